"""scripts/seed003_table1.py: seed 003 Table 1's iterations to tolerance, counted from real run folders.

The end-to-end test runs the script (real `python run.py -m` sweeps) on two seeds of one stochastic column and checks
its counts against the metrics files, read here without the report's code.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

from runner.seeds import seed003_table1 as table1


def test_mean_std_counts_the_runs_that_reached():
    assert table1.mean_std([10, 12, 14]) == "12.0 ± 2.0"  # sample standard deviation (n - 1)
    assert table1.mean_std([7]) == "7.0 ± 0.0"
    assert table1.mean_std([10, None, 14]) == "12.0 ± 2.8 (2/3)"
    assert table1.mean_std([None, None]) == "not reached (0/2)"


def test_table_puts_the_papers_numbers_beside_ours():
    text = table1.table({"rosenbrock_u03": {"curveball": [13, 15]}, "rahimi_recht": {"sgd": [90]}},
                        ["curveball", "sgd"])
    lines = text.splitlines()
    assert lines[0] == "| method | U[0,3] (ours) | U[0,3] (paper) | Rahimi & Recht (ours) | Rahimi & Recht (paper) |"
    assert lines[2] == "| CurveBall | 14.0 ± 1.4 | 13 ± 1 | — | 35 ± 11 |"
    assert lines[3] == "| SGD + momentum | — | 4069 ± 565 | 90.0 ± 0.0 | 95 ± 2 |"


def test_bad_options_exit_2_with_the_valid_choices(tmp_path, capsys):
    assert table1.main(["--out", str(tmp_path), "--columns", "rosenbrok_u01", "--report-only"]) == 2
    assert "--columns rosenbrok_u01 is not valid. Choose from: rosenbrock_det" in capsys.readouterr().err
    assert table1.main(["--out", str(tmp_path), "--methods", "lbfgs"]) == 2
    assert "--methods lbfgs is not valid. Choose from: sgd, adam, lm, bfgs, newton, curveball." in \
        capsys.readouterr().err
    assert table1.main(["--out", str(tmp_path), "--runs", "0"]) == 2


def first_step_below(run: Path, tol: float) -> int | None:
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "eval/loss" in row and row["eval/loss"] <= tol:
            return row["step"]
    return None


@pytest.mark.slow
def test_counts_equal_the_metrics_files(tmp_path):
    out = tmp_path / "t1"
    command = [sys.executable, str(REPO / "scripts" / "seed003_table1.py"), "--runs", "2", "--columns",
               "rosenbrock_u01", "--methods", "newton,lm", "--tol", "1e-3", "--out", str(out),
               "trainer.max_steps=40", "threads=1"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = {}
    for run in sorted((out / "rosenbrock_u01").glob("[0-9]*")):
        overrides = (run / ".hydra" / "overrides.yaml").read_text()
        method = "newton" if "_newton" in overrides else "lm"
        steps.setdefault(method, []).append(first_step_below(run, 1e-3))
    assert {m: len(s) for m, s in steps.items()} == {"newton": 2, "lm": 2}
    assert all(s is not None and s > 1 for s in steps["newton"] + steps["lm"])
    table = (out / "table1.md").read_text()
    for method, label in (("newton", "Exact Hessian"), ("lm", "Levenberg-Marquardt")):
        mean, std = statistics.fmean(steps[method]), statistics.stdev(steps[method])
        assert f"| {label} | {mean:.1f} ± {std:.1f} | " in table
    assert table in done.stdout
