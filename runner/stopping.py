"""Ending a run before its step budget: a wall-clock budget and a target, checked at a step boundary.

    trainer.max_time_minutes  stop once the optimiser steps took M minutes: `wall_time` of metrics.jsonl, the summed
                              step times, without evaluation, logging and checkpoints (AlgoPerf's budget also leaves
                              evaluation out, Dahl et al. 2023 sec. 4). The step that crosses the budget is evaluated
                              and is the last one, so the curve ends with an evaluation.
    trainer.stop_at_target    METRIC:VALUE (eval/accuracy:0.97, eval/loss:0.012; METRIC=VALUE too, quoted on the
                              command line; the direction as in the report's --target, runner/report/quantities.py:
                              at least VALUE for accuracies, at most VALUE otherwise): stop after the evaluation that
                              first reaches it (AlgoPerf stops a run at its validation target).

Either ends the run with status ok; summary.json's `stop_reason` says which rule ended it (it names the rule's key
first, then what was measured), or names the step/epoch budget when that ended it. Every rank takes the same
decision (runner/distributed.py: any_rank), so a data-parallel run stops at the same step everywhere.
"""

from __future__ import annotations

import math
from typing import Any

from runner.distributed import any_rank
from runner.report import quantities as q


class StopRules:
    def __init__(self, max_time_minutes: float | None = None, stop_at_target: str | None = None) -> None:
        if max_time_minutes is not None and not (isinstance(max_time_minutes, (int, float))
                                                 and math.isfinite(max_time_minutes) and max_time_minutes > 0):
            shown = f"{max_time_minutes:g}" if isinstance(max_time_minutes, (int, float)) else max_time_minutes
            raise ValueError(f"trainer.max_time_minutes={shown} must be a positive number of minutes (or null for no "
                             f"wall-clock budget).")
        self.minutes = max_time_minutes
        self.target: q.Target | None = None
        if stop_at_target is not None:
            text = str(stop_at_target)
            if "=" not in text and ":" in text:  # METRIC:VALUE, the form Hydra's command line takes unquoted
                text = "=".join(text.rsplit(":", 1))
            try:
                self.target = q.parse_target(text)
            except ValueError:
                raise ValueError(f"trainer.stop_at_target={stop_at_target} is not METRIC:VALUE. Examples: "
                                 f"trainer.stop_at_target=eval/accuracy:0.97 (stop once at least 0.97), "
                                 f"trainer.stop_at_target=eval/loss:0.012 (at most 0.012).") from None

    @classmethod
    def from_trainer(cls, trainer: Any) -> StopRules:
        return cls(trainer.get("max_time_minutes"), trainer.get("stop_at_target"))

    def check_metric(self, classification: bool) -> None:
        """Refuse a target on a metric that evaluation never logs (before the first step)."""
        if self.target is None:
            return
        logged = ["eval/loss", "train/loss"] + (["eval/accuracy"] if classification else [])
        if self.target.metric not in logged:
            raise ValueError(f"trainer.stop_at_target names {self.target.metric}, which this run's evaluation does "
                             f"not log. Choose one of: {', '.join(logged)}.")

    def out_of_time(self, wall_time: float) -> str | None:
        """The stop reason when the wall-clock budget is spent (collective when a budget is set: every rank calls)."""
        if self.minutes is None:
            return None
        (spent,) = any_rank(wall_time >= 60.0 * self.minutes)
        if not spent:
            return None
        return f"trainer.max_time_minutes={self.minutes:g}: {wall_time:.1f} s of optimiser steps"

    def reached(self, last_eval: dict[str, float], step: int) -> str | None:
        """The stop reason when the latest evaluation (identical on every rank) reached the target."""
        if self.target is None:
            return None
        value = last_eval.get(self.target.metric)
        if value is None or not math.isfinite(value) or not self.target.reached(value):
            return None
        return f"trainer.stop_at_target={self.target.metric}:{self.target.value:g}: {value:.6g} at step {step}"
