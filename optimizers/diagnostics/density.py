"""Spectral density of the Hessian or GGN by stochastic Lanczos quadrature (SLQ).

For a unit probe v, m Lanczos steps give T_m = S diag(theta) S^T, and the Gauss quadrature
    v^T f(A) v  ~  sum_j tau_j f(theta_j),   tau_j = S[0, j]^2,
exact for polynomials f of degree < 2m (Golub & Meurant 2010, "Matrices, Moments and Quadrature with Applications").
Averaging the discrete measures sum_j tau_j delta(t - theta_j) over probes estimates the spectral density
phi(t) = (1/n) sum_i delta(t - lambda_i) (Lin, Saad, Yang 2016, "Approximating spectral densities of large matrices",
sec. 3; Ghorbani, Krishnan, Xiao 2019, "An investigation into neural net optimization via Hessian eigenvalue
density", sec. 2). Its moments estimate tr(A^k) / n; smoothing with a Gaussian kernel gives a plottable density
(Ghorbani et al. eq. 4).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from optimizers.diagnostics import probes
from optimizers.diagnostics.lanczos import lanczos
from optimizers.diagnostics.operators import Source, as_operator
from optimizers.diagnostics.results import Cost, Meter, Record, cost_scalars
from optimizers.interface import Curvature


@dataclass
class SpectralDensity(Record):
    """Per probe, the quadrature nodes (Ritz values) and weights; each probe's weights sum to 1."""

    nodes: Tensor       # (probes, m) float64
    weights: Tensor     # (probes, m) float64
    numel: int
    curvature: str
    num_steps: int
    cost: Cost

    def moment(self, k: int) -> float:
        """Estimate of tr(A^k) / n."""
        return float((self.weights * self.nodes.pow(k)).sum(1).mean())

    def histogram(self, bins: int = 50, bounds: tuple[float, float] | None = None) -> tuple[Tensor, Tensor]:
        """(edges (bins + 1,), mass per bin (bins,)): the share of eigenvalues in each bin; masses sum to 1."""
        lo, hi = bounds if bounds is not None else (float(self.nodes.min()), float(self.nodes.max()))
        hi = hi if hi > lo else lo + 1.0
        edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
        index = torch.bucketize(self.nodes.reshape(-1), edges[1:-1])
        mass = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, self.weights.reshape(-1))
        return edges, mass / self.nodes.shape[0]

    def density(self, num_points: int = 1000, sigma: float | None = None) -> tuple[Tensor, Tensor]:
        """(grid, phi(grid)): the Gaussian-smoothed density (Ghorbani et al. 2019, eq. 4), integrating to 1 over the
        grid. ``sigma`` defaults to 1 % of the spectral range; the grid extends 5 sigma beyond it."""
        lo, hi = float(self.nodes.min()), float(self.nodes.max())
        sigma = sigma if sigma is not None else max(0.01 * (hi - lo), 1e-12 * max(abs(lo), abs(hi), 1.0))
        grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, num_points, dtype=torch.float64)
        kernel = torch.exp(-0.5 * ((grid[:, None] - self.nodes.reshape(1, -1)) / sigma) ** 2)
        phi = kernel @ self.weights.reshape(-1) / (self.nodes.shape[0] * sigma * math.sqrt(2 * math.pi))
        return grid, phi

    def scalars(self) -> dict[str, float]:
        p = f"{self.curvature}_slq"
        return {f"{p}_trace": self.numel * self.moment(1), f"{p}_min": float(self.nodes.min()),
                f"{p}_max": float(self.nodes.max()), **cost_scalars(p, self.cost)}


def spectral_density(source: Source, num_probes: int = 10, num_steps: int = 50, curvature: Curvature = "hessian",
                     seed: int = 0) -> SpectralDensity:
    """SLQ with ``num_probes`` Rademacher probes of ``num_steps`` Lanczos steps each (full reorthogonalisation);
    cost num_probes * num_steps products (fewer if a probe's Krylov space closes early)."""
    for name, value in (("num_probes", num_probes), ("num_steps", num_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer.")
    op = as_operator(source, curvature)
    meter, gen = Meter(op.device, op), probes.generator(seed)
    steps = min(num_steps, op.numel)
    nodes = torch.zeros(num_probes, steps, dtype=torch.float64)
    weights = torch.zeros(num_probes, steps, dtype=torch.float64)
    for i in range(num_probes):
        start = probes.draw(op.numel, gen, op.dtype, op.device, "rademacher")
        krylov = lanczos(op, start, steps, gen, wanted=lambda k: k.betas[-1] == 0.0)   # stop at invariance
        theta, s, _ = krylov.ritz()
        nodes[i] = theta[0]   # a probe whose Krylov space closed early pads with zero-weight copies of a real node
        nodes[i, :theta.numel()], weights[i, :theta.numel()] = theta, s[0].pow(2)
    return SpectralDensity(nodes, weights, op.numel, getattr(op, "curvature", "matrix"), steps, meter.cost(op))
