"""The experiment configs of the seeds, every optimiser through `python run.py`, the submitit launcher, and the known
problems (Rosenbrock, sine regression, 2-D logistic regression) end to end.

Every experiment file composes; those whose data exists here (MNIST and Fashion-MNIST from CURVLAB_DATA, synthetic
problems, tiny CIFAR-10 files written in tmp) run two real training steps in-process. The two `python run.py`
sweeps start in the background when this module starts and are checked by the last tests.
"""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from data.synthetic import build_logreg2d
from runner.metrics import read_jsonl
from runner.schema import register_configs
from runner.train import train

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
HAS_MNIST = bool(os.environ.get("CURVLAB_DATA"))
needs_mnist = pytest.mark.skipif(
    not HAS_MNIST, reason="CURVLAB_DATA is not set: point it at the folder holding MNIST/raw and FashionMNIST/raw"
)

# Statistics every row of an optimiser's metrics.jsonl carries (besides "loss").
OPTIMIZER_STATS = {
    "KFAC": ("damping", "kfac/kl_clip", "kfac/factor_time", "kfac/inverse_time", "update_norm"),
    "SGD": ("lr",),
    "Adam": ("lr",),
    "GradientDescent": ("step_size", "grad_norm"),
    "Newton": ("damping", "step_size", "grad_norm", "pretrain"),
    "HessianFree": ("damping", "cg/iters", "cg/stop", "reduction_ratio"),
    "CurveBall": ("rho", "beta", "damping"),
    "LBFGS": ("lbfgs/iters", "lbfgs/evals", "loss_after"),
    "NLCG": ("beta", "line_search/rate", "loss_after"),
}


@dataclass
class Experiment:
    builders: tuple[str, str, str]  # dataset builder, model builder, optimiser class (the _target_ names)
    facts: dict[str, object]  # config values taken from the seed
    data: str  # mnist | synthetic | cifar10 | imagenet
    shrink: list[str] = field(default_factory=list)  # extra overrides for the two-step smoke run
    sweep: dict[str, str] = field(default_factory=dict)  # hydra.sweeper.params


EXPERIMENTS = {
    "mnist_mlp_adam": Experiment(("build_mnist", "build_mlp", "Adam"), {"trainer.max_epochs": 3}, "mnist"),
    "mnist_sgd_vs_adam": Experiment(("build_mnist", "build_mlp", "SGD"), {"trainer.max_epochs": 2}, "mnist",
                                    sweep={"optimizer": "sgd,adam", "seed": "0,1,2"}),
    "seed000_simple_cnn_newton": Experiment(
        ("build_mnist", "build_simple_cnn", "Newton"),
        {"dtype": "float64", "trainer.batching": "full", "trainer.batch_size": None, "trainer.max_epochs": 80,
         "optimizer.solver": "cg", "optimizer.pretrain_steps": 60, "optimizer.cg_init": "weights"},
        "mnist", shrink=["trainer.batching=fixed", "trainer.batch_size=500", "optimizer.pretrain_steps=1"]),
    "seed001_fashion_lbfgs": Experiment(
        ("build_fashion_mnist", "build_mlp", "LBFGS"),
        {"trainer.batching": "fixed", "trainer.batch_size": 1000, "trainer.max_epochs": 100, "model.hidden": [300]},
        "mnist"),
    "seed001_fashion_nlcg": Experiment(
        ("build_fashion_mnist", "build_mlp", "NLCG"),
        {"trainer.batching": "fixed", "trainer.batch_size": 1000, "trainer.max_epochs": 100, "model.hidden": [300]},
        "mnist"),
    "seed001_logreg2d": Experiment(
        ("build_logreg2d", "build_mlp", "LBFGS"),
        {"dtype": "float64", "trainer.batching": "full", "trainer.max_epochs": 50, "model.hidden": []},
        "synthetic", sweep={"optimizer": "newton,lbfgs,nlcg"}),
    "seed002_sine_hf": Experiment(
        ("build_sine", "build_mlp", "HessianFree"),
        {"trainer.batch_size": 1000, "optimizer.damping_factor": 1.01, "optimizer.cg_min_iters": 3,
         "optimizer.line_search": False, "model.hidden": [15, 15]},
        "synthetic"),
    "seed002_sine_sgd": Experiment(
        ("build_sine", "build_mlp", "SGD"), {"trainer.batch_size": 100, "optimizer.lr": 0.05}, "synthetic"),
    "seed002_mnist_hf": Experiment(
        ("build_mnist", "build_mlp", "HessianFree"),
        {"trainer.batch_size": 1000, "optimizer.damping_factor": 1.5, "optimizer.cg_min_iters": 3,
         "optimizer.cg_martens_tol": 5e-4, "model.hidden": [800]},
        "mnist", shrink=["trainer.batch_size=250"]),
    "seed002_mnist_sgd": Experiment(
        ("build_mnist", "build_mlp", "SGD"),
        {"trainer.batch_size": 100, "optimizer.lr": 0.1, "optimizer.momentum": 0.0, "model.hidden": [800]}, "mnist"),
    "seed003_rosenbrock_curveball": Experiment(
        ("build_rosenbrock", "build_rosenbrock", "CurveBall"),
        {"dtype": "float64", "dataset.l1": 1.0, "dataset.l2": 1.0, "trainer.batch_size": 1}, "synthetic"),
    "seed003_rosenbrock_noisy": Experiment(
        ("build_rosenbrock", "build_rosenbrock", "CurveBall"),
        {"dtype": "float64", "dataset.l1": 0.0, "dataset.l2": 1.0, "trainer.batch_size": 1}, "synthetic",
        sweep={"dataset.l2": "1.0,3.0"}),
    "seed003_rahimi_recht": Experiment(
        ("build_rahimi_recht", "build_two_layer_linear", "CurveBall"),
        {"dtype": "float64", "dataset.condition": 1e5, "trainer.batching": "full"}, "synthetic"),
    "seed003_cifar_basic_curveball": Experiment(
        ("build_cifar10", "build_cifar_basic_cnn", "CurveBall"),
        {"model.batch_norm": False, "trainer.batch_size": 128, "trainer.max_epochs": 20}, "cifar10"),
    "seed003_cifar_basic_curveball_bn": Experiment(
        ("build_cifar10", "build_cifar_basic_cnn", "CurveBall"),
        {"model.batch_norm": True, "trainer.batch_size": 128, "trainer.max_epochs": 20}, "cifar10"),
    "seed003_resnet18_curveball": Experiment(
        ("build_cifar10", "build_resnet18", "CurveBall"), {"trainer.batch_size": 128, "trainer.max_epochs": 20},
        "cifar10"),
    "seed003_vggf_imagenet100_curveball": Experiment(
        ("build_imagenet", "build_vgg_f", "CurveBall"),
        {"model.batch_norm": False, "trainer.batch_size": 256, "dataset.image_size": 224}, "imagenet"),
    "seed003_mnist_kfac_mlp_curveball": Experiment(
        ("build_mnist", "build_mlp", "CurveBall"),
        {"trainer.batch_size": 64, "model.hidden": [128, 64, 32], "model.activation": "tanh"}, "mnist"),
    **{f"seed003_mnist_mlp_{name}": Experiment(  # issue 10: seed 003's K-FAC comparison, one file per method
        ("build_mnist", "build_mlp", cls),
        {"trainer.batch_size": 64, "model.hidden": [128, 64, 32], "model.activation": "tanh", **facts}, "mnist")
       for name, cls, facts in (("kfac", "KFAC", {"optimizer.damping": 1.0}), ("curveball", "CurveBall", {}),
                                ("adam", "Adam", {"optimizer.lr": 0.001}), ("sgd", "SGD", {"optimizer.lr": 0.03}))},
    "seed004_mnist_newton_variants": Experiment(
        ("build_mnist", "build_mlp", "HessianFree"),
        {"trainer.batch_size": 64, "trainer.max_epochs": 7, "optimizer.damping": 4.0, "optimizer.damping_factor": 1.0,
         "optimizer.lr": 0.5, "optimizer.line_search": False, "model.hidden": [32]},
        "mnist"),
}
# The rows of seed 004's tables, as the header of seed004_mnist_newton_variants.yaml gives them.
SEED004 = "experiment=seed004_mnist_newton_variants"
SEED004_BASE = ["dataset=mnist", "model=linear_relu_linear", "trainer.batch_size=64", "trainer.max_epochs=7"]
NEWTON = [*SEED004_BASE, "optimizer=newton", "optimizer.step_size=fixed", "optimizer.lr=0.5",
          "optimizer.descent_check=none", "optimizer.max_explicit_params=30000"]
SEED004_VARIANTS = {
    "hf_gauss_newton": ([SEED004], "HessianFree", 0.5),
    "hf_newton": ([SEED004, "optimizer.curvature=hessian", "optimizer.damping=32"], "HessianFree", 0.5),
    "newton": (NEWTON, "Newton", 0.5),
    "damped_newton": ([*NEWTON, "optimizer.damping=32"], "Newton", 0.5),
    "sgd": ([*SEED004_BASE, "optimizer=sgd", "optimizer.lr=0.1", "optimizer.momentum=0"], "SGD", 0.1),
}

CLOSER_TESTS = ("seed000_simple_cnn_newton", "seed004_mnist_newton_variants")  # each has its own test below
RUNNABLE = [n for n, e in EXPERIMENTS.items() if e.data in ("mnist", "synthetic") and n not in CLOSER_TESTS]


def make_config(*overrides: str, hydra_node: bool = False) -> DictConfig:
    """conf/config.yaml with `overrides`, on one CPU thread, without a progress bar or checkpoint."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=["device=cpu", "threads=1", "trainer.progress=false",
                                            "trainer.checkpoint=false", *overrides], return_hydra_config=hydra_node)


def target_name(node: DictConfig) -> str:
    return node._target_.rsplit(".", 1)[1]


def check_rows(rows: list[dict], steps: int, optimizer: str) -> None:
    assert [row["step"] for row in rows] == list(range(1, steps + 1))
    assert all(math.isfinite(row["loss"]) for row in rows), [row["loss"] for row in rows]
    for row in rows:
        missing = [key for key in OPTIMIZER_STATS[optimizer] if key not in row]
        assert not missing, (row["step"], missing)
    assert math.isfinite(rows[-1]["eval/loss"])  # evaluated at the end


# ---------------------------------------------------------------- the two `python run.py` sweeps, in the background


@dataclass
class Launched:
    folder: Path
    process: subprocess.Popen
    result: tuple[int, str, str] | None = None

    def wait(self) -> tuple[int, str, str]:
        if self.result is None:
            stdout, stderr = self.process.communicate(timeout=300)
            self.result = (self.process.returncode, stdout, stderr)
        return self.result


# conf/optimizer/<name>.yaml -> the class it builds
OPTIMIZERS = {"sgd": "SGD", "adam": "Adam", "gd": "GradientDescent", "newton_cg": "Newton", "hf": "HessianFree",
              "curveball": "CurveBall", "lbfgs": "LBFGS", "nlcg": "NLCG", "kfac": "KFAC"}


@pytest.fixture(scope="module", autouse=True)
def sweeps(tmp_path_factory):
    """Start the optimiser sweep (real MNIST) and the submitit sweep as soon as this module starts."""
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "CURVLAB_DEBUG")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    launched = {}
    if HAS_MNIST:
        folder = tmp_path_factory.mktemp("optimizers")
        args = ["-m", f"optimizer={','.join(OPTIMIZERS)}", "dataset=mnist", "model=mlp", "trainer.max_steps=3",
                "trainer.max_epochs=null", "trainer.batch_size=256", "threads=1", f"hydra.sweep.dir={folder / 'sweep'}"]
        launched["optimizers"] = Launched(folder, subprocess.Popen(
            [sys.executable, str(REPO / "run.py"), *args], cwd=folder, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    # Submitit's local executor starts each job in a fresh `python -m submitit.core._submit`, which unpickles the
    # task and so must import runner/, data/, ...: it runs from the repository root, as a user does.
    folder = tmp_path_factory.mktemp("submitit")
    args = ["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=2", "hydra.launcher.cpus_per_task=1",
            "optimizer=sgd,adam", "trainer.max_steps=2", "threads=1", f"hydra.sweep.dir={folder / 'sweep'}"]
    launched["submitit"] = Launched(folder, subprocess.Popen(
        [sys.executable, "run.py", *args], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    yield launched
    for run in launched.values():
        if run.process.poll() is None:
            run.process.kill()
            run.process.communicate()


# ---------------------------------------------------------------- every experiment composes


def test_every_experiment_file_is_listed():
    assert sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")) == sorted(EXPERIMENTS)


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_experiment_composes_with_the_seed_settings(name):
    expected = EXPERIMENTS[name]
    cfg = make_config(f"experiment={name}", hydra_node=True)
    assert (target_name(cfg.dataset), target_name(cfg.model), target_name(cfg.optimizer)) == expected.builders
    for key, value in expected.facts.items():
        assert OmegaConf.select(cfg, key) == value, key
    params = cfg.hydra.sweeper.params
    assert (OmegaConf.to_container(params) if params else {}) == expected.sweep


def test_command_line_wins_over_an_experiment():
    cfg = make_config("experiment=seed002_mnist_hf", "trainer.batch_size=75", "optimizer.damping_factor=1.01")
    assert (cfg.trainer.batch_size, cfg.optimizer.damping_factor, cfg.optimizer.cg_min_iters) == (75, 1.01, 3)


# ---------------------------------------------------------------- two real steps of each runnable experiment


@pytest.mark.parametrize("name", RUNNABLE)
def test_experiment_runs_two_steps(name, tmp_path):
    experiment = EXPERIMENTS[name]
    if experiment.data == "mnist" and not HAS_MNIST:
        pytest.skip("CURVLAB_DATA is not set")
    cfg = make_config(f"experiment={name}", "trainer.max_steps=2", *experiment.shrink)
    result = train(cfg, tmp_path)
    assert result.status == "ok" and result.steps == 2
    check_rows(read_jsonl(tmp_path / "metrics.jsonl"), 2, experiment.builders[2])


@needs_mnist
def test_seed000_pretrains_then_takes_a_newton_cg_step(tmp_path):
    shrink = EXPERIMENTS["seed000_simple_cnn_newton"].shrink
    result = train(make_config("experiment=seed000_simple_cnn_newton", "trainer.max_steps=2", *shrink), tmp_path)
    assert result.status == "ok"
    check_rows(read_jsonl(tmp_path / "metrics.jsonl"), 2, "Newton")
    first, second = read_jsonl(tmp_path / "metrics.jsonl")
    assert (first["pretrain"], second["pretrain"], second["solve"]) == (1, 0, "cg")
    assert second["cg/iters"] >= 1 and second["loss"] < first["loss"]


@pytest.mark.parametrize(
    "name, overrides, optimizer",
    [
        ("seed001_logreg2d", ["optimizer=newton"], "Newton"),
        ("seed001_logreg2d", ["optimizer=nlcg"], "NLCG"),
        ("seed003_rosenbrock_noisy", ["dataset.l2=3.0"], "CurveBall"),
    ],
)
def test_the_other_points_of_a_sweep_run(name, overrides, optimizer, tmp_path):
    result = train(make_config(f"experiment={name}", "trainer.max_steps=2", *overrides), tmp_path)
    assert result.status == "ok"
    check_rows(read_jsonl(tmp_path / "metrics.jsonl"), 2, optimizer)


@pytest.mark.parametrize("variant", sorted(SEED004_VARIANTS))
def test_seed004_rows_in_the_header_build(variant):
    """Each table row's command in the header of seed004_mnist_newton_variants.yaml composes and builds."""
    overrides, optimizer, lr = SEED004_VARIANTS[variant]
    cfg = make_config(*overrides)
    model = hydra.utils.instantiate(cfg.model, input_shape=(1, 28, 28), num_outputs=10)
    assert sum(p.numel() for p in model.parameters()) == 784 * 32 + 32 + 32 * 10 + 10  # 25,450
    built = hydra.utils.instantiate(cfg.optimizer)(model.parameters())
    assert type(built).__name__ == optimizer
    assert (cfg.dataset._target_, cfg.trainer.batch_size, cfg.trainer.max_epochs) == ("data.vision.build_mnist", 64, 7)
    assert cfg.optimizer.lr == lr


@needs_mnist
@pytest.mark.parametrize("variant, damping", [("hf_gauss_newton", 4.0), ("hf_newton", 32.0)])
def test_seed004_hessian_free_rows_run_two_steps(variant, damping, tmp_path):
    overrides, _, _ = SEED004_VARIANTS[variant]
    train(make_config(*overrides, "trainer.max_steps=2"), tmp_path)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    check_rows(rows, 2, "HessianFree")
    assert [(row["damping"], row["lr"]) for row in rows] == [(damping, 0.5)] * 2  # fixed lambda, alpha = 0.5
    products = "curv/hvp_products" if variant == "hf_newton" else "curv/ggn_products"
    assert all(row[products] >= row["cg/iters"] >= 1 for row in rows)


# ---------------------------------------------------------------- CIFAR-10 (tiny files) and ImageNet (model only)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    """Tiny CIFAR-10 in torchvision's python-version layout: 5 training batches and a test batch of 4 images each.
    torchvision reads them as it reads the real (Python 2) pickles; tests/test_data.py checks that exact format."""
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, size=(4, 3072), dtype=np.uint8),  # rows: 1024 R, 1024 G, 1024 B
                 "labels": [int(v) for v in rng.integers(0, 10, 4)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))
    return root


@pytest.mark.parametrize("name", [n for n, e in EXPERIMENTS.items() if e.data == "cifar10"])
def test_cifar_experiment_runs_two_steps_on_tiny_files(name, cifar_root, tmp_path):
    cfg = make_config(f"experiment={name}", f"data_root={cifar_root}", "trainer.max_steps=2", "trainer.batch_size=4")
    result = train(cfg, tmp_path)
    assert result.status == "ok" and result.epochs == 2 / 5  # 20 training images in batches of 4
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    check_rows(rows, 2, "CurveBall")
    assert rows[0]["rho"] == 0.0  # z = 0 on the first step: an exact line search along the gradient
    lambda0 = 1.0 if "bn" in name or "resnet" in name else 10.0  # seed 003 sec. 3: 1 with batch norm, else 10
    assert rows[0]["damping"] == lambda0


def test_vggf_imagenet100_builds_for_224_pixel_images():
    cfg = make_config("experiment=seed003_vggf_imagenet100_curveball", "dataset.path=/data/imagenet100")
    model = hydra.utils.instantiate(cfg.model, input_shape=(3, 224, 224), num_outputs=100)
    # conv 23,296 + 409,856 + 3 x 590,080; fc 9216*4096+4096, 4096*4096+4096, 4096*100+100
    assert sum(p.numel() for p in model.parameters()) == 57_147_236
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 100)
    optimizer = hydra.utils.instantiate(cfg.optimizer)(model.parameters())
    assert type(optimizer).__name__ == "CurveBall"


# ---------------------------------------------------------------- known problems


def test_newton_solves_rosenbrock_to_machine_precision(tmp_path):
    cfg = make_config("dataset=rosenbrock", "model=rosenbrock", "optimizer=newton", "dtype=float64",
                      "trainer.batching=full", "trainer.max_epochs=25")
    result = train(cfg, tmp_path)
    losses = [row["loss"] for row in read_jsonl(tmp_path / "metrics.jsonl")]
    assert losses[0] == pytest.approx(24.2)  # (1 + 1.2)^2 + 100 (1 - 1.2^2)^2 at the classic start (-1.2, 1)
    assert all(b <= a for a, b in zip(losses, losses[1:]))  # Armijo: never up
    assert result.summary["eval"]["eval/loss"] < 1e-8  # measured: 0.0 (5e-13 after 19 steps, 0.0 from step 21)


def test_hessian_free_beats_sgd_on_the_sine_in_the_same_epochs(tmp_path):
    """Seed 002 Fig. 2 settings (HF: batch 1,000, r = 1.01; SGD: batch 100, lr 0.05), 10 epochs each."""
    losses = {}
    for name in ("seed002_sine_hf", "seed002_sine_sgd"):
        result = train(make_config(f"experiment={name}", "trainer.max_epochs=10"), tmp_path / name)
        assert result.epochs == 10
        losses[name] = result.summary["train_loss"]  # mean batch loss over the last epoch
    # measured: HF 0.0165, SGD 0.0202 (seeds 1, 2: 0.0211 / 0.0251, 0.0239 / 0.0282)
    assert losses["seed002_sine_hf"] < 0.9 * losses["seed002_sine_sgd"]


def test_lbfgs_logistic_regression_reaches_the_minimum_and_its_accuracy(tmp_path):
    cfg = make_config("dataset=logreg2d", "model=logreg", "optimizer=lbfgs", "dtype=float64",
                      "trainer.batching=full", "trainer.max_epochs=15")
    result = train(cfg, tmp_path)
    # The unregularised maximum-likelihood fit of the same points, by scikit-learn.
    splits = build_logreg2d(seed=0)
    x, y = splits.train.inputs.numpy(), splits.train.targets.numpy()
    reference = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000).fit(x, y)
    minimum = log_loss(y, reference.predict_proba(x))  # 0.1913374
    last = read_jsonl(tmp_path / "metrics.jsonl")[-1]
    assert last["loss_after"] == pytest.approx(minimum, abs=1e-8)  # measured: 2e-11 above it
    accuracy = result.summary["eval"]["eval/accuracy"]
    assert accuracy >= 0.92  # measured: 0.93, as scikit-learn's fit
    assert accuracy == reference.score(splits.test.inputs.numpy(), splits.test.targets.numpy())


# ---------------------------------------------------------------- the background sweeps


@needs_mnist
def test_every_optimizer_takes_three_mnist_steps_through_run_py(sweeps):
    returncode, stdout, stderr = sweeps["optimizers"].wait()
    sweep = sweeps["optimizers"].folder / "sweep"
    assert returncode == 0, stderr
    assert stdout.strip().splitlines()[-1] == f"curvlab: results in {sweep}"
    first_losses = []
    for job, (name, optimizer) in enumerate(OPTIMIZERS.items()):  # Hydra numbers the jobs in the sweep's order
        config = yaml.safe_load((sweep / str(job) / "config.yaml").read_text())
        assert config["optimizer"]["_target_"].endswith(f".{optimizer}")
        rows = read_jsonl(sweep / str(job) / "metrics.jsonl")
        check_rows(rows, 3, optimizer)
        assert rows[-1]["loss"] < rows[0]["loss"], (name, [row["loss"] for row in rows])
        first_losses.append(rows[0]["loss"])
        if name == "newton_cg":
            assert all(row["solve"] == "cg" and row["cg/iters"] >= 1 for row in rows)
        if name == "hf":
            assert rows[0]["damping"] == 1.0 and all(row["cg/iters"] >= 3 for row in rows)  # cg_min_iters = 3
            assert all(row["curv/ggn_products"] >= row["cg/iters"] for row in rows)
        if name == "curveball":
            assert rows[0]["rho"] == 0.0 and rows[0]["damping"] == 10.0  # lambda0 = 10 without batch norm
        if name == "lbfgs":
            assert all(row["lbfgs/iters"] == 1 for row in rows)
    # Same seed: the same initial weights and the same first batch for every optimiser.
    assert first_losses == pytest.approx([first_losses[0]] * len(OPTIMIZERS), rel=1e-6)


def test_submitit_local_launcher_runs_a_two_job_sweep(sweeps):
    returncode, stdout, stderr = sweeps["submitit"].wait()
    sweep = sweeps["submitit"].folder / "sweep"
    assert returncode == 0, stderr
    for job, optimizer in (("0", "SGD"), ("1", "Adam")):
        rows = read_jsonl(sweep / job / "metrics.jsonl")
        check_rows(rows, 2, optimizer)
        hydra_config = yaml.safe_load((sweep / job / ".hydra" / "hydra.yaml").read_text())["hydra"]
        assert hydra_config["launcher"]["_target_"].endswith("submitit_launcher.LocalLauncher")
        assert hydra_config["launcher"]["timeout_min"] == 2
    logs = sorted(sweep.glob(".submitit/*/*_0_log.out"))
    assert len(logs) == 2  # one submitit job folder (pickles and logs) per job
