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


# ---------------------------------------------------------------------------------------------- options and mixin
# The schedule's hyperparameters, written once for every method that has a learning rate built on the Options records
# (optimizers.checks); ``Scheduled`` gives such a method the runner's ``configure`` hook and the current multiplier.
from dataclasses import dataclass  # noqa: E402

from optimizers.base import OptimizerOptions  # noqa: E402
from optimizers.checks import in_range, nonnegative_int, one_of, option, positive, sequence_of  # noqa: E402


@dataclass(frozen=True)
class ScheduleOptions(OptimizerOptions):
    """Learning-rate schedule keys (the same names as SGD's and Adam's)."""

    schedule: str = option("constant", one_of(*SCHEDULES))  # lr multiplier: constant | cosine | linear | step
    warmup_steps: int = option(0, nonnegative_int)  # linear warm-up of the rate over this many steps
    milestones: list = option([0.5, 0.75], sequence_of(in_range(0.0, 1.0)))  # step: fractions of the run
    gamma: float = option(0.1, positive)  # step: the rate is multiplied by gamma at each milestone


class Scheduled:
    """Mixin for an Optimizer whose Options derive from ScheduleOptions: ``configure`` and ``lr_scale()``."""

    _multiplier: Callable[[int], float] | None = None

    def configure(self, *, total_steps: int | None = None) -> None:
        o = self.options
        self._multiplier = make_schedule(o.schedule, total_steps=total_steps, warmup_steps=o.warmup_steps,
                                         milestones=o.milestones, gamma=o.gamma)

    def lr_scale(self) -> float:
        """The multiplier of the base rate at the current step (``configure`` first for a decaying schedule)."""
        if self._multiplier is None:
            self.configure(total_steps=None)  # constant: fine; otherwise make_schedule's "needs total steps" error
        return self._multiplier(self.steps)
