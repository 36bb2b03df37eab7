"""The gradient test of seed 001 (sec. 3.4, eq. 31): central differences of the loss against the gradient.

For random directions dm and a small eps,
    (L(m + eps dm) - L(m - eps dm)) / (2 eps) = dm^T grad L + O(eps^2),
so the relative error between the two sides is O(eps^2) plus rounding (about 1e-16 |L| / eps): run it in float64,
where eps = 1e-6 gives errors around 1e-9 for a correct gradient. Both sides use the objective's batch with the
same dropout masks and untouched batch-norm statistics (``Objective.loss_at``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from optimizers.diagnostics import probes
from optimizers.diagnostics.results import Cost, Meter, Record, cost_scalars
from optimizers.interface import ObjectiveLike


@dataclass
class GradientCheck(Record):
    max_relative_error: float
    relative_errors: list[float]            # per direction |fd - exact| / max(|fd|, |exact|)
    directional_derivatives: list[float]    # dm^T grad
    finite_differences: list[float]         # (L(m + eps dm) - L(m - eps dm)) / (2 eps)
    eps: float
    cost: Cost

    def scalars(self) -> dict[str, float]:
        return {"gradcheck_max_relative_error": self.max_relative_error, **cost_scalars("gradcheck", self.cost)}


def _directions(grad: Tensor, direction: Tensor | None, num_directions: int, seed: int) -> list[Tensor]:
    if direction is not None:
        if direction.shape != grad.shape:
            raise ValueError(f"finite_difference_check: direction has shape {tuple(direction.shape)}, but the "
                             f"model has {grad.numel()} parameters; pass a flat vector of that length.")
        return [direction.to(grad)]
    if num_directions < 1:
        raise ValueError(f"finite_difference_check: num_directions={num_directions!r} must be at least 1.")
    gen = probes.generator(seed)
    return [probes.unit(grad.numel(), gen, grad.dtype, grad.device) for _ in range(num_directions)]


def gradient_check(objective: ObjectiveLike, direction: Tensor | None = None, eps: float = 1e-6,
                   num_directions: int = 3, seed: int = 0) -> GradientCheck:
    """Compare ``objective.gradient()`` with central differences of ``objective.loss_at`` (seed 001 eq. 31).

    ``direction``: one flat direction to test; by default ``num_directions`` random unit directions drawn from a
    private generator seeded with ``seed`` (the global RNG is untouched). Cost: one gradient, 2 losses a direction.
    """
    if not eps > 0:
        raise ValueError(f"finite_difference_check: eps={eps!r} must be positive (1e-6 suits float64).")
    grad = objective.gradient()
    meter = Meter(grad.device)
    directions = _directions(grad, direction, num_directions, seed)
    analytic, numeric, errors = [], [], []
    for d in directions:
        exact = float(grad.dot(d))
        central = float(objective.loss_at(eps * d) - objective.loss_at(-eps * d)) / (2 * eps)
        scale = max(abs(exact), abs(central), torch.finfo(grad.dtype).tiny)
        analytic.append(exact)
        numeric.append(central)
        errors.append(abs(central - exact) / scale)
    meter.gradients, meter.loss_evals = 1, 2 * len(directions)
    return GradientCheck(max(errors), errors, analytic, numeric, eps, meter.cost())


def finite_difference_check(objective: ObjectiveLike, direction: Tensor | None = None, eps: float = 1e-6,
                            num_directions: int = 3, seed: int = 0) -> dict[str, Any]:
    """``gradient_check`` as a plain dict (``max_relative_error``, ``relative_errors``, ``directional_derivatives``,
    ``finite_differences``, ``eps``, ``cost``): the original interface."""
    return gradient_check(objective, direction, eps, num_directions, seed).to_dict()
