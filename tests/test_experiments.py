"""The experiment configs of the seeds, every optimiser through `python run.py`, the submitit launcher, and the known
problems (Rosenbrock, sine regression, 2-D logistic regression) end to end.

Every experiment file (one per row of a seed's table) composes with the values its seed gives; those whose data
exists here (MNIST and Fashion-MNIST from CURVLAB_DATA, synthetic problems, tiny CIFAR-10 files written in tmp) run
two real training steps in-process. The `python run.py` sweeps (every optimiser, the submitit launcher, one seed
table through `experiment=glob(...)`) start in the background when this module starts and are checked by the last
tests (marked slow; deselected, they are not started).
"""

from __future__ import annotations

import math
import os
import pickle
import re
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
class Row:
    """What one experiment file must say: the builders it selects and the values its seed gives."""

    builders: tuple[str, str, str]  # dataset builder, model builder, optimiser class (the _target_ names)
    facts: dict[str, object] = field(default_factory=dict)  # config values taken from the seed
    sweep: dict[str, str] = field(default_factory=dict)  # hydra.sweeper.params (seed rows never sweep: one file a run)


def seed_rows() -> dict[str, Row]:
    """One entry per conf/experiment file, built from the seeds' tables (the files are the single source of the
    settings; this is the seed's side to check them against)."""
    rows = {
        "mnist_mlp_adam": Row(("build_mnist", "build_mlp", "Adam"), {"trainer.max_epochs": 3}),
        "mnist_sgd_vs_adam": Row(("build_mnist", "build_mlp", "SGD"), {"trainer.max_epochs": 2},
                                 {"optimizer": "sgd,adam", "seed": "0,1,2"}),
        "seed000_simple_cnn_newton": Row(("build_mnist", "build_simple_cnn", "Newton"), {
            "dtype": "float64", "trainer.batching": "full", "trainer.batch_size": None, "trainer.max_epochs": 80,
            "optimizer.solver": "cg", "optimizer.pretrain_steps": 60, "optimizer.cg_init": "weights",
            "optimizer.cg_negative_curvature": "continue", "optimizer.cg_martens_tol": 0.0}),
        "seed000_simple_cnn_gd": Row(("build_mnist", "build_simple_cnn", "GradientDescent"), {
            "dtype": "float64", "trainer.batching": "full", "trainer.batch_size": None, "trainer.max_epochs": 80,
            "optimizer.step_size": "fixed"}),
        "seed000_taylor_gd": Row(("build_mnist", "build_simple_cnn", "GradientDescent"), {
            "dtype": "float64", "dataset.num_train": 100, "trainer.batching": "full", "trainer.max_epochs": 150,
            "diagnostics.what": ["taylor", "hessian_top"], "diagnostics.every": 150, "diagnostics.batch_size": 100}),
        "seed000_spectrum_sgd": Row(("build_mnist", "build_simple_cnn", "SGD"), {
            "trainer.max_epochs": 3, "diagnostics.what": ["hessian_top", "hessian_bottom"],
            "diagnostics.every": 200}),
        "seed002_sine_hf": Row(("build_sine", "build_mlp", "HessianFree"), {
            "trainer.batch_size": 1000, "optimizer.damping_factor": 1.01, "optimizer.cg_min_iters": 3,
            "optimizer.line_search": False, "optimizer.curvature_fraction": 1.0, "model.hidden": [15, 15]}),
        "seed002_sine_sgd": Row(("build_sine", "build_mlp", "SGD"), {"trainer.batch_size": 100, "optimizer.lr": 0.05}),
        "seed002_mnist_hf": Row(("build_mnist", "build_mlp", "HessianFree"), {
            "trainer.batch_size": 1000, "optimizer.damping_factor": 1.5, "optimizer.cg_min_iters": 3,
            "optimizer.cg_martens_tol": 5e-4, "optimizer.curvature_fraction": 1.0, "model.hidden": [800]}),
        "seed002_mnist_hf_small_batch": Row(("build_mnist", "build_mlp", "HessianFree"), {
            "trainer.batch_size": 75, "optimizer.damping_factor": 1.01, "optimizer.cg_min_iters": 3,
            "optimizer.curvature_fraction": 1.0}),
        "seed002_mnist_sgd": Row(("build_mnist", "build_mlp", "SGD"), {
            "trainer.batch_size": 100, "optimizer.lr": 0.1, "optimizer.momentum": 0.0, "model.hidden": [800]}),
        "seed003_mnist_kfac_mlp_curveball": Row(("build_mnist", "build_mlp", "CurveBall"), {
            "trainer.batch_size": 64, "model.hidden": [128, 64, 32], "model.activation": "tanh"}),
    }
    # seed 003 sec. 4 (issue 10): K-FAC vs CurveBall vs Adam vs SGD (and HF, issue 8) on the 128-64-32-10 tanh MLP, one file each
    for method, optimizer, facts in (("kfac", "KFAC", {"optimizer.damping": 1.0}), ("curveball", "CurveBall", {}),
                                     ("adam", "Adam", {"optimizer.lr": 0.001}), ("sgd", "SGD", {"optimizer.lr": 0.03}),
                                     ("hf", "HessianFree", {"optimizer.damping_factor": 1.5,
                                                            "optimizer.curvature_fraction": 0.25})):
        rows[f"seed003_mnist_mlp_{method}"] = Row(("build_mnist", "build_mlp", optimizer), {
            "trainer.batch_size": 64, "model.hidden": [128, 64, 32], "model.activation": "tanh", **facts})
    # seed 001, Tables 1 and 2: logistic regression on reshuffled / fixed batches
    methods = {"newton_ls": ("Newton", {"optimizer.step_size": "armijo"}),
               "newton_nols": ("Newton", {"optimizer.step_size": "fixed", "optimizer.lr": 1.0}),
               "lbfgs": ("LBFGS", {}), "nlcg": ("NLCG", {"optimizer.same_batch": False})}
    batching = {"fixed": {"trainer.batching": "full", "trainer.max_epochs": 50},
                "shuffled": {"trainer.batching": "shuffle", "trainer.batch_size": 500, "trainer.drop_last": True}}
    for table, trainer in batching.items():
        for method, (optimizer, facts) in methods.items():
            rows[f"seed001_logreg_{table}_{method}"] = Row(("build_logreg2d", "build_mlp", optimizer), {
                "dtype": "float64", "model.hidden": [], **trainer, **facts})
    # seed 001, Table 3: Fashion-MNIST, 100 iterations on eq. 28's objective over all fixed batches, lambda = 0.01
    for method, optimizer in (("gd", "GradientDescent"), ("nlcg", "NLCG"), ("lbfgs", "LBFGS")):
        for layers, hidden in (("1l", [300]), ("2l", [300, 300])):
            rows[f"seed001_fashion_{method}_{layers}"] = Row(("build_fashion_mnist", "build_mlp", optimizer), {
                "model.hidden": hidden, "optimizer.weight_decay": 0.01, "trainer.batching": "full",
                "trainer.batch_size": None, "trainer.max_epochs": 100,
                **({"optimizer.same_batch": False} if method == "nlcg" else {})})
    # seed 003, Table 1: six optimisers on three Rosenbrock variants and Rahimi & Recht's problem, float64
    optimizers = {"sgd": "SGD", "adam": "Adam", "lm": "HessianFree", "bfgs": "LBFGS", "newton": "Newton",
                  "curveball": "CurveBall"}
    problems = {"rosenbrock_det": 1.0, "rosenbrock_u01": (0.0, 1.0), "rosenbrock_u03": (0.0, 3.0)}
    for method, optimizer in optimizers.items():
        for problem, noise in problems.items():
            l1, l2 = noise if isinstance(noise, tuple) else (noise, noise)
            rows[f"seed003_table1_{problem}_{method}"] = Row(("build_rosenbrock", "build_rosenbrock", optimizer), {
                "dtype": "float64", "dataset.l1": l1, "dataset.l2": l2, "trainer.batch_size": 1})
        rows[f"seed003_table1_rahimi_recht_{method}"] = Row(
            ("build_rahimi_recht", "build_two_layer_linear", optimizer),
            {"dtype": "float64", "dataset.condition": 1e5, "trainer.batching": "full",
             **({"optimizer.curvature_fraction": 1.0} if method == "lm" else {})})
    # seed 003, Table 2: CurveBall with / without lambda rescaling, SGD and Adam on four models
    models = {"basic": ("build_cifar10", "build_cifar_basic_cnn", 128, {"model.batch_norm": False}),
              "basic_bn": ("build_cifar10", "build_cifar_basic_cnn", 128, {"model.batch_norm": True}),
              "resnet18": ("build_cifar10", "build_resnet18", 128, {}),
              "vggf": ("build_imagenet", "build_vgg_f", 256, {"model.batch_norm": False, "dataset.image_size": 224})}
    methods = {"curveball_lambda": ("CurveBall", {"optimizer.lambda_rescaling": True}),
               "curveball": ("CurveBall", {"optimizer.lambda_rescaling": False}),
               "sgd": ("SGD", {"optimizer.momentum": 0.9}), "adam": ("Adam", {})}
    for model, (dataset, builder, batch, model_facts) in models.items():
        for method, (optimizer, facts) in methods.items():
            rows[f"seed003_table2_{model}_{method}"] = Row((dataset, builder, optimizer), {
                "trainer.batch_size": batch, "trainer.max_epochs": 20, **model_facts, **facts})
    # seed 004, Tables 1-3: linear -> ReLU -> linear on MNIST, batch 64, 7 epochs, alpha = 0.5
    base = {"trainer.batch_size": 64, "trainer.max_epochs": 7, "model.hidden": [32], "model.activation": "relu"}
    newton = {"optimizer.solver": "explicit", "optimizer.step_size": "fixed", "optimizer.lr": 0.5,
              "optimizer.descent_check": "none"}
    hf = {"optimizer.damping_factor": 1.0, "optimizer.lr": 0.5, "optimizer.line_search": False,
          "optimizer.backtrack": False, "optimizer.preconditioner": False, "optimizer.warm_start_decay": 0.0,
          "optimizer.curvature_fraction": 1.0}
    rows |= {
        "seed004_sgd": Row(("build_mnist", "build_mlp", "SGD"), {
            **base, "optimizer.lr": 0.1, "optimizer.momentum": 0.0}),
        "seed004_newton": Row(("build_mnist", "build_mlp", "Newton"), {**base, **newton, "optimizer.damping": 0.0}),
        "seed004_damped_newton": Row(("build_mnist", "build_mlp", "Newton"), {
            **base, **newton, "optimizer.damping": 32.0}),
        "seed004_hf_newton": Row(("build_mnist", "build_mlp", "HessianFree"), {
            **base, **hf, "optimizer.curvature": "hessian", "optimizer.damping": 32.0}),
        "seed004_hf_gauss_newton": Row(("build_mnist", "build_mlp", "HessianFree"), {
            **base, **hf, "optimizer.curvature": "ggn", "optimizer.damping": 4.0}),
    }
    return rows


ROWS = seed_rows()
# Rows with a test of their own below, or too large to step here.
OWN_TEST = {"seed000_simple_cnn_newton", "seed004_hf_newton", "seed004_hf_gauss_newton",
            "seed004_newton", "seed004_damped_newton"}  # explicit Newton: a 25,450^2 Hessian per step (2.6 GB)
DATA = {"build_mnist": "mnist", "build_fashion_mnist": "mnist", "build_cifar10": "cifar10",
        "build_imagenet": "imagenet"}  # every other dataset builder is synthetic


def runnable(kind: str) -> list:
    """The rows that take two real steps here, on data of `kind` (mnist | synthetic | cifar10)."""
    names = [n for n, r in ROWS.items() if DATA.get(r.builders[0], "synthetic") == kind and n not in OWN_TEST]
    return names


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


# ---------------------------------------------------------------- the `python run.py` sweeps, in the background


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
SEED_TABLE = "seed001_logreg_fixed_*"  # the table the one-command test runs (4 rows, synthetic data, seconds)


def _sweeps(folder: Path) -> dict[str, tuple[list[str], Path]]:
    """name -> (arguments of `python run.py`, launch folder). The submitit sweep runs from the repository root:
    submitit's local executor starts each job in a fresh `python -m submitit.core._submit`, which unpickles the
    task and so must import runner/, data/, ..., as a user's launch from the repository does."""
    common = ["threads=1", f"hydra.sweep.dir={folder}/NAME/sweep"]
    sweeps = {
        "submitit": (["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=2",
                      "hydra.launcher.cpus_per_task=1", "optimizer=sgd,adam", "trainer.max_steps=2", *common], REPO),
        "seed_table": (["-m", f"experiment=glob({SEED_TABLE})", "trainer.max_epochs=2", *common], folder),
    }
    if HAS_MNIST:
        sweeps["optimizers"] = (["-m", f"optimizer={','.join(OPTIMIZERS)}", "dataset=mnist", "model=mlp",
                                 "trainer.max_steps=3", "trainer.max_epochs=null", "trainer.batch_size=256", *common],
                                folder)
    return sweeps


@pytest.fixture(scope="module", autouse=True)
def sweeps(request, tmp_path_factory):
    """Start the sweeps whose tests are selected (all of them by default) as soon as this module starts."""
    wanted = {item.originalname for item in request.session.items}
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "CURVLAB_DEBUG")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    root = tmp_path_factory.mktemp("sweeps")
    launched = {}
    for name, (args, cwd) in _sweeps(root).items():
        if SWEEP_TESTS[name] in wanted:
            (root / name).mkdir()
            launched[name] = Launched(root / name, subprocess.Popen(
                [sys.executable, str(REPO / "run.py"), *[a.replace("NAME", name) for a in args]], cwd=cwd, env=env,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    yield launched
    for run in launched.values():
        if run.process.poll() is None:
            run.process.kill()
            run.process.communicate()


# ---------------------------------------------------------------- every experiment composes


def test_every_experiment_file_is_a_seed_row():
    assert sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")) == sorted(ROWS)


@pytest.mark.parametrize("name", sorted(ROWS))
def test_experiment_composes_with_the_seed_settings(name):
    expected = ROWS[name]
    cfg = make_config(f"experiment={name}", hydra_node=True)
    assert (target_name(cfg.dataset), target_name(cfg.model), target_name(cfg.optimizer)) == expected.builders
    for key, value in expected.facts.items():
        assert OmegaConf.select(cfg, key) == value, key
    params = cfg.hydra.sweeper.params
    assert (OmegaConf.to_container(params) if params else {}) == expected.sweep


@pytest.mark.parametrize("name", sorted(ROWS))
def test_experiment_files_hold_only_overrides(name):
    text = (CONF_DIR / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_\n") and "_target_" not in text
    assert re.search(rf"python run\.py (-m )?experiment={name}\b", text)  # the command that runs it, in its header


def test_command_line_wins_over_an_experiment():
    cfg = make_config("experiment=seed002_mnist_hf", "trainer.batch_size=75", "optimizer.damping_factor=1.01")
    assert (cfg.trainer.batch_size, cfg.optimizer.damping_factor, cfg.optimizer.cg_min_iters) == (75, 1.01, 3)


# ---------------------------------------------------------------- two real steps of each runnable experiment

SHRINK = {  # extra overrides for the two-step smoke runs
    "seed000_simple_cnn_newton": ["dataset.num_train=500", "optimizer.pretrain_steps=1"],
    "seed000_simple_cnn_gd": ["dataset.num_train=500"],
    "seed002_mnist_hf": ["trainer.batch_size=250"],
    "seed000_spectrum_sgd": ["diagnostics.batch_size=64"],  # the diagnostics run after the last (2nd) step
    **{f"seed001_fashion_{m}_{l}": ["dataset.num_train=1000"] for m in ("gd", "nlcg", "lbfgs") for l in ("1l", "2l")},
}


@pytest.mark.parametrize("name", runnable("synthetic") + runnable("mnist"))
def test_experiment_runs_two_steps(name, tmp_path):
    if DATA.get(ROWS[name].builders[0]) == "mnist" and not HAS_MNIST:
        pytest.skip("CURVLAB_DATA is not set")
    cfg = make_config(f"experiment={name}", "trainer.max_steps=2", *SHRINK.get(name, []))
    result = train(cfg, tmp_path)
    assert result.status == "ok" and result.steps == 2
    check_rows(read_jsonl(tmp_path / "metrics.jsonl"), 2, ROWS[name].builders[2])


@needs_mnist
@pytest.mark.slow
def test_seed000_pretrains_then_takes_a_newton_cg_step(tmp_path):
    cfg = make_config("experiment=seed000_simple_cnn_newton", "trainer.max_steps=2",
                      *SHRINK["seed000_simple_cnn_newton"])
    result = train(cfg, tmp_path)
    assert result.status == "ok"
    check_rows(read_jsonl(tmp_path / "metrics.jsonl"), 2, "Newton")
    first, second = read_jsonl(tmp_path / "metrics.jsonl")
    assert (first["pretrain"], second["pretrain"], second["solve"]) == (1, 0, "cg")
    assert second["cg/iters"] >= 1 and second["loss"] < first["loss"]


@pytest.mark.parametrize("name", ["seed004_newton", "seed004_damped_newton"])
def test_seed004_explicit_newton_rows_build(name):
    """Too large to step here (a 25,450 x 25,450 Hessian per step): the model and optimiser are built."""
    cfg = make_config(f"experiment={name}")
    model = hydra.utils.instantiate(cfg.model, input_shape=(1, 28, 28), num_outputs=10)
    assert sum(p.numel() for p in model.parameters()) == 784 * 32 + 32 + 32 * 10 + 10  # 25,450
    built = hydra.utils.instantiate(cfg.optimizer)(model.parameters())
    assert type(built).__name__ == "Newton" and cfg.optimizer.max_explicit_params >= 25_450


@needs_mnist
@pytest.mark.parametrize("name, damping", [("seed004_hf_gauss_newton", 4.0), ("seed004_hf_newton", 32.0)])
def test_seed004_hessian_free_rows_run_two_steps(name, damping, tmp_path):
    train(make_config(f"experiment={name}", "trainer.max_steps=2"), tmp_path)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    check_rows(rows, 2, "HessianFree")
    assert [(row["damping"], row["lr"]) for row in rows] == [(damping, 0.5)] * 2  # fixed lambda, alpha = 0.5
    products = "curv/hvp_products" if name == "seed004_hf_newton" else "curv/ggn_products"
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


@pytest.mark.parametrize("name", runnable("cifar10"))
def test_cifar_experiment_runs_two_steps_on_tiny_files(name, cifar_root, tmp_path):
    cfg = make_config(f"experiment={name}", f"data_root={cifar_root}", "trainer.max_steps=2", "trainer.batch_size=4")
    result = train(cfg, tmp_path)
    assert result.status == "ok" and result.epochs == 2 / 5  # 20 training images in batches of 4
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    check_rows(rows, 2, ROWS[name].builders[2])
    if ROWS[name].builders[2] == "CurveBall":
        assert rows[0]["rho"] == 0.0  # z = 0 on the first step: an exact line search along the gradient
        lambda0 = 1.0 if "bn" in name or "resnet" in name else 10.0  # seed 003 sec. 3: 1 with batch norm, else 10
        assert rows[0]["damping"] == lambda0


def test_vggf_imagenet100_builds_for_224_pixel_images():
    cfg = make_config("experiment=seed003_table2_vggf_curveball_lambda", "dataset.path=/data/imagenet100")
    model = hydra.utils.instantiate(cfg.model, input_shape=(3, 224, 224), num_outputs=100)
    # conv 23,296 + 409,856 + 3 x 590,080; fc 9216*4096+4096, 4096*4096+4096, 4096*100+100
    assert sum(p.numel() for p in model.parameters()) == 57_147_236
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 100)
    optimizer = hydra.utils.instantiate(cfg.optimizer)(model.parameters())
    assert type(optimizer).__name__ == "CurveBall"


# ---------------------------------------------------------------- known problems


@pytest.mark.slow
def test_newton_solves_rosenbrock_to_machine_precision(tmp_path):
    cfg = make_config("dataset=rosenbrock", "model=rosenbrock", "optimizer=newton", "dtype=float64",
                      "trainer.batching=full", "trainer.max_epochs=25")
    result = train(cfg, tmp_path)
    losses = [row["loss"] for row in read_jsonl(tmp_path / "metrics.jsonl")]
    assert losses[0] == pytest.approx(24.2)  # (1 + 1.2)^2 + 100 (1 - 1.2^2)^2 at the classic start (-1.2, 1)
    assert all(b <= a for a, b in zip(losses, losses[1:]))  # Armijo: never up
    assert result.summary["eval"]["eval/loss"] < 1e-8  # measured: 0.0 (5e-13 after 19 steps, 0.0 from step 21)


@pytest.mark.slow
def test_hessian_free_beats_sgd_on_the_sine_in_the_same_epochs(tmp_path):
    """Seed 002 Fig. 2 settings (HF: batch 1,000, r = 1.01; SGD: batch 100, lr 0.05), 10 epochs each."""
    losses = {}
    for name in ("seed002_sine_hf", "seed002_sine_sgd"):
        result = train(make_config(f"experiment={name}", "trainer.max_epochs=10"), tmp_path / name)
        assert result.epochs == 10
        losses[name] = result.summary["train_loss"]  # mean batch loss over the last epoch
    # measured: HF 0.0165, SGD 0.0202 (seeds 1, 2: 0.0211 / 0.0251, 0.0239 / 0.0282)
    assert losses["seed002_sine_hf"] < 0.9 * losses["seed002_sine_sgd"]


@pytest.mark.slow
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
@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_one_command_runs_a_whole_seed_table(sweeps):
    """`python run.py -m 'experiment=glob(seed001_logreg_fixed_*)'`: Hydra's glob over the experiment group runs
    every row of seed 001's Table 2, one job (and one folder) per file."""
    returncode, stdout, stderr = sweeps["seed_table"].wait()
    sweep = sweeps["seed_table"].folder / "sweep"
    assert returncode == 0, stderr
    expected = sorted(p.stem for p in (CONF_DIR / "experiment").glob(f"{SEED_TABLE}.yaml"))
    assert len(expected) == 4
    jobs = sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: int(p.name))
    assert [job.name for job in jobs] == ["0", "1", "2", "3"]
    ran = []
    for job in jobs:
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        name = next(o.removeprefix("experiment=") for o in overrides if o.startswith("experiment="))
        config = yaml.safe_load((job / "config.yaml").read_text())
        assert config["optimizer"]["_target_"].endswith("." + ROWS[name].builders[2])
        check_rows(read_jsonl(job / "metrics.jsonl"), 2, ROWS[name].builders[2])  # 2 full-batch epochs
        ran.append(name)
    assert sorted(ran) == expected


SWEEP_TESTS = {"optimizers": "test_every_optimizer_takes_three_mnist_steps_through_run_py",
               "submitit": "test_submitit_local_launcher_runs_a_two_job_sweep",
               "seed_table": "test_one_command_runs_a_whole_seed_table"}
