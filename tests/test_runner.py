"""The runner in-process: the real config composed with Hydra's compose API, shrunk to a few CPU steps, trained by
`runner.train.train` into a tmp folder. Real data (digits ship with scikit-learn; MNIST from CURVLAB_DATA), real
models and optimizers, real W&B (offline)."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from optimizers.first_order import SGD
from runner.errors import describe_user_error
from runner.metrics import JSONLSink, MetricsLogger, first_nonfinite, read_jsonl
from runner.schema import register_configs
from runner.train import train

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
needs_mnist = pytest.mark.skipif(
    not os.environ.get("CURVLAB_DATA"), reason="CURVLAB_DATA is not set: point it at the folder holding MNIST/raw"
)


def make_config(*overrides: str) -> DictConfig:
    """conf/config.yaml with `overrides`, on one CPU thread (fast also on a busy machine), without a progress bar."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=["device=cpu", "threads=1", "trainer.progress=false", *overrides])


def composition_error(*overrides: str) -> str:
    """The one-paragraph message run.py prints for a config that does not compose."""
    with pytest.raises(Exception) as info:
        make_config(*overrides)
    message = describe_user_error(info.value, during_job=False)
    assert message is not None and "\n" not in message
    return message


def losses(out: Path) -> list[float]:
    return [row["loss"] for row in read_jsonl(out / "metrics.jsonl")]


# ---------------------------------------------------------------- a run and its files


def test_digits_run_writes_every_file(tmp_path):
    cfg = make_config("trainer.max_epochs=2", "trainer.batch_size=500", "trainer.log_every=2")
    result = train(cfg, output_dir=tmp_path)
    # digits: 1,497 training samples -> 3 batches of 500/500/497 per epoch, 2 epochs
    assert (result.status, result.steps, result.epochs) == ("ok", 6, 2.0)

    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert [row["samples_seen"] for row in rows] == [500, 1000, 1497, 1997, 2497, 2994]
    assert rows[2]["epoch"] == 1.0 and rows[5]["epoch"] == 2.0
    assert all(row["lr"] == 0.05 and row["step_time"] > 0 for row in rows)  # SGD's stats, names untouched
    assert rows[-1]["wall_time"] == pytest.approx(sum(row["step_time"] for row in rows))
    eval_rows = [row for row in rows if "eval/loss" in row]  # eval_every=null: at the end of every epoch
    assert [row["step"] for row in eval_rows] == [3, 6]
    assert rows[-1]["train/loss"] == pytest.approx(sum(r["loss"] for r in rows[3:]) / 3)
    assert rows[-1]["eval/loss"] < rows[2]["eval/loss"] < math.log(10)  # it learns, from chance level
    assert 0.5 < rows[-1]["eval/accuracy"] <= 1.0

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["steps"] == 6 and summary["epochs"] == 2.0
    assert summary["eval"] == {"eval/loss": rows[-1]["eval/loss"], "eval/accuracy": rows[-1]["eval/accuracy"]}
    assert summary["best_eval_accuracy"] == max(row["eval/accuracy"] for row in eval_rows)
    assert summary["train_loss"] == rows[-1]["train/loss"] and summary["final_batch_loss"] == rows[-1]["loss"]

    info = json.loads((tmp_path / "run_info.json").read_text())
    assert re.fullmatch(r"[0-9a-f]{40}", info["git"]["commit"]) and isinstance(info["git"]["dirty"], bool)
    assert info["packages"]["torch"] == torch.__version__.split("+")[0]
    assert info["cpu_count"] >= 1 and info["torch_threads"] >= 1

    saved = (tmp_path / "config.yaml").read_text()
    assert "${" not in saved and f"data_root: {os.path.abspath(cfg.data_root)}\n" in saved  # resolved, absolute

    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # tensors and plain values only
    assert checkpoint["progress"]["step"] == 6 and checkpoint["progress"]["epoch"] == 2.0
    assert checkpoint["optimizer"]["steps"] == 6 and checkpoint["world_size"] == 1
    assert {"python", "numpy", "torch", "batches"} <= set(checkpoint["rng"][0])  # one entry per rank
    assert checkpoint["metrics"]["rows"] == 6 and checkpoint["config"]["trainer"]["max_epochs"] == 2
    assert checkpoint["model"]["net.0.weight"].shape == (128, 64)


def test_eval_every_and_max_steps(tmp_path):
    result = train(make_config("trainer.max_steps=7", "trainer.eval_every=3", "trainer.batch_size=64"), tmp_path)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert result.steps == 7 and len(rows) == 7  # max_steps stops before the 10 epochs of the default trainer
    assert [row["step"] for row in rows if "eval/accuracy" in row] == [3, 6, 7]  # every 3 steps and at the end


def test_regression_dataset_logs_loss_without_accuracy(tmp_path):
    train(make_config("dataset=sine", "model=sine_mlp", "trainer.max_steps=4", "trainer.eval_every=2"), tmp_path)
    last = read_jsonl(tmp_path / "metrics.jsonl")[-1]
    assert last["eval/loss"] > 0 and "eval/accuracy" not in last
    assert json.loads((tmp_path / "summary.json").read_text())["best_eval_accuracy"] is None


@needs_mnist
@pytest.mark.slow
def test_mnist_mlp_sgd_one_epoch_reaches_95_percent(tmp_path):
    result = train(make_config("dataset=mnist", "model=mlp", "optimizer=sgd", "trainer.max_epochs=1"), tmp_path)
    assert result.steps == 469  # ceil(60,000 / 128)
    assert result.summary["eval"]["eval/accuracy"] >= 0.95  # measured: 0.96


# ---------------------------------------------------------------- optimizers, precision, batching


def test_adam_steps(tmp_path):
    result = train(make_config("optimizer=adam", "trainer.max_steps=5"), tmp_path)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert result.status == "ok" and [row["lr"] for row in rows] == [0.001] * 5
    assert rows[-1]["loss"] < rows[0]["loss"]
    inner = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["optimizer"]["inner"]
    assert inner["state"][0]["step"].item() == 5  # torch.optim.Adam's own step count


def test_float64_parameters(tmp_path):
    train(make_config("dtype=float64", "trainer.max_steps=2"), tmp_path)
    model = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    assert {tensor.dtype for tensor in model.values()} == {torch.float64}


def test_config_groups_trainer_and_experiment_compose():
    full = make_config("trainer=full_batch").trainer
    assert (full.batching, full.batch_size, full.max_epochs, full.eval_every) == ("full", None, 100, 10)
    cfg = make_config("experiment=mnist_mlp_adam", "seed=3")  # the command line still wins over the experiment
    assert (cfg.dataset._target_, cfg.optimizer._target_) == ("data.vision.build_mnist", "optimizers.first_order.Adam")
    assert (cfg.trainer.max_epochs, cfg.trainer.eval_every, cfg.seed) == (3, 200, 3)


def test_full_batching_takes_one_step_per_epoch(tmp_path):
    result = train(make_config("trainer.batching=full", "trainer.max_epochs=3"), tmp_path)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert result.steps == 3 and [row["samples_seen"] for row in rows] == [1497, 2994, 4491]
    assert all("eval/loss" in row for row in rows)  # every step ends an epoch


@pytest.mark.parametrize("batching, same_batches", [("fixed", True), ("shuffle", False)])
def test_fixed_batching_repeats_the_same_batches(tmp_path, batching, same_batches):
    # With a vanishing learning rate the parameters barely move, so a batch's loss identifies the batch.
    overrides = [f"trainer.batching={batching}", "trainer.batch_size=500", "trainer.max_epochs=2",
                 "optimizer.lr=1e-12", "optimizer.momentum=0.0"]
    train(make_config(*overrides), tmp_path)
    first, second = losses(tmp_path)[:3], losses(tmp_path)[3:]
    assert (first == pytest.approx(second, rel=1e-6)) is same_batches


def test_same_seed_same_metrics_other_seed_other_metrics(tmp_path):
    overrides = ["trainer.max_steps=6", "trainer.batch_size=100"]
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train(make_config(*overrides, f"seed={seed}"), tmp_path / name)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")  # bit for bit
    assert losses(tmp_path / "a")[0] != losses(tmp_path / "c")[0]  # other initialisation and batches


# ---------------------------------------------------------------- divergence and logger failures


def test_divergence_stops_and_keeps_what_was_logged(tmp_path, capsys):
    cfg = make_config("optimizer.lr=1e10", "trainer.max_epochs=5", "trainer.batch_size=100", "trainer.log_every=4")
    result = train(cfg, tmp_path)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    bad = next(row["step"] for row in rows if not math.isfinite(row["loss"]))
    assert result.status == "diverged" and result.steps == rows[-1]["step"]
    assert result.steps % 4 == 0 and bad <= result.steps < bad + 4  # stopped at the flush after the first NaN
    assert [row["step"] for row in rows] == list(range(1, result.steps + 1))  # every row up to the stop
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["diverged_at_step"] == bad
    assert (tmp_path / "checkpoint.pt").exists()
    assert f"at step {bad} " in capsys.readouterr().err


class SGDFailingAfterNaN(SGD):
    """SGD that raises, as a Cholesky factorisation would, on the step after its loss stopped being finite."""

    def step(self, objective):
        if getattr(self, "saw_nan", False):
            raise torch.linalg.LinAlgError("linalg.cholesky: The factorization could not be completed")
        stats = super().step(objective)
        self.saw_nan = not torch.isfinite(stats["loss"])
        return stats


def test_an_optimizer_error_after_the_loss_diverged_is_a_divergence(tmp_path, caplog):
    target = f"optimizer._target_={__name__}.{SGDFailingAfterNaN.__name__}"
    cfg = make_config(target, "optimizer.lr=1e10", "trainer.batch_size=100", "trainer.log_every=100")
    result = train(cfg, tmp_path)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert result.status == "diverged" and not math.isfinite(rows[-1]["loss"])
    assert result.summary["diverged_at_step"] == result.steps == rows[-1]["step"]  # the step before the error
    assert f"LinAlgError at step {result.steps + 1}, after the loss diverged" in caplog.text


def test_a_step_that_raises_on_blown_up_parameters_is_a_divergence_at_that_step(tmp_path, capsys):
    """K-FAC with an absurd rate: step 1 leaves the parameters so large that step 2's outputs are inf, its sampled
    Fisher cannot draw labels (torch.multinomial raises), and no NaN loss was logged yet: the run is diverged at step
    2 (the loss there, at the current parameters, is not finite), not a traceback."""
    cfg = make_config("optimizer=kfac", "optimizer.lr=1e38", "optimizer.kl_clip=null", "trainer.max_steps=5",
                      "trainer.log_every=1")
    result = train(cfg, tmp_path)
    assert result.status == "diverged" and result.steps == 1
    assert result.summary["diverged_at_step"] == 2
    assert "the loss became nan at step 2 " in capsys.readouterr().err
    assert (tmp_path / "checkpoint.pt").exists()


def test_wandb_offline_run_dir(tmp_path):
    train(make_config("logger=wandb", "trainer.max_steps=3"), tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and len(list(runs[0].glob("run-*.wandb"))) == 1
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 3
    wandb_run = json.loads((tmp_path / "summary.json").read_text())["wandb"]
    assert wandb_run["project"] == "curvlab" and wandb_run["mode"] == "offline"
    assert runs[0].name.endswith(wandb_run["id"])
    assert wandb_run["group"] is None  # a single run outside a sweep has no group


def test_wandb_failure_warns_once_and_training_goes_on(tmp_path, capsys):
    result = train(make_config("logger=wandb", "logger.mode=bogus", "trainer.max_steps=12"), tmp_path)
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "wandb init failed" in err  # W&B's own validation error, reported once
    assert result.status == "ok" and len(read_jsonl(tmp_path / "metrics.jsonl")) == 12
    assert result.summary["wandb"] is None


# ---------------------------------------------------------------- bad input: one clear error


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (["device=tpu"], ValueError, r"device='tpu'.*auto, cpu, cuda"),
        (["dtype=float16"], ValueError, r"dtype='float16'.*float32, float64"),
        (["trainer.batching=bogus"], ValueError, r"trainer.batching='bogus'.*shuffle, fixed, full"),
        (["trainer.max_epochs=null"], ValueError, r"trainer.max_epochs=N"),
        (["trainer.log_every=0"], ValueError, r"trainer.log_every=0 must be a positive integer"),
        (["trainer.checkpoint_every=0"], ValueError, r"trainer.checkpoint_every=0 must be a positive integer"),
        (["trainer.checkpoint_every_minutes=0"], ValueError,
         r"trainer.checkpoint_every_minutes=0.0 must be a positive"),
        (["+objective.damping=1"], ValueError, r"objective.damping.*ggn_backend"),
        (["objective.curvature_batch_size=abc"], ValueError, r"^objective.curvature_batch_size=abc must be an"),
        (["model=simple_cnn"], ValueError, r"simple_cnn.*\(1, 28, 28\)"),  # digits are 8x8
        (["+model.width=3"], ValueError, r"^model.width is not an option of model 'build_mlp'. Valid keys: hidden,"),
        (["model.hidden=abc"], ValueError, r"^model.hidden=abc must be a list of integers, e.g. \[1,2\].$"),
        (["dataset.num_test=0"], ValueError, r"^dataset.num_test=0 must be an integer >= 1.$"),
        (["model.hidden=[64,0]"], ValueError, r"^model.hidden\[1\]=0 must be an integer >= 1.$"),
        (["+dataset.colour=red"], ValueError,
         r"^dataset.colour is not an option of dataset 'build_digits'. Valid keys: root, download, num_test, "
         r"split_seed.$"),
        (["model._target_=models.nothing.build"], ValueError, r"^model._target_=models.nothing.build cannot be"),
        (["+trainer.max_step=5"], ValueError, r"^'trainer.max_step' is not a config key \(misspelled\?\). Valid keys "
                                              r"under trainer: batch_size, .*max_steps"),
        (["+logger.projekt=x"], ValueError, r"^'logger.projekt' is not a config key .*Valid keys under logger: entity"),
        (["+sed=1"], ValueError, r"^'sed' is not a config key .*Valid keys under the top level: channels_last, data_root, dataset,"),
        (["dataset=sine", "dataset.noise=inf"], ValueError, r"^dataset.noise=inf must be a finite number.$"),
        (["dataset=rosenbrock", "model=rosenbrock", "model.init=[1,nan]"], ValueError,
         r"^model.init\[1\]=nan must be a finite number.$"),
        (["+optimizer.lrr=1"], (TypeError, ValueError), r"optimizer.*lrr"),  # ValueError once Options check it
        (["dataset=cifar10", "dataset.download=false", "data_root=EMPTY"], FileNotFoundError,
         r"Dataset 'cifar10' was not found.*data_root"),
        # issue 19: the key the user typed, not the one that follows it through ${seed} (diagnostics.seed, dataset.seed)
        (["seed=-1"], ValueError, r"^seed=-1 must be an integer >= 0\.$"),
        (["seed=-1", "dataset=sine", "diagnostics=trace"], ValueError, r"^seed=-1 must be an integer >= 0\.$"),
        (["diagnostics=trace", "diagnostics.trace_method=hutch++", "diagnostics.probes=${trainer.log_every}",
          "trainer.log_every=2"], ValueError,
         r"^trainer\.log_every=2 must be at least 3 with diagnostics\.trace_method=hutch\+\+\. \(diagnostics\.probes "
         r"follows trainer\.log_every: \$\{trainer\.log_every\}\.\)$"),
    ],
)
def test_bad_values_raise_one_clear_error(tmp_path, overrides, error, match):
    overrides = [o.replace("EMPTY", str(tmp_path / "empty")) for o in overrides]
    with pytest.raises(error, match=match) as info:
        train(make_config(*overrides), tmp_path / "out")
    assert describe_user_error(info.value) == " ".join(str(info.value).split())  # run.py prints it as is
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["status"] == "error"


def test_composition_errors_name_the_key_and_the_choices():
    message = composition_error("optimizer=foo")
    assert re.search(r"'foo' is not a choice of the config group 'optimizer'.*adam, .*sgd", message)
    message = composition_error("trainer.max_epoch=1")
    assert "'trainer.max_epoch' is not a config key" in message and "max_epochs, max_steps" in message
    message = composition_error("optimizer.lrr=1")
    assert "Valid keys under optimizer: dampening, gamma, lr, milestones, momentum" in message and "+optimizer.lrr" in message
    message = composition_error("trainer.max_epochs=abc")
    assert "trainer.max_epochs" in message and "could not be converted to Integer" in message


# ---------------------------------------------------------------- data_root: a cache folder outside the code


@pytest.mark.parametrize(
    "env, override, expected",
    [
        ({"XDG_CACHE_HOME": "XDG"}, None, "XDG/curvlab/data"),
        ({"XDG_CACHE_HOME": ""}, None, "HOME/.cache/curvlab/data"),  # empty counts as unset (XDG spec)
        ({}, None, "HOME/.cache/curvlab/data"),
        ({"CURVLAB_DATA": "ENV/data"}, None, "ENV/data"),
        ({"CURVLAB_DATA": "ENV/data"}, "data_root=OTHER/data", "OTHER/data"),  # the command line wins
        ({}, 'data_root="~/my data"', "HOME/my data"),
        ({"MY_DATA": "ENV"}, "data_root=${oc.env:MY_DATA}/sets", "ENV/sets"),
        ({"MY_DATA": "ENV"}, 'data_root="$MY_DATA/sets"', "ENV/sets"),
        ({}, "data_root=rel/../data", "CWD/data"),  # relative: against the launch folder, normalised
    ],
)
def test_data_root_defaults_to_a_cache_folder_outside_the_code(tmp_path, monkeypatch, env, override, expected):
    places = {name: str(tmp_path / name.lower()) for name in ("HOME", "XDG", "ENV", "OTHER", "CWD")}

    def fill(text: str) -> str:  # the placeholders above -> folders under tmp_path
        return re.sub("|".join(places), lambda m: places[m.group(0)], text)

    Path(places["CWD"]).mkdir()
    monkeypatch.chdir(places["CWD"])
    for name in ("CURVLAB_DATA", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(places["HOME"]))
    for name, value in env.items():
        monkeypatch.setenv(name, fill(value))
    overrides = ["trainer.max_steps=1", "trainer.checkpoint=false"] + ([fill(override)] if override else [])
    train(make_config(*overrides), tmp_path / "out")
    saved = OmegaConf.load(tmp_path / "out" / "config.yaml")  # parsed: a long path may be folded over two lines
    assert saved.data_root == fill(expected)
    assert saved.data_root != str(Path(__file__).resolve().parents[1] / "data")  # never the data/ package


# ---------------------------------------------------------------- the metrics buffer


def test_metrics_logger_converts_tensors_once_and_finds_nonfinite(tmp_path):
    metrics = MetricsLogger([JSONLSink(tmp_path / "m.jsonl")])
    metrics.record({"step": 1, "loss": torch.tensor(0.5), "iters": torch.tensor(3), "ok": torch.tensor(True)})
    metrics.record({"step": 2, "loss": torch.tensor(float("nan"), dtype=torch.float64), "extra": 1.5})
    rows = metrics.flush()
    assert rows[0] == {"step": 1, "loss": 0.5, "iters": 3, "ok": True}
    assert type(rows[0]["iters"]) is int and math.isnan(rows[1]["loss"]) and rows[1]["extra"] == 1.5
    assert first_nonfinite(rows)["step"] == 2
    metrics.close()
    assert read_jsonl(tmp_path / "m.jsonl")[0] == rows[0]  # already on disk after the flush


# ---------------------------------------------------------------- the budget, stated at start-up (issue 19)


@pytest.mark.parametrize("epochs, steps, expected, conflict", [
    (10, None, (120, "budget: stops after 120 steps: trainer.max_epochs=10 x 12 steps per epoch."), False),
    (None, 30, (30, "budget: stops after 30 steps: trainer.max_steps=30 (2.5 epochs of 12 steps)."), False),
    (10, 200, (120, "budget: stops after 120 steps: trainer.max_epochs=10 x 12 steps per epoch comes before "
                    "trainer.max_steps=200; set trainer.max_epochs=null to run 200 steps."), True),
    (10, 50, (50, "budget: stops after 50 steps: trainer.max_steps=50 comes before trainer.max_epochs=10 x 12 steps "
                  "per epoch."), False),
    (10, 120, (120, "budget: stops after 120 steps: trainer.max_steps=120 ends together with trainer.max_epochs=10 x "
                    "12 steps per epoch."), False),
])
def test_the_budget_line_names_the_limit_that_ends_the_run(epochs, steps, expected, conflict):
    from runner.train import budget_line

    trainer = OmegaConf.create({"max_epochs": epochs, "max_steps": steps})
    assert budget_line(trainer, 12) == (*expected, conflict)


def test_max_steps_cut_short_by_max_epochs_is_a_warning_at_start_up(tmp_path, caplog):
    """digits at batch 128: 12 steps per epoch, so the default max_epochs=10 ends the run at 120, before max_steps."""
    with caplog.at_level(logging.INFO, logger="curvlab"):
        result = train(make_config("trainer.max_steps=200", "trainer.log_every=50"), tmp_path)
    assert result.steps == 120
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["budget: stops after 120 steps: trainer.max_epochs=10 x 12 steps per epoch comes before "
                        "trainer.max_steps=200; set trainer.max_epochs=null to run 200 steps."]
