"""The compiled and mixed-precision path (issue 17 item 4) against the eager float32 run, on the CPU.

Ground truth is the eager float32 Objective (itself checked against dense float64 oracles in test_objective.py);
what differs from it is only the order or the precision of the arithmetic, so each comparison has the tolerance that
arithmetic allows:

| path | what changes | unit round-off u | tolerance (relative, norm-wise) | measured here |
| --- | --- | --- | --- | --- |
| ``objective.compile`` | inductor fuses and reorders float32 sums | 2^-24 ~ 6.0e-8 | 1e-5 (products, 5 steps) | ~1e-7 |
| ``channels_last`` | the convolution kernels sum in another order | 2^-24 | 1e-5 (products, 5 steps) | <= 1e-7 |
| ``precision=bf16`` | both operands of every matmul/conv rounded to bf16 | 2^-8 ~ 3.9e-3 | products 6 u sum(kappa_l); | <= 6e-3 MLP, |
| | | | loss over 5 steps 2e-2 (5 u) | <= 6e-2 CNN |

Why those numbers. A reordered float32 sum of n terms differs by at most ~n u relative to the sum of |terms|; the
layers here have n <= 100 inputs, so 1e-5 (~170 u) bounds a handful of chained layers, while the measured error is
1-2 u. bf16 rounds both operands of each product to 8 significant bits (relative error u each; the sums accumulate
in float32), so a layer's output carries up to 2 u kappa_l of fresh relative error, kappa_l = || |W| |a| || / || W a ||
the cancellation of its sums (``cancellation``: 3-7 for the nets here, growing with the fan-in for random-sign
weights). A product crosses every layer three times (forward, J v, J^T): 6 u sum(kappa_l) is the first-order bound
with all errors aligned (0.18 for ``mlp()``, 0.34 for ``cnn()``); the measured errors (max over 8 random v) are 30x
and 6x below it, the typical random-walk size. Each bf16 test also asserts that the error is far above float32
round-off (> 100 float32 u), so it fails if autocast silently did nothing.

Every compiled comparison checks, from torch's own counters, that a graph was really compiled (torch falls back to
eager past its recompile limit, which would make the comparison trivially exact).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optimizers import SGD, HessianFree, KFAC, Objective
from optimizers.compiled import check_compile, unavailable
from optimizers.precision import execution_of, set_execution
from validation.checks import OptionError

U32 = 2.0 ** -24   # float32 unit round-off
U_BF16 = 2.0 ** -8  # bf16 (8 significant bits)
REORDER = 1e-5      # float32 reordering: compile, channels_last (see the module docstring)
BF16_LOSS = 2e-2     # ~5 bf16 u: the loss over five steps (measured <= 3e-3)

needs_compile = pytest.mark.skipif(unavailable("cpu") is not None, reason=f"torch.compile: {unavailable('cpu')}")


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def mlp() -> tuple[nn.Module, Tensor, Tensor]:
    """A dropout MLP (the masks must replay inside compiled code) on one batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Dropout(0.1), nn.Linear(32, 5))
    return model, torch.randn(64, 20), torch.randint(0, 5, (64,))


def cnn() -> tuple[nn.Module, Tensor, Tensor]:
    """Conv + batch norm (train mode) + linear head on 8x8 images."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    return model, torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))


def cancellation(model: nn.Module, x: Tensor) -> list[float]:
    """kappa_l = || |W_l| |a_l| || / || W_l a_l || for each Linear/Conv2d layer on the batch (float32, eager): how much
    the layer's sums cancel, so how much a relative rounding u of its operands can grow in its output."""
    kappas: list[float] = []

    def hook(m: nn.Module, args: tuple, out: Tensor) -> None:
        a = args[0]
        if isinstance(m, nn.Linear):
            num, den = F.linear(a.abs(), m.weight.abs()), F.linear(a, m.weight)
        else:
            num, den = m._conv_forward(a.abs(), m.weight.abs(), None), m._conv_forward(a, m.weight, None)
        kappas.append(float(num.norm() / den.norm()))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        model.train()
        for h in handles:
            h.remove()
    return kappas


def bf16_tolerance(model: nn.Module, x: Tensor) -> float:
    """First-order worst case for a product through the network in bf16: each layer rounds both operands (2u) in
    each of three passes (forward, tangent J v, backward J^T), amplified by its cancellation kappa_l, all aligned."""
    return 3 * 2 * U_BF16 * sum(cancellation(model, x))


def products(model: nn.Module, x: Tensor, y: Tensor, v: Tensor, **options) -> dict[str, Tensor]:
    torch.manual_seed(7)  # the same dropout masks for every variant
    o = Objective(model, "cross_entropy", x, y, **options)
    return {"loss": o.loss().detach(), "gradient": o.gradient(), "jvp": o.jvp(v), "ggn": o.ggn_vp(v),
            "vjp": o.vjp(torch.ones_like(o.outputs()))}


def train(model: nn.Module, x: Tensor, y: Tensor, make, steps: int = 5, **options) -> list[float]:
    torch.manual_seed(7)
    opt = make(model.parameters())
    return [float(opt.step(Objective(model, "cross_entropy", x, y, **options))["loss"]) for _ in range(steps)]


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.fixture
def fresh_dynamo():
    """Each compiled test starts below torch's recompile limit (graphs of earlier tests are dropped)."""
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------- objective.compile
@needs_compile
def test_compiled_products_equal_eager_to_float32_reordering(fresh_dynamo):
    model, x, y = mlp()
    v = torch.randn(sum(p.numel() for p in model.parameters()))
    eager = products(model, x, y, v)
    before = compiled_graphs()
    compiled = products(model, x, y, v, compile=True)
    assert compiled_graphs() >= before + 2  # J v and G v were compiled, not run eagerly
    for key in eager:
        assert compiled[key].dtype == torch.float32
        assert rel(compiled[key], eager[key]) < REORDER, key
    # the test can fail: another v gives another G v
    assert rel(products(model, x, y, 2 * v + 1, compile=True)["ggn"], eager["ggn"]) > 0.1


@pytest.mark.slow
@needs_compile
def test_compiled_training_curves_equal_eager(fresh_dynamo):
    """HF (G v products in CG) and SGD (the compiled first-order forward), five steps each (~40 s of compiling)."""
    model, x, y = mlp()
    for make in (HessianFree, lambda p: SGD(p, lr=0.1, momentum=0.9)):
        curves = [train(copy.deepcopy(model), x, y, make, compile=c) for c in (False, True)]
        assert curves[0][-1] < curves[0][0]  # the run trains
        for a, b in zip(*curves):
            assert abs(a - b) <= REORDER * abs(a), curves


@pytest.mark.slow
@needs_compile
def test_compiled_products_on_a_batch_norm_cnn(fresh_dynamo):
    """Batch norm in train mode: compiled G v uses the batch statistics, and the running ones do not move."""
    model, x, y = cnn()
    v = torch.randn(sum(p.numel() for p in model.parameters()))
    eager = products(model, x, y, v)
    compiled = products(model, x, y, v, compile=True)
    for key in eager:
        assert rel(compiled[key], eager[key]) < REORDER, key
    # the batch's one forward pass moves the running statistics; the compiled products (on copies) do not
    o = Objective(model, "cross_entropy", x, y, compile=True)
    o.loss()
    running = model[1].running_mean.clone()
    o.ggn_vp(v), o.jvp(v)
    assert torch.equal(model[1].running_mean, running)


@pytest.mark.slow
@needs_compile
def test_compiled_path_with_bf16_and_channels_last(fresh_dynamo):
    """The three options together (compiled J v / G v under autocast, channels-last input) on the conv net."""
    model, x, y = cnn()
    v = torch.randn(sum(p.numel() for p in model.parameters()))
    eager = products(model, x, y, v)
    fast = copy.deepcopy(model)
    tol = bf16_tolerance(fast, x)
    set_execution(fast, precision="bf16", channels_last=True)
    both = products(fast, x, y, v, compile=True)
    for key in ("loss", "gradient", "ggn"):
        assert both[key].dtype == torch.float32
        assert rel(both[key], eager[key]) < tol, key
        assert key == "loss" or rel(both[key], eager[key]) > 100 * U32, key  # (a mean loss may round luckily)


def test_compile_refused_without_a_compiler(monkeypatch):
    """No C++ compiler: one message naming objective.compile, before any step (not inductor's traceback)."""
    from torch._inductor import config

    monkeypatch.setattr(config.cpp, "cxx", ("no-such-c++",))
    unavailable.cache_clear()
    try:
        with pytest.raises(OptionError, match=r"^objective\.compile=true cannot run here: inductor builds CPU kernels "
                                              r"with a C\+\+ compiler, and none runs here \(looked for no-such-c\+\+"):
            check_compile(True, "auto", "cpu")
        model, x, y = mlp()
        with pytest.raises(OptionError, match=r"objective\.compile=true cannot run here"):
            Objective(model, "cross_entropy", x, y, compile=True)
        assert check_compile(False, "auto", "cpu") is False  # compile=false needs nothing
    finally:
        unavailable.cache_clear()


# ---------------------------------------------------------------------------------------------- precision=bf16
def test_bf16_products_track_float32_to_bf16_round_off():
    model, x, y = mlp()
    v = torch.randn(sum(p.numel() for p in model.parameters()))
    eager = products(model, x, y, v)
    bf16 = copy.deepcopy(model)
    tol = bf16_tolerance(bf16, x)  # 0.18 for this net; measured <= 6e-3 (cnn(): 0.34, measured <= 6e-2)
    set_execution(bf16, precision="bf16")
    mixed = products(bf16, x, y, v)
    assert all(p.dtype == torch.float32 for p in bf16.parameters())
    for key in eager:
        assert mixed[key].dtype == torch.float32, key  # vectors and outputs stay float32
        assert rel(mixed[key], eager[key]) < tol, (key, rel(mixed[key], eager[key]))
        assert key == "loss" or rel(mixed[key], eager[key]) > 100 * U32, key  # autocast did round
    set_execution(bf16)  # back to float32: the same numbers as the eager model again
    assert execution_of(bf16).precision == "float32"
    assert rel(products(bf16, x, y, v)["ggn"], eager["ggn"]) == 0.0


@pytest.mark.parametrize("method", ["hf", "kfac"])
def test_bf16_training_curve_tracks_float32(method):
    """Five steps: HF (G v in bf16, CG in float32), K-FAC (factors from bf16 activations, kept in float32)."""
    model, x, y = cnn() if method == "kfac" else mlp()
    make = HessianFree if method == "hf" else KFAC
    eager = train(copy.deepcopy(model), x, y, make)
    bf16 = copy.deepcopy(model)
    set_execution(bf16, precision="bf16")
    torch.manual_seed(7)
    opt = make(bf16.parameters())
    mixed = [float(opt.step(Objective(bf16, "cross_entropy", x, y))["loss"]) for _ in range(5)]
    assert eager[-1] < eager[0]
    errors = [abs(a - b) / abs(a) for a, b in zip(eager, mixed)]
    assert max(errors) < BF16_LOSS and max(errors) > 100 * U32, errors
    if method == "kfac":  # the factors are float32, whatever the activations were
        assert opt.blocks and all(b.A.dtype == b.G.dtype == torch.float32 for b in opt.blocks.values())


def test_linearize_refused_with_bf16_and_batch_norm():
    model, x, y = cnn()
    set_execution(model, precision="bf16")
    with pytest.raises(OptionError, match=r"^objective\.ggn_backend=linearize cannot run with precision=bf16 on a "
                                          r"model with batch norm"):
        Objective(model, "cross_entropy", x, y, ggn_backend="linearize")


def test_bf16_refused_with_float64_parameters():
    model, _, _ = mlp()
    with pytest.raises(OptionError, match=r"^precision=bf16 cannot be combined with float64 parameters"):
        set_execution(model.double(), precision="bf16")


# ---------------------------------------------------------------------------------------------- channels_last
def test_channels_last_equals_contiguous():
    model, x, y = cnn()
    v = torch.randn(sum(p.numel() for p in model.parameters()))
    eager = products(model, x, y, v)
    last = copy.deepcopy(model)
    record = set_execution(last, channels_last=True)
    assert record["channels_last_applied"] and last[0].weight.is_contiguous(memory_format=torch.channels_last)
    mixed = products(last, x, y, v)
    for key in eager:
        assert rel(mixed[key], eager[key]) < REORDER, key
    # SGD and K-FAC: HF on this net is no test of layouts, since at step 3 its backtracking picks between two CG
    # iterates whose losses differ by less than float32 round-off (a thread count flips the choice as well)
    for make in (lambda p: SGD(p, lr=0.1, momentum=0.9), KFAC):
        curves = [train(copy.deepcopy(m), x, y, make) for m in (model, last)]
        assert curves[0][-1] < curves[0][0]
        for a, b in zip(*curves):
            assert abs(a - b) <= REORDER * abs(a), curves
    # an MLP has nothing to lay out: accepted, recorded as not applied, the same numbers bit for bit
    flat, xf, yf = mlp()
    assert set_execution(flat, channels_last=True)["channels_last_applied"] is False


# ---------------------------------------------------------------------------------------------- the runner's keys
@pytest.mark.parametrize("overrides, match", [
    (["precision=fp16"], r"^precision=fp16 is not one of: float32, bf16\.$"),
    (["precision=bf16", "dtype=float64"], r"^precision=bf16 cannot be combined with float64 parameters \(dtype=float64\)"),
    (["objective.compile=maybe"], r"^objective\.compile=maybe must be"),
    (["objective.compile=true", "objective.ggn_backend=linearize"],
     r"^objective\.compile=true computes J v and G v with its own compiled torch\.func products, so "
     r"objective\.ggn_backend=linearize would not be used"),
])
def test_bad_values_of_the_new_keys_give_one_paragraph(tmp_path, overrides, match):
    from runs import make_config

    from runner.errors import describe_user_error, exit_code_for
    from runner.train import train

    with pytest.raises(ValueError, match=match) as info:
        train(make_config(*overrides), tmp_path / "out")
    assert describe_user_error(info.value) == " ".join(str(info.value).split())  # run.py prints it as is
    assert exit_code_for(info.value) == 2
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # refused before the first step


def test_channels_last_must_be_a_boolean():
    """A typed key: Hydra's structured config refuses it when composing (run.py: one paragraph, exit 2)."""
    from runs import make_config

    from runner.errors import describe_user_error

    with pytest.raises(Exception) as info:
        make_config("channels_last=maybe")
    message = describe_user_error(info.value, during_job=False)
    assert message is not None and "\n" not in message and "channels_last" in message


def test_run_records_the_execution(tmp_path):
    """run_info.json says how the model computed; bf16 + channels_last on a CNN trains."""
    from runs import make_config

    from runner.metrics import read_jsonl
    from runner.train import train

    train(make_config("model=cifar_basic_cnn", "dataset=digits", "precision=bf16", "channels_last=true",
                      "trainer.max_steps=3", "optimizer=curveball"), tmp_path / "out")
    info = json.loads((tmp_path / "out" / "run_info.json").read_text())
    assert info["execution"] == {"precision": "bf16", "autocast_dtype": "bfloat16", "channels_last": True,
                                 "channels_last_applied": True, "device_type": "cpu", "compile": False}
    assert len(read_jsonl(tmp_path / "out" / "metrics.jsonl")) == 3
