"""Learning-rate schedules: the one mechanism of every scheduled method (SGD, Adam, the torch_optim adapter, K-FAC).

A scheduled method's options derive from ``ScheduleOptions`` (the base rate ``lr`` and the schedule's keys, the same
YAML keys for every method) and its class mixes in ``Scheduled``, which takes the runner's ``configure(total_steps)``
hook and gives ``learning_rate()``, the rate of the current step: ``lr`` times the multiplier m(step) of
``make_schedule``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from optimizers.base import OptimizerOptions
from validation.checks import in_range, nonnegative_int, one_of, option, positive, sequence_of

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


@dataclass(frozen=True)
class ScheduleOptions(OptimizerOptions):
    """A learning-rate schedule: the base rate times a multiplier of the step."""

    lr: float = option(0.1, positive)                       # base learning rate
    schedule: str = option("constant", one_of(*SCHEDULES))  # constant | cosine | linear | step
    warmup_steps: int = option(0, nonnegative_int)          # linear warm-up from lr / warmup_steps
    milestones: list = option([0.5, 0.75], sequence_of(in_range(0, 1)))  # step schedule: fractions of the run
    gamma: float = option(0.1, positive)                    # step schedule: factor at each milestone

    def schedule_kwargs(self) -> dict[str, Any]:
        return dict(name=self.schedule, warmup_steps=self.warmup_steps, milestones=self.milestones, gamma=self.gamma)


class Scheduled:
    """Mixin for an Optimizer whose Options derive from ``ScheduleOptions``: the runner's ``configure`` hook and the
    learning rate of the current step."""

    options: ScheduleOptions
    steps: int
    _multiplier: Callable[[int], float] | None = None

    def configure(self, *, total_steps: int | None = None, monitor=None) -> None:
        super().configure(monitor=monitor)  # type: ignore[misc]  # Optimizer's: the step monitor
        self._multiplier = make_schedule(total_steps=total_steps, **self.options.schedule_kwargs())

    def learning_rate(self) -> float:
        """lr * m(step); without ``configure``, a constant schedule (a decaying one raises "needs total steps")."""
        if self._multiplier is None:
            self.configure(total_steps=None)
        return self.options.lr * self._multiplier(self.steps)
