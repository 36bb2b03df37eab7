"""`python scripts/report.py <run or sweep folders...>`: tables and plots from run folders.

    python scripts/report.py outputs/multirun/2026-11-26_10-00-00
    python scripts/report.py outputs/multirun/A outputs/2026-11-26/11-00-00 --by optimizer,model.hidden \
        --target eval/accuracy=0.97 --target train/loss=0.05 --x step,time --out my_report

Writes into --out (default: <first folder>/report): summary.md and summary.csv (one line per group), runs.csv (one
line per run), rows.csv (every metric row of every run), and the figures of runner/report/plots.py. Prints the
Markdown table. Exit codes: 0 ok; 2 nothing to report or bad options (one paragraph on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from runner.report import quantities as q
from runner.report.aggregate import group_runs, mixed_keys, unknown_keys
from runner.report.load import ReportError, find_runs
from runner.report.plots import FORMATS, X_AXES, plot_all
from runner.report.tables import group_record, markdown_summary, run_record, tidy_rows, write_csv

EXIT_OK, EXIT_USER_ERROR = 0, 2


@dataclass
class Report:
    out: Path
    markdown: str  # summary.md's content
    groups: list[dict] = field(default_factory=list)  # group records (summary.csv)
    runs: list[dict] = field(default_factory=list)  # run records (runs.csv)
    files: list[Path] = field(default_factory=list)  # every file written


def build_report(paths: list[str | Path], by: list[str] | None = None, targets: list[str] | None = None,
                 out: str | Path | None = None, xs: list[str] | None = None,
                 formats: list[str] | None = None) -> Report:
    """Read the runs under `paths`, group them, write the tables and figures into `out`. Raises ReportError."""
    by = by or ["optimizer"]
    xs = xs or list(X_AXES)
    formats = formats if formats is not None else list(FORMATS)
    bad = [x for x in xs if x not in X_AXES]
    if bad:
        raise ReportError(f"--x {','.join(bad)} is not an x axis. Choose from: {', '.join(X_AXES)}.")
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ReportError(f"--formats {','.join(bad)} is not a figure format. Choose from: {', '.join(FORMATS)}.")
    try:
        parsed = [q.parse_target(t) for t in targets or []]
    except ValueError as exc:
        raise ReportError(str(exc)) from None
    runs = find_runs(list(paths))
    missing = unknown_keys(runs, by)
    if missing:
        raise ReportError(f"--by {','.join(missing)}: no run has this config key. Use a config-group name "
                          f"(optimizer, model, dataset, ...) or a dotted key of config.yaml, e.g. optimizer.lr.")
    out = Path(out) if out is not None else Path(paths[0]) / "report"
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs, by)
    run_records = [run_record(run, parsed, by) for run in runs]
    group_records = [group_record(label, [r for r in run_records if r["group"] == label], parsed) for label in groups]
    markdown = markdown_summary(group_records, parsed, by) + _notes(groups, by)
    report = Report(out, markdown, group_records, run_records)
    (out / "summary.md").write_text(markdown, encoding="utf-8")
    write_csv(out / "summary.csv", group_records)
    write_csv(out / "runs.csv", run_records)
    write_csv(out / "rows.csv", tidy_rows(runs, by))
    report.files = [out / name for name in ("summary.md", "summary.csv", "runs.csv", "rows.csv")]
    report.files += plot_all(groups, out, xs, tuple(formats), by=by)
    return report


def _notes(groups: dict, by: list[str]) -> str:
    lines = ["", "Mean [min, max] over the runs of each group. Final and best values and time per step: over the ok "
             "runs; targets: over all runs (time = summed optimiser step times, evaluation excluded)."]
    for label, runs in groups.items():
        mixed = mixed_keys(runs)
        if mixed:
            shown = ", ".join(mixed[:6]) + (" ..." if len(mixed) > 6 else "")
            lines.append(f"Warning: group {label} mixes configurations that differ in {shown}; add them to --by "
                         f"(e.g. --by {','.join(by + mixed[:1])}) to separate them.")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="report.py", description="Tables and plots from curvlab run and sweep folders (local files only).")
    parser.add_argument("folders", nargs="+", help="run folders and/or sweep folders (searched recursively)")
    parser.add_argument("--by", default="optimizer",
                        help="comma-separated config keys to group runs by (default: optimizer, its Hydra choice)")
    parser.add_argument("--target", action="append", default=[], metavar="METRIC=VALUE",
                        help="steps and wall-clock to reach it, e.g. eval/accuracy=0.98 or train/loss=0.05 "
                             "(repeatable)")
    parser.add_argument("--out", default=None, help="output folder (default: <first folder>/report)")
    parser.add_argument("--x", default=",".join(X_AXES), help=f"x axes of the curves (default: {','.join(X_AXES)})")
    parser.add_argument("--formats", default=",".join(FORMATS),
                        help=f"figure formats (default: {','.join(FORMATS)}; empty for tables only)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    split = lambda text: [part.strip() for part in text.split(",") if part.strip()]  # noqa: E731
    try:
        report = build_report(args.folders, split(args.by), args.target, args.out, split(args.x), split(args.formats))
    except (ReportError, OSError) as exc:
        if os.environ.get("CURVLAB_DEBUG", "") not in ("", "0"):
            raise
        print(f"curvlab report: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(report.markdown)
    print(f"curvlab report: {len(report.runs)} runs in {len(report.groups)} groups; tables and figures in "
          f"{report.out.resolve()}")
    return EXIT_OK
