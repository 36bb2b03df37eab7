"""Hessian-free optimisation (Martens 2010; seed 002 Algorithms 1-2; seed 004 sec. 3.3-3.4).

One step on a batch, with F(w) = L(w) + eta/2 |w|^2 (eta = weight decay) and C the curvature of L:

1. gradient g of F and the curvature product cache in one pass (``objective.prepare``);
2. optional diagonal preconditioner M = (mean per-sample squared gradient + lambda + eta)^alpha, alpha = 0.75
   (Martens 2010 sec. 4.7; seed 002 sec. III.E);
3. PCG on (C + eta I + lambda I) x = -g, C = GGN ("ggn", seed 002 eq. 20; seed 004 "HF Gauss-Newton") or Hessian
   ("hessian", seed 004 "HF Newton": CG stops on negative curvature), warm-started from decay * previous solution
   (Martens sec. 4.5), stopped by Martens' rule after at least ``cg_min_iters`` steps (seed 002 Algorithm 2);
4. CG backtracking over the stored iterates (Martens sec. 4.6) picks p;
5. reduction ratio rho = (F(w + p) - F(w)) / q(p) with the UNDAMPED model q(p) = g^T p + 1/2 p^T (C + eta I) p
   (seed 002 eq. 25); F went up or is not finite -> rho = -inf;
6. step w <- w + lr * a * p, a from an Armijo line search (rate 1, x0.8, c = 0.01, 60 tries; Martens sec. 4.6) or
   a = 1 without it (seed 002 Algorithm 1; seed 004 Algorithm 2 with lr = alpha = 0.5). A failed search, or a p
   that is not a descent direction, leaves w where it is;
7. Levenberg-Marquardt (seed 002 eq. 26): rho < 1/4 (or nan, or no step) -> lambda *= r; rho > 3/4 -> lambda /= r.

Cost: the CG products (~95 %). q(p) is free by default: CG tracks the damped model value phi of every iterate, so
q(p) = phi(p) - lambda/2 |p|^2 (seed 002 Algorithm 2, "denom"); ``exact_model=true`` spends one extra curvature
product instead (Martens' code). Loss evaluations (backtracking, rho, line search) are counted in ``loss_evals``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from optimizers.base import Optimizer, clone_state
from optimizers.cg import cg_backtrack, pcg
from optimizers.line_search import armijo
from optimizers.objective import Objective
from optimizers.vec import params_vector

CURVATURES = ("ggn", "hessian")


class HessianFree(Optimizer):
    """Hessian-free (truncated Newton) with GGN or Hessian products, PCG, backtracking and Levenberg-Marquardt damping.

    Defaults follow seed 002 (GGN, preconditioned CG with at least 3 steps and its stopping window, r = 1.5) and
    Martens 2010 where seed 002 is silent (warm start 0.95, at most 250 CG steps, backtracking, Armijo search).
    Initial damping: seed 002 gives none; 1.0 as in the ltatzel PyTorch port (batch-mean losses, like ours).
    Martens' demo uses 45, seed 004 a fixed lambda = 4 (HF-GN) or 32 (HF-Newton) with damping_factor = 1, lr = 0.5.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        curvature: str = "ggn",
        damping: float = 1.0,
        damping_factor: float = 1.5,
        min_damping: float = 1e-8,
        max_damping: float = 1e8,
        lr: float = 1.0,
        weight_decay: float = 0.0,
        preconditioner: bool = True,
        precond_exponent: float = 0.75,
        warm_start_decay: float = 0.95,
        cg_min_iters: int = 3,
        cg_max_iters: int = 250,
        cg_martens_tol: float = 5e-4,
        cg_gap: int | None = None,
        cg_tol: float = 0.0,
        backtrack: bool = True,
        line_search: bool = True,
        ls_shrink: float = 0.8,
        ls_c: float = 0.01,
        ls_max_evals: int = 60,
        exact_model: bool = False,
    ):
        super().__init__(params)
        _check_options(curvature=curvature, damping=damping, damping_factor=damping_factor, min_damping=min_damping,
                       max_damping=max_damping, lr=lr, weight_decay=weight_decay, precond_exponent=precond_exponent,
                       warm_start_decay=warm_start_decay, cg_min_iters=cg_min_iters, cg_max_iters=cg_max_iters,
                       cg_martens_tol=cg_martens_tol, cg_gap=cg_gap, cg_tol=cg_tol, ls_shrink=ls_shrink, ls_c=ls_c,
                       ls_max_evals=ls_max_evals)
        self.curvature = curvature
        self.damping = float(damping)
        self.damping_factor = float(damping_factor)
        self.min_damping, self.max_damping = float(min_damping), float(max_damping)
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.preconditioner, self.precond_exponent = bool(preconditioner), float(precond_exponent)
        self.warm_start_decay = float(warm_start_decay)
        # Seed 002 Algorithm 2 opens Martens' window at the minimum number of CG steps; Martens 2010 uses 10.
        gap = max(1, cg_min_iters) if cg_gap is None else cg_gap
        self.cg_options = dict(min_iters=cg_min_iters, max_iters=cg_max_iters, martens_tol=float(cg_martens_tol),
                               tol=float(cg_tol), martens_gap=gap, store_iterates=bool(backtrack))
        self.backtrack, self.line_search = bool(backtrack), bool(line_search)
        self.ls_shrink, self.ls_c, self.ls_max_evals = float(ls_shrink), float(ls_c), int(ls_max_evals)
        self.exact_model = bool(exact_model)
        self.warm_start: Tensor | None = None  # the previous CG solution (before backtracking), Martens sec. 4.5

    # ------------------------------------------------------------------ one step
    def step(self, objective: Objective) -> dict[str, Any]:
        n = sum(p.numel() for p in self.params)
        if objective.numel != n:
            raise ValueError(f"HessianFree was built with {n} trainable parameters but the objective's model has "
                             f"{objective.numel}: pass all of the model's trainable parameters to the optimiser.")
        lam, eta = self.damping, self.weight_decay
        grad = objective.prepare(self.curvature)
        loss = objective.loss()
        f: Objective | _WeightDecayed = objective
        f0 = float(loss)
        if eta:
            w = params_vector(objective.params)
            f = _WeightDecayed(objective, eta, w)
            grad = grad + eta * w
            f0 += 0.5 * eta * float(torch.dot(w, w))
        shift = lam + eta

        def matvec(v: Tensor) -> Tensor:
            return torch.add(objective.curvature_vp(v, self.curvature), v, alpha=shift)

        precond = None
        if self.preconditioner:  # Martens 2010 sec. 4.7
            precond = (objective.per_sample_grad_sq_mean() + shift).pow(self.precond_exponent)
        x0 = None
        if self.warm_start is not None and self.warm_start_decay > 0:
            x0 = self.warm_start.to(grad) * self.warm_start_decay
        result = pcg(matvec, -grad, x0=x0, precond=precond, **self.cg_options)
        self.warm_start = result.x

        evals = 0

        def loss_at(delta: Tensor) -> Tensor:
            nonlocal evals
            evals += 1
            return f.loss_at(delta)

        if self.backtrack:
            cg_iter, p, f_p = cg_backtrack(result.iterates, loss_at)
        else:
            cg_iter, p, f_p = result.iterations, result.x, loss_at(result.x)
        f_p = float(f_p)

        # Undamped quadratic model q(p) = g^T p + 1/2 p^T (C + eta I) p.
        gp = float(torch.dot(grad, p))
        if self.exact_model:
            pcp = float(torch.dot(p, objective.curvature_vp(p, self.curvature))) + eta * float(torch.dot(p, p))
            q = gp + 0.5 * pcp
        else:
            q = result.phis[cg_iter] - 0.5 * lam * float(torch.dot(p, p))
        rho = _reduction_ratio(f0, f_p, q)

        rate, ls_evals = self._step_size(f, p, f0=f0, f_p=f_p, slope=self.lr * gp)
        evals += ls_evals
        if rate > 0 and rho > 0.75:
            new_lam = lam / self.damping_factor
        elif rate == 0 or not rho >= 0.25:  # rho < 1/4, nan, or no step taken
            new_lam = lam * self.damping_factor
        else:
            new_lam = lam
        self.damping = min(max(new_lam, self.min_damping), self.max_damping)

        stats: dict[str, Any] = {
            "loss": loss, "damping": lam, "lr": self.lr, "grad_norm": grad.norm(),
            "cg/iters": result.iterations, "cg/stop": result.stop_reason, "cg/residual": result.residual_norm,
            "cg/model_decrease": result.model_decrease, "cg/backtrack_iter": cg_iter,
            "reduction_ratio": rho, "line_search/rate": rate, "line_search/evals": ls_evals, "loss_evals": evals,
            **objective.stats(),
        }
        if rate > 0:
            objective.apply(p, alpha=self.lr * rate)
        self.steps += 1
        return stats

    def _step_size(self, f: Objective | _WeightDecayed, p: Tensor, *, f0: float, f_p: float,
                   slope: float) -> tuple[float, int]:
        """Rate a for the step lr * a * p and the loss evaluations it cost. 0 = stay (no descent or search failed)."""
        if not slope < 0:                    # p is not a descent direction of F (or p = 0): no step
            return 0.0, 0
        if not self.line_search:             # seeds 002/004: always step, except onto a non-finite loss
            return (1.0 if math.isfinite(f_p) else 0.0), 0
        initial, budget = 1.0, self.ls_max_evals
        if self.lr == 1.0:                   # F(w + p) is known from backtracking: test rate 1 for free
            if math.isfinite(f_p) and f_p <= f0 + self.ls_c * slope:
                return 1.0, 0
            initial, budget = self.ls_shrink, budget - 1
        if budget < 1:
            return 0.0, 0
        found = armijo(f, self.lr * p, loss0=p.new_tensor(f0), slope=p.new_tensor(slope), initial=initial,
                       shrink=self.ls_shrink, c=self.ls_c, max_evals=budget)
        return found.rate, found.evals

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "damping": self.damping, "warm_start": clone_state(self.warm_start)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.damping = float(state["damping"])
        ws = state["warm_start"]
        self.warm_start = None if ws is None else ws.detach().clone().to(self.params[0].device)


class _WeightDecayed:
    """F(w + d) = L(w + d) + eta/2 |w + d|^2: what backtracking, rho and the line search compare under weight decay."""

    def __init__(self, objective: Objective, eta: float, w: Tensor):
        self.objective, self.eta, self.w = objective, eta, w

    def loss_at(self, delta: Tensor) -> Tensor:
        return self.objective.loss_at(delta) + 0.5 * self.eta * (self.w + delta).square().sum()


def _reduction_ratio(f0: float, f_p: float, q: float) -> float:
    """rho = (F(w + p) - F(w)) / q(p) (seed 002 eq. 25); -inf when F went up or is not finite (Martens' code)."""
    if not math.isfinite(f_p) or f_p > f0:
        return -math.inf
    if not q < 0:  # the model predicts no decrease: rho is meaningless
        return math.nan
    return (f_p - f0) / q


def _check_options(*, curvature: str, damping: float, damping_factor: float, min_damping: float, max_damping: float,
                   lr: float, weight_decay: float, precond_exponent: float, warm_start_decay: float,
                   cg_min_iters: int, cg_max_iters: int, cg_martens_tol: float, cg_gap: int | None, cg_tol: float,
                   ls_shrink: float, ls_c: float, ls_max_evals: int) -> None:
    def fail(key: str, value: Any, valid: str) -> None:
        raise ValueError(f"optimizer.{key}={value!r} is invalid for HessianFree: {valid}")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if curvature not in CURVATURES:
        fail("curvature", curvature, f"choose one of {list(CURVATURES)} (Gauss-Newton or exact Hessian products).")
    if not 0 < min_damping <= max_damping:
        fail("min_damping", min_damping, f"need 0 < min_damping <= max_damping (max_damping={max_damping!r}).")
    if not min_damping <= damping <= max_damping:
        fail("damping", damping, f"the initial lambda must lie in [min_damping, max_damping] = "
                                 f"[{min_damping}, {max_damping}].")
    if not damping_factor >= 1:
        fail("damping_factor", damping_factor, "the Levenberg-Marquardt factor r must be >= 1 (1.5 in seed 002, "
                                               "1.01 for small batches; 1 keeps lambda fixed as in seed 004).")
    if not lr > 0:
        fail("lr", lr, "the learning rate must be positive (1 = full step; seed 004 uses 0.5).")
    if not weight_decay >= 0:
        fail("weight_decay", weight_decay, "weight decay must be >= 0.")
    if not 0 < precond_exponent <= 1:
        fail("precond_exponent", precond_exponent, "the preconditioner exponent must be in (0, 1] (Martens: 0.75).")
    if not 0 <= warm_start_decay <= 1:
        fail("warm_start_decay", warm_start_decay, "the warm-start decay must be in [0, 1] (0 = cold start; Martens: "
                                                   "0.95).")
    if not (is_int(cg_min_iters) and is_int(cg_max_iters) and 0 <= cg_min_iters <= cg_max_iters and cg_max_iters >= 1):
        fail("cg_min_iters", cg_min_iters, f"need integers 0 <= cg_min_iters <= cg_max_iters and cg_max_iters >= 1 "
                                           f"(cg_max_iters={cg_max_iters!r}).")
    if cg_gap is not None and not (is_int(cg_gap) and cg_gap >= 1):
        fail("cg_gap", cg_gap, "Martens' window floor must be a positive integer (10 in Martens 2010) or null "
                               "(= cg_min_iters, seed 002).")
    if not (cg_martens_tol >= 0 and cg_tol >= 0):
        fail("cg_martens_tol", (cg_martens_tol, cg_tol), "cg_martens_tol and cg_tol must be >= 0 (0 switches the "
                                                          "rule off).")
    if not 0 < ls_shrink < 1:
        fail("ls_shrink", ls_shrink, "the line-search shrink factor must be in (0, 1) (Martens: 0.8).")
    if not 0 < ls_c < 1:
        fail("ls_c", ls_c, "the Armijo constant must be in (0, 1) (Martens: 0.01).")
    if not (is_int(ls_max_evals) and ls_max_evals >= 1):
        fail("ls_max_evals", ls_max_evals, "the line search needs a positive integer budget (Martens: 60).")
