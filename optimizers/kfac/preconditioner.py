"""One layer's Kronecker-factored curvature A (x) G: moving averages, eigendecompositions and the damped inverse.

With A = Q_A diag(d_A) Q_A^T and G = Q_G diag(d_G) Q_G^T, the damped block (G (x) A + gamma I) acting on the
(d_out, d_in [+1]) gradient matrix V (row-major vec: F = G (x) A) is inverted in the eigenbasis (the form of
reference/algorithms.md, as in gpauloski/kfac-pytorch; the eigenvectors of G (x) A are Kronecker products of theirs):

    eigenbasis:  dW = Q_G [ (Q_G^T V Q_A) / (d_G d_A^T + gamma) ] Q_A^T                 exact inverse of G(x)A + gamma I
    factored:    (G + sqrt(gamma)/pi I) (x) (A + pi sqrt(gamma) I)                       Martens & Grosse 2015 sec. 6.3
                 dW = Q_G [ (Q_G^T V Q_A) / ((d_G + sqrt(gamma)/pi) (d_A + pi sqrt(gamma))^T) ] Q_A^T
                 pi = sqrt( (tr A / dim A) / (tr G / dim G) )                            (their trace-norm choice)

Moving averages (Martens & Grosse 2015 sec. 5): X <- eps X + (1 - eps) X_batch with eps = min(1 - 1/k, decay) at the
k-th update, so the first factors are the first batch's and early ones are plain averages.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

DAMPING_MODES = ("eigenbasis", "factored")
STATE_KEYS = ("A", "G", "QA", "dA", "QG", "dG")


class KroneckerBlock:
    """A, G (moving averages) and their eigendecompositions for one layer."""

    def __init__(self) -> None:
        self.A: Tensor | None = None  # (d_in [+1], d_in [+1])
        self.G: Tensor | None = None  # (d_out, d_out)
        self.QA = self.dA = self.QG = self.dG = None
        self._denominator: tuple[tuple[float, str], Tensor] | None = None  # (damping, mode) -> its divisor

    def update(self, a_batch: Tensor, g_batch: Tensor, k: int, decay: float, a_scale: float = 1.0,
               g_scale: float = 1.0) -> None:
        """The k-th (1-based) moving-average update with this batch's factors ``a_scale * a_batch`` and
        ``g_scale * g_batch`` (the scales fold a division by the sample count into the update's one pass)."""
        eps = min(1.0 - 1.0 / k, decay)
        if self.A is None or eps == 0.0:
            self.A, self.G = a_batch * a_scale, g_batch * g_scale
            return
        self.A.mul_(eps).add_(a_batch, alpha=(1.0 - eps) * a_scale)
        self.G.mul_(eps).add_(g_batch, alpha=(1.0 - eps) * g_scale)

    @property
    def ready(self) -> bool:
        return self.QA is not None

    def decompose(self) -> None:
        """Eigendecompositions of the current A and G (negative rounding errors clamped to 0)."""
        if self.A is None:
            return
        dA, self.QA = symmetric_eigh(self.A)
        dG, self.QG = symmetric_eigh(self.G)
        self.dA, self.dG = dA.clamp_min(0), dG.clamp_min(0)
        self._denominator = None

    def precondition(self, v: Tensor, damping: float, mode: str = "eigenbasis") -> Tensor:
        """(G (x) A + damping)^-1 applied to the (d_out, d_in [+1]) matrix v, per ``mode`` (module docstring)."""
        rotated = self.QG.T @ v @ self.QA
        return self.QG @ rotated.div_(self.denominator(damping, mode)) @ self.QA.T

    def denominator(self, damping: float, mode: str) -> Tensor:
        """The eigenvalues of the damped block (d_out, d_in [+1]), per ``mode``; kept until the next decomposition."""
        key = (damping, mode)
        if self._denominator is None or self._denominator[0] != key:
            if mode == "eigenbasis":
                d = torch.outer(self.dG, self.dA).add_(damping)
            else:
                pi = factored_pi(self.dA, self.dG)
                root = math.sqrt(damping)
                d = torch.outer(self.dG + root / pi, self.dA + pi * root)
            self._denominator = (key, d)
        return self._denominator[1]

    def state_dict(self) -> dict[str, Any]:
        return {k: None if getattr(self, k) is None else getattr(self, k).clone() for k in STATE_KEYS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in STATE_KEYS:
            setattr(self, k, None if state[k] is None else state[k].clone())
        self._denominator = None


def factored_pi(d_a: Tensor, d_g: Tensor) -> Tensor:
    """pi = sqrt((tr A / dim A) / (tr G / dim G)) from the eigenvalues; 1 when either trace is 0 (0-dim tensor)."""
    mean_a, mean_g = d_a.mean(), d_g.mean()
    ok = (mean_a > 0) & (mean_g > 0)
    ratio = torch.where(ok, mean_a / torch.where(ok, mean_g, torch.ones_like(mean_g)), torch.ones_like(mean_a))
    return ratio.sqrt()


def symmetric_eigh(m: Tensor) -> tuple[Tensor, Tensor]:
    """torch.linalg.eigh, redone in float64 where LAPACK's float32 divide-and-conquer fails on a finite matrix.

    A factor with many (numerically) repeated eigenvalues, e.g. the input factor of a convolution whose zero padding
    and constant borders make most patch coordinates equal (seed 003's CIFAR CNN on the 8 x 8 digits: A is 801 x 801
    of rank ~60), can make ``syevd`` in float32 either stop with "failed to converge" or return NaN eigenvectors
    without a word (both measured with torch 2.14.1 on the CPU); the same matrix in float64 decomposes. The result
    is cast back to the factor's dtype, so only a failing factor pays for the float64 solve (one host sync per
    decomposition checks the result)."""
    try:
        d, q = torch.linalg.eigh(m)
        if bool(torch.isfinite(q).all() & torch.isfinite(d).all()):  # one host sync
            return d, q
    except torch.linalg.LinAlgError:
        pass
    if not bool(torch.isfinite(m).all()):
        raise FloatingPointError("K-FAC: a Kronecker factor holds inf or nan values; the run has diverged.")
    d, q = torch.linalg.eigh(m.double())
    return d.to(m.dtype), q.to(m.dtype)
