"""Sums over a batch of squared per-sample gradients, for Martens' diagonal CG preconditioner.

Martens 2010 ("Deep learning via Hessian-free optimization", sec. 4.7) preconditions CG with
M = diag(sum_i g_i^2 / B + lambda)^alpha, where g_i is sample i's gradient. Dense and 2-D convolution layers get it in
closed form from one forward and one backward: a sample's weight gradient is the outer product delta_i a_i^T, so
sum_i g_i^2 = (delta^2)^T (a^2), and the same per sample over unfolded patches for convolutions (the "SumGradSquared"
quantity of Dangel, Kunstner, Hennig 2020, "BackPACK: packing more into backprop"). Every other parameter goes through
``torch.func.vmap`` over samples, and so does a parameter used by more than one layer call (tied weights, a layer
applied twice): its per-sample gradient is the sum over its uses, which the closed form cannot square.
"""
from __future__ import annotations

import collections
from collections.abc import Callable

import torch
from torch import Tensor, nn

from optimizers.losses import Loss
from optimizers.patches import patches_by_sample
from optimizers.precision import without_autocast


def grad_sq_sums(model: nn.Module, loss_fn: Loss, x: Tensor, y: Tensor, named: list[tuple[str, Tensor]],
                 call_with: Callable, chunk: int | None = None) -> list[Tensor]:
    """sum_i g_i^2 for every trainable parameter in ``named`` (same order), on the batch (x, y)."""
    sums = dense_grad_sq_sums(model, loss_fn, x, y, {id(p) for _, p in named})
    rest = [n for n, p in named if id(p) not in sums]
    if rest:
        with without_autocast():  # bf16: in float32 (torch.vmap's batch norm does not mix the two)
            sums.update(vmap_grad_sq_sums(dict(named), rest, loss_fn, x, y, call_with, chunk))
    return [sums[id(p)] for _, p in named]


def dense_grad_sq_sums(model: nn.Module, loss_fn: Loss, x: Tensor, y: Tensor, wanted: set[int]) -> dict[int, Tensor]:
    """Closed form for nn.Linear (2-D inputs) and nn.Conv2d (groups = 1) weights and biases, keyed by id(parameter)."""
    layers: list[tuple[nn.Module, Tensor, Tensor]] = []

    def capture(module: nn.Module, args: tuple, output: Tensor) -> None:
        if output.requires_grad:
            layers.append((module, args[0].detach().to(module.weight.dtype), output))  # float32 under bf16 autocast

    handles = [m.register_forward_hook(capture) for m in model.modules() if _closed_form(m, wanted)]
    try:
        with torch.enable_grad():
            out = model(x)
            layers = [(m, a, o) for m, a, o in layers if not (isinstance(m, nn.Linear) and a.dim() != 2)]
            if not layers:
                return {}
            # the batch-mean loss times B is the sum of per-sample losses: delta_i is then sample i's own signal
            deltas = torch.autograd.grad(loss_fn(out, y) * x.shape[0], [o for _, _, o in layers], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    # A parameter that two layer calls use (a weight shared by two layers, a layer called twice) has per-sample
    # gradients summed over its uses before squaring: no closed form, it goes to the vmap path.
    uses = collections.Counter(id(t) for m, _, _ in layers for t in (m.weight, m.bias) if t is not None)
    sums: dict[int, Tensor] = {}
    for (m, a, o), d in zip(layers, deltas):
        d = torch.zeros_like(o) if d is None else d
        d = d.to(a.dtype)
        weight, bias = (_linear_sums if isinstance(m, nn.Linear) else _conv_sums)(m, a, d)
        if uses[id(m.weight)] == 1:
            sums[id(m.weight)] = weight
        if m.bias is not None and uses[id(m.bias)] == 1:
            sums[id(m.bias)] = bias
    return sums


def _closed_form(m: nn.Module, wanted: set[int]) -> bool:
    dense = isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"
                                         and not isinstance(m.padding, str))
    return dense and id(m.weight) in wanted and (m.bias is None or id(m.bias) in wanted)


def _linear_sums(m: nn.Linear, a: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    # a (B, in), d (B, out): sum_i (d_i a_i^T)^2 = (d^2)^T (a^2)
    return d.pow(2).T @ a.pow(2), d.pow(2).sum(0)


def _conv_sums(m: nn.Conv2d, a: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    patches = patches_by_sample(m, a)  # (B, C k k, P), F.unfold as one strided copy
    d = d.flatten(2)  # (B, out, P)
    w_sq = torch.zeros(m.weight.shape[0], patches.shape[1], dtype=a.dtype, device=a.device)
    chunk = max(1, 2**24 // (d.shape[1] * patches.shape[1]))
    for i in range(0, a.shape[0], chunk):
        w_sq += torch.einsum("bop,bkp->bok", d[i:i + chunk], patches[i:i + chunk]).pow(2).sum(0)
    return w_sq.view_as(m.weight), d.sum(2).pow(2).sum(0)


def vmap_grad_sq_sums(by_name: dict[str, Tensor], names: list[str], loss_fn: Loss, x: Tensor, y: Tensor,
                      call_with: Callable, chunk: int | None = None) -> dict[int, Tensor]:
    """``torch.func.vmap`` of per-sample gradients for the parameters ``names``, in chunks of samples."""
    fixed = {n: p.detach() for n, p in by_name.items() if n not in names}

    def sample_loss(free: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return loss_fn(call_with({**fixed, **free}, xi.unsqueeze(0)), yi.unsqueeze(0))

    per_sample = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))
    free = {n: by_name[n].detach() for n in names}
    sums = {n: torch.zeros_like(p) for n, p in free.items()}
    n_samples, numel = x.shape[0], sum(p.numel() for p in free.values())
    chunk = chunk or max(1, min(n_samples, 2**25 // numel))  # ~32M gradient entries at a time
    for start in range(0, n_samples, chunk):
        g = per_sample(free, x[start:start + chunk], y[start:start + chunk])
        for n in names:
            sums[n] += g[n].pow(2).sum(0)
    return {id(by_name[n]): sums[n] for n in names}
