"""The loss along one or two directions: 1-D lines and 2-D surfaces (seed 000 sec. 15.1, Fig. 15.1).

``loss_line(objective, d, t)`` gives L(w + t d); ``loss_surface(objective, (d1, d2), a, b)`` gives the grid
L(w + a_i d1 + b_j d2). Every value comes from ``objective.loss_at`` on the objective's batch: same dropout masks,
batch-norm running statistics untouched, the parameters never moved.

Directions: the top-2 eigenvectors (``Eigenpairs.eigenvectors[:2]``, the seed's choice: directions of maximum
curvature), or ``filter_normalized_direction``: a Gaussian direction rescaled filter by filter to the norms of the
weights' filters (Li, Xu, Taylor, Studer, Goldstein 2018, "Visualizing the loss landscape of neural nets", sec. 4),
which makes plots of networks with different weight scales comparable.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from optimizers.diagnostics import probes
from optimizers.diagnostics.results import Cost, Meter, Record
from optimizers.interface import ObjectiveLike

ONE_DIM = ("zero", "weights")


@dataclass
class LossLine(Record):
    distances: Tensor    # (p,) t
    losses: Tensor       # (p,) L(w + t d)
    loss: float          # L(w): the objective's batch loss
    cost: Cost

    def scalars(self) -> dict[str, float]:
        return {"line_loss_min": float(self.losses.min()), "line_loss_max": float(self.losses.max()),
                "line_seconds": self.cost.seconds}


@dataclass
class LossSurface(Record):
    alphas: Tensor       # (a,) coordinates along the first direction
    betas: Tensor        # (b,) coordinates along the second direction
    losses: Tensor       # (a, b) L(w + alpha_i d1 + beta_j d2)
    loss: float          # L(w): the objective's batch loss
    cost: Cost

    def scalars(self) -> dict[str, float]:
        return {"surface_loss_min": float(self.losses.min()), "surface_loss_max": float(self.losses.max()),
                "surface_seconds": self.cost.seconds}


def filter_normalized_direction(objective: ObjectiveLike, seed: int = 0, one_dim: str = "zero") -> Tensor:
    """Li et al. 2018, sec. 4: d ~ N(0, I) per parameter, then for each filter (slice along dim 0 of a weight with
    >= 2 dims: a conv output channel, a linear layer's row) d_f <- d_f / ||d_f|| * ||w_f||. One-dimensional
    parameters (biases, batch-norm scales) get ``one_dim="zero"`` (their ``--xignore biasbn``) or the weights
    themselves (``"weights"``, their default). Returns a flat vector (numel,)."""
    if one_dim not in ONE_DIM:
        raise ValueError(f"one_dim={one_dim!r} is not one of {list(ONE_DIM)}.")
    gen, parts = probes.generator(seed), []
    for p in objective.params:
        w = p.detach()
        if w.dim() <= 1:
            parts.append((torch.zeros_like(w) if one_dim == "zero" else w.clone()).reshape(-1))
            continue
        d = probes.draw(tuple(w.shape), gen, w.dtype, w.device, "gaussian")
        d_norm = d.flatten(1).norm(dim=1).clamp_min(torch.finfo(w.dtype).tiny)
        scale = w.flatten(1).norm(dim=1) / d_norm                                    # (filters,)
        parts.append((d * scale.view(-1, *([1] * (w.dim() - 1)))).reshape(-1))
    return torch.cat(parts)


def _grid(values: Sequence[float] | Tensor | None, name: str) -> Tensor:
    grid = torch.linspace(-1.0, 1.0, 21, dtype=torch.float64) if values is None else torch.as_tensor(
        values, dtype=torch.float64).reshape(-1)
    if grid.numel() == 0 or not torch.isfinite(grid).all():
        raise ValueError(f"{name} must be a non-empty sequence of finite numbers.")
    return grid


def _check_direction(objective: ObjectiveLike, d: Tensor, name: str) -> Tensor:
    if d.shape != (objective.numel,):
        raise ValueError(f"{name} must be a flat vector of {objective.numel} entries, got shape {tuple(d.shape)}.")
    return d.detach().to(objective.params[0].dtype)


def loss_line(objective: ObjectiveLike, direction: Tensor,
              distances: Sequence[float] | Tensor | None = None) -> LossLine:
    """L(w + t d) for t in ``distances`` (default 21 points in [-1, 1]); d is used as given (not normalised)."""
    d = _check_direction(objective, direction, "direction")
    t = _grid(distances, "distances")
    meter = Meter(d.device)
    losses = torch.tensor([float(objective.loss_at(float(s) * d)) for s in t], dtype=torch.float64)
    meter.loss_evals = t.numel()
    loss0 = float(objective.loss())
    return LossLine(t, losses, loss0, meter.cost())


def loss_surface(objective: ObjectiveLike, directions: Sequence[Tensor], alphas: Sequence[float] | Tensor | None = None,
                 betas: Sequence[float] | Tensor | None = None) -> LossSurface:
    """L(w + a d1 + b d2) on the grid alphas x betas (default 21 x 21 points in [-1, 1]^2); one loss per point."""
    if len(directions) != 2:
        raise ValueError(f"loss_surface needs two directions, got {len(directions)}.")
    d1, d2 = (_check_direction(objective, d, f"directions[{i}]") for i, d in enumerate(directions))
    a, b = _grid(alphas, "alphas"), _grid(betas, "betas")
    meter = Meter(d1.device)
    losses = torch.empty(a.numel(), b.numel(), dtype=torch.float64)
    for i, ai in enumerate(a.tolist()):
        for j, bj in enumerate(b.tolist()):
            losses[i, j] = float(objective.loss_at(ai * d1 + bj * d2))
    meter.loss_evals = a.numel() * b.numel()
    loss0 = float(objective.loss())
    return LossSurface(a, b, losses, loss0, meter.cost())
