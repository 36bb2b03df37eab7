"""Learning-rate schedules as multipliers of the base rate, a function of the step index."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

SCHEDULES = ("constant", "cosine", "linear", "step")


def make_schedule(
    name: str = "constant",
    *,
    total_steps: int | None = None,
    warmup_steps: int = 0,
    milestones: Sequence[float] = (0.5, 0.75),
    gamma: float = 0.1,
    final_scale: float = 0.0,
) -> Callable[[int], float]:
    """Multiplier m(step): linear warm-up over ``warmup_steps``, then constant | cosine | linear decay to
    ``final_scale`` at ``total_steps`` | step decay by ``gamma`` at the given fractions of ``total_steps``."""
    if name not in SCHEDULES:
        raise ValueError(f"optimizer.schedule={name!r} is not one of {list(SCHEDULES)}.")
    if name != "constant" and not total_steps:
        raise ValueError(f"optimizer.schedule={name!r} needs the run's total number of steps (trainer budget).")

    def multiplier(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if name == "constant":
            return 1.0
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if name == "cosine":
            return final_scale + (1 - final_scale) * 0.5 * (1 + math.cos(math.pi * t))
        if name == "linear":
            return 1.0 - (1.0 - final_scale) * t
        return gamma ** sum(step >= m * total_steps for m in milestones)

    return multiplier


# ---------------------------------------------------------------------------------------------- mixin
class Scheduled:
    """Mixin for an Optimizer whose Options derive from ``first_order.ScheduleOptions``: the runner's ``configure``
    hook and the multiplier of the base rate at the current step."""

    _multiplier: Callable[[int], float] | None = None

    def configure(self, *, total_steps: int | None = None) -> None:
        self._multiplier = make_schedule(total_steps=total_steps, **self.options.schedule_kwargs())

    def lr_scale(self) -> float:
        if self._multiplier is None:
            self.configure(total_steps=None)  # constant: fine; a decaying schedule: the "needs total steps" error
        return self._multiplier(self.steps)
