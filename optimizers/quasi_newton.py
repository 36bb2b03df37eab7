"""Quasi-Newton and conjugate-gradient methods of seed 001: L-BFGS and non-linear conjugate gradient (NLCG).

Seed 001 trains with scipy's ``L-BFGS-B`` and ``CG`` (Polak-Ribiere+) on batches held FIXED throughout training
(sec. 3.3, eq. 28): resampling the batch every iteration breaks the curvature pairs / conjugacy these methods build
and makes them stop early. Both methods here work on any objective, but they make sense on a full batch or on a
fixed batch (or cycle of fixed batches).

Every function evaluation inside a step (line-search trials, L-BFGS inner iterations) is made on the step's batch
with the forward pass's dropout masks and without touching batch-norm running statistics (``loss_and_gradient_at``),
so the line searches see one deterministic function per step.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.lbfgs import _strong_wolfe

from optimizers.base import Optimizer, clone_state
from optimizers.line_search import armijo
from optimizers.objective import Objective
from optimizers.vec import unflatten

LBFGS_LINE_SEARCHES = ("strong_wolfe", "none")
NLCG_LINE_SEARCHES = ("strong_wolfe", "armijo")
BETA_RULES = ("pr", "fr", "hs")


def loss_and_gradient_at(objective: Objective, delta: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Loss and flat gradient at w + delta, afresh on the objective's batch (see ``Objective.loss_and_gradient_at``)."""
    return objective.loss_and_gradient_at(delta)


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"optimizer.{name}={value!r} must be a positive integer.")


class LBFGS(Optimizer):
    """L-BFGS (Nocedal & Wright, Algorithm 7.4/7.5): ``torch.optim.LBFGS`` behind the step contract.

    One ``step`` runs up to ``max_iter`` L-BFGS iterations on the objective's batch; the curvature pairs persist
    across steps. Defaults follow scipy's L-BFGS-B as used by seed 001 (history 10, strong Wolfe line search) with
    one iteration per step, so a step is one iteration of the seed's plots. ``line_search="none"`` takes fixed
    steps of length ``lr`` along the L-BFGS direction (torch's behaviour without a line search).

    Statistics: ``loss`` (before), ``loss_after`` (at the new parameters, same batch and masks), ``lbfgs/evals``
    (function+gradient evaluations in this step), ``lbfgs/iters``, ``grad_norm`` (at the start of the step).
    """

    def __init__(self, params: Iterable[Tensor], lr: float = 1.0, max_iter: int = 1, max_eval: int | None = None,
                 history_size: int = 10, tolerance_grad: float = 1e-7, tolerance_change: float = 1e-9,
                 line_search: str | None = "strong_wolfe"):
        super().__init__(params)
        line_search = "none" if line_search is None else line_search
        if line_search not in LBFGS_LINE_SEARCHES:
            raise ValueError(f"optimizer.line_search={line_search!r} is not one of {list(LBFGS_LINE_SEARCHES)} "
                             "(strong_wolfe: line search as in scipy's L-BFGS-B; none: fixed step of length lr).")
        if not lr > 0:
            raise ValueError(f"optimizer.lr={lr!r} must be positive (the initial trial step, or the fixed step "
                             "when line_search is none).")
        _check_positive_int("max_iter", max_iter)
        _check_positive_int("history_size", history_size)
        if max_eval is not None:
            _check_positive_int("max_eval", max_eval)
        for name, value in (("tolerance_grad", tolerance_grad), ("tolerance_change", tolerance_change)):
            if not value >= 0:
                raise ValueError(f"optimizer.{name}={value!r} must be non-negative.")
        # torch's default budget (max_iter * 5/4 evaluations) leaves a one-iteration step no room for a line search:
        # allow up to 25 evaluations per iteration (torch's strong-Wolfe default max_ls).
        max_eval = 25 * max_iter if max_eval is None else max_eval
        self.inner = torch.optim.LBFGS(
            self.params, lr=lr, max_iter=max_iter, max_eval=max_eval, tolerance_grad=tolerance_grad,
            tolerance_change=tolerance_change, history_size=history_size,
            line_search_fn=None if line_search == "none" else line_search)

    def _counters(self) -> tuple[int, int]:
        state = self.inner.state[self.inner.param_groups[0]["params"][0]]
        return state.get("func_evals", 0), state.get("n_iter", 0)

    def step(self, objective: Objective) -> dict[str, Any]:
        loss, grad = objective.loss(), objective.gradient()
        calls = 0

        def closure() -> Tensor:
            # torch.optim.LBFGS moves the parameters in place between calls. The first call is at the step's start
            # (the objective's cached forward); the others evaluate afresh at the moved parameters.
            nonlocal calls
            calls += 1
            value, g = (loss, grad) if calls == 1 else loss_and_gradient_at(objective)
            for p, gi in zip(objective.params, unflatten(g, objective.params)):
                p.grad = gi
            return value

        evals0, iters0 = self._counters()
        self.inner.step(closure)
        evals1, iters1 = self._counters()
        loss_after = objective.loss_at(torch.zeros_like(grad))  # same batch and masks, BN statistics untouched
        for p in objective.params:
            p.grad = None
        objective.invalidate()  # the parameters moved without objective.apply: its caches belong to the old ones
        self.steps += 1
        return {"loss": loss, "loss_after": loss_after, "lbfgs/evals": evals1 - evals0,
                "lbfgs/iters": iters1 - iters0, "grad_norm": grad.norm(), **objective.stats()}

    def state_dict(self) -> dict[str, Any]:
        # torch's state dict holds the live history buffers (updated in place): copy them.
        return {"steps": self.steps, "inner": clone_state(self.inner.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.inner.load_state_dict(clone_state(state["inner"]))


class NLCG(Optimizer):
    """Non-linear conjugate gradient with Polak-Ribiere+ directions and restarts: one iteration per step.

    Follows scipy's ``minimize(method="CG")`` that seed 001 uses (Nocedal & Wright sec. 5.2):
        beta_PR = g^T (g - g_prev) / |g_prev|^2,   beta = max(0, beta)  (PR+, Gilbert & Nocedal 1992),
        d = -g + beta d_prev,
    restarting with d = -g every ``restart_every`` steps (default: the number of parameters) and whenever d fails
    scipy's sufficient-descent test g^T d <= -descent_tol |g|^2 (descent_tol = 0.01 there). Line search: strong Wolfe
    (torch's ``_strong_wolfe``, cubic interpolation; scipy's c1 = 1e-4, c2 = 0.4) or Armijo backtracking. The first
    trial rate is scipy's min(1, 1.01 * 2 (f - f_prev) / g^T d) (Nocedal & Wright eq. 3.60), 1.01/|g| on the first
    step, capped at ``initial_rate``. Other rules: ``fr`` (Fletcher-Reeves) and ``hs`` (Hestenes-Stiefel);
    ``clip_beta`` applies max(0, .) to any rule.

    Statistics: ``loss``, ``loss_after``, ``beta``, ``restart`` (0/1), ``line_search/rate``, ``line_search/evals``,
    ``grad_norm``.
    """

    def __init__(self, params: Iterable[Tensor], beta_rule: str = "pr", clip_beta: bool = True,
                 line_search: str = "strong_wolfe", restart_every: int | None = None, descent_tol: float = 0.01,
                 c1: float = 1e-4, c2: float = 0.4, max_evals: int = 25, initial_rate: float = 1.0,
                 shrink: float = 0.8, tolerance_change: float = 1e-9):
        super().__init__(params)
        if beta_rule not in BETA_RULES:
            raise ValueError(f"optimizer.beta_rule={beta_rule!r} is not one of {list(BETA_RULES)} "
                             "(pr: Polak-Ribiere, fr: Fletcher-Reeves, hs: Hestenes-Stiefel).")
        if line_search not in NLCG_LINE_SEARCHES:
            raise ValueError(f"optimizer.line_search={line_search!r} is not one of {list(NLCG_LINE_SEARCHES)} "
                             "(NLCG needs a line search; strong_wolfe is the standard choice).")
        if restart_every is not None:
            _check_positive_int("restart_every", restart_every)
        _check_positive_int("max_evals", max_evals)
        if not 0 < c1 < 1:
            raise ValueError(f"optimizer.c1={c1!r} must lie in (0, 1) (sufficient-decrease constant).")
        if line_search == "strong_wolfe" and not c1 < c2 < 1:
            raise ValueError(f"optimizer.c2={c2!r} must satisfy c1 < c2 < 1 with c1={c1} (strong Wolfe curvature "
                             "constant; scipy's CG uses 0.4).")
        if not 0 <= descent_tol < 1:
            raise ValueError(f"optimizer.descent_tol={descent_tol!r} must lie in [0, 1).")
        if not initial_rate > 0:
            raise ValueError(f"optimizer.initial_rate={initial_rate!r} must be positive.")
        if not 0 < shrink < 1:
            raise ValueError(f"optimizer.shrink={shrink!r} must lie in (0, 1) (Armijo backtracking factor).")
        if not tolerance_change >= 0:
            raise ValueError(f"optimizer.tolerance_change={tolerance_change!r} must be non-negative.")
        self.beta_rule, self.clip_beta, self.line_search = beta_rule, clip_beta, line_search
        self.restart_every, self.descent_tol = restart_every, descent_tol
        self.c1, self.c2, self.max_evals = c1, c2, max_evals
        self.initial_rate, self.shrink, self.tolerance_change = initial_rate, shrink, tolerance_change
        self.prev_grad: Tensor | None = None
        self.prev_dir: Tensor | None = None
        self.prev_loss: Tensor | None = None
        self.since_restart = 0

    def _beta(self, g: Tensor) -> Tensor:
        g_prev, d_prev = self.prev_grad, self.prev_dir
        if self.beta_rule == "fr":
            beta = g.dot(g) / g_prev.dot(g_prev)
        elif self.beta_rule == "pr":
            beta = g.dot(g - g_prev) / g_prev.dot(g_prev)
        else:
            y = g - g_prev
            beta = g.dot(y) / d_prev.dot(y)
        if self.clip_beta:
            beta = beta.clamp(min=0.0)
        return torch.where(torch.isfinite(beta), beta, torch.zeros_like(beta))

    def step(self, objective: Objective) -> dict[str, Any]:
        loss, g = objective.loss(), objective.gradient()
        gg = g.dot(g)
        period = self.restart_every if self.restart_every is not None else g.numel()
        restart = self.prev_dir is None or self.since_restart >= period
        beta = torch.zeros_like(gg)
        if not restart:
            beta = self._beta(g)
            d = -g + beta * self.prev_dir
            gtd = g.dot(d)
            if bool(gtd > -self.descent_tol * gg):  # not a (sufficient) descent direction
                restart = True
        if restart:
            beta = torch.zeros_like(gg)
            d, gtd = -g, -gg

        stats: dict[str, Any] = {"loss": loss, "beta": beta, "restart": int(restart), "grad_norm": gg.sqrt()}
        if not bool(gtd < 0):  # zero gradient: nothing to do
            stats.update({"loss_after": loss, "line_search/rate": 0.0, "line_search/evals": 0})
            return self._finish(objective, stats, g, None, loss, restart)

        rate0 = self._initial_rate(loss, gg, gtd)
        if self.line_search == "strong_wolfe":
            def along(_x: Any, t: float, direction: Tensor) -> tuple[float, Tensor]:
                value, grad = loss_and_gradient_at(objective, t * direction)
                return float(value), grad

            loss_after, _, rate, evals = _strong_wolfe(
                along, None, rate0, d, float(loss), g, gtd, c1=self.c1, c2=self.c2,
                tolerance_change=self.tolerance_change, max_ls=self.max_evals)
            rate, loss_after = float(rate), float(loss_after)  # floats: the search ran on the host anyway
        else:
            result = armijo(objective, d, loss0=loss, slope=gtd, initial=rate0, shrink=self.shrink, c=self.c1,
                            max_evals=self.max_evals)
            rate, loss_after, evals = result.rate, result.loss, result.evals
        stats.update({"loss_after": loss_after, "line_search/rate": rate, "line_search/evals": evals})
        if rate > 0:
            objective.apply(d, alpha=rate)
        return self._finish(objective, stats, g, d if rate > 0 else None, loss, restart)

    def _initial_rate(self, loss: Tensor, gg: Tensor, gtd: Tensor) -> float:
        if self.prev_loss is None:
            rate = 1.01 / float(gg.sqrt())  # scipy: f_prev = f + |g| / 2 "sets the initial step guess to dx ~ 1"
        else:
            rate = 1.01 * 2.0 * float(loss - self.prev_loss) / float(gtd)
            if not rate > 0:
                rate = 1.0
        return min(rate, self.initial_rate)

    def _finish(self, objective: Objective, stats: dict[str, Any], g: Tensor, d: Tensor | None, loss: Tensor,
                restart: bool) -> dict[str, Any]:
        # d = None (no move: failed line search or zero gradient) makes the next step restart along -g.
        self.prev_grad, self.prev_loss = g.detach().clone(), loss.detach().clone()
        self.prev_dir = None if d is None else d.detach().clone()
        self.since_restart = 1 if restart else self.since_restart + 1
        self.steps += 1
        return {**stats, **objective.stats()}

    def state_dict(self) -> dict[str, Any]:
        return clone_state({"steps": self.steps, "prev_grad": self.prev_grad, "prev_dir": self.prev_dir,
                            "prev_loss": self.prev_loss, "since_restart": self.since_restart})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = clone_state(state)
        self.steps, self.since_restart = int(state["steps"]), int(state["since_restart"])
        self.prev_grad, self.prev_dir, self.prev_loss = state["prev_grad"], state["prev_dir"], state["prev_loss"]
