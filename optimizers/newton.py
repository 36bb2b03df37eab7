"""Newton's method with the exact Hessian: the globalised Newton of seed 000 (a thesis on Hessian-based optimisation
of large-scale deep networks; Algorithm 4) and the (damped) Newton of Wang & Huang, "Second-order optimization made
practical for deep learning" (seed 004).

One step, after ``pretrain_steps`` plain gradient-descent steps (seed 000 Algorithm 4, sec. 7.1):

1. solve (H + lambda I) s = -g  (Tikhonov damping, seed 000 eq. 7.5; seed 004 eq. 2; lambda = 0 is plain Newton)
   - ``solver=explicit``: H from ``objective.hessian_matrix()`` and a dense solve (seed 004's "Newton's method");
   - ``solver=cg``: inexact Newton, conjugate gradient on Hessian-vector products (seed 000 sec. 9.2, seed 004
     "Hessian-free Newton"). ``cg_negative_curvature=stop`` (default) ends CG at the first direction with
     p^T H p <= 0 (the truncated-Newton safeguard); ``continue`` is seed 000's Algorithm 3 as written: CG steps on
     through negative curvature to its tolerance and the descent check of step 2 judges the result;
2. descent check (seed 000 Algorithm 4): if g^T s > T (threshold T <= 0) the direction is not a safe descent
   direction and the step falls back to s = -g;
3. step size: Armijo backtracking sigma in {1, beta, beta^2, ...} with f(w + sigma s) - f(w) <= sigma gamma g^T s
   (seed 000 sec. 9.2), or a fixed rate ``lr`` (seed 004's alpha); then w <- w + sigma s.

Seed 004's undamped Newton (``damping=0``, ``descent_check=none``, ``step_size=fixed``) is kept as the baseline that
fails on non-convex losses: it heads for any stationary point, maxima and saddles included.

Defaults (issue 17, "robust defaults"; measurements in docs/optimizers/newton.md and docs/benchmarks/defaults.md). Plain Newton (lambda = 0) on a
mini-batch degrades: the batch Hessian of a network is indefinite, CG stops at its negative curvature on every step
(on the Quickstart's digits MLP and on MNIST), and the truncated iterate runs along directions of tiny positive
curvature; the Armijo search accepts it because it lowers the loss of the batch it was fitted to, while the loss of
the whole training split goes up on a third of the steps (digits: |dw| 1.5-3 a step, |w| 7 -> 21 in 60 steps, test
accuracy 0.84 -> 0.67; MNIST 0.73 -> 0.58). A fixed lambda = 1 is enough on digits, not on MNIST (negative curvature
beyond -1 on every step; the loss rose 2.3 -> 28). So the defaults adapt lambda by Levenberg-Marquardt from the
reduction ratio of the FULL Newton step ([More1978]; [Martens2010] sec. 4.1; a fall-back to -g counts as a failure)
and take the Hessian on a quarter of the batch ([Martens2010] sec. 4.3, as Hessian-free), so that rho, measured on
the whole batch, sees the model's sampling error instead of the batch it was fitted to (Hessian on the whole batch:
lambda falls to 0.04-0.06 and the runs swing). That alone still let the test accuracy swing (digits seed 1: 0.977 ->
0.940; MNIST seed 2: 0.938 -> 0.840): CG still stopped on negative curvature and the truncated steps stayed long. So
``solver=cg`` also keeps a Steihaug-Toint trust region (``trust_radius``, from 1; [NocedalWright2006] Algorithm 7.2 in
optimizers/cg.py's ``pcg(radius=...)``): CG follows a direction of non-positive curvature, or an iterate leaving the
region, to the boundary |s| = radius and stops there, and the radius follows the full step's rho
([NocedalWright2006] Algorithm 4.1: rho < 1/4 -> radius / 4; rho > 3/4 with s on the boundary -> 2 radius, up to
``max_trust_radius``). On the Quickstart and on MNIST every step then ends on the boundary after 1-3 CG iterations
(radius 0.03-2), lambda falls to its floor after the first epochs, and the runs no longer degrade (drops <= 0.017 on
digits, <= 0.006 on MNIST, 3 seeds each); a step costs ~1/8 of one without the region. CG backtracking and a warm
start (``backtrack``, ``warm_start_decay``, as Hessian-free) are options, off: measured worse (MNIST seed 2 0.925 ->
0.912). ``solver=explicit`` refuses models above ``max_explicit_params`` (2,000). The seeds' files state their plain
or fixed-lambda settings (damping_factor 1, curvature_fraction 1, trust_radius null).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from optimizers.base import Optimizer, clone_state
from optimizers.cg import NEGATIVE_CURVATURE, CGOptions, cg_backtrack, pcg
from optimizers.damping import DampingOptions, levenberg_marquardt, reduction_ratio, use_curvature_fraction
from validation.checks import OptionError, boolean, in_range, nonnegative, nonnegative_int, one_of, option, optional
from validation.checks import positive, positive_int
from optimizers.gd import StepSizeOptions, step_rate
from optimizers.line_search import armijo_after_trial
from optimizers.interface import ObjectiveLike
from optimizers.vec import flush_tiny, params_vector

SOLVERS = ("explicit", "cg")
DESCENT_CHECKS = ("cosine", "slope", "none")
CG_INITS = ("zero", "weights")


@dataclass(frozen=True)
class NewtonOptions(StepSizeOptions, CGOptions, DampingOptions):
    """Armijo constants: seed 000 gives none; Martens 2010's (rate 1, x0.8, c = 0.01, 60 tries). Levenberg-Marquardt
    (``damping_factor`` > 1) and the curvature mini-batch: optimizers/damping.py, as Hessian-free's."""

    solver: str = option("explicit", one_of(*SOLVERS))    # explicit (dense Hessian + solve) | cg (Hessian products)
    damping: float = option(1.0, nonnegative)             # (initial) Tikhonov lambda in (H + lambda I) s = -g
    damping_factor: float = option(1.5, in_range(1, math.inf))  # Levenberg-Marquardt r on lambda; 1 = fixed lambda
    curvature_fraction: float = option(0.25, in_range(0, 1, low_open=True))  # Hessian on ceil(f B) of B samples
    descent_check: str = option("cosine", one_of(*DESCENT_CHECKS))  # see the class docstring
    descent_threshold: float = option(-1e-8, in_range(-math.inf, 0))  # T <= 0: failing directions fall back to -g
    fallback_lr: float | None = option(None, optional(positive))  # fixed step of a fall-back step; null = pretrain_lr
    pretrain_steps: int = option(0, nonnegative_int)      # gradient-descent steps before Newton (seed 000: 60)
    pretrain_lr: float = option(0.01, positive)           # their learning rate
    max_explicit_params: int = option(2_000, positive_int)  # refuse solver=explicit above this many parameters
    track_min_eigenvalue: bool = option(False, boolean)   # log the smallest Hessian eigenvalue (explicit solver)
    cg_gap: int | None = option(10, optional(positive_int))  # Martens 2010's window floor (solver=cg)
    cg_init: str = option("zero", one_of(*CG_INITS))      # solver=cg: zero | weights (seed 000 sec. 14.3: w/|w|)
    cg_negative_curvature: str = option("stop", one_of(*NEGATIVE_CURVATURE))  # solver=cg: stop | continue (seed 000)
    backtrack: bool = option(False, boolean)            # solver=cg: CG backtracking over iterates (Martens 2010 sec. 4.6)
    warm_start_decay: float = option(0.0, in_range(0, 1))  # solver=cg: CG starts from this times the last solution
    trust_radius: float | None = option(1.0, optional(positive))  # solver=cg: Steihaug-Toint's initial radius; null = off
    max_trust_radius: float = option(100.0, positive)   # its cap


class Newton(Optimizer):
    """Globalised Newton (seed 000 Algorithm 4) with an explicit or conjugate-gradient solve of the damped system.

    Descent check (``descent_check``): seed 000 falls back to gradient descent when g^T s > T for a fixed T < 0 and
    gives no value of T. An absolute threshold depends on the loss scale, and near a minimiser g^T s ~ -2 (f - f*)
    tends to 0, so any fixed T < 0 eventually rejects every Newton step. The default ``cosine`` applies the same test
    to the scale-free quantity g^T s / (|g| |s|) > T; ``slope`` is the seed's literal g^T s > T; ``none`` never falls
    back (seed 004). Unless the check is ``none``, a non-finite s, or s = 0 while g != 0 (CG met negative curvature
    at once), also falls back.
    """

    Options = NewtonOptions

    def __init__(self, params, **options: Any):
        super().__init__(params, **options)
        o = self.options
        if o.solver == "explicit" and self.numel > o.max_explicit_params:
            raise OptionError(
                f"optimizer.solver=explicit (optimizer=newton) builds the dense {self.numel:,} x {self.numel:,} "
                f"Hessian of this model ({4 * self.numel ** 2 / 2 ** 20:,.0f} MiB in float32) and solves it at every "
                f"step: ~{self.numel:,} Hessian-vector products and a {self.numel:,}-dimensional solve, more than "
                f"optimizer.max_explicit_params={o.max_explicit_params:,} allows (the Quickstart MLP's 9,610: ~46 s a "
                "step on one CPU core against 30 ms for a gradient). Use optimizer=newton_cg (the same damped Newton "
                "step by conjugate gradient on Hessian-vector products, no matrix), or raise "
                "optimizer.max_explicit_params if the matrix and the time are affordable.")
        self.fallback_lr = o.pretrain_lr if o.fallback_lr is None else o.fallback_lr
        self.damping = o.damping     # lambda: fixed (damping_factor = 1) or adapted every step
        self._curvature = math.nan   # s^T H s of the last solve (for the reduction ratio)
        self._trial: tuple[Tensor, float] | None = None  # (s, F(w + s)) when backtracking has evaluated it already
        self.warm_start: Tensor | None = None  # the previous CG solution (warm_start_decay > 0)
        self.radius = o.trust_radius if o.solver == "cg" else None  # Steihaug-Toint trust radius (None: off)

    @property
    def adaptive(self) -> bool:
        return self.options.damping_factor > 1

    def update(self, objective: ObjectiveLike) -> dict[str, Any]:
        o, lam = self.options, self.damping
        if self.steps < o.pretrain_steps:
            return self._pretrain_step(objective)
        use_curvature_fraction(objective, o.curvature_fraction)
        loss = objective.loss()
        stats: dict[str, Any] = {"loss": loss, "damping": lam, "pretrain": 0}
        g = objective.gradient("hessian") if o.solver == "cg" else objective.gradient()
        stats["grad_norm"] = g.norm()
        s = self._solve_explicit(objective, g, stats) if o.solver == "explicit" else self._solve_cg(objective, g, stats)
        direction, slope, fallback = self._direction(g, s, stats)
        fixed = self.fallback_lr if fallback else o.lr
        if self.adaptive:
            rate = self._levenberg_marquardt_step(objective, direction, loss, slope, fallback, fixed, stats)
        else:
            rate = step_rate(o, objective, direction, loss=loss, slope=slope, stats=stats, fixed=fixed)
        stats["step_size"] = rate
        stats.update(objective.stats())
        if rate != 0.0:
            objective.apply(direction, alpha=rate)
        return stats

    def _levenberg_marquardt_step(self, objective: ObjectiveLike, direction: Tensor, loss: Tensor, slope: Tensor,
                                  fallback: bool, fixed: float, stats: dict[str, Any]) -> float:
        """The step's rate, and lambda for the next step from the reduction ratio of the FULL Newton step s (before
        the line search shortens it, as Hessian-free's rho: a model that overshoots must raise lambda even when a
        shorter step is then accepted). rho = (F(w + s) - F(w)) / q(s), q(s) = g^T s + 1/2 s^T H s with the undamped
        Hessian of the curvature batch ([More1978]; [Martens2010] sec. 4.1). A fall-back to -g (no usable Newton
        direction: negative curvature at once, or a non-descent s) counts as a failure (lambda * r)."""
        o, lam = self.options, self.damping
        f0, slope_f = float(loss), float(slope)
        evals, rho = int(stats.get("cg/backtrack_evals", 0)), math.nan
        f_s = math.nan
        if not fallback:
            if self._trial is not None and self._trial[0] is direction:
                f_s = self._trial[1]      # evaluated by CG backtracking already
            else:
                f_s, evals = float(objective.loss_at(direction)), 1
            rho = reduction_ratio(f0, f_s, slope_f + 0.5 * self._curvature)
        if o.step_size == "fixed":
            rate = fixed
        else:
            rate, ls_evals = armijo_after_trial(o, objective, direction, loss0=f0, slope=slope_f,
                                                trial_loss=None if fallback else f_s)
            evals += ls_evals
            stats.update({"line_search/rate": rate, "line_search/evals": ls_evals,
                          "line_search/success": int(rate > 0)})
        self.damping = levenberg_marquardt(o, lam, rho, stepped=not fallback and rate > 0)
        if self.radius is not None:  # Nocedal & Wright 2006 Algorithm 4.1 on the full step's rho
            stats["trust_radius"] = self.radius
            if fallback or not rho >= 0.25:
                self.radius = 0.25 * self.radius
            elif rho > 0.75 and float(direction.norm()) >= 0.99 * self.radius:
                self.radius = min(2.0 * self.radius, o.max_trust_radius)
        stats.update({"reduction_ratio": rho, "loss_evals": evals})
        return rate

    def _direction(self, g: Tensor, s: Tensor, stats: dict[str, Any]) -> tuple[Tensor, Tensor, bool]:
        """s, or -g when s fails the descent check; with the slope g^T direction."""
        slope = torch.dot(g, s)
        norms = g.norm() * s.norm()
        cosine = torch.where(norms > 0, slope / norms, torch.zeros_like(slope))  # 0 when there is no Newton step
        stats["descent_cosine"] = -cosine  # cos(-g, s): 1 is steepest descent, < 0 an ascent direction
        fallback = self._fails_descent_check(g, s, slope, cosine)
        stats["fallback"] = int(fallback)
        if fallback:
            return -g, -torch.dot(g, g), True
        return s, slope, False

    def _pretrain_step(self, objective: ObjectiveLike) -> dict[str, Any]:
        """Seed 000 Algorithm 4, first loop: plain gradient descent w <- w - pretrain_lr * g."""
        lr = self.options.pretrain_lr
        loss = objective.loss()
        g = objective.gradient()
        stats = {"loss": loss, "grad_norm": g.norm(), "pretrain": 1, "step_size": lr, "damping": self.damping}
        stats.update(objective.stats())
        objective.apply(g, alpha=-lr)
        return stats

    def _fails_descent_check(self, g: Tensor, s: Tensor, slope: Tensor, cosine: Tensor) -> bool:
        """Seed 000 Algorithm 4: 'if grad^T s > T then s <- -grad' (T = descent_threshold)."""
        if self.options.descent_check == "none":
            return False
        if not bool(torch.isfinite(s).all()):
            return True
        if not bool(s.ne(0).any()):  # no Newton step (e.g. CG met negative curvature at once); fine only if g = 0
            return bool(g.ne(0).any())
        value = cosine if self.options.descent_check == "cosine" else slope
        return bool(value > self.options.descent_threshold)

    # ------------------------------------------------------------------ solvers for (H + lambda I) s = -g
    def _solve_explicit(self, objective: ObjectiveLike, g: Tensor, stats: dict[str, Any]) -> Tensor:
        """Dense solve; a singular or non-finite system falls back to the eigendecomposition pseudo-inverse."""
        hessian = objective.hessian_matrix()
        damping = self.damping
        system = hessian + damping * torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
        s, info = torch.linalg.solve_ex(system, -g)
        if int(info) == 0 and bool(torch.isfinite(s).all()):
            stats["solve"] = "solve"
            if self.options.track_min_eigenvalue:
                stats["min_eigenvalue"] = torch.linalg.eigvalsh(hessian)[0]
            if self.adaptive:
                self._curvature = float(s.dot(hessian @ s))
            return s
        # Singular system (e.g. undamped Newton on a degenerate Hessian): minimum-norm least-squares solution,
        # dropping eigenvalues below the usual rank tolerance n * eps * max|eigenvalue|.
        try:
            evals, evecs = torch.linalg.eigh(system)
        except torch.linalg.LinAlgError:  # LAPACK's float32 divide and conquer can fail on a Hessian with many zero
            evals, evecs = (t.to(system.dtype) for t in torch.linalg.eigh(system.double()))  # rows (dead units)
        cutoff = evals.abs().max() * system.shape[0] * torch.finfo(system.dtype).eps
        keep = evals.abs() > cutoff
        inverse = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), torch.zeros_like(evals))
        stats["solve"] = "pinv"
        stats["min_eigenvalue"] = evals[0] - damping
        s = -(evecs @ (inverse * (evecs.T @ g)))
        if self.adaptive:
            self._curvature = float(s.dot(hessian @ s))
        return s

    def _solve_cg(self, objective: ObjectiveLike, g: Tensor, stats: dict[str, Any]) -> Tensor:
        """Inexact Newton: CG on Hessian-vector products (seed 000 sec. 9.2), stopped on or stepping through negative
        curvature (``cg_negative_curvature``)."""
        o, lam = self.options, self.damping

        def matvec(v: Tensor) -> Tensor:
            return objective.hvp(v) + lam * v

        x0 = None
        if o.warm_start_decay > 0 and self.warm_start is not None:
            x0 = flush_tiny(self.warm_start.to(g) * o.warm_start_decay)
        elif o.cg_init == "weights":
            # Seed 000 sec. 14.3 warm-starts CG "from the normalised weight vector w / |w|".
            w = params_vector(self.params)
            x0 = w / w.norm() if bool(w.norm() > 0) else None
        result = pcg(matvec, -g, x0=x0, **o.cg_kwargs(store_iterates=o.backtrack, radius=self.radius,
                                                       negative_curvature=o.cg_negative_curvature))
        if o.warm_start_decay > 0:
            self.warm_start = result.x
        stats.update({"solve": "cg", "cg/iters": result.iterations, "cg/stop": result.stop_reason,
                      "cg/residual": result.residual_norm, "cg/model_decrease": result.model_decrease,
                      "cg/negative_directions": result.negative_directions})
        self._trial = None
        cg_iter, s = result.iterations, result.x
        if o.backtrack and result.iterations > 0:
            evals = 0

            def loss_at(delta: Tensor) -> Tensor:
                nonlocal evals
                evals += 1
                return objective.loss_at(delta)

            cg_iter, s, f_s = cg_backtrack(result.iterates, loss_at)
            self._trial = (s, float(f_s))
            stats.update({"cg/backtrack_iter": cg_iter, "cg/backtrack_evals": evals})
        # CG tracks phi(x) = 1/2 x^T (H + lambda I) x + g^T x, so s^T H s = 2 (phi(s) - g^T s) - lambda |s|^2: free
        self._curvature = 2.0 * (result.phis[cg_iter] - float(g.dot(s))) - lam * float(s.dot(s))
        return s

    # ------------------------------------------------------------------ state

    def gradients_per_step(self) -> tuple[float, str]:
        """A rough cost per step, in gradients (one forward and backward pass over the batch), and how it comes about,
        for the runner's up-front estimate (runner/cost.py)."""
        o = self.options
        if o.solver == "cg":
            n = o.cg_max_iters  # Hessian-vector products of ~1.5 gradients
            return 1 + 1.5 * n, (f"optimizer.solver=cg and up to optimizer.cg_max_iters={n} CG iterations: up to "
                                 f"~{1 + 1.5 * n:.0f} gradients per step")
        cost = 1 + 0.5 * self.numel  # one vectorised Hessian column per parameter
        return cost, f"optimizer.solver=explicit: a {self.numel} x {self.numel} Hessian, ~{cost:.0f} gradients per step"

    def state_dict(self) -> dict[str, Any]:
        state = {"steps": self.steps, "damping": self.damping}
        if self.radius is not None:
            state["trust_radius"] = self.radius
        if self.warm_start is not None:
            state["warm_start"] = clone_state(self.warm_start)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.damping = float(state.get("damping", self.options.damping))  # checkpoints before lambda was adapted
        if self.radius is not None:  # solver=cg with a trust region (checkpoints before it: the initial radius)
            self.radius = float(state.get("trust_radius", self.options.trust_radius))
        ws = state.get("warm_start")
        self.warm_start = None if ws is None else ws.detach().clone().to(self.params[0].device)
