"""Levenberg-Marquardt damping adapted from the quadratic model's reduction ratio, and the curvature mini-batch:
the step-acceptance machinery shared by Hessian-free and Newton(-CG).

For a step p from the model q(p) = g^T p + 1/2 p^T C p (C the UNDAMPED curvature: GGN or Hessian), the reduction
ratio rho = (F(w + p) - F(w)) / q(p) compares the decrease the objective achieved with the one the model predicted
([More1978] sec. 2; [Martens2010] sec. 4.1; seed 002 eq. 25). Levenberg-Marquardt then adapts lambda in the damped
system (C + lambda I) p = -g (seed 002 eq. 26; [Martens2010] sec. 4.1 with r = 3/2):

    rho < 1/4 (or nan, or no step)  ->  lambda <- r lambda      (the model was too optimistic: shorter steps)
    rho > 3/4                       ->  lambda <- lambda / r    (the model is trustworthy: longer steps)

clamped to [min_damping, max_damping]; r = 1 keeps lambda fixed.

The curvature mini-batch ([Martens2010] sec. 4.3; Martens & Sutskever 2012): C is taken on the first
ceil(curvature_fraction * B) samples of the batch of B, while the gradient, rho and the line search use all B. With C
on the gradient's own batch, rho measures the model on the batch it was fitted to, stays near 1, and the rule drives
lambda towards 0 on mini-batches (docs/benchmarks/defaults.md); C on a fraction lets rho see C's sampling error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from optimizers.base import OptimizerOptions
from optimizers.interface import ObjectiveLike
from validation.checks import fail, in_range, option, positive


@dataclass(frozen=True)
class DampingOptions(OptimizerOptions):
    """Levenberg-Marquardt on lambda and the curvature mini-batch. A method sets its own ``damping`` (the initial
    lambda) and may override these defaults (seed 002 / [Martens2010]'s r = 1.5, a quarter of the batch)."""

    damping: float = option(1.0, positive)              # initial lambda
    damping_factor: float = option(1.5, in_range(1, math.inf))  # Levenberg-Marquardt r (seed 002 eq. 26); 1 = fixed
    min_damping: float = option(1e-8, positive)         # lower clamp on lambda
    max_damping: float = option(1e8, positive)          # upper clamp on lambda
    curvature_fraction: float = option(0.25, in_range(0, 1, low_open=True))  # curvature on ceil(f B) of B samples

    def validate(self) -> None:
        super().validate()
        if self.min_damping > self.max_damping:
            fail(self.key("min_damping"), self.min_damping, f"must not exceed {self.key('max_damping')}="
                 f"{self.max_damping}.")
        if self.damping_factor > 1 and not self.min_damping <= self.damping <= self.max_damping:
            fail(self.key("damping"), self.damping, f"(the initial lambda) must lie in [min_damping, max_damping] = "
                 f"[{self.min_damping:g}, {self.max_damping:g}].")


def reduction_ratio(f0: float, f_p: float, q: float) -> float:
    """rho = (F(w + p) - F(w)) / q(p) (seed 002 eq. 25); -inf when F went up or is not finite (Martens' code), nan when
    the model predicts no decrease (rho is meaningless then)."""
    if not math.isfinite(f_p) or f_p > f0:
        return -math.inf
    if not q < 0:
        return math.nan
    return (f_p - f0) / q


def levenberg_marquardt(options: DampingOptions, lam: float, rho: float, stepped: bool) -> float:
    """Seed 002 eq. 26 / [Martens2010] sec. 4.1: rho > 3/4 -> lambda / r; rho < 1/4, nan or no step -> lambda * r;
    clamped to [min_damping, max_damping]. r = 1: lambda stays as it is (unclamped)."""
    if options.damping_factor == 1:
        return lam
    if stepped and rho > 0.75:
        lam = lam / options.damping_factor
    elif not stepped or not rho >= 0.25:
        lam = lam * options.damping_factor
    return min(max(lam, options.min_damping), options.max_damping)


def use_curvature_fraction(objective: ObjectiveLike, fraction: float) -> None:
    """The curvature mini-batch (Martens 2010 sec. 4.3), unless ``objective.curvature_batch_size`` chose one."""
    if fraction < 1 and objective.curvature_batch_size is None:
        batch = objective.inputs.shape[0]
        size = math.ceil(fraction * batch)
        if size < batch:
            objective.set_curvature_batch_size(size)
