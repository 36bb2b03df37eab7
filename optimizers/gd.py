"""Full-batch gradient descent: the naive method of seed 000 (Chapter 9), used for Newton's pre-training and as its
fall-back.

    w <- w - sigma * g,   sigma = lr (fixed, "learning rate") or found by Armijo backtracking along -g.

Seed 000 sec. 9.2 offers both step-size rules; its MNIST experiment (sec. 14.3) uses a fixed learning rate for gradient
descent because a line search from a large trial rate can hit non-finite losses on a coercive cost.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from optimizers.base import Optimizer
from validation.checks import one_of, option, positive
from optimizers.line_search import LineSearchOptions, armijo_with
from optimizers.interface import ObjectiveLike

STEP_SIZES = ("fixed", "armijo")


@dataclass(frozen=True)
class StepSizeOptions(LineSearchOptions):
    """A fixed step or an Armijo search (seed 000 sec. 9.2), shared by gradient descent and Newton."""

    step_size: str = option("armijo", one_of(*STEP_SIZES))  # fixed: w += lr * direction | armijo: backtracking
    lr: float = option(1.0, positive)                        # the fixed step size


@dataclass(frozen=True)
class GDOptions(StepSizeOptions):
    step_size: str = option("fixed", one_of(*STEP_SIZES))
    lr: float = option(0.1, positive)


class GradientDescent(Optimizer):
    """Plain (full-batch) gradient descent with a fixed step ``lr`` or an Armijo line search.

    Armijo: the first sigma in {ls_initial_rate * ls_shrink^j} with f(w - sigma g) - f(w) <= -sigma * ls_c * |g|^2.
    When no rate passes within ``ls_max_evals`` tries the step is skipped (``line_search/success`` = 0).
    """

    Options = GDOptions

    def update(self, objective: ObjectiveLike) -> dict[str, Any]:
        loss = objective.loss()
        g = objective.gradient()
        stats: dict[str, Any] = {"loss": loss, "grad_norm": g.norm()}
        rate = step_rate(self.options, objective, -g, loss=loss, slope=-g.dot(g), stats=stats)
        stats["step_size"] = rate
        stats.update(objective.stats())
        if rate != 0.0:
            objective.apply(g, alpha=-rate)
        return stats

    def gradients_per_step(self) -> tuple[float, str]:
        """A rough cost per step, in gradients (one forward and backward pass over the batch), and how it comes about,
        for the runner's up-front estimate (runner/cost.py)."""
        if self.options.step_size == "armijo":
            return 1.5, "optimizer.step_size=armijo: ~1.5 gradients per step (a gradient and a few trial losses)"
        return 1.0, "one gradient per step"


def step_rate(options: StepSizeOptions, objective: ObjectiveLike, direction, *, loss, slope, stats: dict,
              fixed: float | None = None) -> float:
    """The step size along ``direction``: ``fixed`` (default ``options.lr``) or an Armijo search, whose outcome is
    recorded in ``stats``."""
    if options.step_size == "fixed":
        return options.lr if fixed is None else fixed
    result = armijo_with(options, objective, direction, loss0=loss, slope=slope)
    stats.update({"line_search/rate": result.rate, "line_search/evals": result.evals,
                  "line_search/success": int(result.success)})
    return result.rate
