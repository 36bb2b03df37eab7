"""The value a hyperparameter sweeper optimises: run.py's task function returns `objective_value(cfg.tune, ...)`.

    tune.metric     a column of metrics.jsonl: eval/accuracy, eval/loss, train/loss, loss, ...
    tune.objective  best (best value over the run) | final (last value) | steps_to_target | time_to_target
                    (optimiser steps / seconds of summed step time until the metric first reaches tune.target)
    tune.mode       auto | max | min: which way the metric improves (auto: max for accuracies, min otherwise)
    tune.target     the value to reach, for the *_to_target objectives

`best` and `final` are maximised when the metric improves upwards and minimised otherwise; `*_to_target` are always
minimised. The sweeper must be told the same direction (`hydra.sweeper.direction`; conf/search/ and scripts/tune.py
set it): `check` refuses a mismatch before training. A run that diverged returns the worst value (-inf when
maximising, +inf when minimising), a target never reached +inf, and a run that does not log the metric None, which
hydra-optuna-sweeper records as a failed trial. The numbers come from runner.report.quantities, so the report's
tables and the tuned value agree.

`RecordObjective` (a Hydra callback, enabled by conf/hydra/sweeper/curvlab_optuna.yaml) refuses bad tune.* values
before the first trial, and writes what the task function returned into each trial's folder as objective.json.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from runner.report import quantities as q
from runner.report.load import read_rows

OBJECTIVES = ("best", "final", "steps_to_target", "time_to_target")
MODES = ("auto", "max", "min")


def metric_mode(tune: Any) -> str:
    return q.better(tune.metric) if tune.mode == "auto" else tune.mode


def direction(tune: Any) -> str:
    """The direction the sweeper must optimise in: "maximize" or "minimize"."""
    if tune.objective in ("steps_to_target", "time_to_target"):
        return "minimize"
    return "maximize" if metric_mode(tune) == "max" else "minimize"


def check(tune: Any, sweeper: Any = None) -> None:
    """Refuse bad tune.* values, and a sweeper direction that does not match them, with one paragraph."""
    if tune.objective not in OBJECTIVES:
        raise ValueError(
            f"tune.objective={tune.objective} is not an objective. Choose one of: {', '.join(OBJECTIVES)}.")
    if tune.mode not in MODES:
        raise ValueError(f"tune.mode={tune.mode} is not a mode. Choose one of: {', '.join(MODES)}.")
    if not tune.metric:
        raise ValueError("tune.metric is empty: name a column of metrics.jsonl, e.g. tune.metric=eval/accuracy.")
    if tune.objective.endswith("_to_target") and (tune.target is None or not math.isfinite(tune.target)):
        raise ValueError(f"tune.objective={tune.objective} needs tune.target=<the value of {tune.metric} to reach>, "
                         f"e.g. tune.target=0.97.")
    wanted = getattr(sweeper, "direction", None) if sweeper is not None else None
    if wanted is None:
        return  # a sweeper without a direction (the basic one) ignores the returned value
    wanted = getattr(wanted, "name", wanted)
    if wanted != direction(tune):
        raise ValueError(
            f"hydra.sweeper.direction={wanted}, but the objective (tune.objective={tune.objective} of "
            f"tune.metric={tune.metric}, mode {metric_mode(tune)}) must be {direction(tune)}d. Set "
            f"hydra.sweeper.direction={direction(tune)} (scripts/tune.py sets it for you)."
        )


def objective_value(tune: Any, run_dir: str | Path, status: str) -> float | None:
    """The tuning objective of the finished run in `run_dir` (see the module docstring)."""
    worst = -math.inf if direction(tune) == "maximize" else math.inf
    if status == "diverged":
        return worst
    rows = read_rows(Path(run_dir) / "metrics.jsonl")
    if not q.values(rows, tune.metric):
        return None
    if tune.objective == "best":
        value = q.best(rows, tune.metric, metric_mode(tune))
    elif tune.objective == "final":
        value = q.final(rows, tune.metric)
    else:
        row = q.first_reaching(rows, q.Target(tune.metric, float(tune.target), metric_mode(tune)))
        value = None if row is None else row["step" if tune.objective == "steps_to_target" else "wall_time"]
        return math.inf if value is None else float(value)
    return worst if value is None or math.isnan(value) else float(value)


class RecordObjective(Callback):
    """Checks tune.* against the sweeper before the first trial, and writes each job's returned objective into its
    folder as objective.json (what the sweeper was told)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check(config.tune, config.hydra.sweeper)
        except ValueError as exc:  # Hydra turns a callback's exception into a warning: stop here instead
            print(f"curvlab: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        out = Path(job_return.hydra_cfg.hydra.runtime.output_dir) if job_return.hydra_cfg else None
        if out is None or not out.is_dir():
            return
        value = job_return.return_value if job_return.status == JobStatus.COMPLETED else None
        tune = config.get("tune")
        record = {"value": value, "direction": direction(tune) if tune else None,
                  "tune": dict(tune) if tune else None, "overrides": list(job_return.overrides or [])}
        (out / "objective.json").write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
        if value is None and tune is not None and _status(out) == "ok":
            print(f"curvlab: warning: {out} logged no {tune.metric} (tune.metric); the sweeper counts this trial as "
                  f"failed. Choose a column of its metrics.jsonl, e.g. tune.metric=eval/loss.", file=sys.stderr)


def _status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "summary.json").read_text(encoding="utf-8")).get("status")
    except (OSError, ValueError):
        return None
