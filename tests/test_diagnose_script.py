"""scripts/diagnose.py end to end: train a tiny run with run.py, then diagnose its folder (real Hydra, real files)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_diagnose_a_run_folder(tmp_path):
    folder = tmp_path / "run"
    trained = run([str(ROOT / "run.py"), "model.hidden=[8]", "model.activation=tanh", "trainer.max_epochs=1",
                   "threads=1", "trainer.progress=false", f"hydra.run.dir={folder}"], tmp_path)
    assert trained.returncode == 0, trained.stderr
    done = run([str(ROOT / "scripts/diagnose.py"), str(folder), "spectrum", "taylor", "surface", "full",
                "--batch-size", "200", "--k", "2", "--grid", "5", "--dtype", "float64", "--power", "30",
                "--taylor-directions", "random,ones,top"], tmp_path)
    assert done.returncode == 0, done.stderr
    out = folder / "diagnostics"
    for name in ("spectrum.png", "taylor.png", "taylor_ones.png", "taylor_top.png", "surface_contour.png",
                 "surface_3d.png", "full_spectrum.png"):
        assert (out / name).stat().st_size > 1000
    report = json.loads((out / "diagnostics.json").read_text())
    assert report["weights"] == "checkpoint" and report["batch_size"] == 200 and report["dtype"] == "float64"
    # The figures' titles say what was diagnosed (not the run folder's name, a job number in a sweep).
    assert report["label"].startswith("digits + mlp trained by sgd, weights at step 12, 200 training samples")
    assert report["hvp_check"]["relative"] < 1e-13                # H s explicitly against the product (seed 000)
    power, lanczos = report["hessian_top_power"]["eigenvalues"], report["hessian_top"]["eigenvalues"]
    assert power[0] == pytest.approx(lanczos[0], rel=1e-4) and report["hessian_top_power"]["cost"]["products"] == 60
    full = report["full_spectrum"]["eigenvalues"]                  # explicit Hessian: the extremes agree with Lanczos
    assert abs(report["hessian_top"]["eigenvalues"][0] - full[-1]) < 1e-8 * max(1.0, abs(full[-1]))
    assert abs(report["hessian_bottom"]["eigenvalues"][0] - full[0]) < 1e-8 * max(1.0, abs(full[-1]))
    assert abs(report["taylor_top"]["slopes"][2] - 3) < 0.15
    surface = report["surface"]
    assert abs(surface["losses"][2][2] - report["loss"]) < 1e-12   # the grid's centre is the batch loss


@pytest.mark.slow
def test_init_weights_are_the_runs_initial_weights(tmp_path):
    """A run whose one SGD step cannot move a float64 weight (lr 1e-300): its checkpoint holds the initial weights,
    so --weights init (rebuilt from the run's seed) and --weights checkpoint diagnose the same loss, bit for bit."""
    folder = tmp_path / "run"
    trained = run([str(ROOT / "run.py"), "model.hidden=[8]", "dtype=float64", "optimizer.lr=1e-300",
                   "trainer.max_steps=1", "threads=1", "trainer.progress=false", f"hydra.run.dir={folder}"], tmp_path)
    assert trained.returncode == 0, trained.stderr
    losses = []
    for weights in ("checkpoint", "init"):
        done = run([str(ROOT / "scripts/diagnose.py"), str(folder), "trace", "--weights", weights, "--probes", "3",
                    "--out", str(tmp_path / weights)], tmp_path)
        assert done.returncode == 0, done.stderr
        losses.append(json.loads((tmp_path / weights / "diagnostics.json").read_text())["loss"])
    assert losses[0] == losses[1]


def test_diagnose_rejects_an_unknown_diagnostic_and_a_folder_without_a_run(tmp_path):
    bad = run([str(ROOT / "scripts/diagnose.py"), str(tmp_path), "hessian"], tmp_path)
    assert bad.returncode == 2 and "unknown diagnostic(s) ['hessian']" in bad.stderr and "Traceback" not in bad.stderr
    empty = run([str(ROOT / "scripts/diagnose.py"), str(tmp_path)], tmp_path)
    assert empty.returncode == 2 and "has no config.yaml" in empty.stderr and "Traceback" not in empty.stderr
