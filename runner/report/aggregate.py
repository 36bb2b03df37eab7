"""Grouping runs by config keys and aggregating their seeds (mean and min-max band).

`--by optimizer,model.hidden` groups by the Hydra choice of the optimizer group and the value of model.hidden; the
runs of one group are normally the seeds of one configuration. `mixed_keys` names any other config key that differs
inside a group, so that a report never averages two configurations silently.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from typing import Any

import numpy as np

from runner.report.load import Run, is_missing

_NOT_CONFIG = {  # run-time settings that do not change the results
    "seed", "data_root", "dataset.root", "threads", "device", "logger", "trainer.progress", "trainer.log_every",
    "trainer.eval_batch_size", "trainer.num_workers", "trainer.checkpoint", "tune",
}


def group_label(run: Run, by: list[str]) -> str:
    """`hf` for one key; `optimizer=hf, model.hidden=[64]` for several."""
    parts = [(key, _text(run.get(key))) for key in by]
    return parts[0][1] if len(parts) == 1 else ", ".join(f"{k}={v}" for k, v in parts)


def group_runs(runs: list[Run], by: list[str]) -> "OrderedDict[str, list[Run]]":
    groups: OrderedDict[str, list[Run]] = OrderedDict()
    for run in runs:
        groups.setdefault(group_label(run, by), []).append(run)
    return groups


def unknown_keys(runs: list[Run], by: list[str]) -> list[str]:
    """The `by` keys that no run has (a misspelling, most likely)."""
    return [key for key in by if all(is_missing(run.get(key)) for run in runs)]


def mixed_keys(runs: list[Run]) -> list[str]:
    """Config keys (besides seeds and run-time settings) whose values differ between the runs of one group."""
    flat = [_flatten(run.config) for run in runs]
    keys = sorted(set().union(*flat)) if flat else []
    mixed = []
    for key in keys:
        if key in _NOT_CONFIG or key.split(".")[0] in _NOT_CONFIG or key.endswith(".seed"):
            continue
        if len({json.dumps(f.get(key), sort_keys=True, default=str) for f in flat}) > 1:
            mixed.append(key)
    return mixed


def stats(values: list[float | None]) -> dict[str, Any]:
    """mean / min / max over the finite values, and how many there were."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": None, "min": None, "max": None, "n": 0}
    return {"mean": sum(finite) / len(finite), "min": min(finite), "max": max(finite), "n": len(finite)}


def band(curves: list[tuple[np.ndarray, np.ndarray]], max_points: int = 1000):
    """Mean, min and max over seeds of curves y(x), on a common grid.

    curves: one (x, y) pair per run, x increasing, y finite. When every run has the same x (steps, epochs, samples
    of one configuration) the grid is that x and nothing is interpolated; otherwise (wall-clock) the grid spans the
    range that every run covers and each curve is linearly interpolated onto it. Returns (grid, mean, lo, hi).
    """
    curves = [(x, y) for x, y in curves if len(x)]
    if not curves:
        return (np.empty(0),) * 4
    first = curves[0][0]
    if all(len(x) == len(first) and np.array_equal(x, first) for x, _ in curves):
        grid = first
        ys = np.stack([y for _, y in curves])
    else:
        lo, hi = max(x[0] for x, _ in curves), min(x[-1] for x, _ in curves)
        grid = np.unique(np.concatenate([x[(x >= lo) & (x <= hi)] for x, _ in curves]))
        if len(grid) > max_points:
            grid = np.linspace(lo, hi, max_points)
        ys = np.stack([np.interp(grid, x, y) for x, y in curves])
    return grid, ys.mean(axis=0), ys.min(axis=0), ys.max(axis=0)


def curve(run: Run, y: str, x: str) -> tuple[np.ndarray, np.ndarray]:
    """The finite (x, y) points of one run, x increasing."""
    pairs = [(row[x], row[y]) for row in run.rows if _finite(row.get(x)) and _finite(row.get(y))]
    if not pairs:
        return np.empty(0), np.empty(0)
    xs, ys = np.asarray(pairs, dtype=float).T
    order = np.argsort(xs, kind="stable")
    return xs[order], ys[order]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(_flatten(value, f"{prefix}{key}." if isinstance(value, dict) else f"{prefix}{key}"))
    return flat


def _text(value: Any) -> str:
    if is_missing(value):
        return "—"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)
