"""Weight decay as one wrapper around an Objective, used by every method.

    F(w) = L(w) + eta/2 |w|^2,   grad F = grad L + eta w,   curvature of F = C + eta I,

where C is the Gauss-Newton matrix or the Hessian of L (both gain eta I: the regulariser is quadratic, so its GGN is
its Hessian; Martens 2010 sec. 4.3 uses the same penalty with eta = 2e-5 in his demo code). ``WeightDecayed`` presents
the Objective's interface with these terms added to everything a method reads in parameter space: the loss, the
gradient, curvature products, the explicit Hessian and trial losses. Output-space quantities (J v, J^T u, H_L u) are
the data loss's and pass through unchanged; a method that builds its step from them (CurveBall) adds ``l2`` to its
damping and ``l2_gradient()`` to its gradient.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from optimizers.interface import Curvature, ObjectiveLike
from optimizers.losses import Loss
from optimizers.vec import params_vector


class WeightDecayed:
    """F = L + eta/2 |w|^2 around ``objective`` (implements ``ObjectiveLike``; every member written out)."""

    def __init__(self, objective: ObjectiveLike, eta: float):
        self.inner, self.l2 = objective, float(eta)
        self._data_loss: Tensor | None = None

    def _w(self) -> Tensor:
        return params_vector(self.inner.params)  # the parameters as they are now

    def penalty(self, delta: Tensor | None = None) -> Tensor:
        """eta/2 |w + delta|^2."""
        w = self._w() if delta is None else self._w() + delta
        return 0.5 * self.l2 * w.dot(w)

    def data_loss_at_start(self) -> Tensor:
        """L at the step's starting point (what the runner logs as ``loss``)."""
        return self._data_loss if self._data_loss is not None else self.inner.loss()

    # ---------------------------------------------------------------- the batch and the network: the objective's
    @property
    def model(self) -> nn.Module:
        return self.inner.model

    @property
    def loss_fn(self) -> Loss:
        return self.inner.loss_fn

    @property
    def inputs(self) -> Tensor:
        return self.inner.inputs

    @property
    def targets(self) -> Tensor:
        return self.inner.targets

    @property
    def params(self) -> Sequence[Tensor]:
        return self.inner.params

    @property
    def numel(self) -> int:
        return self.inner.numel

    @property
    def curvature_batch_size(self) -> int | None:
        return self.inner.curvature_batch_size

    @property
    def micro_batch_size(self) -> int | None:
        return self.inner.micro_batch_size

    def set_curvature_batch_size(self, size: int) -> None:
        self.inner.set_curvature_batch_size(size)

    # ---------------------------------------------------------------- loss and gradient: F's
    def loss(self) -> Tensor:
        self._data_loss = self.inner.loss()
        return self._data_loss + self.penalty()

    def gradient(self, curvature: Curvature | None = None) -> Tensor:
        return self.inner.gradient(curvature) + self.l2_gradient()

    def backward(self) -> Tensor:
        """First-order path: p.grad = grad L + eta p; returns F."""
        self._data_loss = self.inner.backward()
        with torch.no_grad():
            for p in self.inner.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.add_(p, alpha=self.l2)
        return self._data_loss + self.penalty()

    def l2_gradient(self) -> Tensor:
        return self.l2 * self._w()

    def loss_at(self, delta: Tensor) -> Tensor:
        return self.inner.loss_at(delta) + self.penalty(delta)

    def loss_and_gradient_at(self, delta: Tensor | None = None) -> tuple[Tensor, Tensor]:
        loss, grad = self.inner.loss_and_gradient_at(delta)
        w = self._w() if delta is None else self._w() + delta
        return loss + 0.5 * self.l2 * w.dot(w), grad + self.l2 * w

    def apply(self, delta: Tensor, alpha: float = 1.0) -> None:
        self.inner.apply(delta, alpha)

    # ---------------------------------------------------------------- parameter-space curvature: F's (+ eta I)
    def curvature_vp(self, v: Tensor, curvature: Curvature = "ggn") -> Tensor:
        return self.inner.curvature_vp(v, curvature) + self.l2 * v

    def ggn_vp(self, v: Tensor) -> Tensor:
        return self.inner.ggn_vp(v) + self.l2 * v

    def hvp(self, v: Tensor) -> Tensor:
        return self.inner.hvp(v) + self.l2 * v

    def hessian_matrix(self) -> Tensor:
        h = self.inner.hessian_matrix()
        return h + self.l2 * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)

    def per_sample_grad_sq_mean(self) -> Tensor:
        """The data loss's (Martens' preconditioner adds the damping, eta included, itself)."""
        return self.inner.per_sample_grad_sq_mean()

    # ---------------------------------------------------------------- output space: the data loss's
    def outputs(self) -> Tensor:
        return self.inner.outputs()

    def output_grad(self) -> Tensor:
        return self.inner.output_grad()

    def curvature_output_grad(self) -> Tensor:
        return self.inner.curvature_output_grad()

    def loss_hessian_vp(self, u: Tensor) -> Tensor:
        return self.inner.loss_hessian_vp(u)

    def jvp(self, v: Tensor, backend: str | None = None) -> Tensor:
        return self.inner.jvp(v, backend)

    def vjp(self, w: Tensor, keep_for_jvp: bool = False) -> Tensor:
        return self.inner.vjp(w, keep_for_jvp)

    def forward_with_jvp(self, v: Tensor) -> Tensor:
        return self.inner.forward_with_jvp(v)

    # ---------------------------------------------------------------- data parallelism and statistics
    def reduce(self, t: Tensor) -> Tensor:
        return self.inner.reduce(t)

    def stats(self) -> dict[str, float]:
        return self.inner.stats()
