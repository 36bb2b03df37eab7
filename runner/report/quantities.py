"""What one run achieved, read from its metric rows: final and best values, and when it first reached a target.

Shared by the report's tables and by the tuning objective (runner/tuning.py), so that a number in a table and the
value a sweeper optimised are the same number. A metric is taken from the rows that carry it: eval/* and train/loss
from evaluation rows, the method statistics (loss, cg/iters, ...) from every step.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

Row = dict[str, Any]


def better(metric: str) -> str:
    """Which way a metric improves: "max" for accuracies, "min" for everything else (losses, errors, times)."""
    return "max" if "accuracy" in metric else "min"


@dataclass(frozen=True)
class Target:
    """`metric` reaching `value`: at least `value` when mode is "max", at most `value` when mode is "min"."""

    metric: str
    value: float
    mode: str

    def reached(self, value: float) -> bool:
        return value >= self.value if self.mode == "max" else value <= self.value

    @property
    def label(self) -> str:
        return f"{self.metric}{'≥' if self.mode == 'max' else '≤'}{self.value:g}"


def parse_target(text: str) -> Target:
    """`eval/accuracy=0.98` (the direction from `better`), or explicit `eval/loss<=0.1` / `eval/accuracy>=0.9`."""
    match = re.fullmatch(r"\s*([^<>=\s]+)\s*(>=|<=|=)\s*(\S+)\s*", text)
    value = _float(match.group(3)) if match else None
    if match is None or value is None or not math.isfinite(value):
        raise ValueError(
            f"--target {text!r} is not METRIC=VALUE. Examples: --target eval/accuracy=0.98 (reached when at least "
            f"0.98), --target train/loss=0.05 (at most 0.05), or explicit --target 'eval/loss<=0.1'."
        )
    metric, op = match.group(1), match.group(2)
    mode = {"=": better(metric), ">=": "max", "<=": "min"}[op]
    return Target(metric, value, mode)


def values(rows: list[Row], metric: str) -> list[tuple[Row, float]]:
    """(row, value) for every row that holds `metric` as a number (NaN and infinities included)."""
    return [(row, float(row[metric])) for row in rows if _is_number(row.get(metric))]


def final(rows: list[Row], metric: str) -> float | None:
    found = values(rows, metric)
    return found[-1][1] if found else None


def best(rows: list[Row], metric: str, mode: str | None = None) -> float | None:
    """The best finite value of `metric` (max or min by `mode`, default `better(metric)`)."""
    finite = [v for _, v in values(rows, metric) if math.isfinite(v)]
    if not finite:
        return None
    return max(finite) if (mode or better(metric)) == "max" else min(finite)


def mean(rows: list[Row], metric: str) -> float | None:
    finite = [v for _, v in values(rows, metric) if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def first_reaching(rows: list[Row], target: Target) -> Row | None:
    """The first row at which `target.metric` reaches the target, or None if it never does."""
    for row, value in values(rows, target.metric):
        if math.isfinite(value) and target.reached(value):
            return row
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None
