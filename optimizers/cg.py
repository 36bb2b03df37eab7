"""Preconditioned conjugate gradient for the Hessian-free inner solve, and Martens' CG backtracking.

``pcg`` minimises the quadratic q(x) = 1/2 x^T A x - b^T x (equivalently solves A x = b) for a symmetric A that it
only sees through ``matvec``. It follows seed 002 Algorithm 2 and Martens 2010 sec. 4.4-4.6 (conjgrad_1.m):

* residual convention r = A x - b, so q(x) = 1/2 (r - b)^T x comes for free every iteration (Martens sec. 4.4);
* diagonal preconditioner M (the solver multiplies by M^-1 elementwise), warm start from the caller's ``x0``;
* Martens' relative-progress stopping rule: stop at iteration i when i > k, q(x_i) < 0 and
  (q(x_i) - q(x_{i-k})) / q(x_i) < k * martens_tol, with k = max(martens_gap, ceil(0.1 i)), never before
  ``min_iters``. Martens uses martens_gap = 10; seed 002 Algorithm 2 starts its window at the minimum number of
  CG steps t (j <- max{t, ...}), which is why it stops after 6-10 steps with t = 3;
* p^T A p <= 0 (negative curvature, possible for an undamped Hessian): ``negative_curvature="stop"`` ends the solve
  at the last good iterate (the usual truncated-Newton safeguard); ``"continue"`` is seed 000's Algorithm 3 as written,
  which takes alpha = r^T y / p^T A p whatever its sign and iterates on to the tolerance, leaving the judgement of the
  result to the caller (seed 000 Algorithm 4's descent check). CG on a symmetric indefinite but non-singular A still
  reaches A^-1 b in at most n steps unless p^T A p = 0 exactly ("breakdown", the only stop it cannot step past);
* ``radius``: Steihaug-Toint's trust region ([Steihaug1983], [Toint1981]; [NocedalWright2006] Algorithm 7.2; Newton-CG's default): a direction of
  non-positive curvature, or an iterate that would leave |x| <= radius, is followed to the boundary and the solve
  stops there ("boundary");
* iterates kept at i = ceil(5 * 1.3^j) and the last, for backtracking (Martens sec. 4.6);
* each iteration and each backtracking evaluation is reported to the step's monitor (optimizers/monitor.py), which
  may stop the step there.

One host synchronisation per iteration: the scalars the stopping rules read are fetched together.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from optimizers import monitor as step_monitor
from optimizers.base import OptimizerOptions
from validation.checks import fail, nonnegative, nonnegative_int, option, optional, positive_int

STOP_REASONS = ("martens", "max_iters", "tolerance", "negative_curvature", "breakdown", "boundary")
NEGATIVE_CURVATURE = ("stop", "continue")


@dataclass(frozen=True)
class CGOptions(OptimizerOptions):
    """The inner CG solve's settings, shared by Hessian-free and Newton-CG."""

    cg_min_iters: int = option(1, nonnegative_int)     # never stop earlier (Martens' code: 1; seed 002: 3)
    cg_max_iters: int = option(250, positive_int)      # iteration cap (Martens 2010: 250; his later code: 125)
    cg_martens_tol: float = option(5e-4, nonnegative)  # Martens' relative-progress tolerance; 0 switches it off
    cg_gap: int | None = option(None, optional(positive_int))  # floor of the window k; null = max(1, cg_min_iters)
    cg_tol: float = option(0.0, nonnegative)           # also stop once |r| <= cg_tol |b| (0 = off)

    def validate(self) -> None:
        super().validate()
        if self.cg_min_iters > self.cg_max_iters:
            fail(self.key("cg_min_iters"), self.cg_min_iters,
                 f"must not exceed {self.key('cg_max_iters')}={self.cg_max_iters}.")

    def cg_kwargs(self, **extra: Any) -> dict[str, Any]:
        """Keyword arguments for ``pcg``. Seed 002 Algorithm 2 opens Martens' window at the minimum number of CG
        steps (j <- max{t, ...}); Martens 2010 uses 10."""
        gap = max(1, self.cg_min_iters) if self.cg_gap is None else self.cg_gap
        return dict(min_iters=self.cg_min_iters, max_iters=self.cg_max_iters, martens_tol=self.cg_martens_tol,
                    tol=self.cg_tol, martens_gap=gap, **extra)


@dataclass
class CGResult:
    x: Tensor                    # final iterate
    iterations: int              # CG iterations completed
    stop_reason: str             # one of STOP_REASONS
    residual_norm: float         # |A x - b| (the recurrence's residual: no extra product)
    model_decrease: float        # q(x) - q(x0) with q(x) = 1/2 x^T A x - b^T x   (negative = decrease)
    iterates: list[tuple[int, Tensor]] = field(default_factory=list)  # (i, x_i) at i = ceil(5 * 1.3^j) and the last
    phis: list[float] = field(default_factory=list)                   # phis[i] = q(x_i), i = 0 .. iterations
    negative_directions: int = 0  # directions with p^T A p < 0 stepped along (negative_curvature="continue")


def storage_schedule(max_iters: int) -> set[int]:
    """Iterations whose iterate is kept for backtracking: ceil(5 * 1.3^j), j = 0, 1, ... (Martens 2010 sec. 4.6)."""
    keep, j = set(), 0
    while (i := math.ceil(5 * 1.3 ** j)) <= max_iters:
        keep.add(i)
        j += 1
    return keep


def pcg(matvec: Callable[[Tensor], Tensor], b: Tensor, *, x0: Tensor | None = None, precond: Tensor | None = None,
        min_iters: int = 1, max_iters: int = 250, martens_tol: float = 5e-4, tol: float = 0.0,
        store_iterates: bool = True, martens_gap: int = 10, negative_curvature: str = "stop",
        radius: float | None = None) -> CGResult:
    """Minimise q(x) = 1/2 x^T A x - b^T x with A = ``matvec`` by preconditioned CG.

    ``precond`` is the diagonal of M (positive), ``x0`` the warm start (zero when None). ``martens_tol = 0`` switches
    Martens' rule off, ``tol`` > 0 stops once |r| <= tol |b|. An exactly zero residual always stops ("tolerance").
    ``negative_curvature``: "stop" at a direction with p^T A p <= 0, or "continue" through it (seed 000 Algorithm 3).
    ``radius``: Steihaug-Toint's trust region |x| <= radius (Nocedal & Wright 2006, Algorithm 7.2; needs x0 = None):
    a direction of non-positive curvature, or an iterate that would leave the region, is followed to the boundary
    |x| = radius and the solve stops there ("boundary"); the last phis entry is q of that boundary point.
    """
    _check_arguments(min_iters, max_iters, martens_tol, tol, martens_gap, negative_curvature)
    minv = None if precond is None else precond.reciprocal()  # hoisted: M^-1 once per solve
    s = _start(matvec, b, x0, minv)
    q = s.y  # q = -p, the search direction negated (see _advance)
    head = torch.stack([0.5 * torch.dot(s.r - b, s.x), s.ry, torch.dot(b, b)]).tolist()
    phis, b_norm = [head[0]], math.sqrt(head[2])
    keep = storage_schedule(max_iters) if store_iterates else set()
    iterates: list[tuple[int, Tensor]] = []
    reason, i = ("tolerance" if head[1] == 0.0 else "max_iters"), 0  # ry = 0: x0 already solves the system
    negatives = 0
    monitor = step_monitor.current()
    residual = tol > 0 or monitor.active  # |r|^2 among the iteration's host scalars
    while reason == "max_iters" and i < max_iters:
        aq = matvec(q)
        new, host = _advance(s, q, aq, b, minv, residual)
        if radius is not None and (not host[0] > 0.0 or float(new.x.norm()) >= radius):
            s, phi = _to_boundary(s, q, host[0], radius, phis[-1])  # Steihaug-Toint: along p to |x| = radius, and stop
            i += 1
            phis.append(phi)
            reason = "boundary"
            break
        if not host[0] > 0.0:                   # p^T A p <= 0 (or nan)
            if negative_curvature == "stop" or not host[0] < 0.0:  # stop, or no step length: keep the last iterate
                reason = "negative_curvature" if negative_curvature == "stop" else "breakdown"
                break
            negatives += 1                      # seed 000 Algorithm 3: step on with alpha < 0
        i += 1
        q = torch.addcmul(new.y, new.ry / s.ry, q)  # p <- -y + beta p, as q = -p: y + beta q in one pass
        s = new
        phis.append(host[2])
        if i in keep:
            iterates.append((i, s.x))
        if host[1] == 0.0 or (tol > 0 and math.sqrt(host[3]) <= tol * b_norm):
            reason = "tolerance"
        elif martens_tol > 0 and i >= min_iters and _martens_stop(phis, i, martens_tol, martens_gap):
            reason = "martens"
        if monitor.active:
            monitor.report("CG iteration", i, at_most=max_iters, residual=math.sqrt(host[3]), model=host[2])
    if not iterates or iterates[-1][0] != i:
        iterates.append((i, s.x))
    return CGResult(x=s.x, iterations=i, stop_reason=reason, residual_norm=float(s.r.norm()),
                    model_decrease=phis[-1] - phis[0], iterates=iterates, phis=phis, negative_directions=negatives)


@dataclass
class _CGState:
    x: Tensor    # iterate
    r: Tensor    # residual A x - b
    y: Tensor    # preconditioned residual M^-1 r
    ry: Tensor   # r^T y


def _start(matvec: Callable[[Tensor], Tensor], b: Tensor, x0: Tensor | None, minv: Tensor | None) -> _CGState:
    if x0 is None:
        x, r = torch.zeros_like(b), -b          # r_0 = A 0 - b, no product needed
    else:
        x = x0.detach().clone()
        r = matvec(x) - b
    y = r if minv is None else r * minv
    return _CGState(x, r, y, torch.dot(r, y))


def _advance(s: _CGState, q: Tensor, aq: Tensor, b: Tensor, minv: Tensor | None,
             residual: bool) -> tuple[_CGState, list[float]]:
    """The candidate iterate along p = -q (discarded by the caller if p has non-positive curvature) and the scalars
    the stopping rules read, [p'Ap, r'y, q(x), |r|^2 if residual], fetched in the iteration's one host synchronisation.

    The direction is carried negated, q = -p (A q = -A p), so that each vector update is one fused pass:
    x + alpha p = x - alpha q, r + alpha Ap = r - alpha Aq, and p <- -y + beta p is q <- y + beta q."""
    pap = torch.dot(q, aq)
    neg_alpha = -(s.ry / pap)
    x, r = torch.addcmul(s.x, neg_alpha, q), torch.addcmul(s.r, neg_alpha, aq)
    y = r if minv is None else r * minv
    new = _CGState(x, r, y, torch.dot(r, y))
    scalars = [pap, new.ry, 0.5 * torch.dot(r - b, x)] + ([torch.dot(r, r)] if residual else [])
    return new, torch.stack(scalars).tolist()


def _to_boundary(s: _CGState, q: Tensor, pap: float, radius: float, phi: float) -> tuple[_CGState, float]:
    """x + tau p with tau >= 0 and |x + tau p| = radius (p = -q), and q(x + tau p) = q(x) + tau r^T p + tau^2/2 p^T A p
    (the residual r = A x - b of the last accepted iterate; r is not updated: the solve ends here)."""
    xq, qq, xx, rq = torch.stack([torch.dot(s.x, q), torch.dot(q, q), torch.dot(s.x, s.x), torch.dot(s.r, q)]).tolist()
    # |x - tau q|^2 = radius^2: qq tau^2 - 2 xq tau + (xx - radius^2) = 0, the positive root (xx < radius^2)
    tau = (xq + math.sqrt(max(xq * xq - qq * (xx - radius * radius), 0.0))) / qq if qq > 0 else 0.0
    x = torch.add(s.x, q, alpha=-tau)
    return _CGState(x, s.r, s.y, s.ry), phi - tau * rq + 0.5 * tau * tau * pap


def _check_arguments(min_iters: int, max_iters: int, martens_tol: float, tol: float, martens_gap: int,
                     negative_curvature: str) -> None:
    if min_iters < 0 or max_iters < 1 or min_iters > max_iters:
        raise ValueError(f"pcg needs 0 <= min_iters <= max_iters and max_iters >= 1, got min_iters={min_iters}, "
                         f"max_iters={max_iters}.")
    if martens_tol < 0 or tol < 0 or martens_gap < 1:
        raise ValueError(f"pcg needs martens_tol >= 0, tol >= 0 and martens_gap >= 1, got martens_tol={martens_tol}, "
                         f"tol={tol}, martens_gap={martens_gap}.")
    if negative_curvature not in NEGATIVE_CURVATURE:
        raise ValueError(f"pcg needs negative_curvature in {NEGATIVE_CURVATURE}, got {negative_curvature!r}.")


def _martens_stop(phis: list[float], i: int, martens_tol: float, martens_gap: int) -> bool:
    """Martens 2010 sec. 4.4: relative progress over the last k iterations is below k * martens_tol."""
    k = max(martens_gap, math.ceil(0.1 * i))
    return i > k and phis[i] < 0 and (phis[i] - phis[i - k]) / phis[i] < k * martens_tol


def cg_backtrack(iterates: list[tuple[int, Tensor]], loss_at: Callable[[Tensor], Tensor]) -> tuple[int, Tensor, Tensor]:
    """Martens 2010 sec. 4.6: walk back from the last stored iterate while the objective keeps improving.

    Returns (CG iteration of the chosen iterate, the iterate, its loss). Costs one ``loss_at`` per iterate visited.
    A non-finite loss never counts as an improvement.
    """
    if not iterates:
        raise ValueError("cg_backtrack needs at least one stored iterate")
    monitor = step_monitor.current()
    best_i, best_x = iterates[-1]
    best_loss = loss_at(best_x)
    best = _as_float(best_loss)
    if monitor.active:
        monitor.report("CG backtracking", 1, at_most=len(iterates), loss=best)
    for evals, (i, x) in enumerate(reversed(iterates[:-1]), 2):
        loss = loss_at(x)
        value = _as_float(loss)
        if monitor.active:
            monitor.report("CG backtracking", evals, at_most=len(iterates), loss=value)
        if value < best:
            best_i, best_x, best_loss, best = i, x, loss, value
        elif best < math.inf:   # stop at the first iterate that does not improve (keep walking past inf/nan ones)
            break
    return best_i, best_x, best_loss


def _as_float(loss: Tensor | float) -> float:
    """The loss as a float, with nan and -inf read as +inf (never an improvement)."""
    value = float(loss)
    return value if math.isfinite(value) else math.inf
