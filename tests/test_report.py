"""The report on real run folders made once per session by the real runner (`python run.py` subprocesses): a sweep
of SGD and HF x two seeds on digits, an SGD run that diverges, a sweep with a failing job, and a run killed with
SIGKILL mid-training. Every number in the tables is recomputed here from the metrics files with plain json, sharing
no code with runner/report."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import pytest

from runner.report import build_report, side_by_side
from runner.report.cli import main

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["eval/accuracy=0.5", "train/loss=1e-6"]  # the first is reached by every run, the second by none
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = ["curves_vs_step", "curves_vs_epoch", "curves_vs_samples", "curves_vs_time", "diagnostics_vs_step",
           "cg_stop_reasons"]


def run_py(*args: str, cwd: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "CURVLAB_DEBUG")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    flags = [a for a in args if a.startswith("-")]  # -m goes before the overrides
    overrides = [a for a in args if not a.startswith("-")]
    return subprocess.Popen([sys.executable, str(REPO / "run.py"), *flags, "threads=1", "trainer.progress=false",
                             *overrides],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_after_rows(process: subprocess.Popen, metrics: Path, rows: int, timeout: float = 240.0) -> None:
    """SIGKILL `process` once `metrics` holds at least `rows` lines (what a preempted job leaves behind)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= rows:
            break
        time.sleep(0.1)
    assert process.poll() is None, "the long run ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=30)


@pytest.fixture(scope="session")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report_runs")
    f = {name: root / name for name in ("sweep", "diverged", "failing", "killed")}
    jobs = {
        "sweep": run_py("-m", "optimizer=sgd,hf", "seed=0,1", "trainer.max_epochs=2", "trainer.eval_every=4",
                        f"hydra.sweep.dir={f['sweep']}", cwd=root),
        "diverged": run_py("optimizer=sgd", "optimizer.lr=1e20", "trainer.max_epochs=1",
                           f"hydra.run.dir={f['diverged']}", cwd=root),
        "failing": run_py("-m", "trainer.batching=shuffle,bogus", "trainer.max_steps=3",
                          f"hydra.sweep.dir={f['failing']}", cwd=root),
        "killed": run_py("trainer.max_epochs=100000", "trainer.log_every=1", "trainer.eval_every=5",
                         f"hydra.run.dir={f['killed']}", cwd=root),
    }
    kill_after_rows(jobs["killed"], f["killed"] / "metrics.jsonl", rows=12)
    codes = {name: job.wait(timeout=300) for name, job in jobs.items() if name != "killed"}
    assert codes == {"sweep": 0, "diverged": 3, "failing": 2}, codes
    return f


@pytest.fixture(scope="session")
def report(folders, tmp_path_factory):
    return build_report([folders["sweep"], folders["diverged"]], by=["optimizer"], targets=TARGETS,
                        out=tmp_path_factory.mktemp("report"))


# ---------------------------------------------------------------- ground truth from the files, in plain json


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def truth(run_dir: Path) -> dict:
    rows = rows_of(run_dir)
    evals = [r for r in rows if "eval/accuracy" in r]
    reached = [r for r in evals if r["eval/accuracy"] >= 0.5]
    cg = [r["cg/iters"] for r in rows if "cg/iters" in r]
    return {
        "status": json.loads((run_dir / "summary.json").read_text())["status"],
        "final_test_accuracy": evals[-1]["eval/accuracy"] if evals else None,
        "best_test_accuracy": max(r["eval/accuracy"] for r in evals) if evals else None,
        "final_train_loss": evals[-1]["train/loss"] if evals else None,
        "final_test_loss": evals[-1]["eval/loss"] if evals else None,
        "time_per_step": sum(r["step_time"] for r in rows) / len(rows),
        "mean_cg_iters": sum(cg) / len(cg) if cg else None,
        "steps": rows[-1]["step"],
        "steps_to": reached[0]["step"] if reached else None,
        "time_to": reached[0]["wall_time"] if reached else None,
    }


def sweep_runs(folders, optimizer: str) -> list[Path]:
    found = []
    for job in sorted(p for p in folders["sweep"].iterdir() if p.name.isdigit()):
        if f"optimizer={optimizer}" in (job / ".hydra" / "overrides.yaml").read_text():
            found.append(job)
    assert len(found) == 2
    return found


# ---------------------------------------------------------------- tables


@pytest.mark.parametrize("optimizer", ["sgd", "hf"])
def test_group_numbers_equal_the_metrics_files(report, folders, optimizer):
    group = next(g for g in report.groups if g["group"] == optimizer)
    ok = [truth(d) for d in sweep_runs(folders, optimizer)]
    for name in ("final_test_accuracy", "best_test_accuracy", "final_train_loss", "final_test_loss", "time_per_step"):
        values = [t[name] for t in ok]
        assert group[f"{name} mean"] == pytest.approx(sum(values) / len(values), rel=1e-12), name
        assert (group[f"{name} min"], group[f"{name} max"]) == (min(values), max(values)), name
    if optimizer == "hf":
        assert group["mean_cg_iters mean"] == pytest.approx(sum(t["mean_cg_iters"] for t in ok) / 2, rel=1e-12)
        assert group["mean_cg_iters mean"] > 1
    else:
        assert group["mean_cg_iters mean"] is None
    steps = [t["steps_to"] for t in ok] + ([truth(folders["diverged"])["steps_to"]] if optimizer == "sgd" else [])
    reached = [s for s in steps if s is not None]
    assert group["steps_to eval/accuracy≥0.5 reached"] == len(reached) and group["runs"] == len(steps)
    assert group["steps_to eval/accuracy≥0.5 mean"] == pytest.approx(sum(reached) / len(reached))
    assert group["steps mean"] == 24  # 2 epochs of 12 batches


def test_per_run_records_equal_the_metrics_files(report, folders):
    by_path = {Path(r["path"]): r for r in report.runs}
    for run_dir in sweep_runs(folders, "sgd") + sweep_runs(folders, "hf"):
        record, expected = by_path[run_dir.resolve()], truth(run_dir)
        for name in ("status", "final_test_accuracy", "best_test_accuracy", "final_train_loss", "steps"):
            assert record[name] == expected[name], name
        assert record["steps_to eval/accuracy≥0.5"] == expected["steps_to"]
        assert record["time_to eval/accuracy≥0.5"] == expected["time_to"]


def test_csv_files_hold_the_same_numbers(report):
    with open(report.out / "summary.csv", newline="") as file:
        summary = list(csv.DictReader(file))
    assert [row["group"] for row in summary] == ["sgd", "hf"]
    for row, group in zip(summary, report.groups):
        assert float(row["best_test_accuracy mean"]) == pytest.approx(group["best_test_accuracy mean"], rel=1e-15)
        assert row["steps_to train/loss≤1e-06 mean"] == "" and row["steps_to train/loss≤1e-06 reached"] == "0"
    with open(report.out / "runs.csv", newline="") as file:
        assert len(list(csv.DictReader(file))) == 5


def test_tidy_csv_holds_every_row_of_every_run(report, folders):
    with open(report.out / "rows.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    runs = [*sweep_runs(folders, "sgd"), *sweep_runs(folders, "hf"), folders["diverged"]]
    assert len(rows) == sum(len(rows_of(d)) for d in runs)
    assert {"run", "group", "optimizer", "seed", "status", "step", "loss", "eval/accuracy", "cg/iters"} <= set(rows[0])
    hf = [r for r in rows if r["group"] == "hf"]
    assert all(r["cg/iters"] != "" for r in hf) and all(r["cg/iters"] == "" for r in rows if r["group"] == "sgd")


def test_targets_not_reached_are_shown_as_such(report):
    md = report.markdown
    assert "steps to train/loss≤1e-06" in md and "time to train/loss≤1e-06 (s)" in md
    sgd_line = next(line for line in md.splitlines() if line.startswith("| sgd |"))
    hf_line = next(line for line in md.splitlines() if line.startswith("| hf |"))
    assert sgd_line.count("not reached (0/3)") == 2 and hf_line.count("not reached (0/2)") == 2
    assert sgd_line.count("(2/3 reached)") == 2  # eval/accuracy>=0.5: steps and time; the diverged run never got there


def test_diverged_and_failed_runs_are_counted_and_the_rest_reported(report, folders, tmp_path):
    sgd_line = next(line for line in report.markdown.splitlines() if line.startswith("| sgd |"))
    assert "| 2 ok, 1 diverged |" in sgd_line
    assert "optimizer.lr" in report.markdown  # the diverged run's lr differs: the mixed group is flagged

    failing = build_report([folders["failing"]], out=tmp_path / "failing", formats=[])
    assert [(r["status"], r["steps"]) for r in failing.runs] == [("ok", 3), ("error", 0)]
    assert "| sgd | 1 ok, 1 error |" in failing.markdown


def test_a_killed_run_is_reported_as_interrupted_with_its_rows(folders, tmp_path):
    killed = shutil.copytree(folders["killed"], tmp_path / "killed")
    assert not (killed / "summary.json").exists()
    with open(killed / "metrics.jsonl", "a") as file:
        file.write('{"step": 99999, "loss": 0.')  # a write cut short: skipped, the complete rows are kept
    report = build_report([killed], targets=["eval/accuracy=0.0"], out=tmp_path / "r", xs=["step"], formats=["png"])
    (run,) = report.runs
    complete = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()[:-1]]
    assert run["status"] == "interrupted" and run["steps"] == complete[-1]["step"] >= 12
    assert "| sgd | 1 interrupted |" in report.markdown
    assert "not reached" not in report.markdown  # targets are counted over every run, whatever its status
    assert (tmp_path / "r" / "curves_vs_step.png").is_file()


def test_group_by_several_keys(folders, tmp_path):
    report = build_report([folders["sweep"]], by=["optimizer", "seed"], out=tmp_path / "r", formats=[])
    assert [g["group"] for g in report.groups] == [
        "optimizer=sgd, seed=0", "optimizer=sgd, seed=1", "optimizer=hf, seed=0", "optimizer=hf, seed=1"]
    assert all(g["runs"] == 1 for g in report.groups)
    assert "Warning" not in report.markdown


# ---------------------------------------------------------------- figures


def test_every_figure_exists_as_a_valid_png_and_pdf(report):
    for name in FIGURES:
        png, pdf = report.out / f"{name}.png", report.out / f"{name}.pdf"
        assert png.read_bytes()[:8] == PNG_SIGNATURE, name
        image = matplotlib.image.imread(png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, name
        assert image[..., :3].std() > 0.01, f"{name} is blank"
        assert pdf.read_bytes()[:5] == b"%PDF-", name
    assert {p.name for p in report.files} >= {f"{n}.png" for n in FIGURES}


# ---------------------------------------------------------------- the command line


def test_cli_prints_the_table_and_exits_0(folders, tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "report.py"), str(folders["sweep"]),
                             "--target", "eval/accuracy=0.5", "--x", "step,time", "--formats", "png",
                             "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "| optimizer | runs |" in result.stdout and "| hf | 2 ok |" in result.stdout
    assert (out / "curves_vs_time.png").is_file() and not (out / "curves_vs_epoch.png").exists()
    assert not list(out.glob("*.pdf"))
    assert (out / "summary.md").read_text() in result.stdout


def test_cli_refuses_an_empty_or_foreign_folder_with_exit_2(tmp_path):
    empty, foreign = tmp_path / "empty", tmp_path / "foreign"
    empty.mkdir()
    (foreign / "sub").mkdir(parents=True)
    (foreign / "notes.txt").write_text("not a run")
    (foreign / "sub" / "metrics.jsonl").write_text('{"step": 1}\n')  # no config.yaml: not a curvlab run
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "report.py"), str(empty), str(foreign)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("curvlab report: error: no curvlab runs found under")
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["MISSING_FOLDER"], "is not a folder"),
    (["SWEEP", "--target", "eval/accuracy"], "is not METRIC=VALUE"),
    (["SWEEP", "--by", "optimzer"], "--by optimzer: no run has this config key"),
    (["SWEEP", "--x", "steps"], "--x steps is not an x axis. Choose from: step, epoch, samples, time"),
    (["SWEEP", "--formats", "svg"], "--formats svg is not a figure format. Choose from: png, pdf"),
])
def test_cli_bad_options_exit_2_with_one_paragraph(folders, tmp_path, capsys, args, message):
    args = [a.replace("MISSING_FOLDER", str(tmp_path / "nope")).replace("SWEEP", str(folders["sweep"])) for a in args]
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- ours vs paper


def test_side_by_side_table_puts_paper_values_next_to_ours(report):
    paper = {"hf": {"best_test_accuracy mean": 0.9854}, "curveball": {"best_test_accuracy mean": 0.98}}
    table = side_by_side(report.groups, paper, ["best_test_accuracy mean"])
    lines = table.splitlines()
    assert lines[0] == "| group | best_test_accuracy mean (ours) | best_test_accuracy mean (paper) |"
    hf = next(g for g in report.groups if g["group"] == "hf")
    assert f"| hf | {hf['best_test_accuracy mean']:.4g} | 0.9854 |" in lines
    assert "| sgd | " in table and "| curveball | — | 0.98 |" in lines


def test_runs_without_a_hydra_record_are_grouped_by_their_config_file(folders, tmp_path):
    for optimizer in ("sgd", "hf"):
        copy = shutil.copytree(sweep_runs(folders, optimizer)[0], tmp_path / "runs" / optimizer)
        shutil.rmtree(copy / ".hydra")  # e.g. a run made by runner.train.train(cfg, output_dir) in Python
    report = build_report([tmp_path / "runs"], out=tmp_path / "r", formats=[])
    assert [g["group"] for g in report.groups] == ["hf", "sgd"]  # conf/optimizer/hf.yaml, not "hessianfree"


def test_a_group_whose_runs_share_no_wall_clock_range_is_still_drawn():
    # One run's first step took longer than the other run's whole training (a load spike on a shared machine): no
    # common time range, so no mean band; the group must still appear, each run drawn alone.
    from runner.report.load import Run
    from runner.report.plots import plot_curves

    def rows(t0):
        return [{"step": s, "wall_time": t0 + 0.1 * s, "loss": 1.0 / s} for s in range(1, 6)]

    runs = [Run(Path(f"r{i}"), {}, {}, {"status": "ok"}, rows(t0), "ok") for i, t0 in enumerate((0.0, 5.0))]
    fig = plot_curves({"curveball": runs}, "time")
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["curveball (n=2, each run alone)"]
    assert [list(line.get_xdata()) for line in fig.axes[0].lines] == [[0.1 * s + t0 for s in range(1, 6)]
                                                                      for t0 in (0.0, 5.0)]
