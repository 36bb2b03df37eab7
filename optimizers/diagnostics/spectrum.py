"""Extreme eigenvalues and eigenvectors of the Hessian or the GGN: Lanczos (default) and power iteration.

* ``lanczos_eigenpairs``: Lanczos with full reorthogonalisation (``lanczos.py``), stopped when the wanted Ritz pairs
  have residuals ||A y - theta y|| <= tol * max|theta| (Golub & Van Loan 2013, "Matrix Computations", sec. 10.1;
  this is what scipy's ``eigsh``/ARPACK and curvlinops do, without restarts). Both ends of the spectrum come from the
  same Krylov space, so the most negative Hessian eigenvalues (negative curvature) cost what the top ones cost.
* ``power_iteration``: seed 000 Algorithm 5 (sec. 15.1): b <- A b / ||A b|| from a random unit b, the eigenvalue as
  the Rayleigh quotient b^T A b (the seed's ||A b|| loses the sign), further eigenpairs by the seed's deflation
  A - lambda_1 v_1 v_1^T. It converges to the eigenvalue largest in *magnitude*; when that one lies at the other
  end of the spectrum, the iteration continues on a shifted A + sigma I whose wanted end dominates.
  As in PyHessian (Yao, Gholami, Keutzer, Mahoney 2020, "PyHessian: Neural networks through the lens of the
  Hessian"), for comparison: it needs far more products than Lanczos for the same accuracy.

Both return an ``Eigenpairs`` record; results depend only on ``seed`` (private generator).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from optimizers.diagnostics import probes
from optimizers.diagnostics.lanczos import Krylov, lanczos
from optimizers.diagnostics.operators import Source, as_operator
from optimizers.diagnostics.results import Cost, Meter, Record, cost_scalars
from optimizers.interface import Curvature

WHICH = ("largest", "smallest")
METHODS = ("lanczos", "power")


@dataclass
class Eigenpairs(Record):
    """k eigenpairs from one end of the spectrum, the wanted end first (largest: descending; smallest: ascending)."""

    eigenvalues: Tensor   # (k,) float64
    eigenvectors: Tensor  # (k, n) unit rows, the operator's dtype and device
    residuals: Tensor     # (k,) ||A v - lambda v|| (Lanczos: its exact-arithmetic estimate; power: measured)
    which: str
    method: str
    curvature: str
    iterations: int       # Lanczos steps, or power iterations summed over the eigenpairs
    converged: bool       # every residual <= tol * spectral scale
    cost: Cost

    VECTORS = ("eigenvectors",)

    def scalars(self) -> dict[str, float]:
        end = "top" if self.which == "largest" else "bottom"
        out = {f"{self.curvature}_{end}{i + 1}": float(v) for i, v in enumerate(self.eigenvalues)}
        return {**out, **cost_scalars(f"{self.curvature}_{end}", self.cost)}


def eigenpairs(source: Source, k: int = 1, which: str = "largest", curvature: Curvature = "hessian",
               method: str = "lanczos", seed: int = 0, **options: Any) -> Eigenpairs:
    """k extreme eigenpairs of ``source`` (an Objective, with ``curvature`` "hessian" or "ggn", or an operator)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {list(METHODS)}.")
    solver = lanczos_eigenpairs if method == "lanczos" else power_iteration
    return solver(source, k=k, which=which, curvature=curvature, seed=seed, **options)


def _check(k: int, which: str, n: int) -> None:
    if which not in WHICH:
        raise ValueError(f"which={which!r} is not one of {list(WHICH)}.")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k={k!r} must be an integer between 1 and the number of parameters ({n}).")


def _ends(theta: Tensor, k: int, which: str) -> Tensor:
    """Indices of the k wanted Ritz values (theta ascending), the wanted end first."""
    idx = torch.arange(theta.numel())
    return idx.flip(0)[:k] if which == "largest" else idx[:k]


def _converged_test(k: int, which: str, tol: float, n: int) -> Callable[[Krylov], bool]:
    def wanted(krylov: Krylov) -> bool:
        if krylov.steps < k or (krylov.betas[-1] == 0.0 and krylov.steps < n):
            return False   # too few Ritz values, or an invariant subspace that may hide the wanted end
        theta, _, res = krylov.ritz()
        return bool((res[_ends(theta, k, which)] <= tol * theta.abs().max()).all())
    return wanted


def lanczos_eigenpairs(source: Source, k: int = 1, which: str = "largest", curvature: Curvature = "hessian",
                       seed: int = 0, tol: float = 1e-5, max_steps: int | None = None) -> Eigenpairs:
    """Lanczos with full reorthogonalisation; ``max_steps`` defaults to min(n, 3k + 50) (memory: that many vectors)."""
    op = as_operator(source, curvature)
    _check(k, which, op.numel)
    meter = Meter(op.device, op)
    gen = probes.generator(seed)
    start = probes.draw(op.numel, gen, op.dtype, op.device, "gaussian")
    steps = max_steps if max_steps is not None else 3 * k + 50
    krylov = lanczos(op, start, steps, gen, wanted=_converged_test(k, which, tol, op.numel))
    theta, s, res = krylov.ritz()
    idx = _ends(theta, k, which)
    if idx.numel() < k:
        raise ValueError(f"lanczos_eigenpairs: max_steps={steps} gives fewer than k={k} Ritz values.")
    vectors = krylov.vectors(s[:, idx])
    vectors = vectors / vectors.norm(dim=1, keepdim=True)
    converged = bool((res[idx] <= tol * theta.abs().max()).all())
    return Eigenpairs(theta[idx], vectors, res[idx], which, "lanczos", getattr(op, "curvature", "matrix"),
                      krylov.steps, converged, meter.cost(op))


def _power_one(matvec: Callable[[Tensor], Tensor], b: Tensor, tol: float, max_iters: int
               ) -> tuple[float, Tensor, float, int]:
    """Seed 000 Algorithm 5 from the unit vector b: returns (Rayleigh quotient, vector, residual, iterations);
    converged when residual <= tol |mu| (mu of the shifted, deflated operator)."""
    mu, residual = 0.0, float("inf")
    for it in range(1, max_iters + 1):
        ab = matvec(b)
        mu = float(torch.dot(b, ab))
        residual = float((ab - mu * b).norm())
        if residual <= tol * abs(mu) or float(ab.norm()) == 0.0:
            break
        b = ab / ab.norm()
    return mu, b, residual, it


def power_iteration(source: Source, k: int = 1, which: str = "largest", curvature: Curvature = "hessian", seed: int = 0,
                    tol: float = 1e-5, max_iters: int = 100) -> Eigenpairs:
    """Power iteration with deflation (seed 000 Algorithm 5 and sec. 15.1), at most ``max_iters`` products per
    try, each stopped when ||B b - mu b|| <= tol |mu| for B = A + shift I - sum_j (lambda_j + shift) v_j v_j^T.

    The shift starts at 0 (the seed's iteration). A pair whose mu has the wrong sign (negative when the largest are
    wanted) belongs to the other end of the spectrum: the shift moves by -mu, which makes every remaining eigenvalue
    of B one-signed, and the pair is drawn again; every later pair then converges to the wanted end."""
    op = as_operator(source, curvature)
    _check(k, which, op.numel)
    meter, gen = Meter(op.device, op), probes.generator(seed)
    sign = 1.0 if which == "largest" else -1.0
    found: list[tuple[float, Tensor, float, bool]] = []   # (eigenvalue of A, vector, residual, converged)
    shift, iterations = 0.0, 0

    def deflated(v: Tensor) -> Tensor:
        out = op.matvec(v) + shift * v
        for lam_j, v_j, _, _ in found:
            out = out - (lam_j + shift) * torch.dot(v_j, v) * v_j
        return out

    retried = False
    while len(found) < k:
        mu, b, res, its = _power_one(deflated, probes.unit(op.numel, gen, op.dtype, op.device), tol, max_iters)
        iterations += its
        if sign * mu >= 0 or retried:      # after one shift the rest is one-signed: accept (rounding may flip ~0)
            found.append((mu - shift, b, res, res <= tol * abs(mu)))
            retried = False
        else:
            shift, retried = shift - mu, True
    values = torch.tensor([f[0] for f in found], dtype=torch.float64)
    order = torch.argsort(values, descending=(which == "largest"))
    vectors = torch.stack([found[i][1] for i in order])
    residuals = torch.tensor([found[i][2] for i in order], dtype=torch.float64)
    return Eigenpairs(values[order], vectors, residuals, which, "power", getattr(op, "curvature", "matrix"),
                      iterations, all(f[3] for f in found), meter.cost(op))
