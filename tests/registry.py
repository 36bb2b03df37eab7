"""The one registry of optimisers the generic tests cover: conf/optimizer/*.yaml plus ``METHODS`` below.

Every ``conf/optimizer/<name>.yaml`` is a choice a user makes with ``optimizer=<name>``; its ``_target_`` is the class
and its keys the options (composed by Hydra, as ``run.py`` composes them). Two kinds of choice:

* a library method (``optimizers.*`` other than the adapter ``TorchOptim``): ``METHODS[name]`` states what the
  generic tests cannot guess, the settings that converge on their small problems and the steps measured with them;
* an adapter choice (``_target_`` ``TorchOptim``: torch_optim, and the external packages' soap, shampoo, ...): needs
  nothing here (tests/test_torch_optim.py trains each on MNIST).

``test_options.py::test_every_choice_is_registered`` fails until a new yaml's method has its entry. The tests that
read the registry, and what a new method therefore gets without editing them:

=================================  ===================================================================================
tests/test_known_minima.py         ``Method.minima``: the least-squares minimiser in float64 and float32, Rosenbrock's
                                   (1, 1) in both (budgets 25 % + 2 above the measured steps)
tests/test_resume.py               ``Method.resume``: a stop signal through ``python run.py``, then resume bit for bit;
                                   every choice: its state through ``torch.load(weights_only=True)``, bit for bit
tests/test_options.py              every choice's yaml lists its options at their defaults; every class: nan, text and
                                   unknown keys are refused naming the key; ``Method.ridge``: weight decay reaches the
                                   closed-form ridge minimiser
tests/test_distributed.py          ``Method.equivalence``: 2 gloo ranks take the single process's steps, ranks bitwise
                                   identical
tests/test_micro_batch.py          ``Method.equivalence``: micro-batches take the whole batch's step, or the method
                                   refuses them naming objective.micro_batch_size (K-FAC)
=================================  ===================================================================================

Options given here are applied on top of the yaml choice, as command-line overrides would be. No flag says whether a
method is first-order or draws random numbers in its steps (K-FAC's sampled Fisher, PSGD, Hutchinson probes): the
tests that compare two runs give both the same random state, and every method meets every test.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import OmegaConf

from optimizers import Optimizer, TorchOptim

CONF = Path(__file__).resolve().parents[1] / "conf"


@dataclass(frozen=True)
class Minima:
    """Settings that reach the known minima, and the steps measured with them (CPU, this code)."""

    options: dict[str, Any]
    quadratic: tuple[int, int]          # to max |w - w*| < 1e-5 (float64), 1e-3 (float32)
    rosenbrock: tuple[int, int] | None  # to |(x, y) - (1, 1)| < 1e-4 (float64), 1e-3 (float32); None: the comment says
    total_steps: int | None = None      # the schedule's length (configure(total_steps)); None: the run's budget unknown


@dataclass(frozen=True)
class Resume:
    """The stop-signal case: a budget far above the steps taken before the signal, the signal, extra overrides."""

    steps: int = 120
    signal: str = "SIGTERM"
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Method:
    minima: Minima
    ridge: tuple[dict[str, Any], int]  # options and steps that reach the ridge minimiser under weight decay
    resume: Resume = Resume()
    # options on the small MLPs of the equivalence tests (data-parallel, micro-batches): variant -> options ("": plain)
    equivalence: dict[str, dict[str, Any]] = field(default_factory=lambda: {"": {}})


PLAIN_NEWTON = dict(damping=0.0, damping_factor=1.0, curvature_fraction=1.0, trust_radius=None)

METHODS: dict[str, Method] = {
    "sgd": Method(Minima(dict(lr=2e-3, momentum=0.9), quadratic=(217, 113), rosenbrock=(1126, 861)),
                  ridge=(dict(lr=0.1), 800), resume=Resume(300), equivalence={"": dict(lr=0.1)}),
    "adam": Method(Minima(dict(lr=5e-2), quadratic=(240, 144), rosenbrock=(2084, 1803)),
                   ridge=(dict(lr=0.05), 300), resume=Resume(300, "SIGUSR1"), equivalence={"": dict(lr=0.01)}),
    # Rosenbrock: ~13,000 Armijo steps along its valley (80 s), fixed steps more; the quadratic covers the method.
    "gd": Method(Minima(dict(lr=0.05), quadratic=(110, 62), rosenbrock=None),
                 ridge=(dict(lr=0.5), 200), resume=Resume(300), equivalence={"": dict(lr=0.05)}),
    # Newton's known minima with plain Newton (the seeds' full-batch method: one step on the quadratic); the defaults
    # (Levenberg-Marquardt from lambda = 1, the Hessian on a quarter of the batch) are for mini-batches. The
    # equivalence tests use the whole batch (each rank's first quarter is another subset than one process's).
    "newton": Method(Minima(PLAIN_NEWTON, quadratic=(1, 1), rosenbrock=(19, 18)), ridge=(PLAIN_NEWTON, 5),
                     resume=Resume(60, overrides=("dtype=float64", "model.hidden=[4]")),  # explicit 310 x 310 H
                     equivalence={"": dict(damping=1.0, curvature_fraction=1.0)}),  # 1e-2: float32 solve off by 1.7e-5
    "newton_cg": Method(Minima(PLAIN_NEWTON, quadratic=(1, 1), rosenbrock=(19, 18)), ridge=(PLAIN_NEWTON, 10),
                        resume=Resume(overrides=("dtype=float64",)),
                        equivalence={"": dict(damping=1e-2, curvature_fraction=1.0)}),
    # HF's defaults take the curvature on a quarter of the batch (Martens 2010 sec. 4.3): on the full-batch quadratic
    # that costs exactness (8 of 32 samples), 49 / 31 steps (6 / 4 with curvature_fraction=1). The equivalence tests
    # use the whole batch: each rank's first quarter is another subset of the global batch than one process's.
    "hf": Method(Minima({}, quadratic=(49, 31), rosenbrock=(15, 14)), ridge=({}, 30), resume=Resume(signal="SIGUSR2"),
                 equivalence={"": dict(weight_decay=1e-3, curvature_fraction=1.0)}),
    # damping=10 (the no-BN default): 213 Rosenbrock steps
    "curveball": Method(Minima(dict(damping=1.0), quadratic=(54, 28), rosenbrock=(30, 24)),
                        ridge=(dict(damping=1.0), 300), resume=Resume(signal="SIGINT"),
                        equivalence={"": dict(lambda_every=2)}),
    "lbfgs": Method(Minima({}, quadratic=(11, 9), rosenbrock=(35, 33)),
                    ridge=(dict(tolerance_change=0.0, tolerance_grad=0.0), 60),
                    resume=Resume(200, overrides=("dtype=float64", "trainer.batching=fixed"))),
    "nlcg": Method(Minima({}, quadratic=(6, 6), rosenbrock=(31, 31)), ridge=({}, 200),
                   resume=Resume(200, "SIGUSR2", ("dtype=float64", "trainer.batching=fixed"))),
    # Rosenbrock's two parameters are no Linear or Conv2d layer: K-FAC would be its fall-back (SGD) there.
    "kfac": Method(Minima({}, quadratic=(219, 127), rosenbrock=None), ridge=({}, 300), resume=Resume(signal="SIGUSR1"),
                   equivalence={"": dict(fisher="empirical", inverse_every=2),  # factors through the one reduction
                                "ggn": dict(fisher="ggn", weight_decay=1e-3)}),
    # The race's methods (issue 18). Muon's and PSGD's steps have a size set by the rate alone (orthogonalised /
    # normalised), so they reach 1e-5 only as a decaying schedule brings the rate down (cosine over total_steps).
    # Rosenbrock's parameter is one vector: Muon would run its AdamW part there (compared with torch's AdamW in
    # tests/test_race_methods.py instead).
    "muon": Method(Minima(dict(lr=0.05, output_layer="muon", schedule="cosine"), quadratic=(489, 359), rosenbrock=None,
                          total_steps=500),
                   ridge=(dict(decoupled=False, adam_lr=0.05, adam_betas=[0.9, 0.999], adam_eps=1e-8), 300),
                   resume=Resume(300, "SIGUSR2"), equivalence={"": dict(ns_dtype="float64")}),  # bfloat16: rounding flips
    "schedule_free": Method(Minima(dict(lr=0.2, betas=[0.95, 0.999]), quadratic=(405, 233), rosenbrock=(2547, 1017)),
                            ridge=(dict(decoupled=False, lr=0.2, betas=[0.95, 0.999]), 250),
                            resume=Resume(300, "SIGUSR1"), equivalence={"": dict(lr=0.01)}),
    "nadamw": Method(Minima(dict(lr=0.03), quadratic=(245, 220), rosenbrock=(2395, 2083)),
                     ridge=(dict(decoupled=False, lr=0.05), 250), resume=Resume(300, "SIGINT"),
                     equivalence={"": dict(lr=0.01, weight_decay=1e-3)}),
    # Adapter choices (pytorch-optimizer). SOAP's own decoupled decay (0.01) moves the minimiser: off here.
    "soap": Method(Minima(dict(lr=0.03, options=dict(weight_decay=0.0), schedule="cosine"), quadratic=(548, 224),
                          rosenbrock=(488, 398), total_steps=600),
                   ridge=(dict(lr=0.01, options=dict(weight_decay=0.0, betas=[0.95, 0.999])), 650),
                   resume=Resume(300),
                   # A side whose statistics are rank-deficient (more rows than the few steps' gradients span) has an
                   # arbitrary eigenbasis there, and Adam's per-coordinate scaling in it is not rotation invariant: a
                   # rounding-level change of the gradient (the batch's samples permuted) moves step 2 by 5e-3. The
                   # equivalence tests precondition only the sides of at most 5 (full rank here): 1e-11.
                   equivalence={"": dict(options=dict(max_precondition_dim=5))}),
    # Rosenbrock: its AdaGrad-like sums of gradient statistics shrink the steps along the valley (6e-3 from (1, 1)
    # after 6,000 steps at lr 1).
    "shampoo": Method(Minima(dict(lr=1.0), quadratic=(54, 30), rosenbrock=None), ridge=(dict(lr=1.0), 40),
                      resume=Resume(300, "SIGUSR1")),
    "psgd": Method(Minima(dict(lr=0.01, schedule="cosine"), quadratic=(1450, 1007), rosenbrock=(1355, 1102),
                          total_steps=1500),
                   ridge=(dict(lr=0.005, schedule="cosine"), 2000), resume=Resume(300, "SIGUSR2")),
}


# Adapter choices whose state a checkpoint loaded with weights_only=True cannot hold (their runs cannot checkpoint):
# the state round trip is an expected failure, strict, so that a fixed package shows up. (heavyball.SOAP's sets and
# pickled schedule are converted by the adapter: optimizers.torch_optim._checkpointable.)
NO_CHECKPOINT: dict[str, str] = {}


def seed_draws(seed: int) -> None:
    """Seed every random stream a method may draw from in its steps: torch's (K-FAC's sampled Fisher, PSGD's probes,
    Hutchinson) and NumPy's (pytorch-optimizer's Kron decides when to rebalance its factors with np.random)."""
    import numpy as np
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)


@functools.cache
def choices() -> dict[str, dict[str, Any]]:
    """Every conf/optimizer choice as composed by Hydra: name -> its keys (``_target_`` included)."""
    from runner.schema import register_configs

    register_configs()
    names = sorted(p.stem for p in (CONF / "optimizer").glob("*.yaml"))
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return {n: OmegaConf.to_container(compose("config", [f"optimizer={n}"]).optimizer, resolve=True) for n in names}


def method_class(name: str) -> type[Optimizer]:
    return get_class(choices()[name]["_target_"])


def is_adapter_choice(name: str) -> bool:
    return issubclass(method_class(name), TorchOptim)


def options(name: str) -> dict[str, Any]:
    """The choice's options as its yaml sets them."""
    return {k: v for k, v in choices()[name].items() if k not in ("_target_", "_partial_")}


def make(name: str, params, **overrides: Any) -> Optimizer:
    """The optimiser ``optimizer=<name>`` builds, with ``overrides`` on top (as command-line overrides)."""
    return method_class(name)(params, **{**options(name), **overrides})


def factory(name: str, **overrides: Any):
    """``params -> make(name, params, **overrides)``."""
    return functools.partial(make, name, **overrides)


def library_classes() -> list[type[Optimizer]]:
    """Every class a choice builds (the library's methods and the adapter), each once, in registry order."""
    return list(dict.fromkeys(method_class(name) for name in [*METHODS, *choices()]))


def adapter_choices() -> list[str]:
    return [name for name in choices() if is_adapter_choice(name)]
