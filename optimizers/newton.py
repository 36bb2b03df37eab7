"""Newton's method with the exact Hessian: seed 000's globalised Newton (Algorithm 4) and seed 004's (damped) Newton.

One step, after ``pretrain_steps`` plain gradient-descent steps (seed 000 Algorithm 4, sec. 7.1):

1. solve (H + lambda I) s = -g  (Tikhonov damping, seed 000 eq. 7.5; seed 004 eq. 2; lambda = 0 is plain Newton)
   - ``solver=explicit``: H from ``objective.hessian_matrix()`` and a dense solve (seed 004's "Newton's method");
   - ``solver=cg``: inexact Newton, conjugate gradient on Hessian-vector products (seed 000 sec. 9.2, seed 004
     "Hessian-free Newton"), stopped early on negative curvature;
2. descent check (seed 000 Algorithm 4): if g^T s > T (threshold T <= 0) the direction is not a safe descent
   direction and the step falls back to s = -g;
3. step size: Armijo backtracking sigma in {1, beta, beta^2, ...} with f(w + sigma s) - f(w) <= sigma gamma g^T s
   (seed 000 sec. 9.2), or a fixed rate ``lr`` (seed 004's alpha); then w <- w + sigma s.

Seed 004's undamped Newton (``damping=0``, ``descent_check=none``, ``step_size=fixed``) is kept as the baseline that
fails on non-convex losses: it heads for any stationary point, maxima and saddles included.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from optimizers.base import Optimizer
from optimizers.cg import pcg
from optimizers.gd import check_step_size_options
from optimizers.line_search import armijo
from optimizers.objective import Objective
from optimizers.vec import params_vector

SOLVERS = ("explicit", "cg")
DESCENT_CHECKS = ("cosine", "slope", "none")
CG_INITS = ("zero", "weights")


class Newton(Optimizer):
    """Globalised Newton (seed 000 Algorithm 4) with an explicit or conjugate-gradient solve of the damped system.

    Descent check (``descent_check``): seed 000 falls back to gradient descent when g^T s > T for a fixed T < 0 and
    gives no value of T. An absolute threshold depends on the loss scale, and near a minimiser g^T s ~ -2 (f - f*)
    tends to 0, so any fixed T < 0 eventually rejects every Newton step. The default ``cosine`` applies the same test
    to the scale-free quantity g^T s / (|g| |s|) > T; ``slope`` is the seed's literal g^T s > T; ``none`` never falls
    back (seed 004). Unless the check is ``none``, a non-finite s, or s = 0 while g != 0 (CG met negative curvature
    at once), also falls back.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        solver: str = "explicit",
        damping: float = 0.0,
        step_size: str = "armijo",
        lr: float = 1.0,
        initial_rate: float = 1.0,
        beta: float = 0.8,
        gamma: float = 0.01,
        max_evals: int = 60,
        descent_check: str = "cosine",
        descent_threshold: float = -1e-8,
        fallback_lr: float | None = None,
        pretrain_steps: int = 0,
        pretrain_lr: float = 0.01,
        max_explicit_params: int = 20_000,
        track_min_eigenvalue: bool = False,
        cg_max_iters: int = 250,
        cg_min_iters: int = 1,
        cg_martens_tol: float = 5e-4,
        cg_tol: float = 0.0,
        cg_init: str = "zero",
    ):
        super().__init__(params)
        if solver not in SOLVERS:
            raise ValueError(f"optimizer.solver={solver!r} is not one of {list(SOLVERS)}: 'explicit' builds the "
                             "Hessian matrix (small models), 'cg' solves with Hessian-vector products.")
        if not damping >= 0:
            raise ValueError(f"optimizer.damping (Tikhonov lambda) must be >= 0, got {damping}; 0 is plain Newton.")
        check_step_size_options(step_size, lr=lr, initial_rate=initial_rate, beta=beta, gamma=gamma,
                                max_evals=max_evals)
        if descent_check not in DESCENT_CHECKS:
            raise ValueError(f"optimizer.descent_check={descent_check!r} is not one of {list(DESCENT_CHECKS)}.")
        if not descent_threshold <= 0:
            raise ValueError(f"optimizer.descent_threshold (seed 000's T, fall back when g^T s > T) must be <= 0, "
                             f"got {descent_threshold}.")
        if fallback_lr is not None and not fallback_lr > 0:
            raise ValueError(f"optimizer.fallback_lr must be positive or null (null: use optimizer.pretrain_lr), "
                             f"got {fallback_lr}.")
        if isinstance(pretrain_steps, bool) or int(pretrain_steps) != pretrain_steps or pretrain_steps < 0:
            raise ValueError(f"optimizer.pretrain_steps must be a non-negative integer, got {pretrain_steps!r}.")
        if not pretrain_lr > 0:
            raise ValueError(f"optimizer.pretrain_lr must be positive, got {pretrain_lr}.")
        if cg_init not in CG_INITS:
            raise ValueError(f"optimizer.cg_init={cg_init!r} is not one of {list(CG_INITS)}.")
        if not (isinstance(cg_min_iters, int) and isinstance(cg_max_iters, int) and 0 <= cg_min_iters <= cg_max_iters
                and cg_max_iters >= 1):
            raise ValueError(f"optimizer.cg_min_iters={cg_min_iters!r} and optimizer.cg_max_iters={cg_max_iters!r} "
                             "must be integers with 0 <= cg_min_iters <= cg_max_iters and cg_max_iters >= 1.")
        if cg_martens_tol < 0 or cg_tol < 0:
            raise ValueError(f"optimizer.cg_martens_tol={cg_martens_tol} and optimizer.cg_tol={cg_tol} must be >= 0.")
        numel = sum(p.numel() for p in self.params)
        if solver == "explicit" and numel > max_explicit_params:
            raise ValueError(
                f"optimizer.solver='explicit' builds the {numel} x {numel} Hessian, but the model has {numel} "
                f"parameters, more than optimizer.max_explicit_params={max_explicit_params}. Use optimizer.solver=cg "
                "(Hessian-vector products, no matrix) or raise optimizer.max_explicit_params if the matrix fits in "
                "memory.")

        self.solver, self.damping = solver, float(damping)
        self.step_size, self.lr = step_size, float(lr)
        self.initial_rate, self.beta, self.gamma, self.max_evals = float(initial_rate), float(beta), float(gamma), int(max_evals)
        self.descent_check, self.descent_threshold = descent_check, float(descent_threshold)
        self.fallback_lr = float(pretrain_lr if fallback_lr is None else fallback_lr)
        self.pretrain_steps, self.pretrain_lr = int(pretrain_steps), float(pretrain_lr)
        self.track_min_eigenvalue = bool(track_min_eigenvalue)
        self.cg_options = dict(min_iters=cg_min_iters, max_iters=cg_max_iters, martens_tol=cg_martens_tol, tol=cg_tol)
        self.cg_init = cg_init

    # ------------------------------------------------------------------ the step
    def step(self, objective: Objective) -> dict[str, Any]:
        if self.steps < self.pretrain_steps:
            return self._pretrain_step(objective)
        loss = objective.loss()
        stats: dict[str, Any] = {"loss": loss, "damping": self.damping, "pretrain": 0}
        g = objective.prepare("hessian") if self.solver == "cg" else objective.gradient()
        stats["grad_norm"] = g.norm()
        s = self._solve_explicit(objective, g, stats) if self.solver == "explicit" else self._solve_cg(objective, g, stats)

        slope = torch.dot(g, s)
        norms = g.norm() * s.norm()
        cosine = torch.where(norms > 0, slope / norms, torch.zeros_like(slope))  # 0 when there is no Newton step
        stats["descent_cosine"] = -cosine  # cos(-g, s): 1 is steepest descent, < 0 an ascent direction
        fallback = self._fails_descent_check(g, s, slope, cosine)
        stats["fallback"] = int(fallback)
        direction = -g if fallback else s
        slope = -torch.dot(g, g) if fallback else slope

        if self.step_size == "armijo":
            result = armijo(objective, direction, loss0=loss, slope=slope, initial=self.initial_rate,
                            shrink=self.beta, c=self.gamma, max_evals=self.max_evals)
            rate = result.rate
            stats.update({"line_search/rate": result.rate, "line_search/evals": result.evals,
                          "line_search/success": int(result.success)})
        else:
            rate = self.fallback_lr if fallback else self.lr
        stats["step_size"] = rate
        stats.update(objective.stats())
        if rate != 0.0:
            objective.apply(direction, alpha=rate)
        self.steps += 1
        return stats

    def _pretrain_step(self, objective: Objective) -> dict[str, Any]:
        """Seed 000 Algorithm 4, first loop: plain gradient descent w <- w - pretrain_lr * g."""
        loss = objective.loss()
        g = objective.gradient()
        stats = {"loss": loss, "grad_norm": g.norm(), "pretrain": 1, "step_size": self.pretrain_lr,
                 "damping": self.damping}
        stats.update(objective.stats())
        objective.apply(g, alpha=-self.pretrain_lr)
        self.steps += 1
        return stats

    def _fails_descent_check(self, g: Tensor, s: Tensor, slope: Tensor, cosine: Tensor) -> bool:
        """Seed 000 Algorithm 4: 'if grad^T s > T then s <- -grad' (T = descent_threshold)."""
        if self.descent_check == "none":
            return False
        if not bool(torch.isfinite(s).all()):
            return True
        if not bool(s.ne(0).any()):  # no Newton step (e.g. CG met negative curvature at once); fine only if g = 0
            return bool(g.ne(0).any())
        value = cosine if self.descent_check == "cosine" else slope
        return bool(value > self.descent_threshold)

    # ------------------------------------------------------------------ solvers for (H + lambda I) s = -g
    def _solve_explicit(self, objective: Objective, g: Tensor, stats: dict[str, Any]) -> Tensor:
        """Dense solve; a singular or non-finite system falls back to the eigendecomposition pseudo-inverse."""
        hessian = objective.hessian_matrix()
        system = hessian + self.damping * torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
        s, info = torch.linalg.solve_ex(system, -g)
        if int(info) == 0 and bool(torch.isfinite(s).all()):
            stats["solve"] = "solve"
            if self.track_min_eigenvalue:
                stats["min_eigenvalue"] = torch.linalg.eigvalsh(hessian)[0]
            return s
        # Singular system (e.g. undamped Newton on a degenerate Hessian): minimum-norm least-squares solution,
        # dropping eigenvalues below the usual rank tolerance n * eps * max|eigenvalue|.
        evals, evecs = torch.linalg.eigh(system)
        cutoff = evals.abs().max() * system.shape[0] * torch.finfo(system.dtype).eps
        keep = evals.abs() > cutoff
        inverse = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), torch.zeros_like(evals))
        stats["solve"] = "pinv"
        stats["min_eigenvalue"] = evals[0] - self.damping
        return -(evecs @ (inverse * (evecs.T @ g)))

    def _solve_cg(self, objective: Objective, g: Tensor, stats: dict[str, Any]) -> Tensor:
        """Inexact Newton: CG on Hessian-vector products, stopped on negative curvature (seed 000 sec. 9.2)."""
        def matvec(v: Tensor) -> Tensor:
            return objective.hvp(v) + self.damping * v

        x0 = None
        if self.cg_init == "weights":
            # Seed 000 sec. 14.3 warm-starts CG "from the normalised weight vector w / |w|".
            w = params_vector(self.params)
            x0 = w / w.norm() if bool(w.norm() > 0) else None
        result = pcg(matvec, -g, x0=x0, store_iterates=False, **self.cg_options)
        stats.update({"solve": "cg", "cg/iters": result.iterations, "cg/stop": result.stop_reason,
                      "cg/residual": result.residual_norm, "cg/model_decrease": result.model_decrease})
        return result.x

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "damping": self.damping}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.damping = float(state["damping"])
