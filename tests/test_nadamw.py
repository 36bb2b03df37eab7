"""NAdamW (optimizers/nadamw.py): AlgoPerf's update against a float64 transcription of its formula, and the
documented difference from torch.optim.NAdam (why curvlab does not use it for AlgoPerf's baseline)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from optimizers import Objective
from optimizers.nadamw import NAdamW

F64 = torch.float64


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def batches(n: int = 6):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(12, 5, generator=g, dtype=F64), torch.randint(0, 3, (12,), generator=g)) for _ in range(n)]


def formula(model: nn.Module, data, lr, beta1, beta2, eps, wd, momentum_correction=lambda t, b1: 1 - b1 ** t):
    """The update written out, one tensor per parameter (Dahl et al. 2023's baseline; AlgoPerf's NAdamW):
    w <- w (1 - lr wd); m, v <- moments; w <- w - lr (b1 m + (1 - b1) g) / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps).
    ``momentum_correction(t, b1)`` divides the b1 m term (torch's NAdam in its limit: 1 - b1^(t+1))."""
    w = [p.detach().clone() for p in model.parameters()]
    m, v = [torch.zeros_like(p) for p in w], [torch.zeros_like(p) for p in w]
    for t, (x, y) in enumerate(data, start=1):
        for p, wi in zip(model.parameters(), w):
            p.data = wi.clone()
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for i, p in enumerate(model.parameters()):
            g = p.grad
            w[i] = w[i] * (1 - lr * wd)
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            denom = (v[i] / (1 - beta2 ** t)).sqrt() + eps
            w[i] = w[i] - lr * (beta1 * m[i] / momentum_correction(t, beta1) + (1 - beta1) * g / (1 - beta1 ** t)) \
                / denom
    return w


def test_nadamw_is_algoperfs_update():
    data, model = batches(), net()
    opt = NAdamW(model.parameters(), lr=0.01, betas=[0.95, 0.99], eps=1e-8, weight_decay=0.1)
    for x, y in data:
        opt.step(Objective(model, "cross_entropy", x, y))
    expected = formula(net(), data, 0.01, 0.95, 0.99, 1e-8, 0.1)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-14)


def test_torchs_nadam_differs_as_documented():
    """torch's NAdam(decoupled_weight_decay=True) with its momentum schedule switched off (momentum_decay so large
    that 0.96^(t * momentum_decay) = 0, mu_t = beta1) is the formula with the momentum term divided by
    1 - beta1^(t+1): not AlgoPerf's, and with the default momentum_decay further still."""
    data = batches()
    runs = {}
    for decay in (1e9, 4e-3):
        model = net()
        opt = torch.optim.NAdam(model.parameters(), lr=0.01, betas=(0.95, 0.99), eps=1e-8, weight_decay=0.1,
                                momentum_decay=decay, decoupled_weight_decay=True)
        for x, y in data:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        runs[decay] = [p.detach() for p in model.parameters()]
    torch_limit = formula(net(), data, 0.01, 0.95, 0.99, 1e-8, 0.1, momentum_correction=lambda t, b1: 1 - b1 ** (t + 1))
    algoperf = formula(net(), data, 0.01, 0.95, 0.99, 1e-8, 0.1)
    for p, e, a, d in zip(runs[1e9], torch_limit, algoperf, runs[4e-3]):
        torch.testing.assert_close(p, e, rtol=0, atol=1e-7)  # torch keeps the product of the mu_t in float32
        assert (p - a).abs().max() > 1e-4 and (d - a).abs().max() > 1e-4


def test_coupled_weight_decay_goes_through_the_objective():
    model = net()
    opt = NAdamW(model.parameters(), weight_decay=0.1, decoupled=False)
    assert opt.decays_through_objective and opt.inner.param_groups[0]["weight_decay"] == 0.0
    assert not NAdamW(net().parameters(), weight_decay=0.1).decays_through_objective


@pytest.mark.parametrize("schedule", ["cosine"])
def test_the_schedule_scales_the_rate(schedule):
    model, data = net(), batches(4)
    opt = NAdamW(model.parameters(), lr=0.01, schedule=schedule, warmup_steps=2)
    opt.configure(total_steps=4)
    lrs = [opt.step(Objective(model, "cross_entropy", x, y))["lr"] for x, y in data]
    assert lrs == pytest.approx([0.005, 0.01, 0.01, 0.005])  # warm-up, then cosine from 1 over the last 2 steps
