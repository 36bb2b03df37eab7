"""K-FAC's step length, momentum and damping from the exact quadratic model (Martens & Grosse 2015, "Optimizing
neural networks with Kronecker-factored approximate curvature", sec. 6.4-6.6 and 7).

The K-FAC direction Delta = -F~^-1 grad is only as good as the Kronecker approximation F~ (with its damping gamma).
Martens & Grosse choose the update from the EXACT local quadratic model of the objective h on the mini-batch,

    M(delta) = grad^T delta + 1/2 delta^T (C + (lambda + eta) I) delta,      C = the exact GGN (= Fisher) of the batch,

over the span of Delta and the previous update delta0:  delta = alpha Delta + mu delta0  (sec. 6.4 and 7), i.e. the
2 x 2 system

    [Delta' A Delta    Delta' A delta0 ] [alpha]     [grad' Delta ]
    [delta0' A Delta   delta0' A delta0] [mu   ] = - [grad' delta0],       A = C + (lambda + eta) I,

whose minimum is M* = 1/2 [alpha, mu] . [grad' Delta, grad' delta0] (first step: delta0 = 0, the 1 x 1 system in
alpha). The quadratic forms need J Delta and J delta0 (one Jacobian-vector product each, on the Objective) and the
closed-form loss Hessian H_L in output space, as CurveBall's eq. 18 (seed 003). Two damping strengths are adapted:

* lambda, the damping of the exact model, by Levenberg-Marquardt every T1 steps (sec. 6.5): rho = (h(theta + delta)
  - h(theta)) / M(delta) on the same batch; rho > 3/4: lambda <- omega1 lambda; rho < 1/4: lambda <- lambda / omega1,
  omega1 = (19/20)^T1;
* gamma, the damping of the Kronecker factors (optimizers/kfac/preconditioner.py), starts at lambda + eta and is
  chosen every T2 steps greedily among {gamma, omega2 gamma, gamma / omega2}: the one whose rescaled update has the
  lowest M (sec. 6.6). Martens & Grosse damp each factor by gamma_MG, so their F~ + gamma_MG^2 I corresponds to
  curvlab's eigenvalue damping gamma = gamma_MG^2 (``factored`` mode takes sqrt(gamma) per factor); their
  omega2 = sqrt(19/20)^T2 on gamma_MG is (19/20)^T2 on gamma, and their gamma_MG = sqrt(lambda + eta) is
  gamma = lambda + eta here.

Cost: two J v products per step (three more every T2 steps for the gamma candidates) and one loss evaluation every
T1 steps; the Objective counts them (``curv/jvp_products``, ``curv/product_time`` in the step statistics).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from optimizers.interface import ObjectiveLike

RHO_LOW, RHO_HIGH = 0.25, 0.75  # Levenberg-Marquardt thresholds (Martens & Grosse 2015 sec. 6.5)


class Rescaled(NamedTuple):
    """The minimiser of the exact quadratic model over span(direction, previous update)."""

    alpha: float        # coefficient of the K-FAC direction
    mu: float           # coefficient of the previous update (0 on the first step)
    model_change: float  # M(alpha Delta + mu delta0) - M(0) = 1/2 [alpha, mu] . b  (<= 0)


def gram(objective: ObjectiveLike, vectors: list[Tensor]) -> Tensor:
    """[v_i^T C v_j] for the batch's GGN C of the data loss, from one J v per vector (k x k, float64 on the host)."""
    jv = [objective.jvp(v) for v in vectors]  # (B, o) each
    hjv = [objective.loss_hessian_vp(u) for u in jv]
    k = len(vectors)
    entries = torch.stack([(jv[i] * hjv[j]).sum() for i in range(k) for j in range(k)])
    entries = objective.reduce(entries)  # output-space sums are this rank's share: one all-reduce
    g = entries.reshape(k, k).double().cpu()
    return 0.5 * (g + g.T)


def solve(gram_c: Tensor, vectors: list[Tensor], grad: Tensor, damping: float) -> Rescaled:
    """Minimise M over span(vectors) (1 or 2 of them: [Delta] or [Delta, delta0]) for the model damping
    ``damping`` = lambda + eta; a singular 2 x 2 system (delta0 parallel to Delta) falls back to alpha alone."""
    inner = torch.stack([a.dot(b) for a in vectors for b in vectors]).double().cpu().reshape(len(vectors), -1)
    b = torch.stack([grad.dot(v) for v in vectors]).double().cpu()
    a = gram_c + damping * inner
    if len(vectors) == 2:
        det = float(a[0, 0] * a[1, 1] - a[0, 1] ** 2)
        if det > 1e-12 * float(a[0, 0] * a[1, 1]) and math.isfinite(det):
            x = -torch.linalg.solve(a, b)
            return Rescaled(float(x[0]), float(x[1]), 0.5 * float(x.dot(b)))
    alpha = -float(b[0]) / float(a[0, 0]) if float(a[0, 0]) > 0 else 0.0
    if not math.isfinite(alpha):
        alpha = 0.0
    return Rescaled(alpha, 0.0, 0.5 * alpha * float(b[0]))


def levenberg_marquardt(lam: float, rho: float, omega: float) -> float:
    """Sec. 6.5: rho > 3/4 -> lambda * omega1; rho < 1/4 (or nan) -> lambda / omega1 (omega1 < 1)."""
    if rho > RHO_HIGH:
        return lam * omega
    if not rho >= RHO_LOW:
        return lam / omega
    return lam
