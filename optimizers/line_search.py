"""Armijo backtracking along a direction, shared by gradient descent, Newton, Hessian-free and NLCG.

Seed 000 (Algorithm 4, step-size adaption with beta, gamma) and Martens 2010 ("Deep learning via Hessian-free
optimization", sec. 4.6: rate 1, shrink 0.8, c = 0.01, give up after 60 tries) use the same rule: accept the first
rate a in {a0, a0*shrink, a0*shrink^2, ...} with
    f(w + a p) <= f(w) + c * a * g^T p.
Every method names these settings ``ls_*`` (``LineSearchOptions``). Each trial is reported to the step's monitor
(optimizers/monitor.py), which may stop the step there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from optimizers import monitor as step_monitor
from optimizers.base import OptimizerOptions
from validation.checks import in_range, option, positive, positive_int
from optimizers.interface import ObjectiveLike


@dataclass(frozen=True)
class LineSearchOptions(OptimizerOptions):
    """The Armijo settings every method with a line search shares (defaults: Martens 2010 sec. 4.6)."""

    ls_initial_rate: float = option(1.0, positive)                                # first trial rate a0
    ls_shrink: float = option(0.8, in_range(0, 1, low_open=True, high_open=True))  # rate multiplier per rejected trial
    ls_c: float = option(0.01, in_range(0, 1, low_open=True, high_open=True))      # sufficient-decrease constant c
    ls_max_evals: int = option(60, positive_int)                                  # trials before giving up (no step)


@dataclass
class LineSearchResult:
    rate: float        # accepted rate (0.0 when the search failed)
    loss: Tensor       # loss at the accepted point (the start loss when failed)
    evals: int         # loss evaluations spent
    success: bool


def armijo(objective: ObjectiveLike, direction: Tensor, *, loss0: Tensor | None = None, slope: Tensor | None = None,
           initial: float = 1.0, shrink: float = 0.8, c: float = 0.01, max_evals: int = 60) -> LineSearchResult:
    """Backtrack from ``initial`` by ``shrink`` until the Armijo condition holds, on the objective's batch."""
    loss0 = objective.loss() if loss0 is None else loss0
    slope = torch.dot(objective.gradient(), direction) if slope is None else slope
    rate, monitor = initial, step_monitor.current()
    for evals in range(1, max_evals + 1):
        trial = objective.loss_at(rate * direction)
        accepted = bool(torch.isfinite(trial)) and bool(trial <= loss0 + c * rate * slope)
        if monitor.active:
            monitor.report("line-search trial", evals, at_most=max_evals, rate=rate, loss=float(trial))
        if accepted:
            return LineSearchResult(rate, trial, evals, True)
        rate *= shrink
    return LineSearchResult(0.0, loss0, max_evals, False)


def armijo_with(options: LineSearchOptions, objective: ObjectiveLike, direction: Tensor, *, loss0: Tensor,
                slope: Tensor, initial: float | None = None, max_evals: int | None = None) -> LineSearchResult:
    """``armijo`` with a method's ``ls_*`` options (``initial``/``max_evals`` override them for one call)."""
    return armijo(objective, direction, loss0=loss0, slope=slope,
                  initial=options.ls_initial_rate if initial is None else initial, shrink=options.ls_shrink,
                  c=options.ls_c, max_evals=options.ls_max_evals if max_evals is None else max_evals)


def armijo_after_trial(options: LineSearchOptions, objective: ObjectiveLike, direction: Tensor, *, loss0: float,
                       slope: float, trial_loss: float | None) -> tuple[float, int]:
    """``armijo_with`` when the loss at rate 1, f(w + direction), is known already (``trial_loss``; None: not known):
    rate 1 is then tested for free when it is the first trial. Returns (rate, loss evaluations spent); rate 0 = no
    step (the direction is not a descent direction, or the search failed). Used by Hessian-free and Newton, whose
    reduction ratio needs f(w + p) anyway."""
    if not slope < 0:
        return 0.0, 0
    initial, budget = options.ls_initial_rate, options.ls_max_evals
    if trial_loss is not None and initial == 1.0:
        if math.isfinite(trial_loss) and trial_loss <= loss0 + options.ls_c * slope:
            return 1.0, 0
        initial, budget = options.ls_shrink, budget - 1
    if budget < 1:
        return 0.0, 0
    found = armijo_with(options, objective, direction, loss0=direction.new_tensor(loss0),
                        slope=direction.new_tensor(slope), initial=initial, max_evals=budget)
    return found.rate, found.evals
