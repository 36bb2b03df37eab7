"""Non-linear conjugate gradient (Nocedal & Wright 2006, "Numerical Optimization", sec. 5.2), as seed 001 (Veitch,
"Second order optimisation methods in deep learning with applications on the Fashion MNIST dataset") uses scipy's
``minimize(method="CG")``.

Mini-batches (issue 17). scipy's rule takes beta and the first trial rate from the previous step's gradient and loss,
which on resampled batches belong to another batch: g - g_prev is then mostly sampling noise, beta = g'(g - g_prev) /
|g_prev|^2 ~ |g|^2 / |g_prev|^2 (0.2-37 on MNIST at batch 128), the direction piles up stale directions that the
descent test rarely resets, and the run degrades (``dataset=mnist model=mlp optimizer=nlcg``: test accuracy 0.81 ->
0.24 in 1,000 steps, training loss back at 2.0 from 2.3). With ``same_batch=true`` (the default) the previous point's
loss and gradient are re-evaluated on the current batch (one extra gradient a step), so beta and the rate compare
two points of ONE function, as conjugacy assumes; this is how online quasi-Newton methods form their gradient
differences ([Schraudolph2007], "A stochastic quasi-Newton method for online convex optimization": both gradients
of a pair on the same sample). On a full or fixed batch both rules give the same steps;
``same_batch=false`` is scipy's (seed 001's files, which count evaluations, set it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim.lbfgs import _strong_wolfe

from optimizers import monitor as step_monitor
from optimizers.base import Optimizer, clone_state
from validation.checks import boolean, fail, in_range, nonnegative, one_of, option, optional, positive_int
from optimizers.line_search import LineSearchOptions, armijo_with
from optimizers.interface import ObjectiveLike

BETA_RULES = ("pr", "fr", "hs")
LINE_SEARCHES = ("strong_wolfe", "armijo")
INITIAL_RULES = ("quadratic", "slope")
_OPEN = dict(low_open=True, high_open=True)


@dataclass(frozen=True)
class NLCGOptions(LineSearchOptions):
    """Line-search defaults: scipy's CG (c1 = 1e-4, c2 = 0.4, initial rate capped at 1)."""

    beta_rule: str = option("pr", one_of(*BETA_RULES))  # pr (Polak-Ribiere) | fr (Fletcher-Reeves) | hs (Hestenes-S.)
    clip_beta: bool = option(True, boolean)            # beta = max(0, beta) (PR+, Gilbert & Nocedal 1992)
    line_search: str = option("strong_wolfe", one_of(*LINE_SEARCHES))
    restart_every: int | None = option(None, optional(positive_int))  # restart period; null = number of parameters
    descent_tol: float = option(0.01, in_range(0, 1, high_open=True))  # restart when g^T d > -descent_tol |g|^2
    ls_c: float = option(1e-4, in_range(0, 1, **_OPEN))   # sufficient-decrease (Armijo) constant c1
    ls_c2: float = option(0.4, in_range(0, 1, **_OPEN))   # strong Wolfe curvature constant c2 (N&W suggest 0.1)
    ls_max_evals: int = option(25, positive_int)          # loss evaluations per line search
    ls_tolerance_change: float = option(1e-9, nonnegative)  # strong Wolfe: stop when the bracket is this narrow
    same_batch: bool = option(True, boolean)  # beta, first rate from the previous point re-evaluated on this batch
    ls_initial_rule: str = option("quadratic", one_of(*INITIAL_RULES))  # first trial: N&W eq. 3.60 | eq. 3.59

    def validate(self) -> None:
        super().validate()
        if self.line_search == "strong_wolfe" and not self.ls_c < self.ls_c2:
            fail(self.key("ls_c2"), self.ls_c2, f"must exceed {self.key('ls_c')}={self.ls_c} (strong Wolfe needs "
                 "c1 < c2 < 1).")


class NLCG(Optimizer):
    """Non-linear conjugate gradient with Polak-Ribiere+ directions and restarts: one iteration per step.

        beta_PR = g^T (g - g_prev) / |g_prev|^2,   beta = max(0, beta)  (PR+, Gilbert & Nocedal 1992),
        d = -g + beta d_prev,
    restarting with d = -g every ``restart_every`` steps (default: the number of parameters) and whenever d fails
    scipy's sufficient-descent test g^T d <= -descent_tol |g|^2. Line search: strong Wolfe (torch's ``_strong_wolfe``,
    cubic interpolation) or Armijo backtracking. The first trial rate is scipy's min(1, 1.01 * 2 (f - f_prev) / g^T d)
    (Nocedal & Wright eq. 3.60), 1.01/|g| on the first step, capped at ``ls_initial_rate``.

    Statistics: ``loss``, ``loss_after``, ``beta``, ``restart`` (0/1), ``nlcg/reevaluated`` (0/1: the previous point's
    extra gradient, ``same_batch``), ``line_search/rate``, ``line_search/evals``,
    ``grad_norm``.
    """

    Options = NLCGOptions

    def __init__(self, params, **options: Any):
        super().__init__(params, **options)
        self.prev_grad: Tensor | None = None
        self.prev_dir: Tensor | None = None
        self.prev_loss: Tensor | None = None
        self.prev_step: Tensor | None = None  # the last move (same_batch: the previous point is w - prev_step)
        self.since_restart = 0
        self.prev_slope: float | None = None  # rate * g^T d of the last move (ls_initial_rule=slope)

    def update(self, objective: ObjectiveLike) -> dict[str, Any]:
        loss, g = objective.loss(), objective.gradient()
        reevaluated = self.options.same_batch and self.prev_step is not None
        if reevaluated:  # the previous point, on this batch
            self.prev_loss, self.prev_grad = objective.loss_and_gradient_at(-self.prev_step)
        gg = g.dot(g)
        d, gtd, beta, restart = self._direction(g, gg)
        stats: dict[str, Any] = {"loss": loss, "beta": beta, "restart": int(restart), "grad_norm": gg.sqrt(),
                                 "nlcg/reevaluated": int(reevaluated)}
        if not bool(gtd < 0):  # zero gradient: nothing to do
            rate, loss_after, evals = 0.0, loss, 0
        else:
            rate, loss_after, evals = self._search(objective, d, loss, g, gg, gtd)
        stats.update({"loss_after": loss_after, "line_search/rate": rate, "line_search/evals": evals})
        if rate > 0:
            objective.apply(d, alpha=rate)
        # no move (failed search or zero gradient) makes the next step restart along -g
        self.prev_grad, self.prev_loss = g.detach().clone(), loss.detach().clone()
        self.prev_dir = d.detach().clone() if rate > 0 else None
        self.prev_step = d.detach() * rate if rate > 0 else None
        self.prev_slope = rate * float(gtd) if rate > 0 else None
        self.since_restart = 1 if restart else self.since_restart + 1
        return {**stats, **objective.stats()}

    def _direction(self, g: Tensor, gg: Tensor) -> tuple[Tensor, Tensor, Tensor, bool]:
        """d = -g + beta d_prev, or -g on a restart; with g^T d, beta and whether it restarted."""
        period = self.options.restart_every or g.numel()
        if self.prev_dir is not None and self.since_restart < period:
            beta = self._beta(g)
            d = -g + beta * self.prev_dir
            gtd = g.dot(d)
            if not bool(gtd > -self.options.descent_tol * gg):  # a sufficient descent direction
                return d, gtd, beta, False
        return -g, -gg, torch.zeros_like(gg), True

    def _beta(self, g: Tensor) -> Tensor:
        g_prev, d_prev = self.prev_grad, self.prev_dir
        if self.options.beta_rule == "fr":
            beta = g.dot(g) / g_prev.dot(g_prev)
        elif self.options.beta_rule == "pr":
            beta = g.dot(g - g_prev) / g_prev.dot(g_prev)
        else:
            y = g - g_prev
            beta = g.dot(y) / d_prev.dot(y)
        if self.options.clip_beta:
            beta = beta.clamp(min=0.0)
        return torch.where(torch.isfinite(beta), beta, torch.zeros_like(beta))

    def _search(self, objective: ObjectiveLike, d: Tensor, loss: Tensor, g: Tensor, gg: Tensor,
                gtd: Tensor) -> tuple[float, Any, int]:
        """(rate, loss at the new point, evaluations) along d."""
        o = self.options
        rate0 = self._initial_rate(loss, gg, gtd)
        if o.line_search == "armijo":
            result = armijo_with(o, objective, d, loss0=loss, slope=gtd, initial=rate0)
            return result.rate, result.loss, result.evals

        evals, monitor = 0, step_monitor.current()

        def along(_x: Any, t: float, direction: Tensor) -> tuple[float, Tensor]:
            nonlocal evals
            value, grad = objective.loss_and_gradient_at(t * direction)
            evals += 1
            monitor.report("line-search trial", evals, at_most=o.ls_max_evals, rate=t, loss=float(value))
            return float(value), grad

        loss_after, _, rate, evals = _strong_wolfe(along, None, rate0, d, float(loss), g, gtd, c1=o.ls_c, c2=o.ls_c2,
                                                   tolerance_change=o.ls_tolerance_change, max_ls=o.ls_max_evals)
        return float(rate), float(loss_after), evals  # floats: the search ran on the host anyway

    def _initial_rate(self, loss: Tensor, gg: Tensor, gtd: Tensor) -> float:
        """``quadratic`` (scipy): the minimiser of the quadratic through f_prev, f and g^T d (N&W eq. 3.60); on
        resampled batches f - f_prev is one batch's difference and, where the last move raised this batch's loss, the
        guess falls back to the cap. ``slope``: the last move's first-order change alpha_prev g_prev^T d_prev repeated
        (N&W eq. 3.59), which uses no loss difference."""
        if self.options.ls_initial_rule == "slope" and self.prev_slope is not None:
            return min(self.prev_slope / float(gtd), self.options.ls_initial_rate)
        if self.prev_loss is None:
            rate = 1.01 / float(gg.sqrt())  # scipy: f_prev = f + |g| / 2 "sets the initial step guess to dx ~ 1"
        else:
            rate = 1.01 * 2.0 * float(loss - self.prev_loss) / float(gtd)
            if not rate > 0:
                rate = 1.0
        return min(rate, self.options.ls_initial_rate)

    def gradients_per_step(self) -> tuple[float, str]:
        """A rough cost per step, in gradients (one forward and backward pass over the batch), and how it comes about,
        for the runner's up-front estimate (runner/cost.py)."""
        if self.options.line_search == "armijo":
            return 1.5, "optimizer.line_search=armijo: ~1.5 gradients per step (a gradient and a few trial losses)"
        return 3.0, "optimizer.line_search=strong_wolfe: ~3 gradients per step (a gradient and ~2 trials)"

    def state_dict(self) -> dict[str, Any]:
        return clone_state({"steps": self.steps, "prev_grad": self.prev_grad, "prev_dir": self.prev_dir,
                            "prev_loss": self.prev_loss, "prev_step": self.prev_step,
                            "since_restart": self.since_restart, "prev_slope": self.prev_slope})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = clone_state(state)
        self.steps, self.since_restart = int(state["steps"]), int(state["since_restart"])
        self.prev_grad, self.prev_dir, self.prev_loss = state["prev_grad"], state["prev_dir"], state["prev_loss"]
        self.prev_step = state.get("prev_step")
        self.prev_slope = state.get("prev_slope")
