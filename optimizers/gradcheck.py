"""The gradient test of seed 001 (sec. 3.4, eq. 31): central differences of the loss against the gradient.

For random directions dm and a small eps,
    (L(m + eps dm) - L(m - eps dm)) / (2 eps) = dm^T grad L + O(eps^2),
so the relative error between the two sides is O(eps^2) plus rounding (about 1e-16 |L| / eps): run it in float64,
where eps = 1e-6 gives errors around 1e-9 for a correct gradient. Both sides use the objective's batch with the
same dropout masks and untouched batch-norm statistics (``Objective.loss_at``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from optimizers.objective import Objective


def finite_difference_check(objective: Objective, direction: Tensor | None = None, eps: float = 1e-6,
                            num_directions: int = 3, seed: int = 0) -> dict[str, Any]:
    """Compare ``objective.gradient()`` with central differences of ``objective.loss_at`` (seed 001 eq. 31).

    ``direction``: one flat direction to test; by default ``num_directions`` random unit directions drawn from a
    private generator seeded with ``seed`` (the global RNG is untouched). Returns ``max_relative_error`` and, per
    direction, ``relative_errors``, ``directional_derivatives`` (dm^T grad) and ``finite_differences``.
    """
    if not eps > 0:
        raise ValueError(f"finite_difference_check: eps={eps!r} must be positive (1e-6 suits float64).")
    grad = objective.gradient()
    if direction is not None:
        if direction.shape != grad.shape:
            raise ValueError(f"finite_difference_check: direction has shape {tuple(direction.shape)}, but the "
                             f"model has {grad.numel()} parameters; pass a flat vector of that length.")
        directions = [direction.to(grad)]
    else:
        if num_directions < 1:
            raise ValueError(f"finite_difference_check: num_directions={num_directions!r} must be at least 1.")
        generator = torch.Generator(device=grad.device).manual_seed(seed)
        directions = []
        for _ in range(num_directions):
            d = torch.randn(grad.shape, generator=generator, dtype=grad.dtype, device=grad.device)
            directions.append(d / d.norm())
    analytic, numeric, errors = [], [], []
    for d in directions:
        exact = float(grad.dot(d))
        central = float(objective.loss_at(eps * d) - objective.loss_at(-eps * d)) / (2 * eps)
        scale = max(abs(exact), abs(central), torch.finfo(grad.dtype).tiny)
        analytic.append(exact)
        numeric.append(central)
        errors.append(abs(central - exact) / scale)
    return {"max_relative_error": max(errors), "relative_errors": errors, "directional_derivatives": analytic,
            "finite_differences": numeric, "eps": eps}
