"""Stochastic trace and diagonal estimates from products alone.

* ``hutchinson_trace``: tr(A) ~ (1/N) sum_i v_i^T A v_i for i.i.d. probes with E[v v^T] = I (Hutchinson 1989,
  "A stochastic estimator of the trace of the influence matrix for Laplacian smoothing splines"; Girard 1989).
  Rademacher probes give the smallest variance, 2 (||A||_F^2 - sum_i A_ii^2) / N, so the error falls as 1/sqrt(N).
* ``hutchinson_diagonal``: diag(A) ~ (1/N) sum_i v_i * (A v_i) (Bekas, Kokiopoulou, Saad 2007, "An estimator for
  the diagonal of a matrix"), as in AdaHessian and PyHessian.
* ``hutchpp_trace``: Hutch++ (Meyer, Musco, Musco, Woodruff 2021, "Hutch++: Optimal stochastic trace estimation",
  Algorithm 1): with m products, the trace of A on the range Q of A S (S: n x m/3 random) exactly, and Hutchinson
  with m/3 probes on the rest, (I - Q Q^T) A (I - Q Q^T). Error O(1/m) instead of O(1/sqrt(m)) when the spectrum
  is dominated by a few large eigenvalues, as neural-network Hessians are (Ghorbani, Krishnan, Xiao 2019).

All products are counted in the record's ``cost``; probes come from a private generator seeded with ``seed``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from optimizers.diagnostics import probes
from optimizers.diagnostics.operators import Source, as_operator
from optimizers.diagnostics.results import Cost, Meter, Record, cost_scalars
from optimizers.interface import Curvature


@dataclass
class TraceEstimate(Record):
    """A trace estimate with its standard error (Hutchinson: sample std / sqrt(N) of the stochastic part)."""

    trace: float
    stderr: float
    method: str          # "hutchinson" or "hutch++"
    curvature: str
    num_products: int
    samples: Tensor      # (N,) the stochastic part's v^T A v values
    cost: Cost

    def scalars(self) -> dict[str, float]:
        p = f"{self.curvature}_trace"
        return {p: self.trace, f"{p}_stderr": self.stderr, **cost_scalars(p, self.cost)}


@dataclass
class DiagonalEstimate(Record):
    """A diagonal estimate (n,) and the implied trace estimate."""

    diagonal: Tensor     # (n,) the operator's dtype and device
    curvature: str
    num_probes: int
    cost: Cost

    VECTORS = ("diagonal",)

    def scalars(self) -> dict[str, float]:
        p = f"{self.curvature}_diagonal"
        return {f"{p}_sum": float(self.diagonal.sum()), f"{p}_max": float(self.diagonal.max()),
                f"{p}_min": float(self.diagonal.min()), **cost_scalars(p, self.cost)}


def _check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}.")


def _stderr(samples: Tensor) -> float:
    return float(samples.std() / math.sqrt(samples.numel())) if samples.numel() > 1 else float("nan")


def hutchinson_trace(source: Source, num_probes: int = 100, curvature: Curvature = "hessian", seed: int = 0,
                     distribution: str = "rademacher") -> TraceEstimate:
    """Hutchinson's estimate of tr(H) or tr(G) from ``num_probes`` products."""
    _check_count("num_probes", num_probes, 1)
    op = as_operator(source, curvature)
    meter, gen = Meter(op.device, op), probes.generator(seed)
    samples = torch.empty(num_probes, dtype=torch.float64)
    for i in range(num_probes):
        v = probes.draw(op.numel, gen, op.dtype, op.device, distribution)
        samples[i] = float(torch.dot(v, op.matvec(v)))
    return TraceEstimate(float(samples.mean()), _stderr(samples), "hutchinson", getattr(op, "curvature", "matrix"),
                         num_probes, samples, meter.cost(op))


def hutchinson_diagonal(source: Source, num_probes: int = 100, curvature: Curvature = "hessian", seed: int = 0
                        ) -> DiagonalEstimate:
    """Bekas et al. 2007: diag(A) ~ mean of v * (A v) over Rademacher probes v."""
    _check_count("num_probes", num_probes, 1)
    op = as_operator(source, curvature)
    meter, gen = Meter(op.device, op), probes.generator(seed)
    total = torch.zeros(op.numel, dtype=op.dtype, device=op.device)
    for _ in range(num_probes):
        v = probes.draw(op.numel, gen, op.dtype, op.device, "rademacher")
        total += v * op.matvec(v)
    return DiagonalEstimate(total / num_probes, getattr(op, "curvature", "matrix"), num_probes, meter.cost(op))


def hutchpp_trace(source: Source, num_products: int = 99, curvature: Curvature = "hessian", seed: int = 0
                  ) -> TraceEstimate:
    """Hutch++ (Meyer et al. 2021, Algorithm 1) with exactly ``num_products`` products: a sketch of about a third of
    them, as many to apply A to its basis, and the rest as Hutchinson probes. Memory: two sketches of n-vectors."""
    _check_count("num_products", num_products, 3)
    op = as_operator(source, curvature)
    meter, gen = Meter(op.device, op), probes.generator(seed)
    sketch = (num_products - num_products // 3) // 2
    m = num_products - 2 * sketch                                                       # Hutchinson probes
    s = probes.draw((sketch, op.numel), gen, op.dtype, op.device, "rademacher")       # S^T (sketch, n)
    q, _ = torch.linalg.qr(torch.stack([op.matvec(row) for row in s]).T)            # Q (n, sketch)
    low_rank = sum(float(torch.dot(q[:, j], op.matvec(q[:, j].contiguous()))) for j in range(q.shape[1]))
    samples = torch.empty(m, dtype=torch.float64)
    for i in range(m):
        g = probes.draw(op.numel, gen, op.dtype, op.device, "rademacher")
        g = g - q @ (q.T @ g)                                                          # (I - Q Q^T) g
        samples[i] = float(torch.dot(g, op.matvec(g)))
    return TraceEstimate(low_rank + float(samples.mean()), _stderr(samples), "hutch++",
                         getattr(op, "curvature", "matrix"), num_products, samples, meter.cost(op))
