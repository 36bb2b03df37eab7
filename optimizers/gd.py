"""Full-batch gradient descent: seed 000's naive method, used for Newton's pre-training and as its fall-back.

    w <- w - sigma * g,   sigma = lr (fixed, "learning rate") or found by Armijo backtracking along -g.

Seed 000 sec. 9.2 offers both step-size rules; its MNIST experiment (sec. 14.3) uses a fixed learning rate for gradient
descent because a line search from a large trial rate can hit non-finite losses on a coercive cost.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from optimizers.base import Optimizer
from optimizers.line_search import armijo
from optimizers.objective import Objective

STEP_SIZES = ("fixed", "armijo")


class GradientDescent(Optimizer):
    """Plain (full-batch) gradient descent with a fixed step ``lr`` or an Armijo line search.

    Armijo (seed 000 sec. 9.2): the first sigma in {initial_rate * beta^j} with
    f(w - sigma g) - f(w) <= -sigma * gamma * |g|^2. When no rate passes within ``max_evals`` tries the step is skipped
    (``line_search/success`` = 0).
    """

    def __init__(self, params: Iterable[Tensor], lr: float = 0.1, step_size: str = "fixed",
                 initial_rate: float = 1.0, beta: float = 0.8, gamma: float = 0.01, max_evals: int = 60):
        super().__init__(params)
        check_step_size_options(step_size, lr=lr, initial_rate=initial_rate, beta=beta, gamma=gamma,
                                max_evals=max_evals)
        self.lr, self.step_size = float(lr), step_size
        self.initial_rate, self.beta, self.gamma, self.max_evals = float(initial_rate), float(beta), float(gamma), int(max_evals)

    def step(self, objective: Objective) -> dict[str, Any]:
        loss = objective.loss()
        g = objective.gradient()
        stats: dict[str, Any] = {"loss": loss, "grad_norm": g.norm()}
        if self.step_size == "fixed":
            rate = self.lr
        else:
            result = armijo(objective, -g, loss0=loss, slope=-torch.dot(g, g), initial=self.initial_rate,
                            shrink=self.beta, c=self.gamma, max_evals=self.max_evals)
            rate = result.rate
            stats.update({"line_search/rate": result.rate, "line_search/evals": result.evals,
                          "line_search/success": int(result.success)})
        stats["step_size"] = rate
        stats.update(objective.stats())
        if rate != 0.0:
            objective.apply(g, alpha=-rate)
        self.steps += 1
        return stats


def check_step_size_options(step_size: str, *, lr: float, initial_rate: float, beta: float, gamma: float,
                            max_evals: int) -> None:
    """ValueErrors for the step-size hyperparameters shared by gradient descent and Newton."""
    if step_size not in STEP_SIZES:
        raise ValueError(f"optimizer.step_size={step_size!r} is not one of {list(STEP_SIZES)}: 'fixed' multiplies the "
                         "direction by optimizer.lr, 'armijo' backtracks from optimizer.initial_rate by optimizer.beta.")
    if not lr > 0:
        raise ValueError(f"optimizer.lr must be positive, got {lr}.")
    if not initial_rate > 0:
        raise ValueError(f"optimizer.initial_rate (first Armijo trial rate) must be positive, got {initial_rate}.")
    if not 0.0 < beta < 1.0:
        raise ValueError(f"optimizer.beta (Armijo shrink factor, seed 000 sec. 9.2) must be in (0, 1), got {beta}.")
    if not 0.0 < gamma < 1.0:
        raise ValueError(f"optimizer.gamma (Armijo sufficient-decrease constant, seed 000 sec. 9.2) must be in (0, 1), "
                         f"got {gamma}.")
    if isinstance(max_evals, bool) or int(max_evals) != max_evals or max_evals < 1:
        raise ValueError(f"optimizer.max_evals (Armijo loss evaluations per step) must be a positive integer, "
                         f"got {max_evals!r}.")
