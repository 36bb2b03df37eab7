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

from typing import Any

import torch
from torch import Tensor

from optimizers.vec import params_vector


class WeightDecayed:
    """F = L + eta/2 |w|^2 around ``objective`` (any attribute not overridden here is the objective's own)."""

    def __init__(self, objective: Any, eta: float):
        self.inner, self.l2 = objective, float(eta)
        self._data_loss: Tensor | None = None

    def __getattr__(self, name: str) -> Any:  # model, params, jvp, vjp, stats, apply, reduce, ...
        return getattr(self.inner, name)

    def _w(self) -> Tensor:
        return params_vector(self.inner.params)  # the parameters as they are now

    def penalty(self, delta: Tensor | None = None) -> Tensor:
        """eta/2 |w + delta|^2."""
        w = self._w() if delta is None else self._w() + delta
        return 0.5 * self.l2 * w.dot(w)

    def l2_gradient(self) -> Tensor:
        return self.l2 * self._w()

    def loss(self) -> Tensor:
        self._data_loss = self.inner.loss()
        return self._data_loss + self.penalty()

    def data_loss_at_start(self) -> Tensor:
        """L at the step's starting point (what the runner logs as ``loss``)."""
        return self._data_loss if self._data_loss is not None else self.inner.loss()

    def backward(self) -> Tensor:
        """First-order path: p.grad = grad L + eta p; returns F."""
        self._data_loss = self.inner.backward()
        with torch.no_grad():
            for p in self.inner.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.add_(p, alpha=self.l2)
        return self._data_loss + self.penalty()

    def gradient(self, curvature: str | None = None) -> Tensor:
        return self.inner.gradient(curvature) + self.l2_gradient()

    def ggn_vp(self, v: Tensor) -> Tensor:
        return self.inner.ggn_vp(v) + self.l2 * v

    def hvp(self, v: Tensor) -> Tensor:
        return self.inner.hvp(v) + self.l2 * v

    def curvature_vp(self, v: Tensor, curvature: str = "ggn") -> Tensor:
        return self.inner.curvature_vp(v, curvature) + self.l2 * v

    def hessian_matrix(self) -> Tensor:
        h = self.inner.hessian_matrix()
        return h + self.l2 * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)

    def loss_at(self, delta: Tensor) -> Tensor:
        return self.inner.loss_at(delta) + self.penalty(delta)

    def loss_and_gradient_at(self, delta: Tensor | None = None) -> tuple[Tensor, Tensor]:
        loss, grad = self.inner.loss_and_gradient_at(delta)
        w = self._w() if delta is None else self._w() + delta
        return loss + 0.5 * self.l2 * w.dot(w), grad + self.l2 * w
