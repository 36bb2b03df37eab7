"""The workload group (conf/workload/) and the two stopping rules it uses (trainer.max_time_minutes and
trainer.stop_at_target, runner/stopping.py), with the real runner.

Every workload composes through `python run.py workload=<name> --cfg job` and names its target, metric and budget
consistently; the cheap ones train a few steps in-process (MNIST-sized ones on the real files of CURVLAB_DATA), the
CIFAR-10 and ImageNet ones on small files in the real formats (written by tests/test_data.py's writers). The stopping
rules are checked against the metrics file read here with plain json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from runner.train import train
from tests.runs import CONF_DIR, REPO, env, make_config, metrics
from tests.test_data import write_cifar10, write_imagenet

WORKLOADS = sorted(p.stem for p in (CONF_DIR / "workload").glob("*.yaml"))
ON_CPU = ["digits_mlp", "sine_mlp", "mnist_mlp800", "mnist_tanh_mlp", "mnist_linear_relu", "fashion_mlp",
          "mnist_simple_cnn"]  # real data on this machine (runner/race.py: CPU_WORKLOADS)
NEEDS_FILES = {"cifar10_basic_cnn": "cifar10", "cifar10_resnet18": "cifar10", "imagenet_resnet50": "imagenet"}
needs_mnist = pytest.mark.skipif(not os.environ.get("CURVLAB_DATA"), reason="CURVLAB_DATA is not set (MNIST files)")
SMALL = ["trainer.max_steps=3", "trainer.eval_every=3", "trainer.checkpoint=false"]


def test_the_suite_is_the_issues_list():
    from runner.race import CPU_WORKLOADS

    assert sorted(WORKLOADS) == sorted(ON_CPU + list(NEEDS_FILES))
    assert sorted(CPU_WORKLOADS) == sorted(ON_CPU)


@pytest.mark.parametrize("name", WORKLOADS)
def test_every_workload_composes_with_its_target_budget_and_tuning_objective(name):
    cfg = make_config(f"workload={name}")
    assert cfg.workload.name == name
    metric, target = cfg.workload.metric, cfg.workload.target
    assert metric in ("eval/accuracy", "eval/loss") and target > 0
    assert cfg.trainer.stop_at_target == f"{metric}:{target}"  # the run stops at the workload's target ...
    assert (cfg.tune.metric, cfg.tune.target, cfg.tune.objective) == (metric, target, "time_to_target")  # ... which
    assert cfg.trainer.max_steps and cfg.trainer.max_epochs is None  # tuning minimises the time to reach
    if name in ON_CPU:
        assert 0 < cfg.trainer.max_time_minutes <= 2  # minutes per run on a CPU: the race runs dozens of them
    text = (CONF_DIR / "workload" / f"{name}.yaml").read_text()
    assert "Target" in text and ("python -m runner.report.targets" in text or "not measured" in text)
    # Overriding the target moves every place that uses it.
    cfg = make_config(f"workload={name}", "workload.target=0.5")
    assert cfg.trainer.stop_at_target == f"{metric}:0.5" and cfg.tune.target == 0.5


def test_the_command_line_composes_a_workload_and_a_method_may_change_the_batch():
    result = subprocess.run([sys.executable, str(REPO / "run.py"), "workload=mnist_mlp800", "optimizer=hf",
                             "trainer.batch_size=1000", "--cfg", "job"], capture_output=True, text=True, env=env(),
                            timeout=120)
    assert result.returncode == 0, result.stderr
    cfg = yaml.safe_load(result.stdout)
    assert cfg["trainer"]["batch_size"] == 1000 and cfg["model"]["hidden"] == [800]
    assert cfg["optimizer"]["_target_"] == "optimizers.hf.HessianFree" and cfg["workload"]["target"] > 0.9


def test_a_misspelled_workload_key_is_refused():
    result = subprocess.run([sys.executable, str(REPO / "run.py"), "workload=digits_mlp", "workload.targt=0.9"],
                            capture_output=True, text=True, env=env(), timeout=120)
    assert result.returncode == 2 and "workload.targt" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ON_CPU)
def test_cheap_workloads_train_a_few_steps(name, tmp_path):
    if name.startswith(("mnist", "fashion")) and not os.environ.get("CURVLAB_DATA"):
        pytest.skip("CURVLAB_DATA is not set (MNIST files)")
    result = train(make_config(f"workload={name}", *SMALL), tmp_path)
    assert result.status == "ok" and result.steps == 3
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3] and "eval/loss" in rows[-1]


@pytest.mark.parametrize("name", sorted(NEEDS_FILES))
def test_cifar_and_imagenet_workloads_train_on_files_in_the_real_format(name, tmp_path):
    data = tmp_path / "data"
    if NEEDS_FILES[name] == "cifar10":
        write_cifar10(data, per_batch=4)  # 20 training and 4 test images in CIFAR-10's python pickles
    else:
        write_imagenet(data / "imagenet")  # 3 classes x 2 JPEGs per split
    cfg = make_config(f"workload={name}", f"data_root={data}", "trainer.batch_size=2", "trainer.eval_batch_size=4",
                      "trainer.num_workers=0", "trainer.max_steps=2", "trainer.eval_every=2",
                      "trainer.checkpoint=false",
                      *(["dataset.image_size=64"] if name == "imagenet_resnet50" else []))
    result = train(cfg, tmp_path / "run")
    assert result.status == "ok" and result.steps == 2
    assert "eval/accuracy" in metrics(tmp_path / "run")[-1]


# ---------------------------------------------------------------- the stopping rules


def test_a_wall_clock_budget_stops_at_the_step_that_spends_it(tmp_path):
    minutes = 0.003  # 0.18 s of optimiser steps (evaluation excluded)
    result = train(make_config("trainer.max_steps=100000", "trainer.max_epochs=null",
                               f"trainer.max_time_minutes={minutes}", "trainer.eval_every=1000"), tmp_path)
    rows = metrics(tmp_path)
    assert result.status == "ok" and 1 < result.steps < 100000
    assert rows[-1]["wall_time"] >= 60 * minutes > rows[-2]["wall_time"]  # the first step past the budget is the last
    assert "eval/accuracy" in rows[-1]  # ... and it is evaluated
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["exit_code"] == 0
    assert summary["stop_reason"].startswith(f"trainer.max_time_minutes={minutes}: ")
    # Continued with the same budget, the run takes no further step.
    again = train(make_config("trainer.max_steps=100000", "trainer.max_epochs=null",
                              f"trainer.max_time_minutes={minutes}", "trainer.eval_every=1000", "trainer.resume=true"),
                  tmp_path)
    assert again.steps == result.steps and len(metrics(tmp_path)) == len(rows)


def test_a_target_stops_the_run_after_the_evaluation_that_reaches_it(tmp_path):
    result = train(make_config("trainer.max_steps=500", "trainer.max_epochs=null", "trainer.eval_every=5",
                               "trainer.stop_at_target=eval/accuracy:0.9"), tmp_path)
    rows = metrics(tmp_path)
    first = next(r for r in rows if r.get("eval/accuracy", 0) >= 0.9)
    assert rows[-1] is not None and rows[-1]["step"] == first["step"] == result.steps < 500
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stop_reason"] == (f"trainer.stop_at_target=eval/accuracy:0.9: {first['eval/accuracy']:.6g} at step "
                                      f"{first['step']}")
    # A loss target is reached when the loss falls to it (sine regression: eval/loss).
    result = train(make_config("dataset=sine", "model=sine_mlp", "trainer.max_steps=400", "trainer.eval_every=10",
                               "trainer.stop_at_target=eval/loss:0.2"), tmp_path / "sine")
    rows = metrics(tmp_path / "sine")
    first = next(r for r in rows if r.get("eval/loss", 1e9) <= 0.2)
    assert result.steps == first["step"] < 400


def test_a_run_that_completes_its_budget_says_so(tmp_path):
    train(make_config("trainer.max_steps=4", "trainer.checkpoint=false"), tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text())["stop_reason"] == "trainer.max_steps=4"


@pytest.mark.parametrize("overrides, message", [
    (["trainer.max_time_minutes=0"], "trainer.max_time_minutes=0 must be a positive number of minutes"),
    (["trainer.stop_at_target=accuracy"], "trainer.stop_at_target=accuracy is not METRIC:VALUE"),
    (["dataset=sine", "model=sine_mlp", "trainer.stop_at_target=eval/accuracy:0.9"],
     "trainer.stop_at_target names eval/accuracy, which this run's evaluation does not log. Choose one of: eval/loss, "
     "train/loss."),
])
def test_bad_stopping_rules_are_refused_before_the_first_step(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        train(make_config("trainer.max_steps=3", *overrides), tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists() or metrics(tmp_path) == []


# ---------------------------------------------------------------- the target rule (runner/report/targets.py)


def fake_run(folder: Path, optimizer: str, lr: float, seed: int, accuracies: dict[int, float], seconds: float) -> None:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "optimizer": {"lr": lr}}))
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(
        {"hydra": {"runtime": {"choices": {"optimizer": optimizer}}}}))
    rows = [{"step": s, "wall_time": seconds * s / max(accuracies), "eval/accuracy": a} for s, a in accuracies.items()]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "summary.json").write_text(json.dumps({"status": "ok"}))


def test_the_target_rule_on_hand_made_reference_runs(tmp_path):
    from runner.report.targets import measure

    # sgd 0.1: worst seed's best within 100 steps = min(0.9717, 0.9731) = 0.9717 (the 0.99 at step 200 is too late);
    # adam: min(0.9650, 0.9800) = 0.9650. Best configuration: sgd, target floor(0.9717, 3 decimals) = 0.971.
    fake_run(tmp_path / "sgd" / "0", "sgd", 0.1, 0, {50: 0.95, 100: 0.9717, 200: 0.99}, 40.0)
    fake_run(tmp_path / "sgd" / "1", "sgd", 0.1, 1, {50: 0.9731, 100: 0.97, 200: 0.99}, 44.0)
    fake_run(tmp_path / "adam" / "0", "adam", 0.001, 0, {50: 0.96, 100: 0.9650}, 10.0)
    fake_run(tmp_path / "adam" / "1", "adam", 0.001, 1, {50: 0.98, 100: 0.97}, 10.0)
    found = measure([tmp_path], "eval/accuracy", 100, ["optimizer", "optimizer.lr"])
    assert found["best"]["config"] == "optimizer=sgd, optimizer.lr=0.1"
    assert found["target"] == 0.971 and found["max_steps"] == 400
    # The slowest sgd seed reached step 100 at 22 s (44 s for 200 steps): 4 x 22 s = 1.47 min -> 1.5 minutes.
    assert found["max_time_minutes"] == 1.5
    assert measure([tmp_path], "eval/accuracy", 100, ["optimizer", "optimizer.lr"], max_minutes=1.0)[
        "max_time_minutes"] == 1.0
