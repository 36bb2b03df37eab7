"""The objective's interface (optimizers/interface.py, ``ObjectiveLike``) and its three implementations.

* ``Objective``, ``WeightDecayed`` and ``MicroBatchedObjective`` each provide every member of the Protocol, written out
  on the class (``inspect.getattr_static``: a member reached only through ``__getattr__`` does not count);
* every member of each gives the plain Objective's value in float64 on the same model and batch: the same value for
  ``MicroBatchedObjective``, that value plus the regulariser's term for ``WeightDecayed`` (F = L + eta/2 |w|^2,
  its terms written here from w); the table ``CHECKS`` must name every member, so a new member needs a check;
* the curvature kind is a checked literal: a bad one is refused by every implementation, naming the choices.
"""
from __future__ import annotations

import inspect

import pytest
import torch
from torch import Tensor, nn

from optimizers import MicroBatchedObjective, Objective, ObjectiveLike, OptionError, WeightDecayed
from optimizers.vec import params_vector

MEMBERS = sorted(name for name in vars(ObjectiveLike) if not name.startswith("_"))
ETA = 0.3      # weight decay of the WeightDecayed objective
PIECE = 4      # micro-batch size: 10 samples = 4 + 4 + 2
F64 = torch.float64


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(10, 5, generator=g, dtype=F64), torch.randint(0, 3, (10,), generator=g)


def make(kind: str, m: nn.Module) -> ObjectiveLike:
    x, y = batch()
    if kind == "micro_batched":
        return MicroBatchedObjective(m, "cross_entropy", x, y, micro_batch_size=PIECE)
    objective = Objective(m, "cross_entropy", x, y)
    return WeightDecayed(objective, ETA) if kind == "weight_decayed" else objective


KINDS = ["objective", "weight_decayed", "micro_batched"]


def vectors(numel: int) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(2)
    return (torch.randn(numel, generator=g, dtype=F64), 0.1 * torch.randn(numel, generator=g, dtype=F64),
            torch.randn(10, 3, generator=g, dtype=F64))


# member -> (call(objective, v, delta, u), the regulariser's term eta(w, v, delta) or None where there is none)
CHECKS = {
    "model": (lambda o, v, d, u: o.model, None),
    "loss_fn": (lambda o, v, d, u: o.loss_fn.name, None),
    "inputs": (lambda o, v, d, u: o.inputs, None),
    "targets": (lambda o, v, d, u: o.targets, None),
    "params": (lambda o, v, d, u: list(o.params), None),
    "numel": (lambda o, v, d, u: o.numel, None),
    "curvature_batch_size": (lambda o, v, d, u: o.curvature_batch_size, None),
    "micro_batch_size": (lambda o, v, d, u: o.micro_batch_size, None),  # PIECE for the micro-batched one
    "set_curvature_batch_size": (lambda o, v, d, u: (o.set_curvature_batch_size(5), o.curvature_batch_size,
                                                     o.ggn_vp(v))[1:], lambda w, v, d: (0, ETA * v)),
    "l2": (lambda o, v, d, u: o.l2, lambda w, v, d: ETA),
    "loss": (lambda o, v, d, u: o.loss(), lambda w, v, d: ETA / 2 * w.dot(w)),
    "gradient": (lambda o, v, d, u: o.gradient("ggn"), lambda w, v, d: ETA * w),
    "backward": (lambda o, v, d, u: (o.backward(), params_vector([p.grad for p in o.params])),
                 lambda w, v, d: (ETA / 2 * w.dot(w), ETA * w)),
    "l2_gradient": (lambda o, v, d, u: o.l2_gradient(), lambda w, v, d: ETA * w),
    "loss_at": (lambda o, v, d, u: o.loss_at(d), lambda w, v, d: ETA / 2 * (w + d).dot(w + d)),
    "loss_and_gradient_at": (lambda o, v, d, u: o.loss_and_gradient_at(d),
                             lambda w, v, d: (ETA / 2 * (w + d).dot(w + d), ETA * (w + d))),
    "apply": (lambda o, v, d, u: (o.apply(d, alpha=-2.0), params_vector(o.params))[1], None),
    "curvature_vp": (lambda o, v, d, u: (o.curvature_vp(v, "ggn"), o.curvature_vp(v, "hessian")),
                     lambda w, v, d: (ETA * v, ETA * v)),
    "ggn_vp": (lambda o, v, d, u: o.ggn_vp(v), lambda w, v, d: ETA * v),
    "hvp": (lambda o, v, d, u: o.hvp(v), lambda w, v, d: ETA * v),
    "hessian_matrix": (lambda o, v, d, u: o.hessian_matrix(), lambda w, v, d: ETA * torch.eye(w.numel(), dtype=F64)),
    "per_sample_grad_sq_mean": (lambda o, v, d, u: o.per_sample_grad_sq_mean(), None),
    "outputs": (lambda o, v, d, u: o.outputs(), None),
    "output_grad": (lambda o, v, d, u: o.output_grad(), None),
    "curvature_output_grad": (lambda o, v, d, u: o.curvature_output_grad(), None),
    "loss_hessian_vp": (lambda o, v, d, u: o.loss_hessian_vp(u), None),
    "jvp": (lambda o, v, d, u: (o.jvp(v), o.jvp(v, backend="forward_ad")), None),
    "vjp": (lambda o, v, d, u: (o.vjp(u), o.vjp(u, keep_for_jvp=True)), None),
    "forward_with_jvp": (lambda o, v, d, u: (o.forward_with_jvp(v), o.loss()),
                         lambda w, v, d: (0.0, ETA / 2 * w.dot(w))),
    "reduce": (lambda o, v, d, u: o.reduce(v), None),  # one process: the identity
    "stats": (lambda o, v, d, u: (o.ggn_vp(v), sorted(o.stats())), lambda w, v, d: (ETA * v, [])),
}


def test_the_checks_name_every_member_of_the_interface():
    assert sorted(CHECKS) == MEMBERS


@pytest.mark.parametrize("kind", KINDS)
def test_every_implementation_writes_out_every_member(kind):
    objective = make(kind, model())
    assert isinstance(objective, ObjectiveLike)
    missing = []
    for name in MEMBERS:
        try:
            inspect.getattr_static(objective, name)
        except AttributeError:
            missing.append(name)
    assert not missing, f"{type(objective).__name__} does not define {missing} (only __getattr__ forwarding?)"


def close(got, expected, name: str) -> None:
    if isinstance(expected, (tuple, list)):
        assert type(got) is type(expected) and len(got) == len(expected), name
        for g, e in zip(got, expected):
            close(g, e, name)
    elif isinstance(expected, Tensor):
        assert isinstance(got, Tensor) and got.shape == expected.shape and got.dtype == expected.dtype, name
        scale = max(expected.abs().max().item(), 1.0)
        assert (got - expected).abs().max().item() <= 1e-12 * scale, (name, (got - expected).abs().max().item())
    else:
        assert got == expected or got is expected, (name, got, expected)


def plus(value, term):
    if isinstance(value, tuple):
        return tuple(plus(a, b) for a, b in zip(value, term))
    return term if value is None else value + term


@pytest.mark.parametrize("member", MEMBERS)
@pytest.mark.parametrize("kind", KINDS[1:])
def test_every_member_gives_the_plain_objectives_value(kind, member):
    mine, reference_model = model(), model()
    objective, reference = make(kind, mine), Objective(reference_model, "cross_entropy", *batch())
    v, delta, u = vectors(reference.numel)
    w = params_vector(reference_model.parameters())
    call, regulariser = CHECKS[member]
    if kind == "micro_batched" and member == "set_curvature_batch_size":  # no curvature sub-batch on micro-batches
        with pytest.raises(OptionError, match=r"optimizer\.curvature_fraction=1 or objective\.micro_batch_size"):
            call(make(kind, model()), v, delta, u)
        return
    got, expected = call(objective, v, delta, u), call(reference, v, delta, u)
    if member == "model":
        assert got is mine
        return
    if member == "params":
        assert all(p is q for p, q in zip(got, mine.parameters())) and len(got) == len(list(mine.parameters()))
        return
    if kind == "weight_decayed" and regulariser is not None:
        expected = plus(expected, regulariser(w, v, delta))
    if kind == "micro_batched" and member == "micro_batch_size":
        expected = PIECE
    if member == "stats" and kind == "micro_batched":  # product counts add up over the pieces; plus the piece count
        got = (got[0], [key for key in got[1] if key != "micro_batches"])
    close(got, expected, member)


@pytest.mark.parametrize("kind", KINDS)
def test_a_bad_curvature_kind_is_refused_naming_the_choices(kind):
    objective = make(kind, model())
    v = torch.ones(objective.numel, dtype=F64)
    for call in (lambda: objective.curvature_vp(v, "fisher"), lambda: objective.gradient("fisher")):
        with pytest.raises(OptionError, match=r"^curvature=fisher is not one of: ggn, hessian\.$"):
            call()
    objective.gradient("ggn")  # a cached gradient does not let a bad kind through
    with pytest.raises(OptionError, match="curvature=Hessian is not one of"):
        objective.gradient("Hessian")
