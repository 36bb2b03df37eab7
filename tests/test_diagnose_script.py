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
                "--batch-size", "200", "--k", "2", "--grid", "5", "--dtype", "float64"], tmp_path)
    assert done.returncode == 0, done.stderr
    out = folder / "diagnostics"
    for name in ("spectrum.png", "taylor.png", "taylor_top.png", "surface_contour.png", "surface_3d.png",
                 "full_spectrum.png"):
        assert (out / name).stat().st_size > 1000
    report = json.loads((out / "diagnostics.json").read_text())
    full = report["full_spectrum"]["eigenvalues"]                  # explicit Hessian: the extremes agree with Lanczos
    assert abs(report["hessian_top"]["eigenvalues"][0] - full[-1]) < 1e-8 * max(1.0, abs(full[-1]))
    assert abs(report["hessian_bottom"]["eigenvalues"][0] - full[0]) < 1e-8 * max(1.0, abs(full[-1]))
    assert abs(report["taylor_top"]["slopes"][2] - 3) < 0.15
    surface = report["surface"]
    assert abs(surface["losses"][2][2] - report["loss"]) < 1e-12   # the grid's centre is the batch loss


def test_diagnose_rejects_an_unknown_diagnostic_and_a_folder_without_a_run(tmp_path):
    bad = run([str(ROOT / "scripts/diagnose.py"), str(tmp_path), "hessian"], tmp_path)
    assert bad.returncode == 2 and "unknown diagnostic(s) ['hessian']" in bad.stderr and "Traceback" not in bad.stderr
    empty = run([str(ROOT / "scripts/diagnose.py"), str(tmp_path)], tmp_path)
    assert empty.returncode == 2 and "has no config.yaml" in empty.stderr and "Traceback" not in empty.stderr
