"""The `diagnostics` config group in real runs (runner/diagnostics.py): in-process `train()` on real configs, plus
`python run.py` for the exit code and torchrun for data parallelism.

* the trajectory (every metrics column but times, final parameters, optimiser and random states) is bitwise that
  of the same run without diagnostics, on networks with batch norm and dropout, in train and eval mode;
* the scalars land in the rows of the right steps, diagnostics.jsonl holds one valid record per evaluation, and the
  eigenvalues equal those of the explicit float64 Hessian of the final weights on the diagnostic batch (computed
  here with torch.func alone);
* their time stays out of wall_time;
* a resumed run repeats the uninterrupted one, side file included; diagnostics may be switched on at a resume;
* bad keys and values: one message naming the key, exit code 2.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import rich.style  # noqa: F401 -- draws from Python's global RNG when first imported, which a run does lazily:
import torch        # imported here, the first run of this process ends with the same random states as the others
from omegaconf import OmegaConf

from oracles import dense_hessian
from validation.checks import OptionError
from runner.checkpoint import load_checkpoint
from runner.diagnostics import FILE, DiagnosticsOptions
from runner.errors import describe_user_error
from runner.metrics import read_jsonl
from runner.train import train
from tests.runs import REPO, assert_same_tensors, env, is_time, make_config

# digits, 7 steps of 64; diagnostics after steps 3, 6 and the last (7) on a fixed batch of 96 samples
SHORT = ["trainer.max_steps=7", "trainer.max_epochs=null", "trainer.batch_size=64", "trainer.log_every=2",
         "trainer.eval_every=4"]
DIAG = ["diagnostics.what=[hessian_top,hessian_bottom,ggn_top,ggn_trace,hessian_density,taylor]",
        "diagnostics.every=3", "diagnostics.batch_size=96", "diagnostics.probes=4", "diagnostics.slq_probes=2",
        "diagnostics.slq_steps=8", "diagnostics.k=2"]
# 8x8 digits: 8 -> 4 -> 2 -> 1, BN after every conv, 82k parameters: fewer, cheaper diagnostics
BN_DROPOUT = ["model=cifar_basic_cnn_bn", "model.dropout=0.3", "diagnostics.batch_size=32", "diagnostics.k=1"]
BN_WHAT = "diagnostics.what=[hessian_top,ggn_trace,taylor]"


def without(rows: list[dict], prefix: str = "diag/") -> list[dict]:
    """The rows without the diagnostics' columns, the wall-clock ones and the process's memory."""
    return [{k: v for k, v in row.items() if not k.startswith((prefix, "memory/")) and not is_time(k)}
            for row in rows]


def run(folder: Path, *overrides: str) -> Path:
    result = train(make_config(*SHORT, *overrides), output_dir=folder)
    assert result.status == "ok"
    return folder


@pytest.mark.parametrize("overrides", [
    [*BN_DROPOUT, "diagnostics.mode=train"],   # batch statistics and dropout masks in the diagnostics' forward
    [*BN_DROPOUT, "diagnostics.mode=eval"],
    ["model.hidden=[16]", "optimizer=kfac"],    # K-FAC's hooks on the layers must not see the diagnostics
    ["model.hidden=[16]", "optimizer=hf", "objective.curvature_batch_size=32"],
    ["model.hidden=[16]", "optimizer=hf", "objective.micro_batch_size=24", "optimizer.curvature_fraction=1"],
], ids=["bn-dropout-train", "bn-dropout-eval", "kfac", "hf-sub-batch", "hf-micro-batches"])
def test_diagnostics_leave_the_trajectory_bitwise_unchanged(tmp_path, overrides):
    plain = run(tmp_path / "plain", *overrides)
    diagnosed = run(tmp_path / "diag", *DIAG, *overrides, *([BN_WHAT] if "model.dropout=0.3" in overrides else []))
    a, b = read_jsonl(plain / "metrics.jsonl"), read_jsonl(diagnosed / "metrics.jsonl")
    assert without(a) == without(b)
    assert [r["step"] for r in b if "diag/hessian_top1" in r] == [3, 6, 7]
    first, second = load_checkpoint(plain / "checkpoint.pt"), load_checkpoint(diagnosed / "checkpoint.pt")
    for key in ("model", "optimizer", "rng"):
        assert_same_tensors(first[key], second[key], key)


def test_scalars_side_file_and_eigenvalues_against_the_explicit_hessian(tmp_path):
    folder = run(tmp_path / "run", "dtype=float64", "model.hidden=[8]", "model.activation=tanh", *DIAG)
    rows = read_jsonl(folder / "metrics.jsonl")
    diag_rows = [r for r in rows if any(k.startswith("diag/") for k in r)]
    assert [r["step"] for r in diag_rows] == [3, 6, 7]
    for row in diag_rows:
        for key in ("diag/loss", "diag/time", "diag/hessian_top1", "diag/hessian_top2", "diag/hessian_bottom1",
                    "diag/ggn_top1", "diag/ggn_trace", "diag/ggn_trace_stderr", "diag/ggn_trace_products",
                    "diag/hessian_slq_trace", "diag/taylor_slope2", "diag/hessian_top_time"):
            assert key in row, key
        assert row["diag/hessian_top1"] >= row["diag/hessian_top2"] >= row["diag/hessian_bottom1"]
        assert row["diag/ggn_trace_products"] == 4.0
        assert abs(row["diag/taylor_slope2"] - 3) < 0.2     # float64, tanh: the Hessian is right
    records = [json.loads(line) for line in (folder / FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6, 7]
    for record, row in zip(records, diag_rows):
        assert record["batch_size"] == 96 and record["mode"] == "eval" and record["loss"] == row["diag/loss"]
        assert record["hessian_top"]["eigenvalues"] == [row["diag/hessian_top1"], row["diag/hessian_top2"]]
        assert len(record["hessian_density"]["nodes"]) == 2 and len(record["taylor"]["remainders"]) == 3
        assert "eigenvectors" not in record["hessian_top"]                  # no parameter-sized vectors in JSON
    # ground truth: the final weights, the 96 samples drawn by their own generator, a dense float64 Hessian
    cfg = make_config(*SHORT, "dtype=float64", "model.hidden=[8]", "model.activation=tanh")
    from hydra.utils import instantiate
    splits = instantiate(cfg.dataset)
    model = instantiate(cfg.model, input_shape=splits.input_shape, num_outputs=splits.num_outputs).double().eval()
    model.load_state_dict(load_checkpoint(folder / "checkpoint.pt")["model"])
    index = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(cfg.seed))[:96]
    x, y = splits.train.inputs[index].double(), splits.train.targets[index]
    eigenvalues = torch.linalg.eigvalsh(dense_hessian(model, "cross_entropy", x, y))
    last = diag_rows[-1]
    scale = eigenvalues.abs().max().item()
    assert abs(last["diag/hessian_top1"] - eigenvalues[-1].item()) < 1e-8 * scale
    assert abs(last["diag/hessian_top2"] - eigenvalues[-2].item()) < 1e-8 * scale
    assert abs(last["diag/hessian_bottom1"] - eigenvalues[0].item()) < 1e-8 * scale
    assert abs(last["diag/hessian_slq_trace"] - eigenvalues.sum().item()) < 0.5 * eigenvalues.abs().sum().item()


def test_micro_batched_diagnostics_equal_the_whole_batch(tmp_path):
    """With objective.micro_batch_size the diagnostics are built as the steps are (in pieces of 40 of the 96
    samples): the same numbers to rounding."""
    common = ["dtype=float64", "model.hidden=[8]", "model.activation=tanh", *DIAG]
    whole, pieces = (read_jsonl(run(tmp_path / name, *common, *extra) / "metrics.jsonl")
                     for name, extra in (("whole", []), ("pieces", ["objective.micro_batch_size=40"])))
    compared = 0
    for a, b in zip(whole, pieces, strict=True):
        for key in [k for k in a if k.startswith("diag/") and not is_time(k) and "taylor_slope" not in k]:
            assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-12), (a["step"], key)
            compared += 1
    assert compared > 40


def test_diagnostics_time_stays_out_of_the_training_wall_clock(tmp_path):
    folder = run(tmp_path / "run", "model.hidden=[16]", *DIAG, "diagnostics.what=[hessian_density]",
                 "diagnostics.slq_steps=60", "diagnostics.slq_probes=3", "diagnostics.batch_size=1000")
    rows = read_jsonl(folder / "metrics.jsonl")
    diag_time = sum(r.get("diag/time", 0.0) for r in rows)
    assert diag_time > 0 and rows[-1]["wall_time"] == pytest.approx(sum(r["step_time"] for r in rows), rel=1e-9)
    assert rows[-1]["wall_time"] < 0.5 * diag_time   # 3 x 180 products on 1000 samples against 7 SGD steps of 64


def test_resume_repeats_the_run_and_its_side_file(tmp_path):
    """A crash after step 9 of 10: the folder holds the checkpoint of step 8 and rows and records past it. Resumed
    into a new folder, the run repeats the uninterrupted one; a run checkpointed without diagnostics may be resumed
    with them switched on (diagnostics.* may change at a resume: they do not touch the trajectory)."""
    ten = ["trainer.max_steps=10", "trainer.checkpoint_every=4", "model.hidden=[16]"]
    full = run(tmp_path / "full", *ten, *DIAG)
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for name in ("config.yaml", "metrics.jsonl", FILE):
        shutil.copy(full / name, crashed / name)
    shutil.copy(full / "checkpoint.prev.pt", crashed / "checkpoint.pt")
    assert load_checkpoint(crashed / "checkpoint.pt")["progress"]["step"] == 8
    resumed = run(tmp_path / "resumed", *ten, *DIAG, f"trainer.resume={crashed}")
    assert without(read_jsonl(resumed / "metrics.jsonl"), prefix="diag/time") == without(
        read_jsonl(full / "metrics.jsonl"), prefix="diag/time")
    records = [[json.loads(line) for line in (f / FILE).read_text().splitlines()] for f in (full, resumed)]
    assert [r["step"] for r in records[1]] == [3, 6, 9, 10]
    for a, b in zip(*records, strict=True):
        for value in [*a.values(), *b.values()]:
            if isinstance(value, dict):
                value.pop("cost")   # holds seconds
        assert {k: v for k, v in a.items() if k != "time"} == {k: v for k, v in b.items() if k != "time"}
    assert_same_tensors(load_checkpoint(full / "checkpoint.pt")["model"],
                        load_checkpoint(resumed / "checkpoint.pt")["model"])
    # switched on at the resume: accepted, and the steps after the checkpoint carry the same diagnostics
    plain = run(tmp_path / "plain", *ten)
    shutil.copy(plain / "checkpoint.prev.pt", plain / "checkpoint.pt")
    later = run(tmp_path / "later", *ten, *DIAG, f"trainer.resume={plain}")
    rows, reference = read_jsonl(later / "metrics.jsonl"), read_jsonl(full / "metrics.jsonl")
    assert without(rows) == without(reference)
    assert [r["step"] for r in rows if "diag/hessian_top1" in r] == [9, 10]
    assert rows[-1]["diag/hessian_top1"] == reference[-1]["diag/hessian_top1"]


def test_the_none_file_lists_every_option_at_its_default_and_the_presets_compose():
    defaults = dataclasses.asdict(DiagnosticsOptions())
    node = OmegaConf.to_container(make_config().diagnostics, resolve=True)
    assert node == defaults
    for preset in ("spectrum", "trace", "full"):
        options = DiagnosticsOptions.build("test", OmegaConf.to_container(
            make_config(f"diagnostics={preset}").diagnostics, resolve=True))
        assert options.what and options.every


@pytest.mark.parametrize("overrides, match", [
    (["diagnostics=spectrum", "+diagnostics.evry=5"],
     r"^diagnostics\.evry is not an option of the diagnostics group\. Valid keys: what, every, at_end, batch_size"),
    (["diagnostics=spectrum", "diagnostics.what=[hessian_top,eigen]"],
     r"^diagnostics\.what\[1\]=eigen is not one of: hessian_top, hessian_bottom, ggn_top, hessian_trace"),
    (["diagnostics=spectrum", "diagnostics.what=[surface]"],
     r"^diagnostics\.what\[0\]=surface runs only in curvlab-diagnose <run folder> surface \(it needs plots or an "
     r"explicit matrix\)\. During training choose from: hessian_top, .*, gradcheck\.$"),
    (["diagnostics.what=[ggn_trace]"], r"^diagnostics\.what=\[ggn_trace\] needs diagnostics\.every=N"),
    (["diagnostics.every=10"], r"^diagnostics\.every=10 runs nothing: diagnostics\.what is empty"),
    (["diagnostics=trace", "diagnostics.every=0"], r"^diagnostics\.every=0 must be an integer >= 1\.$"),
    (["diagnostics=trace", "diagnostics.batch_size=5000"],
     r"^diagnostics\.batch_size=5000 is larger than the training split \(1497 samples\)"),
    (["diagnostics=spectrum", "diagnostics.k=20000"], r"^diagnostics\.k=20000 exceeds the model's 9610 param"),
    (["diagnostics=spectrum", "diagnostics.mode=test"], r"^diagnostics\.mode=test is not one of: eval, train\.$"),
    (["diagnostics=trace", "diagnostics.trace_method=hutch++", "diagnostics.probes=2"],
     r"^diagnostics\.probes=2 must be at least 3 with diagnostics\.trace_method=hutch\+\+"),
])
def test_bad_diagnostics_options_name_the_key(tmp_path, overrides, match):
    with pytest.raises(OptionError, match=match) as info:
        train(make_config(*overrides), tmp_path / "out")
    assert describe_user_error(info.value) == " ".join(str(info.value).split())
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_run_py_exits_2_on_a_misspelled_diagnostics_key(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "run.py"), "device=cpu", "threads=1", "diagnostics=spectrum",
                           "diagnostics.evry=5", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        "curvlab: error: 'diagnostics.evry' is not a config key (misspelled?). Valid keys under diagnostics: "
        "at_end, batch_size, every, k, mode, probes, seed, slq_probes, slq_steps, trace_method, what.")


TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.mark.slow
def test_two_torchrun_ranks_give_the_single_process_diagnostics(tmp_path):
    """The same float64 run on 1 process and on 2 torchrun ranks: each rank holds its shard (50 + 49) of the
    99-sample diagnostic batch, the products are all-reduced, and the diagnostics agree to rounding; rank 0 alone
    writes diagnostics.jsonl."""
    args = ["device=cpu", "threads=1", "dtype=float64", "model.hidden=[16]", "trainer.max_steps=4",
            "trainer.max_epochs=null", "trainer.batch_size=64", "diagnostics.every=2", "diagnostics.batch_size=99",
            "diagnostics.what=[hessian_top,hessian_bottom,ggn_trace,hessian_density,taylor]",
            "diagnostics.probes=5", "diagnostics.slq_steps=10", "diagnostics.slq_probes=2"]
    folders = {}
    for ranks in (1, 2):
        folder = tmp_path / f"ranks{ranks}"
        launcher = [str(TORCHRUN), "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else [sys.executable]
        done = subprocess.run([*launcher, str(REPO / "run.py"), *args, f"hydra.run.dir={folder}"], cwd=tmp_path,
                              env=env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        folders[ranks] = folder
    one, two = (read_jsonl(folders[r] / "metrics.jsonl") for r in (1, 2))
    checked = 0
    for a, b in zip(one, two, strict=True):
        for key, value in a.items():
            if key.startswith("diag/") and not is_time(key):
                # a Taylor slope is fitted through remainders down to 1e-13 of the loss: it moves with the rounding
                # of the two shard means (about 1e-4); everything else agrees to rounding
                rel = 1e-3 if "taylor_slope" in key else 1e-9
                assert b[key] == pytest.approx(value, rel=rel, abs=1e-12, nan_ok=True), (a["step"], key)
                checked += 1
    assert checked > 20 and [r["step"] for r in two if "diag/loss" in r] == [2, 4]
    records = (folders[2] / FILE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in records] == [2, 4]   # written once, by rank 0


HEAVY = ["diagnostics.batch_size=8", "diagnostics.what=[hessian_trace,taylor]"]  # 5 products on millions of weights
needs_mnist = pytest.mark.skipif(not os.environ.get("CURVLAB_DATA"), reason="CURVLAB_DATA is not set")
MODELS = [  # every model builder the runner has (VGG-f needs ImageNet-sized images), with a loss of each kind
    pytest.param(["dataset=sine", "model=sine_mlp"], id="sine_mlp-mse"),
    pytest.param(["dataset=rosenbrock", "model=rosenbrock", "diagnostics.k=1"], id="rosenbrock-sse"),
    pytest.param(["dataset=rahimi_recht", "model=two_layer_linear"], id="two_layer_linear-mse"),
    pytest.param(["model=logreg"], id="logreg"),
    pytest.param(["dataset=mnist", "model=simple_cnn"], id="simple_cnn", marks=[pytest.mark.slow, needs_mnist]),
    pytest.param(["model=resnet18", *HEAVY], id="resnet18", marks=pytest.mark.slow),
    pytest.param(["model=timm", "model.name=resnet10t", *HEAVY], id="timm", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("overrides", MODELS)
def test_every_model_the_runner_builds(tmp_path, overrides):
    folder = run(tmp_path / "run", "trainer.max_steps=2", "diagnostics.every=2", "diagnostics.batch_size=32",
                 "diagnostics.what=[hessian_top,ggn_top,hessian_trace,taylor]", "diagnostics.probes=3",
                 *overrides)
    row = read_jsonl(folder / "metrics.jsonl")[-1]
    assert row["diag/hessian_trace_products"] == 3 and math.isfinite(row["diag/hessian_trace"])
    assert row.get("diag/hessian_top1", 1.0) > 0 and row.get("diag/ggn_top1", 0.0) >= 0
    assert json.loads((folder / FILE).read_text())["step"] == 2


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_float32_taylor_test_explains_its_nan_slopes_once(tmp_path, caplog, dtype):
    """Issue 19: in float32 the second-order remainders sink below round-off, so diag/taylor_slope2 is nan; the log
    says why (once) and so does the record in diagnostics.jsonl. In float64 the slopes are fitted: no note."""
    import logging

    with caplog.at_level(logging.WARNING, logger="curvlab"):
        run(tmp_path / "run", f"dtype={dtype}", "model.hidden=[8]", "model.activation=tanh", "diagnostics.what=[taylor]",
            "diagnostics.every=3", "diagnostics.batch_size=96")
    notes = [r.getMessage() for r in caplog.records if "Taylor test" in r.getMessage()]
    records = read_jsonl(tmp_path / "run" / FILE)
    if dtype == "float64":
        assert notes == [] and all("note" not in r["taylor"] for r in records)
        assert [abs(r["taylor"]["slopes"][2] - 3) < 0.3 for r in records] == [True] * 3
        return
    assert len(records) == 3 and all(r["taylor"]["slopes"][2] is None for r in records)  # nan: null in JSON
    assert len(notes) == 1 and notes[0].startswith("diagnostics at step 3: Taylor test in float32: ")
    assert "slope2 nan from " in notes[0] and "below float32's round-off floor (1000 eps |L0| = " in notes[0]
    assert notes[0].endswith("so these slopes are nan or unreliable; run it in float64 (curvlab-diagnose --dtype "
                             "float64; in a run, dtype=float64).")
    assert records[0]["taylor"]["note"] == notes[0].removeprefix("diagnostics at step 3: ")
