"""The Taylor test of seed 000 (ch. 13, eq. 13.1; Fig. 14.1 and Table 15.1): how well the gradient and the curvature
predict the loss along a direction.

For a unit direction d and distances h, with L0 = L(w), g = gradient, C = H (or G):
    r0(h) = |L(w + h d) - L0|                              = O(h)     (slope 1 on a log-log plot)
    r1(h) = |L(w + h d) - L0 - h g.d|                      = O(h^2)   (slope 2: the gradient is right)
    r2(h) = |L(w + h d) - L0 - h g.d - h^2/2 d.C d|        = O(h^3)   (slope 3: the Hessian is right)
by Taylor's theorem for a three times differentiable loss. The slopes are fitted by least squares on log r vs log h
over the distances whose remainder lies above the rounding floor ~ 1000 eps |L0| (below it the remainder is noise:
Table 15.1's float32 plateau). The seed's text calls the first- and second-order errors "linear" and "quadratic";
its Table 15.1 numbers fall by about 10^2 and 10^2-10^3 per decade, i.e. the slopes 2 and 3 fitted here.
A slope 2 for r2 with ``curvature="ggn"`` measures how far the GGN is from the Hessian along d; piecewise-linear
networks (ReLU) give kinks, so use a smooth model (tanh) or small distances when checking the Hessian itself.
The gradient, the product and the losses must be of the same loss: use an Objective without a curvature sub-batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from optimizers.diagnostics import probes
from optimizers.diagnostics.operators import CurvatureOperator
from optimizers.diagnostics.results import Cost, Meter, Record, cost_scalars
from optimizers.interface import Curvature, ObjectiveLike


@dataclass
class TaylorTest(Record):
    """Remainders of the zeroth-, first- and second-order Taylor models and their fitted log-log slopes."""

    distances: Tensor    # (p,) h
    losses: Tensor       # (p,) L(w + h d)
    loss: float          # L(w)
    directional_derivative: float   # g.d
    directional_curvature: float    # d.C d
    remainders: Tensor   # (3, p) r0, r1, r2
    slopes: Tensor       # (3,) fitted slopes (expected 1, 2, 3); nan where fewer than 2 points are above the floor
    fitted: Tensor       # (3, p) bool, the points each fit used
    curvature: str
    direction: Tensor    # (n,) the unit direction d
    cost: Cost

    VECTORS = ("direction",)

    def scalars(self) -> dict[str, float]:
        out = {f"taylor_slope{k}": float(self.slopes[k]) for k in range(3)}
        return {**out, **cost_scalars("taylor", self.cost)}


def fit_slopes(distances: Tensor, remainders: Tensor, floor: float) -> tuple[Tensor, Tensor]:
    """Least-squares slopes of log r against log h per row of ``remainders`` (k, p), over points with r > floor."""
    used = remainders > floor
    slopes = torch.full((remainders.shape[0],), float("nan"), dtype=torch.float64)
    for k in range(remainders.shape[0]):
        if int(used[k].sum()) >= 2:
            x, y = distances[used[k]].log(), remainders[k, used[k]].log()
            x, y = x - x.mean(), y - y.mean()
            slopes[k] = (x * y).sum() / (x * x).sum()
    return slopes, used


def taylor_test(objective: ObjectiveLike, direction: Tensor | None = None, distances: Tensor | None = None,
                curvature: Curvature = "hessian", seed: int = 0) -> TaylorTest:
    """Seed 000's Taylor test along ``direction`` (normalised to unit length; default a random unit vector from
    ``seed``) at ``distances`` (default 1e-1 ... 1e-6). Cost: one gradient, one product, len(distances) + 1 losses."""
    op = CurvatureOperator(objective, curvature)
    meter = Meter(op.device, op)
    if direction is None:
        direction = probes.unit(op.numel, probes.generator(seed), op.dtype, op.device)
    elif direction.shape != (op.numel,) or not float(direction.norm()) > 0:
        raise ValueError(f"taylor_test: direction must be a non-zero flat vector of {op.numel} entries, "
                         f"got shape {tuple(direction.shape)}.")
    d = (direction / direction.norm()).to(op.dtype)
    h = torch.logspace(-1, -6, 6, dtype=torch.float64) if distances is None else torch.as_tensor(
        distances, dtype=torch.float64)
    loss0 = float(objective.loss_at(torch.zeros_like(d)))   # the same evaluation path as the trial losses
    slope = float(torch.dot(objective.gradient(), d))
    quad = float(torch.dot(d, op.matvec(d)))
    meter.gradients, meter.loss_evals = 1, 1 + h.numel()
    losses = torch.tensor([float(objective.loss_at(float(t) * d)) for t in h], dtype=torch.float64)
    r0 = (losses - loss0).abs()
    r1 = (losses - loss0 - h * slope).abs()
    r2 = (losses - loss0 - h * slope - 0.5 * h * h * quad).abs()
    remainders = torch.stack([r0, r1, r2])
    floor = 1e3 * torch.finfo(op.dtype).eps * max(abs(loss0), torch.finfo(op.dtype).tiny)
    slopes, used = fit_slopes(h, remainders, floor)
    return TaylorTest(h, losses, loss0, slope, quad, remainders, slopes, used, curvature, d, meter.cost(op))
