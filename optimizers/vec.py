"""Parameter-shaped vectors are flat 1-D tensors throughout the library (one allocation, trivially solvable).

These helpers convert between the model's list of parameter tensors and one flat vector. ``unflatten`` returns
views (no copy), so a flat vector can be fed to autograd as per-parameter tangents for free.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors into one flat vector (a copy)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat vector into views shaped like ``like`` (no copy)."""
    views, offset = [], 0
    for t in like:
        n = t.numel()
        views.append(flat[offset:offset + n].view_as(t))
        offset += n
    if offset != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} entries but the parameters have {offset}")
    return views


def add_to_params(params: Sequence[Tensor], delta: Tensor, alpha: float = 1.0) -> None:
    """In place: w <- w + alpha * delta."""
    with torch.no_grad():
        torch._foreach_add_(list(params), unflatten(delta, params), alpha=alpha)


def params_vector(params: Sequence[Tensor]) -> Tensor:
    """The current parameters as one flat vector (a detached copy)."""
    return flatten([p.detach() for p in params])


TINY = 2.0**-100  # ~8e-31: the threshold of flush_tiny


def flush_tiny(x: Tensor) -> Tensor:
    """x with the entries of magnitude below ``TINY`` set to 0, in place; for state vectors that are carried from step
    to step (Hessian-free's warm start, CurveBall's z).

    Their entries for parameters without gradient (dead ReLU units, say) shrink geometrically from step to step (by
    about 1e-4 a step in HF's warm start on the basic CNN) and reach float32's subnormal range (< 1.2e-38) after ~10
    steps; every product with such a vector then runs on the CPU's slow subnormal path (measured: HF steps 20-35 %
    slower after 14 steps, single convolutions 10x). Values this small are far below the rounding of any parameter
    they could be added to."""
    return x.masked_fill_(x.abs() < TINY, 0.0)
