"""The report's tables: one record per run, one per group (seeds aggregated), Markdown and CSV renderings, the tidy
CSV of every metric row, and a side-by-side "ours vs paper" table for reproductions.

Group aggregates of final and best values are taken over the runs whose status is ok (a diverged run's last
evaluation is not a result); reaching a target is counted over every run of the group, whatever its status.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Iterable

from runner.report import quantities as q
from runner.report.aggregate import group_label, stats
from runner.report.load import STATUSES, Run

# per-run quantity -> (metric, how), aggregated over the ok runs of a group
FINALS = {
    "final_test_accuracy": ("eval/accuracy", "final"),
    "best_test_accuracy": ("eval/accuracy", "best"),
    "final_train_loss": ("train/loss", "final"),
    "final_test_loss": ("eval/loss", "final"),
    "time_per_step": ("step_time", "mean"),
    "mean_cg_iters": ("cg/iters", "mean"),
}


def run_record(run: Run, targets: list[q.Target], by: list[str]) -> dict[str, Any]:
    """Everything the tables say about one run, as plain numbers (None = not logged by this run)."""
    last = run.rows[-1] if run.rows else {}
    record: dict[str, Any] = {"run": run.id, "group": group_label(run, by), "seed": run.seed, "status": run.status,
                              "steps": last.get("step", 0), "wall_time": last.get("wall_time")}
    how = {"final": q.final, "best": q.best, "mean": q.mean}
    for name, (metric, kind) in FINALS.items():
        record[name] = how[kind](run.rows, metric)
    for target in targets:
        row = q.first_reaching(run.rows, target)
        record[f"steps_to {target.label}"] = row.get("step") if row else None
        record[f"time_to {target.label}"] = row.get("wall_time") if row else None
    record["path"] = str(run.path)
    return record


def group_record(label: str, records: list[dict[str, Any]], targets: list[q.Target]) -> dict[str, Any]:
    """One group: status counts, mean/min/max over the ok runs of each final value, and each target's
    mean/min/max over the runs that reached it with how many did."""
    ok = [r for r in records if r["status"] == "ok"]
    group: dict[str, Any] = {"group": label, "runs": len(records)}
    group.update({status: sum(r["status"] == status for r in records) for status in STATUSES})
    for name in [*FINALS, "steps", "wall_time"]:
        _put(group, name, stats([r[name] for r in ok]))
    for target in targets:
        for kind in ("steps_to", "time_to"):
            name = f"{kind} {target.label}"
            _put(group, name, stats([r[name] for r in records]))
            group[f"{name} reached"] = sum(r[name] is not None for r in records)
    return group


def _put(record: dict[str, Any], name: str, summary: dict[str, Any]) -> None:
    for key in ("mean", "min", "max"):
        record[f"{name} {key}"] = summary[key]


def markdown_summary(groups: list[dict[str, Any]], targets: list[q.Target], by: list[str]) -> str:
    """The per-group table: mean [min, max] over seeds."""
    headers = [" / ".join(by), "runs", "final test acc", "best test acc", "final train loss", "steps"]
    for target in targets:
        headers += [f"steps to {target.label}", f"time to {target.label} (s)"]
    headers += ["time/step (ms)", "CG iters/step"]
    lines = []
    for g in groups:
        cells = [g["group"], _status(g), _cell(g, "final_test_accuracy", ".4f"), _cell(g, "best_test_accuracy", ".4f"),
                 _cell(g, "final_train_loss", ".4g"), _cell(g, "steps", ".0f")]
        for target in targets:
            cells += [_target_cell(g, f"steps_to {target.label}", ".0f"),
                      _target_cell(g, f"time_to {target.label}", ".3g")]
        cells += [_cell(g, "time_per_step", ".3g", scale=1e3), _cell(g, "mean_cg_iters", ".1f")]
        lines.append(cells)
    return markdown_table(headers, lines)


def _status(g: dict[str, Any]) -> str:
    parts = [f"{g[s]} {s}" for s in STATUSES if g[s]]
    return ", ".join(parts) or "0"


def _cell(g: dict[str, Any], name: str, fmt: str, scale: float = 1.0) -> str:
    mean, lo, hi = (g[f"{name} {k}"] for k in ("mean", "min", "max"))
    if mean is None:
        return "—"
    text = format(mean * scale, fmt)
    if lo != hi:
        text += f" [{format(lo * scale, fmt)}, {format(hi * scale, fmt)}]"
    return text


def _target_cell(g: dict[str, Any], name: str, fmt: str) -> str:
    reached, runs = g[f"{name} reached"], g["runs"]
    if reached == 0:
        return f"not reached (0/{runs})"
    text = _cell(g, name, fmt)
    return text if reached == runs else f"{text} ({reached}/{runs} reached)"


def markdown_table(headers: list[str], rows: Iterable[list[Any]], align: list[str] | None = None) -> str:
    """A Markdown table; `align` holds one "---" (left) or "---:" (right) per column (default: first left)."""
    def line(cells: list[Any]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    align = align or ["---"] + ["---:"] * (len(headers) - 1)
    return "\n".join([line(headers), line(align), *(line(r) for r in rows)]) + "\n"


def side_by_side(ours: list[dict[str, Any]], paper: dict[str, dict[str, Any]], columns: list[str],
                 key: str = "group", fmt: str = ".4g") -> str:
    """Markdown "ours | paper" for each of `columns`, one line per label of `key` in either table.

    ours: records (e.g. group records; a column may name "final_test_accuracy mean"); paper: label -> {column:
    value}, missing values shown as —. Labels only in the paper (not run here) are listed too.
    """
    by_label = {str(r[key]): r for r in ours}
    labels = list(by_label) + [label for label in paper if label not in by_label]
    headers = [key]
    for column in columns:
        headers += [f"{column} (ours)", f"{column} (paper)"]
    rows = []
    for label in labels:
        cells = [label]
        for column in columns:
            cells += [_plain(by_label.get(label, {}).get(column), fmt), _plain(paper.get(label, {}).get(column), fmt)]
        rows.append(cells)
    return markdown_table(headers, rows)


def _plain(value: Any, fmt: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return format(value, fmt) if math.isfinite(value) else str(value)
    return str(value)


def write_csv(path: Path, records: list[dict[str, Any]]) -> None:
    """CSV with the union of the records' keys as columns (first-seen order); None is written as an empty cell."""
    columns: list[str] = []
    for record in records:
        columns += [k for k in record if k not in columns]
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=columns, restval="")
        writer.writeheader()
        for record in records:
            writer.writerow({k: "" if v is None else v for k, v in record.items()})


def tidy_rows(runs: list[Run], by: list[str]) -> list[dict[str, Any]]:
    """Every metric row of every run, with the run's id, group, by-key values, seed and status in front."""
    out = []
    for run in runs:
        front = {"run": run.id, "group": group_label(run, by), **{k: group_label(run, [k]) for k in by},
                 "seed": run.seed, "status": run.status}
        out.extend({**front, **row} for row in run.rows)
    return out
