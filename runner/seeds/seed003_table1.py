"""Seed 003 Table 1 (Henriques et al. 2019, Small steps and giant leaps, sec. 4): iterations to tolerance, mean and
standard deviation over runs, beside the paper's numbers.

    python scripts/seed003_table1.py --runs 20 --out outputs/seed003_table1 threads=1
    python scripts/seed003_table1.py --runs 20 --out outputs/seed003_table1 --report-only
    python scripts/seed003_table1.py --methods curveball --columns rosenbrock_u01 --out outputs/cb1 optimizer.damping=1

For each column (rosenbrock_det, rosenbrock_u01, rosenbrock_u03, rahimi_recht) it runs the experiment files
conf/experiment/seed003_table1_<column>_<method>.yaml on seeds 0 .. runs-1 (one `python run.py -m` sweep per column,
evaluating every step), into <out>/<column>/. An iteration count is the number of optimiser steps after which the
held-out loss (eval/loss: the mean of eq. 19 over the test split's noise samples, or the Rahimi & Recht test error)
is at most --tol for the first time: the report's "steps to eval/loss<=tol" (runner/report). The seed says "iterates
taken to reach the solution, with a tolerance of 1e-4" without naming the quantity; a loss is the only one that
applies to both problems (the Rahimi & Recht minimisers form a manifold). Writes <out>/table1.md and prints it.
Exit codes: 0 ok; 2 bad options or a column that could not run.
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

from runner.report.cli import build_report
from runner.report.load import ReportError
from runner.report.tables import markdown_table

EXIT_OK, EXIT_USER_ERROR = 0, 2
COLUMNS = {"rosenbrock_det": "Deterministic", "rosenbrock_u01": "U[0,1]", "rosenbrock_u03": "U[0,3]",
           "rahimi_recht": "Rahimi & Recht"}
METHODS = {"sgd": "SGD + momentum", "adam": "Adam", "lm": "Levenberg-Marquardt", "bfgs": "BFGS",
           "newton": "Exact Hessian", "curveball": "CurveBall"}
# Seed 003 Table 1: mean +- standard deviation of the iterations to tolerance over 100 runs, column by column.
PAPER = {
    "sgd": ((370, 40), (846, 217), (4069, 565), (95, 2)),
    "adam": ((799, 160.5), (1290, 476), (2750, 257), (95, 5)),
    "lm": ((16, 4), (14, 3), (17, 4), (9, 4)),
    "bfgs": ((19, 4), (44, 21), (63, 29), (43, 21)),
    "newton": ((14, 1), (10, 3), (17, 4), (9, 0.5)),
    "curveball": ((13, 0.5), (12, 1), (13, 1), (35, 11)),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="seed003_table1.py", description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="key=value overrides for every run (e.g. threads=1)")
    p.add_argument("--runs", type=int, default=20, help="seeds 0 .. runs-1 per method and column (the seed: 100)")
    p.add_argument("--tol", type=float, default=1e-4, help="the tolerance on eval/loss (the seed's tau = 1e-4)")
    p.add_argument("--columns", default=",".join(COLUMNS), help="comma-separated columns")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods (file suffixes)")
    p.add_argument("--out", required=True, help="output folder: one sweep folder per column, and table1.md")
    p.add_argument("--report-only", action="store_true", help="count from existing sweep folders, run nothing")
    return p.parse_args(argv)


def _choices(text: str, valid: dict[str, str], option: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in valid]
    if not names or bad:
        raise ReportError(f"{option} {','.join(bad) or '(none)'} is not valid. Choose from: {', '.join(valid)}.")
    return names


def run_column(column: str, methods: list[str], runs: int, out: Path, overrides: list[str]) -> None:
    """One sweep: every method's experiment file x seeds 0 .. runs-1, evaluated every step, into out/column."""
    files = ",".join(f"seed003_table1_{column}_{m}" for m in methods)
    command = [sys.executable, str(ROOT / "run.py"), "-m", f"experiment={files}", f"seed=range(0,{runs})",
               "trainer.eval_every=1", "trainer.checkpoint=false", "trainer.progress=false",
               f"hydra.sweep.dir={out / column}", *overrides]
    print("+", " ".join(command[1:]), flush=True)
    code = subprocess.run(command, cwd=ROOT).returncode
    if code not in (0, 3):  # 3: a run diverged, which is a result (never reached)
        raise ReportError(f"the sweep of column {column} exited with code {code}; see its output above.")


def count(column_dir: Path, tol: float) -> dict[str, list[int | None]]:
    """method -> the iterations to eval/loss <= tol of each run (None: never reached), via the report."""
    target = f"eval/loss<={tol:g}"
    report = build_report([column_dir], by=["experiment"], targets=[target], formats=[])
    column_key = next(k for k in report.runs[0] if k.startswith("steps_to "))
    counts: dict[str, list[int | None]] = {}
    for record in report.runs:
        method = str(record["group"]).rsplit("_", 1)[-1]
        counts.setdefault(method, []).append(record[column_key])
    return counts


def mean_std(steps: list[int | None]) -> str:
    """`mean ± std (reached/runs)` over the runs that reached the tolerance; std with n - 1 (0 for one run)."""
    reached = [s for s in steps if s is not None]
    if not reached:
        return f"not reached (0/{len(steps)})"
    std = statistics.stdev(reached) if len(reached) > 1 else 0.0
    text = f"{statistics.fmean(reached):.1f} ± {std:.1f}"
    return text if len(reached) == len(steps) else f"{text} ({len(reached)}/{len(steps)})"


def table(counts: dict[str, dict[str, list[int | None]]], methods: list[str]) -> str:
    """Rows: methods; per column two cells, ours (mean ± std) and the paper's."""
    headers = ["method"]
    for column in counts:
        headers += [f"{COLUMNS[column]} (ours)", f"{COLUMNS[column]} (paper)"]
    rows = []
    for method in methods:
        cells = [METHODS[method]]
        for column, by_method in counts.items():
            mean, std = PAPER[method][list(COLUMNS).index(column)]
            cells += [mean_std(by_method.get(method, [])) if method in by_method else "—", f"{mean:g} ± {std:g}"]
        rows.append(cells)
    return markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        columns = _choices(args.columns, COLUMNS, "--columns")
        methods = _choices(args.methods, METHODS, "--methods")
        if args.runs < 1 or not (math.isfinite(args.tol) and args.tol > 0):
            raise ReportError(f"--runs {args.runs} must be >= 1 and --tol {args.tol} a finite number > 0.")
        out = Path(args.out).resolve()
        counts = {}
        for column in columns:
            if not args.report_only:
                run_column(column, methods, args.runs, out, args.overrides)
            counts[column] = count(out / column, args.tol)
    except ReportError as exc:
        print(f"seed003_table1: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    text = table(counts, methods)
    (out / "table1.md").write_text(text, encoding="utf-8")
    print(text)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
