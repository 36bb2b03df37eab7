"""The Lanczos process with full reorthogonalisation: the one Krylov engine behind ``spectrum`` and ``density``.

For a symmetric A and a unit start vector q_1, Lanczos builds an orthonormal basis Q_m = [q_1 .. q_m] of the Krylov
space span{q_1, A q_1, ..., A^{m-1} q_1} and the tridiagonal T_m = Q_m^T A Q_m (diagonal alpha, off-diagonal beta),
one product per step (Lanczos 1950; Golub & Van Loan 2013, "Matrix Computations", 4th ed., sec. 10.1). In floating
point the q_j lose orthogonality as Ritz values converge, which creates spurious copies of eigenvalues; each new
vector is therefore orthogonalised against all previous ones, twice ("twice is enough": Parlett 1998, "The
Symmetric Eigenvalue Problem", sec. 6.9). Memory is m vectors of the parameter size.

If beta_j vanishes (an invariant subspace was found, e.g. because of repeated eigenvalues) the process continues
from a fresh random vector orthogonal to Q_j and records beta_j = 0, so T stays block tridiagonal and exact.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from optimizers.diagnostics import probes


@dataclass
class Krylov:
    """The Lanczos basis and recurrence coefficients after ``steps`` products."""

    basis: list[Tensor] = field(default_factory=list)   # q_1 .. q_m, each (n,)
    alphas: list[float] = field(default_factory=list)   # diagonal of T (m,)
    betas: list[float] = field(default_factory=list)    # beta_j after step j (m,); the last one is beta_m

    @property
    def steps(self) -> int:
        return len(self.alphas)

    def tridiagonal(self) -> Tensor:
        """T_m (m, m) in float64."""
        m = self.steps
        t = torch.diag(torch.tensor(self.alphas, dtype=torch.float64))
        if m > 1:
            off = torch.tensor(self.betas[:m - 1], dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        return t

    def ritz(self) -> tuple[Tensor, Tensor, Tensor]:
        """Ritz values theta (m,) ascending, eigenvectors S of T (m, m), and the residual norms
        ||A y_i - theta_i y_i|| = beta_m |S[m-1, i]| of the Ritz vectors y_i = Q_m s_i (Parlett 1998, sec. 13.2)."""
        theta, s = torch.linalg.eigh(self.tridiagonal())
        return theta, s, abs(self.betas[-1]) * s[-1].abs()

    def vectors(self, s: Tensor) -> Tensor:
        """Ritz vectors Q_m S for the columns of s (m, k): returned as rows (k, n)."""
        q = torch.stack(self.basis)                          # (m, n)
        return s.T.to(q.dtype).to(q.device) @ q


def _orthogonalise(w: Tensor, basis: list[Tensor]) -> Tensor:
    """w minus its components along the basis, by two passes of modified Gram-Schmidt."""
    for _ in range(2):
        for q in basis:
            w = w - torch.dot(q, w) * q
    return w


def lanczos(operator, start: Tensor, steps: int, gen: torch.Generator, wanted=None) -> Krylov:
    """Run up to ``steps`` Lanczos steps from ``start`` (n,). ``wanted(krylov) -> bool`` (optional) is asked after
    each step and stops the process early when it returns True (a convergence test on the Ritz pairs)."""
    n = operator.numel
    steps = min(steps, n)
    krylov = Krylov()
    q = start / start.norm()
    for _ in range(steps):
        krylov.basis.append(q)
        w = operator.matvec(q)
        alpha = float(torch.dot(q, w))
        w = _orthogonalise(w, krylov.basis)     # removes alpha q_j and beta q_{j-1} too, in exact arithmetic
        beta = float(w.norm())
        krylov.alphas.append(alpha)
        scale = max(abs(a) for a in krylov.alphas) + max(krylov.betas, default=0.0)
        if beta <= 100 * torch.finfo(q.dtype).eps * scale or beta == 0.0:   # an invariant subspace
            krylov.betas.append(0.0)
            if krylov.steps == n:
                break
            w = _orthogonalise(probes.draw(n, gen, q.dtype, q.device, "gaussian"), krylov.basis)
            beta_next = float(w.norm())
        else:
            krylov.betas.append(beta)
            beta_next = beta
        if wanted is not None and wanted(krylov):
            break
        q = w / beta_next
    return krylov
