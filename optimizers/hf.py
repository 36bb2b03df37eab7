"""Hessian-free optimisation (Martens 2010, "Deep learning via Hessian-free optimization"; Brunn, Kury, Schaechter
2022, "Efficient Hessian-free optimization of deep neural networks" (seed 002), Algorithms 1-2; Wang & Huang,
"Second-order optimization made practical for deep learning" (seed 004), sec. 3.3-3.4).

One step on a batch, F the objective (the data loss, plus eta/2 |w|^2 under weight decay) and C its curvature:

0. the curvature mini-batch: C is taken on the first ceil(curvature_fraction * B) samples of the batch of B, while
   the gradient, rho, backtracking and the line search use all B ([Martens2010] sec. 4.3; [MartensSutskever2012],
   "Training deep and recurrent networks with Hessian-free optimization": the curvature on a fraction of the
   gradient's batch, rho on the gradient's batch). See "Mini-batches" below for why this is the default;
1. gradient g of F, sharing its backward with the curvature products' set-up (``objective.gradient(curvature)``)
   when the curvature uses the whole batch;
2. optional diagonal preconditioner M = (mean per-sample squared gradient + lambda + eta)^alpha, alpha = 0.75
   (Martens 2010 sec. 4.7; seed 002 sec. III.E);
3. PCG on (C + lambda I) x = -g, C = GGN ("ggn", seed 002 eq. 20; seed 004 "HF Gauss-Newton") or Hessian
   ("hessian", seed 004 "HF Newton": CG stops on negative curvature), warm-started from decay * previous solution
   (Martens sec. 4.5), stopped by Martens' rule after at least ``cg_min_iters`` steps (seed 002 Algorithm 2);
4. CG backtracking over the stored iterates (Martens sec. 4.6) picks p;
5. reduction ratio rho = (F(w + p) - F(w)) / q(p) with the UNDAMPED model q(p) = g^T p + 1/2 p^T C p
   (seed 002 eq. 25); F went up or is not finite -> rho = -inf;
6. step w <- w + lr * a * p, a from an Armijo line search (rate 1, x0.8, c = 0.01, 60 tries; Martens sec. 4.6) or
   a = 1 without it (seed 002 Algorithm 1; seed 004 Algorithm 2 with lr = alpha = 0.5). A failed search, or a p
   that is not a descent direction, leaves w where it is;
7. Levenberg-Marquardt (seed 002 eq. 26): rho < 1/4 (or nan, or no step) -> lambda *= r; rho > 3/4 -> lambda /= r.

Mini-batches (issue 17). With the curvature on the gradient's own batch, rho measures the quadratic model on the
very batch it was fitted to: on the Quickstart (digits MLP, batch 128) it stays at ~1 while the same steps lower the
loss of the whole training split by 0.1-0.5 of the prediction (or raise it), so Levenberg-Marquardt shrinks lambda
by 1.5 at almost every step (1 -> 1e-4 in 90 steps), CG runs to 100-250 iterations, each step fits the batch's noise,
and the run swings (test accuracy 0.97 -> 0.56, training loss 0.02 -> 3.2 over 15 steps while the warm start carries
the blown-up solution on and lambda climbs back by 1.5 a step). At batch 64 (seed 003's MNIST MLP) lambda sits in
rho's dead band at 0.3 with rho ~0.5 and the loss stalls at 0.3. A rho measured on held-out samples instead is
bounded by the gradient's signal-to-noise ratio whatever lambda is, and drove lambda to its cap (training froze).
With the curvature on a quarter of the batch, rho on the whole batch sees the curvature's sampling error: lambda
settles at 0.2-1.5 (digits), 1-3 (MNIST, batch 128), 0.4-11 (batch 64), and the runs improve monotonically up to the
evaluation noise; the products are 4x cheaper. Numbers: docs/benchmarks/defaults.md. Seeds 002 and 004 and seed 003's
Levenberg-Marquardt rows take the curvature on the whole batch (``curvature_fraction: 1`` in their files).

Cost: the CG products (~95 %). q(p) is free by default: CG tracks the damped model value phi of every iterate, so
q(p) = phi(p) - lambda/2 |p|^2 (seed 002 Algorithm 2, "denom"); ``exact_model=true`` spends one extra curvature
product instead (Martens' code). Loss evaluations (backtracking, rho, line search) are counted in ``loss_evals``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from optimizers.base import Optimizer, clone_state
from optimizers.vec import flush_tiny
from optimizers.cg import CGOptions, CGResult, cg_backtrack, pcg
from optimizers.damping import DampingOptions, levenberg_marquardt, reduction_ratio, use_curvature_fraction
from validation.checks import boolean, in_range, nonnegative_int, one_of, option, positive
from optimizers.line_search import LineSearchOptions, armijo_after_trial
from optimizers.interface import CURVATURES, ObjectiveLike


@dataclass(frozen=True)
class HFOptions(CGOptions, LineSearchOptions, DampingOptions):
    """Defaults follow seed 002 (GGN, preconditioned CG with at least 3 steps and its stopping window, r = 1.5) and
    Martens 2010 where seed 002 is silent (warm start 0.95, at most 250 CG steps, backtracking, Armijo search, the
    curvature on a quarter of the batch: seed 002 uses the whole batch, for mini-batches see the module docstring).
    Initial damping: seed 002 gives none; 1.0 as in the ltatzel PyTorch port (batch-mean losses, like ours).
    Martens' demo uses 45, seed 004 a fixed lambda = 4 (HF-GN) or 32 (HF-Newton) with damping_factor = 1, lr = 0.5."""

    curvature: str = option("ggn", one_of(*CURVATURES))  # ggn (Gauss-Newton, seed 002) | hessian (HF-Newton, seed 004)
    # damping (initial lambda, 1), damping_factor (r, 1.5), min_damping, max_damping, curvature_fraction (0.25):
    # optimizers/damping.py (shared with Newton-CG)
    lr: float = option(1.0, positive)                   # step w += lr * rate * p (seed 004: 0.5)
    preconditioner: bool = option(True, boolean)        # Martens' diagonal preconditioner M
    precond_exponent: float = option(0.75, in_range(0, 1, low_open=True))  # alpha (fmeirinhos port: 0.85)
    warm_start_decay: float = option(0.95, in_range(0, 1))  # CG starts from this times the last solution; 0 = cold
    cg_min_iters: int = option(3, nonnegative_int)     # never stop CG earlier (seed 002; Martens' code: 1)
    backtrack: bool = option(True, boolean)             # CG backtracking over iterates ceil(5 * 1.3^j)
    line_search: bool = option(True, boolean)           # Armijo from rate 1; false = always step (seeds 002, 004)
    exact_model: bool = option(False, boolean)          # true: one extra product for q(p); false: from CG's phi


class HessianFree(Optimizer):
    """Hessian-free (truncated Newton) with GGN or Hessian products, PCG, backtracking and Levenberg-Marquardt."""

    Options = HFOptions

    def __init__(self, params, **options: Any):
        super().__init__(params, **options)
        self.damping = self.options.damping     # lambda, adapted every step
        self.warm_start: Tensor | None = None   # the previous CG solution (before backtracking), Martens sec. 4.5

    def update(self, objective: ObjectiveLike) -> dict[str, Any]:
        o, lam = self.options, self.damping
        use_curvature_fraction(objective, o.curvature_fraction)
        grad = objective.gradient(o.curvature)
        loss = objective.loss()
        f0 = float(loss)
        result = self._solve(objective, grad, lam)
        cg_iter, p, f_p, evals = self._backtrack(objective, result)
        q = self._model_decrease(objective, grad, p, result, cg_iter, lam)
        rho = reduction_ratio(f0, f_p, q)
        rate, ls_evals = self._step_size(objective, p, f0=f0, f_p=f_p, slope=o.lr * float(grad.dot(p)))
        self.damping = levenberg_marquardt(o, lam, rho, stepped=rate > 0)
        stats: dict[str, Any] = {
            "loss": loss, "damping": lam, "lr": o.lr, "grad_norm": grad.norm(),
            "cg/iters": result.iterations, "cg/stop": result.stop_reason, "cg/residual": result.residual_norm,
            "cg/model_decrease": result.model_decrease, "cg/backtrack_iter": cg_iter,
            "reduction_ratio": rho, "line_search/rate": rate, "line_search/evals": ls_evals,
            "loss_evals": evals + ls_evals, **objective.stats(),
        }
        if rate > 0:
            objective.apply(p, alpha=o.lr * rate)
        return stats

    def _solve(self, objective: ObjectiveLike, grad: Tensor, lam: float) -> CGResult:
        """PCG on (C + lambda I) x = -g, preconditioned and warm-started (Martens 2010 sec. 4.5, 4.7)."""
        o = self.options

        def matvec(v: Tensor) -> Tensor:
            return torch.add(objective.curvature_vp(v, o.curvature), v, alpha=lam)

        precond = None
        if o.preconditioner:
            precond = (objective.per_sample_grad_sq_mean() + (lam + objective.l2)).pow(o.precond_exponent)
        x0 = None
        if self.warm_start is not None and o.warm_start_decay > 0:
            x0 = flush_tiny(self.warm_start.to(grad) * o.warm_start_decay)
        result = pcg(matvec, -grad, x0=x0, precond=precond, **o.cg_kwargs(store_iterates=o.backtrack))
        self.warm_start = result.x
        return result

    def _backtrack(self, objective: ObjectiveLike, result: CGResult) -> tuple[int, Tensor, float, int]:
        """The iterate to step along, its loss and the loss evaluations spent (Martens 2010 sec. 4.6)."""
        evals = 0

        def loss_at(delta: Tensor) -> Tensor:
            nonlocal evals
            evals += 1
            return objective.loss_at(delta)

        if self.options.backtrack:
            cg_iter, p, f_p = cg_backtrack(result.iterates, loss_at)
        else:
            cg_iter, p, f_p = result.iterations, result.x, loss_at(result.x)
        return cg_iter, p, float(f_p), evals

    def _model_decrease(self, objective: ObjectiveLike, grad: Tensor, p: Tensor, result: CGResult, cg_iter: int,
                        lam: float) -> float:
        """The undamped quadratic model q(p) = g^T p + 1/2 p^T C p."""
        if self.options.exact_model:
            return float(grad.dot(p)) + 0.5 * float(p.dot(objective.curvature_vp(p, self.options.curvature)))
        return result.phis[cg_iter] - 0.5 * lam * float(p.dot(p))

    def _step_size(self, objective: ObjectiveLike, p: Tensor, *, f0: float, f_p: float, slope: float) -> tuple[float, int]:
        """Rate a for the step lr * a * p and the loss evaluations it cost. 0 = stay (no descent or search failed)."""
        o = self.options
        if not slope < 0:                    # p is not a descent direction of F (or p = 0): no step
            return 0.0, 0
        if not o.line_search:                # seeds 002/004: always step, except onto a non-finite loss
            return (1.0 if math.isfinite(f_p) else 0.0), 0
        return armijo_after_trial(o, objective, o.lr * p, loss0=f0, slope=slope,
                                  trial_loss=f_p if o.lr == 1.0 else None)

    def gradients_per_step(self) -> tuple[float, str]:
        """A rough cost per step, in gradients (one forward and backward pass over the batch), and how it comes about,
        for the runner's up-front estimate (runner/cost.py)."""
        n = self.options.cg_max_iters  # the gradient and the preconditioner, then up to n products of ~1.2 gradients
        return 2 + 1.2 * n, f"up to optimizer.cg_max_iters={n} CG iterations: up to ~{2 + 1.2 * n:.0f} gradients per step"

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "damping": self.damping, "warm_start": clone_state(self.warm_start)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.damping = float(state["damping"])
        ws = state["warm_start"]
        self.warm_start = None if ws is None else ws.detach().clone().to(self.params[0].device)

