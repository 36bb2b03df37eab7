"""Micro-batches: the same mathematics as the whole batch (float64, a network without batch norm)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from optimizers import HessianFree, Objective, OptionError
from optimizers.micro_batch import MicroBatchedObjective
from optimizers.vec import params_vector
from tests import registry


def model() -> nn.Module:
    registry.seed_draws(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def batch(n: int = 10):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def close(a, b, tol=1e-13) -> bool:
    return ((a - b).norm() / b.norm()).item() < tol


@pytest.mark.parametrize("backend", ["double_backward", "forward_ad", "linearize"])
def test_every_quantity_equals_the_whole_batch(backend):
    m, (x, y) = model(), batch()
    whole = Objective(m, "cross_entropy", x, y, ggn_backend=backend)
    micro = MicroBatchedObjective(m, "cross_entropy", x, y, micro_batch_size=4, ggn_backend=backend)  # 4 + 4 + 2
    v = torch.randn(whole.numel, dtype=torch.float64)
    u = torch.randn(10, 3, dtype=torch.float64)
    assert close(micro.loss(), whole.loss()) and close(micro.gradient("ggn"), whole.gradient("ggn"))
    for name in ("ggn_vp", "hvp", "loss_at"):
        assert close(getattr(micro, name)(v), getattr(whole, name)(v)), name
    assert all(close(a, b) for a, b in zip(micro.loss_and_gradient_at(v), whole.loss_and_gradient_at(v)))
    for name, arg in (("jvp", v), ("vjp", u), ("loss_hessian_vp", u)):
        assert close(getattr(micro, name)(arg), getattr(whole, name)(arg)), name
    assert close(micro.output_grad(), whole.output_grad()) and close(micro.outputs(), whole.outputs())
    assert close(micro.per_sample_grad_sq_mean(), whole.per_sample_grad_sq_mean())
    assert close(micro.hessian_matrix(), whole.hessian_matrix())
    assert micro.stats()["micro_batches"] == 3


@pytest.mark.parametrize("name", registry.METHODS)
def test_methods_take_the_whole_batch_step_or_refuse_micro_batches(name):
    """Every method of the registry (its options of the equivalence tests, with weight decay): three steps on
    micro-batches equal three on the whole batch, or the first is refused naming objective.micro_batch_size."""
    (x, y), runs = batch(), []
    for micro in (None, 3):
        m = model()
        opt = registry.make(name, m.parameters(), **{"weight_decay": 1e-3, **registry.METHODS[name].equivalence[""]})
        for _ in range(3):
            objective = (Objective(m, "cross_entropy", x, y) if micro is None else
                         MicroBatchedObjective(m, "cross_entropy", x, y, micro_batch_size=micro))
            if micro is None:
                opt.step(objective)
                continue
            try:
                opt.step(objective)
            except OptionError as refused:
                assert "objective.micro_batch_size must be null" in str(refused)
                return
        runs.append(params_vector(m.parameters()))
    assert close(runs[1], runs[0], 1e-10)


def test_a_curvature_mini_batch_is_refused_with_micro_batches():
    """Hessian-free's default curvature mini-batch (a quarter of the batch) is not available on micro-batches: a clear
    error naming both keys, never a silent change of the method."""
    m, (x, y) = model(), batch()
    opt = HessianFree(m.parameters())
    with pytest.raises(OptionError, match=r"optimizer\.curvature_fraction=1 or objective\.micro_batch_size=null"):
        opt.step(MicroBatchedObjective(m, "cross_entropy", x, y, micro_batch_size=3))


def test_only_one_piece_is_alive_at_a_time():
    m, (x, y) = model(), batch()
    micro = MicroBatchedObjective(m, "cross_entropy", x, y, micro_batch_size=4)
    micro.ggn_vp(torch.ones(micro.numel, dtype=torch.float64))
    assert all(part._outputs is None for part in micro.parts)  # every graph released after use


def test_bad_sizes_name_the_key():
    m, (x, y) = model(), batch()
    with pytest.raises(OptionError, match=r"objective\.micro_batch_size=0 must be an integer >= 1"):
        MicroBatchedObjective(m, "cross_entropy", x, y, micro_batch_size=0)
    with pytest.raises(OptionError, match="cannot be combined"):
        MicroBatchedObjective(m, "cross_entropy", x, y, micro_batch_size=2, curvature_batch_size=4)
