"""`python run.py` as a user runs it: real subprocesses, real Hydra, exit codes and what is printed.

The invocations are independent, so the module fixture starts all of them at once and each test checks one.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from runner.metrics import read_jsonl

REPO = Path(__file__).resolve().parents[1]

# name -> (arguments, extra environment). OUT is replaced by the invocation's own empty folder, which is also its cwd.
INVOCATIONS: dict[str, tuple[list[str], dict[str, str]]] = {
    "default": ([], {}),
    "help": (["--help"], {}),
    "sweep": (
        ["-m", "optimizer=sgd,adam", "seed=0,1", "trainer.max_steps=2", "logger=wandb", "hydra.sweep.dir=OUT/sweep"], {}
    ),
    "diverged": (["optimizer.lr=1e10", "trainer.batch_size=100", "trainer.log_every=4", "hydra.run.dir=OUT/run"], {}),
    # bad input: one paragraph on stderr, exit code 2, no traceback
    "unknown_choice": (["optimizer=foo"], {}),
    "misspelled_key": (["trainer.max_epoch=1"], {}),
    "wrong_type": (["trainer.max_epochs=abc"], {}),
    "unwritable_output": (["hydra.run.dir=/proc/forbidden/run"], {}),
    "impossible_shape": (["model=simple_cnn", "hydra.run.dir=OUT/run"], {}),
    "missing_data": (["dataset=cifar10", "dataset.download=false", "data_root=OUT/empty", "hydra.run.dir=OUT/run"], {}),
    # issue 6: every free-form group names the key; nan/inf and + keys in the typed groups are rejected (more cases
    # of the same mechanisms run in-process in test_runner.py, test_data.py and test_models.py)
    "lr_abc": (["optimizer.lr=abc", "hydra.run.dir=OUT/run"], {}),
    "hidden_abc": (["model.hidden=abc", "hydra.run.dir=OUT/run"], {}),
    "momentum_negative": (["optimizer.momentum=-1", "hydra.run.dir=OUT/run"], {}),
    "lr_nan": (["optimizer.lr=nan", "hydra.run.dir=OUT/run"], {}),
    "plus_trainer_key": (["+trainer.max_step=5", "hydra.run.dir=OUT/run"], {}),
    "plus_top_level_key": (["+sed=1", "hydra.run.dir=OUT/run"], {}),
    "unknown_model_key": (["+model.width=3", "hydra.run.dir=OUT/run"], {}),
    "dataset_inf": (["dataset=sine", "model=sine_mlp", "dataset.noise=inf", "hydra.run.dir=OUT/run"], {}),
    "seed_nan": (["seed=nan", "hydra.run.dir=OUT/run"], {}),
    "debug_traceback": (["optimizer=foo"], {"CURVLAB_DEBUG": "1"}),
}


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    folder: Path

    @property
    def results_line(self) -> str:
        return self.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> dict[str, Result]:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "CURVLAB_DEBUG")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")  # one thread: fast on a busy machine
    started = {}
    for name, (args, extra_env) in INVOCATIONS.items():
        folder = tmp_path_factory.mktemp(name)
        args = [a.replace("OUT", str(folder)) for a in args]
        started[name] = (folder, subprocess.Popen(
            [sys.executable, str(REPO / "run.py"), *args], cwd=folder, env={**env, **extra_env},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    results = {}
    for name, (folder, process) in started.items():
        stdout, stderr = process.communicate(timeout=300)
        results[name] = Result(process.returncode, stdout, stderr, folder)
    return results


def test_no_arguments_trains_digits_and_says_where_the_results_are(cli):
    run = cli["default"]
    assert run.returncode == 0, run.stderr
    assert run.results_line.startswith("curvlab: results in ")
    out = Path(run.results_line.removeprefix("curvlab: results in "))
    assert out.is_absolute() and out.parent.parent == run.folder / "outputs"  # outputs/<date>/<time>
    for name in ("config.yaml", "run_info.json", "metrics.jsonl", "summary.json", "checkpoint.pt"):
        assert (out / name).is_file(), name
    rows = read_jsonl(out / "metrics.jsonl")
    assert len(rows) == 120  # 10 epochs of 12 batches of 128 digits
    assert {"step", "epoch", "samples_seen", "wall_time", "step_time", "loss", "lr"} <= set(rows[0])
    assert rows[-1]["eval/accuracy"] > 0.9
    assert "dataset:\n  _target_: data.digits.build_digits" in (out / "config.yaml").read_text()


def test_help_lists_every_group_and_its_choices(cli):
    run = cli["help"]
    assert run.returncode == 0 and run.stdout.startswith("curvlab: train a model")
    for line in ("dataset: cifar10, cifar100, digits", "logger: none, wandb", "trainer: default, full_batch",
                 "experiment: mnist_mlp_adam", "model: ", "optimizer: "):
        assert line in run.stdout, line
    assert "adam" in run.stdout.split("optimizer: ")[1].splitlines()[0]
    assert "Exit codes: 0 ok, 2 bad configuration or input, 3 training diverged" in run.stdout


def test_multirun_creates_one_folder_per_job_grouped_in_wandb(cli):
    run = cli["sweep"]
    assert run.returncode == 0, run.stderr
    sweep = run.folder / "sweep"
    assert run.results_line == f"curvlab: results in {sweep}"
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [job.name for job in jobs] == ["0", "1", "2", "3"]
    configs = set()
    for job in jobs:
        assert [row["step"] for row in read_jsonl(job / "metrics.jsonl")] == [1, 2]
        assert len(list(job.glob("wandb/offline-run-*/run-*.wandb"))) == 1
        wandb_run = json.loads((job / "summary.json").read_text())["wandb"]
        assert wandb_run["group"] == "sweep"  # the W&B group defaults to the sweep folder's name
        optimizer, seed = ("sgd" if job.name in "01" else "adam"), int(job.name) % 2  # Hydra's job order
        assert wandb_run["name"] == f"logger=wandb,optimizer={optimizer},seed={seed},trainer.max_steps=2"
        config = yaml.safe_load((job / "config.yaml").read_text())
        configs.add((config["optimizer"]["_target_"].rsplit(".", 1)[1], config["seed"]))
    assert configs == {("SGD", 0), ("SGD", 1), ("Adam", 0), ("Adam", 1)}


def test_divergence_exits_3_and_names_the_step(cli):
    run = cli["diverged"]
    assert run.returncode == 3, run.stderr
    rows = read_jsonl(run.folder / "run" / "metrics.jsonl")
    bad = next(row for row in rows if not math.isfinite(row["loss"]))
    assert f"curvlab: training diverged: the loss became {bad['loss']} at step {bad['step']} " in run.stderr
    assert run.results_line == f"curvlab: results in {run.folder / 'run'}"
    assert '"status": "diverged"' in (run.folder / "run" / "summary.json").read_text()
    assert (run.folder / "run" / "checkpoint.pt").is_file()


TRAINER_KEYS = ("batch_size, batching, checkpoint, checkpoint_every, checkpoint_every_minutes, drop_last, "
                "estimate_cost, eval_batch_size, eval_every, log_every, max_epochs, max_steps, max_time_minutes")


@pytest.mark.parametrize(
    "name, match",
    [
        ("unknown_choice", r"'foo' is not a choice of the config group 'optimizer'\. Valid choices for optimizer: "
                           r"adahessian, adam,"),
        ("misspelled_key", rf"'trainer\.max_epoch' is not a config key \(misspelled\?\)\. Valid keys under trainer: "
                           rf"{TRAINER_KEYS}, num_workers, progress, progress_every_seconds, resume, "
                           r"stop_at_target\.$"),
        ("wrong_type", r"invalid override trainer\.max_epochs=abc: Value 'abc' of type 'str' could not be converted"),
        ("unwritable_output", r"cannot create the output folder '/proc/forbidden"),
        ("impossible_shape", r"Model 'simple_cnn' got dataset input_shape=\(1, 8, 8\)"),
        ("missing_data", r"Dataset 'cifar10' was not found"),
        ("lr_abc", r"optimizer\.lr=abc must be a finite number"),
        ("hidden_abc", r"model\.hidden=abc must be a list of integers, e\.g\. \[1,2\]\.$"),
        ("momentum_negative", r"optimizer\.momentum=-1(\.0)? must "),
        ("lr_nan", r"optimizer\.lr=nan must be a finite number"),
        ("plus_trainer_key", rf"'trainer\.max_step' is not a config key \(misspelled\?\)\. Valid keys under trainer: "
                             rf"{TRAINER_KEYS}, num_workers, progress, progress_every_seconds, resume, "
                             r"stop_at_target\.$"),  # the same message as a misspelled key
        ("plus_top_level_key", r"'sed' is not a config key \(misspelled\?\)\. Valid keys under the top level: "
                               r"channels_last, data_root, dataset, device, diagnostics, dtype, logger, model, "
                               r"objective, optimizer, precision, seed, threads, trainer, tune, workload\.$"),
        ("unknown_model_key", r"model\.width is not an option of model 'build_mlp'\. Valid keys: hidden, activation, "
                              r"bias\.$"),
        ("dataset_inf", r"dataset\.noise=inf must be a finite number\.$"),
        ("seed_nan", r"invalid override seed=nan: .*could not be converted to Integer"),
    ],
)
def test_bad_input_gives_one_paragraph_and_exit_code_2(cli, name, match):
    run = cli[name]
    assert run.returncode == 2, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("curvlab: error: ")]
    assert len(errors) == 1, run.stderr
    assert re.match(match, errors[0].removeprefix("curvlab: error: ")), errors[0]
    assert "Traceback" not in run.stderr and "Error executing job" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == errors[0]  # one paragraph: nothing after it
    assert not list(run.folder.glob("run/metrics.jsonl"))  # rejected before the first step


def test_curvlab_debug_shows_the_traceback(cli):
    run = cli["debug_traceback"]
    assert run.returncode != 0 and "Traceback (most recent call last)" in run.stderr
    assert "MissingConfigException" in run.stderr
