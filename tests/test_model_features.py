"""The model-feature matrix (issue 19, item 1): every curvature backend, every optimiser and every diagnostic on the
model features users bring, in float64 against ground truth that shares no code with curvlab (tests/oracles.py).

Rows are model features (``FEATURES``): dropout in train mode, batch norm in train and in eval mode, a frozen
backbone (frozen parameters, a batch norm in eval mode in a train-mode network), a layer the forward never uses, one
weight shared by two layers, and a timm vision transformer with stochastic depth (drop_path_rate > 0, train mode).
Columns come from the library's registries, so a new backend, optimiser or diagnostic is covered without editing
this file:

* backends: the gradient, G v on every Jacobian backend (``JACOBIAN_BACKENDS``), H v on every Hessian backend
  (``HESSIAN_BACKENDS``), ``hessian_matrix``, the per-sample squares of HF's preconditioner and the micro-batched
  objective; each against the dense oracle, and the same twice;
* optimisers: every ``conf/optimizer`` choice (tests/registry.py). The torch.optim adapter's choices (SGD, Adam,
  L-BFGS, the external packages) against the same torch class run directly on the model; gradient descent, Newton,
  Newton-CG, HF, CurveBall and NLCG against their step computed from the dense oracle (a dense solve where the method
  solves a system, CG run to tolerance); every method (K-FAC, and any new one) runs two steps, stays finite, leaves
  frozen parameters and eval-mode statistics untouched and gives the same result twice;
* diagnostics: every entry of the runner's registry (``runner.diagnostics.DIAGNOSTICS``) and the loss surface, run on
  the objective and on ``oracles.DenseObjective`` (dense matrices and the pure loss function) with the same seed: the
  same eigenvalues, traces, densities, Taylor remainders, gradient checks and surfaces.

A cell is ``exact`` (matches its reference to float64 precision), ``consistent`` (the checks above, no reference
exists) or ``refused`` (``REFUSED``: an OptionError at the objective's first product or the optimiser's first step,
before anything moved, naming the feature and the alternative). docs/library/model-features.md holds the matrix as
``render_matrix()`` writes it; ``test_the_documented_matrix_is_this_file's`` fails when they differ (regenerate with
``CURVLAB_WRITE_MATRIX=1 pytest tests/test_model_features.py -k documented``).
"""
from __future__ import annotations

import copy
import functools
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.optim.lbfgs import _strong_wolfe

import oracles
from optimizers import diagnostics as diag
from optimizers.backends import HESSIAN_BACKENDS, JACOBIAN_BACKENDS
from optimizers.micro_batch import MicroBatchedObjective
from optimizers.objective import Objective
from optimizers.torch_optim import TorchAdapter
from runner.diagnostics import DIAGNOSTICS, DiagnosticsOptions
from tests import registry
from validation.checks import OptionError

F64 = torch.float64
TOL = 1e-10          # relative error of a product, matrix or step against the oracle (float64)
SEED = 1234          # torch.manual_seed before an objective's forward pass: the oracle redraws the same masks
BATCH, CLASSES = 6, 3
PIECES = 4           # micro-batches of 4 and 2 samples
DOC = Path(__file__).resolve().parents[1] / "docs" / "library" / "model-features.md"


# ---------------------------------------------------------------------------------------------- the model features
def _mlp(*middle: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 5), *middle, nn.Tanh(), nn.Linear(5, 3))


class UnusedHead(nn.Module):
    """An auxiliary head the forward never calls: its parameters get no gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head, self.aux = nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.body(x)))


class TiedLayers(nn.Module):
    """Two layers with one weight Parameter (each keeps its own bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.second.weight = self.first.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.second(torch.tanh(self.first(x)))))


def _bn_eval() -> nn.Module:
    model = _mlp(nn.BatchNorm1d(5))
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def _frozen() -> nn.Module:
    """A frozen backbone as users freeze one: requires_grad=False on the first layer's weight (its bias still
    trains) and on a batch norm's scale and shift, the batch norm in eval mode (frozen running statistics) inside a
    network in train mode."""
    model = _bn_eval().train()
    model[0].weight.requires_grad_(False)
    for p in model[1].parameters():
        p.requires_grad_(False)
    model[1].eval()
    return model


def _timm_vit() -> nn.Module:
    """The smallest timm vision transformer with stochastic depth: 2 blocks (drop_path_rate grows linearly over the
    blocks from 0, so the second block's residual branches are dropped per sample), 4x4 one-channel images in 2x2
    patches, width 4, one head."""
    timm = pytest.importorskip("timm")
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=4, patch_size=2, in_chans=1,
                             embed_dim=4, depth=2, num_heads=1, mlp_ratio=1.0, drop_path_rate=0.5,
                             num_classes=CLASSES).train()


@dataclass(frozen=True)
class Feature:
    title: str                      # the matrix's row
    make: Callable[[], nn.Module]
    sample_shape: tuple[int, ...] = (4,)

    def build(self, dtype: torch.dtype = F64) -> nn.Module:
        torch.manual_seed(0)
        return self.make().to(dtype)

    def batch(self, dtype: torch.dtype = F64) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(BATCH, *self.sample_shape, generator=g, dtype=F64)
        return x.to(dtype), torch.randint(0, CLASSES, (BATCH,), generator=g)


FEATURES = {
    "dropout": Feature("dropout (train mode)", lambda: _mlp(nn.Dropout(0.4)).train()),
    "bn_train": Feature("batch norm (train mode)", lambda: _mlp(nn.BatchNorm1d(5)).train()),
    "bn_eval": Feature("batch norm (eval mode)", _bn_eval),
    "frozen": Feature("frozen layers (requires_grad=False; a batch norm in eval mode in a train-mode network)",
                      _frozen),
    "unused": Feature("unused layer (no gradient)", UnusedHead),
    "shared": Feature("one weight shared by two layers", TiedLayers),
    "timm": Feature("timm ViT with stochastic depth (drop_path_rate=0.5)", _timm_vit, (1, 4, 4)),
}
SLOW = {"timm"}  # its dense G and H (339 parameters, through attention) take seconds: those cells are marked slow


def trainable(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def flat(tensors) -> Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


@functools.lru_cache(maxsize=None)
def dense(feature: str, seed: int = SEED, pieces: int | None = None, at: bytes | None = None) -> oracles.DenseObjective:
    """The oracle of the feature's fresh model on its batch (with the masks of ``torch.manual_seed(seed)``), or at
    the trainable parameters ``at`` (bytes of a flat float64 vector)."""
    f = FEATURES[feature]
    model = f.build()
    if at is not None:
        w = torch.frombuffer(bytearray(at), dtype=F64)
        with torch.no_grad():
            for p, v in zip(trainable(model), w.split([p.numel() for p in trainable(model)])):
                p.copy_(v.view_as(p))
    x, y = f.batch()
    return oracles.DenseObjective(model, "cross_entropy", x, y, seed=seed, pieces=pieces)


def objective(feature: str, model: nn.Module | None = None, **options) -> Objective:
    """An Objective on the feature's batch (a fresh model by default), the global RNG seeded with SEED for its forward
    pass (the first use: the oracle's masks)."""
    f = FEATURES[feature]
    x, y = f.batch()
    obj = Objective(f.build() if model is None else model, "cross_entropy", x, y, **options)
    torch.manual_seed(SEED)
    return obj


def probe(n: int, seed: int = 3) -> Tensor:
    return torch.randn(n, dtype=F64, generator=torch.Generator().manual_seed(seed))


def rel(a: Tensor, b: Tensor) -> float:
    return oracles.rel(a, b) if b.norm() > 0 else float(a.norm())


# ---------------------------------------------------------------------------------------------- expected outcomes
LINEARIZE_RANDOM = "objective.ggn_backend=linearize cannot be used with this model: its forward pass draws random"
REFUSED = {  # (feature, column) -> the start of the message the cell must raise (an OptionError)
    ("dropout", "ggn:linearize"): LINEARIZE_RANDOM,
    ("timm", "ggn:linearize"): LINEARIZE_RANDOM,
    ("shared", "kfac"): "optimizer=kfac cannot precondition the parameter 'first.weight': the layers 'first' and "
                        "'second' share it",
}
NOTES = {  # column -> what "exact" compares (the matrix's footnotes)
    "per_sample": "per-sample gradients of the network in eval mode (dropout and stochastic depth off, batch norm on "
                  "its running statistics: one sample has no batch statistics; Martens' preconditioner is a "
                  "heuristic and does not change the CG solution), against a loop over single samples",
    "micro_batch": "gradient, G v, H v and the explicit Hessian of the micro-batched objective (pieces of 4 and 2 "
                   "samples; random layers draw per piece, batch norm normalises each piece with its own statistics, "
                   "as in gradient accumulation) against the oracle of that function",
    "nlcg": "first step: direction -g and the strong-Wolfe rate torch's line search finds on the oracle loss",
    "curveball": "two steps: the closed-form rho, beta of the 2x2 system from the oracle's G and gradient",
    "hf": "first step: CG run to 1e-12 against the dense solve (G + lambda I) p = -g, preconditioner on",
    "newton": "first step: (H + lambda I) s = -g, dense solve",
    "newton_cg": "first step: CG run to 1e-12 against the dense solve (H + lambda I) s = -g",
    "gd": "first step: w - lr g with the oracle gradient",
}


def backend_columns() -> list[str]:
    return ["gradient", *(f"ggn:{b}" for b in JACOBIAN_BACKENDS), *(f"hvp:{b}" for b in HESSIAN_BACKENDS),
            "hessian_matrix", "per_sample", "micro_batch"]


def optimizer_columns() -> list[str]:
    return list(registry.choices())


def diagnostic_columns() -> list[str]:
    return list(DIAGNOSTICS)  # the registry holds the loss surface and the explicit Hessian too


def slow(feature: str, column: str) -> bool:
    """Cells of a SLOW feature whose check needs the dense G or H (a refusal needs neither)."""
    if feature not in SLOW or expected(feature, column) == "refused":
        return False
    if column in optimizer_columns():
        return column in ("newton", "newton_cg", "hf", "curveball")
    return column not in ("gradient", "per_sample", "gradcheck", "surface")


def expected(feature: str, column: str) -> str:
    if (feature, column) in REFUSED:
        return "refused"
    if column in optimizer_columns() and not has_reference(column):
        return "consistent"
    return "exact"


# ---------------------------------------------------------------------------------------------- backend cells
def run_backend(feature: str, column: str) -> None:
    """Asserts the cell is exact; an OptionError is a refusal."""
    if column == "micro_batch":
        return _micro_batch(feature)
    if column == "per_sample":
        f = FEATURES[feature]
        model, (x, y) = f.build(), f.batch()
        obj = objective(feature, model)
        got = obj.per_sample_grad_sq_mean()
        assert modes(model) == modes(f.build())  # every module's mode is restored
        assert rel(got, oracles.per_sample_grad_sq_mean(f.build(), "cross_entropy", x, y)) < TOL
        return
    # the oracle after the objective's first product: building its model seeds the global RNG
    kind, _, backend = column.partition(":")
    if kind == "ggn":
        obj = objective(feature, ggn_backend=backend)
        v = probe(obj.numel)
        first = obj.ggn_vp(v)
        assert torch.equal(first, obj.ggn_vp(v))                       # the same twice
        assert rel(first, dense(feature).ggn_vp(v)) < TOL
        assert rel(obj.gradient("ggn"), dense(feature).g) < TOL
    elif kind == "hvp":
        obj = objective(feature, hvp_backend=backend)
        v = probe(obj.numel)
        first = obj.hvp(v)
        assert torch.equal(first, obj.hvp(v))
        assert rel(first, dense(feature).hvp(v)) < TOL
        assert rel(obj.gradient("hessian"), dense(feature).g) < TOL
    elif column == "hessian_matrix":
        obj = objective(feature)
        first = obj.hessian_matrix()
        assert torch.equal(first, obj.hessian_matrix())
        assert rel(first, dense(feature).H) < TOL
    elif column == "gradient":
        obj = objective(feature)
        assert rel(obj.gradient(), dense(feature).g) < TOL
        model = FEATURES[feature].build()
        objective(feature, model).backward()                            # the first-order path: p.grad
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in trainable(model)]
        assert rel(flat(grads), dense(feature).g) < TOL
    else:
        raise AssertionError(f"no check for the column {column!r}")


def _micro_batch(feature: str) -> None:
    f = FEATURES[feature]
    x, y = f.batch()
    ref = dense(feature, pieces=PIECES)  # first: building a model seeds the global RNG
    obj = MicroBatchedObjective(f.build(), "cross_entropy", x, y, micro_batch_size=PIECES)
    torch.manual_seed(SEED)
    assert rel(obj.gradient(), ref.g) < TOL
    v = probe(obj.numel)
    assert rel(obj.ggn_vp(v), ref.ggn_vp(v)) < TOL
    assert rel(obj.hvp(v), ref.hvp(v)) < TOL
    assert rel(obj.hessian_matrix(), ref.H) < TOL


BACKEND_CELLS = [pytest.param(f, c, marks=[pytest.mark.slow] if slow(f, c) else [], id=f"{f}-{c}")
                 for f in FEATURES for c in backend_columns()]


@pytest.mark.parametrize("feature, column", BACKEND_CELLS)
def test_backend_cell(feature, column):
    check_cell(feature, column, lambda: run_backend(feature, column))


def check_cell(feature: str, column: str, run: Callable[[], object]) -> None:
    if expected(feature, column) == "refused":
        with pytest.raises(OptionError) as refusal:
            run()
        assert str(refusal.value).startswith(REFUSED[feature, column])
    else:
        run()


# ---------------------------------------------------------------------------------------------- optimiser cells
FLOAT32_ONLY = {"heavyball_soap": "heavyball.SOAP keeps float32 state: in float64 its first step stops with "
                                  "'expected scalar type Double but found Float'"}
OVERRIDES = {  # settings that make the first step a closed-form quantity of the oracle (registry.make overrides)
    # Newton: a fixed lambda on the whole batch (the defaults adapt lambda and take the Hessian on a quarter)
    "newton": dict(step_size="fixed", lr=1.0, damping_factor=1.0, curvature_fraction=1.0),
    "newton_cg": dict(step_size="fixed", lr=1.0, cg_tol=1e-12, cg_martens_tol=0.0, cg_max_iters=2000,
                      damping_factor=1.0, curvature_fraction=1.0, trust_radius=None),
    "hf": dict(damping=1.0, backtrack=False, line_search=False, cg_tol=1e-12, cg_martens_tol=0.0, cg_max_iters=2000,
               cg_min_iters=1, curvature_fraction=1.0),  # the oracle's GGN is the whole batch's
    "curveball": dict(damping=1.0),
}


def overrides(feature: str, name: str) -> dict:
    """OVERRIDES, and for Newton a damping that makes H + lambda I positive definite (its step is then the damped
    Newton step, no fall-back to -g): 1 above the most negative eigenvalue of the oracle's Hessian."""
    out = dict(OVERRIDES.get(name, {}))
    if name in ("newton", "newton_cg"):
        out["damping"] = 1.0 + max(0.0, -float(torch.linalg.eigvalsh(dense(feature).H)[0]))
    return out
STEPS = 2


@pytest.fixture(autouse=True)
def eager_heavyball(request):
    """heavyball without torch.compile (minutes on the CPU); restored afterwards."""
    if "heavyball" not in request.node.name:
        yield
        return
    utils = pytest.importorskip("heavyball.utils")
    saved, utils.compile_mode = utils.compile_mode, None
    yield
    utils.compile_mode = saved


@dataclass
class Trajectory:
    model: nn.Module
    initial: list[Tensor]       # every parameter (trainable or not) and buffer before the first step
    after: list[Tensor]         # the flat trainable parameters after each step


def run_optimizer(feature: str, name: str, steps: int = STEPS) -> Trajectory:
    dtype = torch.float32 if name in FLOAT32_ONLY else F64
    f = FEATURES[feature]
    model, (x, y) = f.build(dtype), f.batch(dtype)
    initial = [t.detach().clone() for t in [*model.parameters(), *model.buffers()]]
    opt = registry.make(name, model.parameters(), **overrides(feature, name))
    after = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(steps):
            torch.manual_seed(SEED + step)
            opt.step(Objective(model, "cross_entropy", x, y))
            after.append(flat(trainable(model)))
    return Trajectory(model, initial, after)


def state(model: nn.Module) -> list[Tensor]:
    return [t.detach() for t in [*model.parameters(), *model.buffers()]]


def check_optimizer(feature: str, name: str) -> None:
    run = run_optimizer(feature, name)
    final = state(run.model)
    assert all(bool(torch.isfinite(t).all()) for t in final)
    frozen = [i for i, p in enumerate(run.model.parameters()) if not p.requires_grad]
    assert frozen or feature != "frozen"
    for i in frozen:
        assert torch.equal(final[i], run.initial[i]), "a frozen parameter moved"
    assert modes(run.model) == modes(FEATURES[feature].build()), "a module's train/eval mode changed"
    buffers = dict(zip([n for n, _ in run.model.named_buffers()], final[len(list(run.model.parameters())):]))
    initial = dict(zip(buffers, run.initial[len(list(run.model.parameters())):]))
    for module in run.model.modules():  # modules in eval mode read their statistics, never write them
        if not module.training:
            for b in module.buffers(recurse=False):
                key = next(k for k, v in run.model.named_buffers() if v is b)
                assert torch.equal(buffers[key], initial[key]), f"{key} of a module in eval mode moved"
    again = state(run_optimizer(feature, name).model)
    assert all(torch.equal(a, b) for a, b in zip(final, again)), "two identical runs differ"
    if has_reference(name):
        REFERENCE_CHECKS.get(name, check_against_torch)(feature, name, run)


def has_reference(name: str) -> bool:
    return name in REFERENCE_CHECKS or issubclass(registry.method_class(name), TorchAdapter)


def check_against_torch(feature: str, name: str, run: Trajectory) -> None:
    """A torch.optim configuration: the same class, built with the configuration's arguments, run directly on the model
    (forward, backward, step; a closure that re-evaluates the batch with the same masks and untouched running
    statistics for closure methods; backward(create_graph=True) for Hessian-reading methods)."""
    dtype = torch.float32 if name in FLOAT32_ONLY else F64
    f = FEATURES[feature]
    model, (x, y) = f.build(dtype), f.batch(dtype)
    config = registry.make(name, f.build(dtype).parameters(), **overrides(feature, name))
    cls, kwargs = config.torch_optimizer()
    inner = cls(trainable(model), lr=config.options.lr, **kwargs)
    if callable(getattr(inner, "train", None)):
        inner.train()  # schedulefree: steps are taken at the training point y
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(STEPS):
            seed = SEED + step
            torch.manual_seed(seed)
            if config.mode == "plain":
                inner.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                with config.own_random_stream():  # PSGD's probes: the adapter's stream, seeded from the parameters
                    inner.step()
            elif config.mode == "create_graph":
                with sdpa_kernel([SDPBackend.MATH]):
                    F.cross_entropy(model(x), y).backward(create_graph=True)
                inner.step()
                for p in trainable(model):
                    p.grad = None
            else:
                with config.own_random_stream():
                    inner.step(_closure(model, x, y, seed))
                for p in trainable(model):
                    p.grad = None
    for got, want in zip(state(run.model), state(model)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def _closure(model: nn.Module, x: Tensor, y: Tensor, seed: int) -> Callable[[], Tensor]:
    calls = 0

    def closure() -> Tensor:
        nonlocal calls
        calls += 1
        params = trainable(model)
        with torch.enable_grad(), torch.random.fork_rng(devices=[]), sdpa_kernel([SDPBackend.MATH]):
            torch.manual_seed(seed)
            if calls == 1:   # the batch's forward pass: running statistics move once
                out = model(x)
            else:            # the same function at the moved parameters
                named = {n: p for n, p in model.named_parameters()}
                buffers = {n: b.clone() for n, b in model.named_buffers()}
                out = torch.func.functional_call(model, {**named, **buffers}, (x,))
            loss = F.cross_entropy(out, y)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = torch.zeros_like(p) if g is None else g
        return loss.detach()

    return closure


def _start(feature: str) -> tuple[oracles.DenseObjective, Tensor]:
    ref = dense(feature, SEED)
    return ref, ref.w


def _gd(feature: str, name: str, run: Trajectory) -> None:
    ref, w0 = _start(feature)
    lr = registry.options(name)["lr"]
    assert rel(run.after[0] - w0, -lr * ref.g) < TOL


def _damped_solve(matrix: Tensor, g: Tensor, damping: float) -> Tensor:
    system = matrix + damping * torch.eye(matrix.shape[0], dtype=F64)
    assert torch.linalg.eigvalsh(system)[0] > 0  # a descent direction: no fall-back, no negative curvature
    return torch.linalg.solve(system, -g)


def _newton(feature: str, name: str, run: Trajectory) -> None:
    ref, w0 = _start(feature)
    tol = TOL if registry.options(name).get("solver") == "explicit" else 1e-8  # CG to 1e-12
    assert rel(run.after[0] - w0, _damped_solve(ref.H, ref.g, overrides(feature, name)["damping"])) < tol


def _hf(feature: str, name: str, run: Trajectory) -> None:
    ref, w0 = _start(feature)
    assert rel(run.after[0] - w0, _damped_solve(ref.G, ref.g, OVERRIDES[name]["damping"])) < 1e-8


def _curveball(feature: str, name: str, run: Trajectory) -> None:
    """Seed 003 Algorithm 1 with eq. 18, from the oracle: step 1 is the exact line search along -g (z = 0); step 2
    solves the 2x2 system in z and dz = (G + lambda I) z + g at the new point (its own batch masks)."""
    lam = OVERRIDES[name]["damping"]
    ref, w0 = _start(feature)
    g = ref.g
    beta = g.dot(g) / (g.dot(ref.G @ g) + lam * g.dot(g))
    z1 = -beta * g
    assert rel(run.after[0] - w0, z1) < TOL
    ref1 = dense(feature, SEED + 1, at=run.after[0].numpy().tobytes())

    def c(a: Tensor, b: Tensor) -> Tensor:
        return a.dot(ref1.G @ b) + lam * a.dot(b)

    dz = ref1.G @ z1 + lam * z1 + ref1.g
    system = torch.stack([torch.stack([c(dz, dz), c(dz, z1)]), torch.stack([c(dz, z1), c(z1, z1)])])
    beta2, minus_rho = torch.linalg.solve(system, torch.stack([ref1.g.dot(dz), ref1.g.dot(z1)]))
    assert rel(run.after[1] - run.after[0], -minus_rho * z1 - beta2 * dz) < 1e-8


def _nlcg(feature: str, name: str, run: Trajectory) -> None:
    """The first step is -g times the strong-Wolfe rate (torch's line search on the oracle loss, scipy's first trial
    rate 1.01 / |g| capped at ls_initial_rate, NLCG's documented constants)."""
    o = registry.options(name)
    ref, w0 = _start(feature)
    g, d = ref.g, -ref.g

    def along(_x, t: float, direction: Tensor) -> tuple[float, Tensor]:
        w = (w0 + t * direction).requires_grad_(True)
        with torch.enable_grad():
            loss = ref._loss(w)
            (grad,) = torch.autograd.grad(loss, w)
        return float(loss.detach()), grad

    rate0 = min(1.01 / float(g.norm()), o["ls_initial_rate"])
    _, _, rate, _ = _strong_wolfe(along, None, rate0, d, float(ref.loss()), g, g.dot(d), c1=o["ls_c"], c2=o["ls_c2"],
                                  tolerance_change=o["ls_tolerance_change"], max_ls=o["ls_max_evals"])
    assert rate > 0 and rel(run.after[0] - w0, rate * d) < TOL


REFERENCE_CHECKS: dict[str, Callable[[str, str, Trajectory], None]] = {
    "gd": _gd, "newton": _newton, "newton_cg": _newton, "hf": _hf, "curveball": _curveball, "nlcg": _nlcg,
}

OPTIMIZER_CELLS = [pytest.param(f, c, marks=[pytest.mark.slow] if slow(f, c) else [], id=f"{f}-{c}")
                   for f in FEATURES for c in optimizer_columns()]


@pytest.mark.parametrize("feature, name", OPTIMIZER_CELLS)
def test_optimizer_cell(feature, name):
    if expected(feature, name) == "refused":
        f = FEATURES[feature]
        model, (x, y) = f.build(), f.batch()
        before = state(model)
        opt = registry.make(name, model.parameters(), **overrides(feature, name))
        with pytest.raises(OptionError) as refusal:
            opt.step(Objective(model, "cross_entropy", x, y))
        assert str(refusal.value).startswith(REFUSED[feature, name])
        assert all(torch.equal(a, b) for a, b in zip(state(model), before)), "refused, but after moving something"
        assert all(p.grad is None for p in model.parameters())
    else:
        check_optimizer(feature, name)


# ---------------------------------------------------------------------------------------------- diagnostic cells
def _surface(obj, o) -> diag.LossSurface:
    directions = [diag.filter_normalized_direction(obj, seed=s, one_dim="weights") for s in (0, 1)]
    return diag.loss_surface(obj, directions, [-0.5, 0.0, 0.5], [-0.25, 0.25])


def diagnostic(column: str) -> Callable:
    """The registry's diagnostic; the surface along two seeded random directions instead of the top-2 eigenvectors,
    whose signs the objective and the oracle may choose differently."""
    return _surface if column == "surface" else DIAGNOSTICS[column].run


def values(record) -> dict[str, float]:
    """The record's numbers, its costs (products, seconds) left out."""
    if isinstance(record, dict):  # hessian_explicit: {"full_spectrum": {...}, "hvp_check": {...}}
        spectrum, check = record["full_spectrum"], record["hvp_check"]
        return {**{f"eigenvalues[{i}]": float(v) for i, v in enumerate(spectrum["eigenvalues"])},
                "hvp_check.direction_norm": check["direction_norm"], "hvp_check.relative": check["relative"]}
    out = {k: v for k, v in record.scalars().items() if not k.endswith(("_products", "_seconds", "_time"))}
    data = record.to_dict()
    for key in ("losses", "remainders", "directional_derivatives", "finite_differences", "eigenvalues", "samples"):
        if key in data:
            out.update({f"{key}[{i}]": float(v) for i, v in enumerate(torch.as_tensor(data[key]).reshape(-1))})
    return out


def run_diagnostic(feature: str, column: str) -> None:
    options = DiagnosticsOptions(k=1, probes=4, slq_probes=2, slq_steps=10)  # the runner's options, fewer products
    got = values(diagnostic(column)(objective(feature), options))
    assert got == values(diagnostic(column)(objective(feature), options)), "two identical runs differ"
    want = values(diagnostic(column)(dense(feature), options))
    assert got.keys() == want.keys()
    for key in got:
        assert got[key] == pytest.approx(want[key], rel=1e-7, abs=1e-9), key


DIAGNOSTIC_CELLS = [pytest.param(f, c, marks=[pytest.mark.slow] if slow(f, c) else [], id=f"{f}-{c}")
                    for f in FEATURES for c in diagnostic_columns()]


@pytest.mark.parametrize("feature, column", DIAGNOSTIC_CELLS)
def test_diagnostic_cell(feature, column):
    check_cell(feature, column, lambda: run_diagnostic(feature, column))


# ---------------------------------------------------------------------------------------------- the documented matrix
BEGIN, END = "<!-- matrix: generated by tests/test_model_features.py -->", "<!-- end of matrix -->"


def refusal_messages() -> dict[tuple[str, str], str]:
    """The full message of every refused cell, from the library itself (refusals are immediate)."""
    out = {}
    for feature, column in REFUSED:
        try:
            if column in optimizer_columns():
                f = FEATURES[feature]
                model, (x, y) = f.build(), f.batch()
                registry.make(column, model.parameters()).step(Objective(model, "cross_entropy", x, y))
            else:
                run_backend(feature, column)
        except OptionError as exc:
            out[feature, column] = str(exc)
    return out


def render_matrix() -> str:
    messages = refusal_messages()
    numbers = {cell: i + 1 for i, cell in enumerate(dict.fromkeys(
        sorted(set(messages.values()), key=list(messages.values()).index)))}
    lines = [BEGIN, ""]
    for title, columns in (("Curvature backends and objectives", backend_columns()),
                           ("Optimisers (`optimizer=<choice>`)", optimizer_columns()),
                           ("Diagnostics (`diagnostics.what` and the loss surface)", diagnostic_columns())):
        lines += [f"#### {title}", "", "| feature | " + " | ".join(f"`{c}`" for c in columns) + " |",
                  "| --- |" + " --- |" * len(columns)]
        for feature, f in FEATURES.items():
            cells = []
            for column in columns:
                outcome = expected(feature, column)
                cells.append(f"refused [{numbers[messages[feature, column]]}]" if outcome == "refused" else outcome)
            lines.append(f"| {f.title} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Refusals (the whole message, as raised):", ""]
    lines += [f"{n}. {message}" for message, n in numbers.items()]
    lines += ["", "What `exact` compares where it is not a product against the dense matrix:", ""]
    lines += [f"* `{column}`: {note}." for column, note in NOTES.items()]
    lines += ["* the torch.optim adapter's choices (`sgd`, `adam`, `lbfgs`, `torch_optim` and the external "
              "packages): the same class run directly on the model, two steps" +
              "".join(f"; `{n}` in float32 ({why})" for n, why in FLOAT32_ONLY.items()) + ".", "", END]
    return "\n".join(lines)


def test_the_documented_matrix_is_this_files():
    text = render_matrix()
    if os.environ.get("CURVLAB_WRITE_MATRIX"):
        doc = DOC.read_text() if DOC.exists() else f"{BEGIN}\n{END}\n"
        DOC.write_text(re.sub(re.escape(BEGIN) + ".*" + re.escape(END), lambda _: text, doc, flags=re.S))
    doc = DOC.read_text()
    found = re.search(re.escape(BEGIN) + ".*" + re.escape(END), doc, flags=re.S)
    assert found and found.group(0) == text, (
        f"{DOC} does not show the matrix this test checks: regenerate it with "
        "CURVLAB_WRITE_MATRIX=1 pytest tests/test_model_features.py -k documented")
