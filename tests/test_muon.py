"""Muon (optimizers/muon.py) against ground truth that shares no code with it.

* The Newton-Schulz map against torch.linalg.svd in float64: NS5(G) = U p^5(S / |G|_F) V^T with p the quintic
  (singular vectors kept, singular values mapped by the scalar polynomial); its singular values in the band
  [0.68, 1.21] for singular values above 2e-3 of the norm; its polar factor U V^T; bfloat16 close to float64.
* One step: the hidden weight moves by -lr sqrt(max(1, rows / cols)) NS5(g) (tall matrices scaled, convolution
  filters flattened), from the autograd gradient and the SVD.
* Which parameter takes Muon and which AdamW (embeddings, the output and input layers, vectors, names).
* The whole optimiser against pytorch-optimizer's Muon (same conventions: Jordan's coefficients, average momentum,
  Nesterov, sqrt(max(1, out / in)), decoupled decay) with its iterations in float64; the AdamW part against
  torch.optim.AdamW. heavyball's Muon differs on purpose (another coefficient schedule per iteration, stochastic
  rounding): not compared.

Convergence on the known minima, the state round trip and resume come from the registry (tests/registry.py).
"""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from optimizers import Objective, OptionError
from optimizers.muon import NS_COEFFICIENTS, Muon, newton_schulz

F64 = torch.float64


def quintic(s: torch.Tensor, steps: int = 5) -> torch.Tensor:
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        s = a * s + b * s ** 3 + c * s ** 5
    return s


def matrix(rows: int, cols: int, smallest: float = 0.05, seed: int = 0) -> torch.Tensor:
    """A random matrix with singular values spread over [smallest, 1] (so all are >= smallest / sqrt(k) of |G|_F)."""
    g = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=g, dtype=F64))
    return u @ torch.diag(torch.logspace(0, torch.log10(torch.tensor(smallest)).item(), k, dtype=F64)) @ v.T


SHAPES = [(8, 5), (5, 8), (16, 16), (30, 7), (1, 6)]


def assert_same_five_steps(opt, reference, ours, theirs, x, y, atol):
    """Five steps of our optimiser (on ``ours``) and a reference torch.optim optimiser (on ``theirs``, an equal copy)
    on the same batch end at the same parameters."""
    for _ in range(5):
        opt.step(Objective(ours, "cross_entropy", x, y))
        reference.zero_grad()
        nn.functional.cross_entropy(theirs(x), y).backward()
        reference.step()
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=atol)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_newton_schulz_maps_the_singular_values_by_the_quintic_and_keeps_the_singular_vectors(shape):
    g = matrix(*shape)
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    expected = u @ torch.diag(quintic(s / torch.linalg.norm(g))) @ vh
    torch.testing.assert_close(newton_schulz(g, dtype=F64, eps=0.0), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_its_singular_values_lie_in_the_band_and_its_polar_factor_is_that_of_the_input(shape):
    g = matrix(*shape, smallest=0.01)
    k = min(shape)
    assert (torch.linalg.svdvals(g) / torch.linalg.norm(g)).min() >= 2e-3 / k ** 0.5
    out = newton_schulz(g, dtype=F64)
    singular = torch.linalg.svdvals(out)
    assert singular.min() >= 0.68 and singular.max() <= 1.21, singular  # the quintic's band (scalar map, 2e-3..1)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    u2, _, vh2 = torch.linalg.svd(out, full_matrices=False)
    torch.testing.assert_close(u2 @ vh2, u @ vh, rtol=0, atol=1e-9)  # the direction: the polar factor U V^T
    # the authors' dtype: bfloat16's 8-bit mantissa, amplified by the quintic's slope, moves the result by a few per
    # cent of its norm (measured: 3 to 6 %); its direction stays that of the float64 result, and the band holds
    low = newton_schulz(g, dtype=torch.bfloat16).to(F64)
    assert (low * out).sum() / (low.norm() * out.norm()) > 0.995
    assert 0.6 <= torch.linalg.svdvals(low).min() and torch.linalg.svdvals(low).max() <= 1.3


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()


def data(n: int = 16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


def gradients(model: nn.Module, x, y) -> list[torch.Tensor]:
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return grads


@pytest.mark.parametrize("nesterov", [True, False])
def test_the_first_step_moves_a_tall_hidden_matrix_by_its_scaled_orthogonalised_gradient(nesterov):
    model, (x, y) = small_net(), data()
    w0, g = model[0].weight.detach().clone(), gradients(model, x, y)[0]   # (12, 6): rows > cols
    opt = Muon(model.parameters(), lr=0.02, ns_dtype="float64", nesterov=nesterov)
    opt.step(Objective(model, "cross_entropy", x, y))
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    # first step, momentum M = (1 - beta) g: Nesterov orthogonalises U = (1 - beta^2) g, else (1 - beta) g; NS5 sees
    # U / (|U|_F + 1e-7) (the reference's epsilon)
    scale = (1 - 0.95 ** 2) if nesterov else (1 - 0.95)
    expected = w0 - 0.02 * 2 ** 0.5 * (u @ torch.diag(quintic(scale * s / (scale * s.norm() + 1e-7))) @ vh)
    torch.testing.assert_close(model[0].weight.detach(), expected, rtol=0, atol=1e-12)


def test_convolution_filters_are_orthogonalised_as_one_matrix_of_out_by_in_times_kernel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 2, 6, 6, generator=g, dtype=F64), torch.randint(0, 3, (8,), generator=g)
    w0, grad = model[0].weight.detach().clone(), gradients(model, x, y)[0]      # (4, 2, 3, 3)
    Muon(model.parameters(), lr=0.1, ns_dtype="float64").step(Objective(model, "cross_entropy", x, y))
    flat = grad.reshape(4, 18)
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    s = (1 - 0.95 ** 2) * s  # the first Nesterov step's U (previous test)
    expected = w0 - 0.1 * (u @ torch.diag(quintic(s / (s.norm() + 1e-7))) @ vh).reshape(4, 2, 3, 3)  # 4 < 18: 1
    torch.testing.assert_close(model[0].weight.detach(), expected, rtol=0, atol=1e-12)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.conv = nn.Conv1d(4, 6, 3)
        self.norm = nn.BatchNorm1d(6)
        self.hidden = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)
        self.scale = nn.Parameter(torch.ones(3, 3))  # a matrix outside any layer: hidden


@pytest.mark.parametrize("options, adamw", [
    ({}, {"embed.weight", "head.weight"}),
    ({"output_layer": "muon"}, {"embed.weight"}),
    ({"input_layer": "adamw"}, {"embed.weight", "head.weight", "conv.weight"}),
    ({"adamw_params": ["hidden.weight", "scale"]}, {"embed.weight", "head.weight", "hidden.weight", "scale"}),
])
def test_embeddings_the_output_layer_vectors_and_named_parameters_take_adamw(options, adamw):
    net = Net()
    use_muon = Muon(net.parameters(), **options).assign(net)
    names = [n for n, _ in net.named_parameters()]
    muon = {n for n, p, m in zip(names, net.parameters(), use_muon) if m}
    assert muon == {n for n, p in net.named_parameters() if p.ndim >= 2} - adamw
    assert "norm.weight" not in muon and "conv.bias" not in muon


def test_an_unknown_parameter_name_is_refused_naming_the_key():
    net = Net()
    with pytest.raises(OptionError, match=r"optimizer\.adamw_params names fc\.weight, which is not a parameter of "
                                          r"the model\. Parameters: scale, embed\.weight, conv\.weight"):
        Muon(net.parameters(), adamw_params=["fc.weight"]).assign(net)
    with pytest.raises(OptionError, match=r"optimizer\.adamw_params\[0\]=3 must be a parameter name"):
        Muon(net.parameters(), adamw_params=[3])


def test_matches_pytorch_optimizers_muon_with_its_iterations_in_float64(monkeypatch):
    """pytorch-optimizer's Muon has the reference's conventions but two: its Newton-Schulz runs in bfloat16 always
    (switched to float64 here, as ours), and it divides by max(|U|_F, 1e-7) where the reference (and we) divide by
    |U|_F + 1e-7 (set to |U|_F on both sides here), so that the comparison is exact to rounding."""
    import optimizers.muon

    po = pytest.importorskip("pytorch_optimizer")
    base = pytest.importorskip("pytorch_optimizer.optimizer.muon.base")
    monkeypatch.setattr(base, "zero_power_via_newton_schulz_5",
                        functools.partial(base.zero_power_via_newton_schulz_5, dtype=F64))
    monkeypatch.setattr(optimizers.muon, "newton_schulz", functools.partial(newton_schulz, eps=0.0))
    ours, theirs, (x, y) = small_net(), small_net(), data()
    opt = Muon(ours.parameters(), lr=0.02, weight_decay=0.01, ns_dtype="float64")
    hidden, rest = [theirs[0].weight], [theirs[0].bias, theirs[2].weight, theirs[2].bias]
    reference = po.Muon([dict(params=hidden, use_muon=True, lr=0.02, weight_decay=0.01),
                         dict(params=rest, use_muon=False, lr=3e-4, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.01)])
    assert_same_five_steps(opt, reference, ours, theirs, x, y, atol=1e-12)


def test_the_adamw_part_is_torchs_adamw():
    ours, theirs, (x, y) = small_net(), small_net(), data()
    options = dict(adam_lr=0.01, adam_betas=[0.9, 0.99], adam_eps=1e-8, weight_decay=0.05)
    opt = Muon(ours.parameters(), adamw_params=["0.weight"], **options)  # every parameter on AdamW
    reference = torch.optim.AdamW(theirs.parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    assert_same_five_steps(opt, reference, ours, theirs, x, y, atol=1e-13)


def test_a_schedule_scales_both_rates():
    model, (x, y) = small_net(), data()
    opt = Muon(model.parameters(), lr=0.02, adam_lr=1e-3, schedule="step", milestones=[0.5], gamma=0.1)
    opt.configure(total_steps=4)
    stats = [opt.step(Objective(model, "cross_entropy", x, y)) for _ in range(4)]
    assert [s["lr"] for s in stats] == pytest.approx([0.02, 0.02, 0.002, 0.002])
    assert [s["adam_lr"] for s in stats] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4])
