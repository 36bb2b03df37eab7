"""scripts/diagnose.py (= curvlab-diagnose, runner/diagnose.py) end to end: train a tiny run with run.py, then
diagnose its folder (real Hydra, real files); its names are the training loop's (one registry)."""
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from runner.diagnose import expand, main
from runner.diagnostics import DIAGNOSTICS, IN_RUN, SHORTHANDS, DiagnosticsOptions
from runner.train import train
from tests.runs import make_config
from validation.checks import OptionError

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


def test_a_float32_taylor_test_prints_why_its_slopes_are_nan(tmp_path, capsys):
    """Issue 19: in float32 the Taylor remainders sink below round-off ("slope nan"); the output says why and what to
    do, and diagnostics.json carries the same note. In float64 the slopes are fitted and there is no note."""
    folder = tmp_path / "run"
    train(make_config("model.hidden=[8]", "model.activation=tanh", "trainer.max_steps=3", "trainer.max_epochs=null"),
          folder)
    for dtype in ("float32", "float64"):
        out = tmp_path / dtype
        assert main([str(folder), "taylor", "--taylor-directions", "random", "--batch-size", "96", "--dtype", dtype,
                     "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        record = json.loads((out / "diagnostics.json").read_text())["taylor_random"]
        if dtype == "float64":
            assert "note" not in record and "note:" not in printed and abs(record["slopes"][2] - 3) < 0.3
            continue
        assert record["slopes"][2] is None  # nan
        assert record["note"].startswith("Taylor test in float32: ") and "slope2 nan from 0 of 6 points" in record["note"]
        assert f"  note: {record['note']}" in printed.splitlines()
        assert "round-off floor" in record["note"] and "curvlab-diagnose --dtype float64" in record["note"]


def test_one_registry_of_names_for_the_training_loop_and_the_script(tmp_path, capsys):
    assert set(IN_RUN) < set(DIAGNOSTICS) and set(DIAGNOSTICS) - set(IN_RUN) == {"surface", "hessian_explicit"}
    assert DiagnosticsOptions(what=list(IN_RUN), every=1).what == list(IN_RUN)  # every in-run name is a config name
    with pytest.raises(OptionError, match=r"diagnostics\.what\[0\]=surface runs only in curvlab-diagnose"):
        DiagnosticsOptions(what=["surface"], every=1)
    assert all(name in DIAGNOSTICS for names in SHORTHANDS.values() for name in names)
    assert expand(["spectrum", "hessian_top", "trace", "full", "gradcheck"]) == [
        "hessian_top", "hessian_bottom", "ggn_top", "hessian_trace", "ggn_trace", "hessian_explicit", "gradcheck"]
    with pytest.raises(SystemExit) as stopped:
        main([str(tmp_path), "hessian", "ggn_top"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("diagnose: unknown diagnostic(s) ['hessian']; choose from ['hessian_top', ")
    assert "'surface', 'hessian_explicit'] or the shorthands (spectrum = hessian_top hessian_bottom ggn_top;" in error


def test_the_console_scripts_are_the_modules_the_shims_call():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {k: scripts[k] for k in ("curvlab-diagnose", "curvlab-report")} == {
        "curvlab-diagnose": "runner.diagnose:main", "curvlab-report": "runner.report.cli:main"}
    for name, shim in (("curvlab-diagnose", "scripts/diagnose.py"), ("curvlab-report", "scripts/report.py")):
        module = scripts[name].split(":")[0]
        assert f"from {module} import main" in (ROOT / shim).read_text()
