"""Armijo backtracking along a direction, shared by Newton, Hessian-free and gradient descent.

Seed 000 Algorithm 4 (step-size adaption with beta, gamma) and Martens 2010 sec. 4.6 (rate 1, shrink 0.8, c = 0.01,
give up after 60 tries) are the same rule: accept the first rate a in {a0, a0*shrink, ...} with
    f(w + a p) <= f(w) + c * a * g^T p.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from optimizers.objective import Objective


@dataclass
class LineSearchResult:
    rate: float        # accepted rate (0.0 when the search failed)
    loss: Tensor       # loss at the accepted point (the start loss when failed)
    evals: int         # loss evaluations spent
    success: bool


def armijo(objective: Objective, direction: Tensor, *, loss0: Tensor | None = None, slope: Tensor | None = None,
           initial: float = 1.0, shrink: float = 0.8, c: float = 0.01, max_evals: int = 60) -> LineSearchResult:
    """Backtrack from ``initial`` by ``shrink`` until the Armijo condition holds, on the objective's batch."""
    if not 0.0 < shrink < 1.0:
        raise ValueError(f"line search shrink factor must be in (0, 1), got {shrink}")
    loss0 = objective.loss() if loss0 is None else loss0
    slope = torch.dot(objective.gradient(), direction) if slope is None else slope
    rate = initial
    for evals in range(1, max_evals + 1):
        trial = objective.loss_at(rate * direction)
        if bool(torch.isfinite(trial)) and bool(trial <= loss0 + c * rate * slope):
            return LineSearchResult(rate, trial, evals, True)
        rate *= shrink
    return LineSearchResult(0.0, loss0, max_evals, False)
