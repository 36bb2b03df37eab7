"""Losses with closed-form output Hessians H_L, used by the Gauss-Newton products.

Every loss is a batch mean, so the gradient g_f = dL/df and H_L both carry the 1/B factor (reference/algorithms.md,
CurveBall step 3). ``hessian_vp`` is H_L u for an output-shaped u; ``hessian_blocks`` gives the explicit per-sample
blocks (B, o, o), used for explicit GGN matrices and in tests.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


class Loss:
    """A scalar batch-mean loss L(f, y) of network outputs f (B, o) and targets y."""

    name = "loss"

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        raise NotImplementedError

    def output_grad(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """g_f = dL/df, shape of ``outputs``."""
        f = outputs.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self(f, targets), f)
        return g

    def hessian_vp(self, outputs: Tensor, targets: Tensor, u: Tensor) -> Tensor:
        """H_L u, with H_L = d^2 L / df^2 (block diagonal over samples)."""
        f = outputs.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self(f, targets), f, create_graph=True)
            (hu,) = torch.autograd.grad(g, f, u)
        return hu

    def hessian_blocks(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Explicit per-sample blocks of H_L, shape (B, o, o)."""
        b, o = outputs.shape
        eye = torch.eye(o, dtype=outputs.dtype, device=outputs.device)
        cols = [self.hessian_vp(outputs, targets, eye[k].expand(b, o)) for k in range(o)]
        return torch.stack(cols, dim=2)


class CrossEntropy(Loss):
    """Softmax cross-entropy on logits; H_L = (diag(p) - p p^T) / B per sample (Martens 2010; seed 003 sec. 2.3)."""

    name = "cross_entropy"

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs, targets)

    def output_grad(self, outputs: Tensor, targets: Tensor) -> Tensor:
        p = torch.softmax(outputs.detach(), dim=1)
        p[torch.arange(p.shape[0], device=p.device), targets] -= 1.0
        return p / outputs.shape[0]

    def hessian_vp(self, outputs: Tensor, targets: Tensor, u: Tensor) -> Tensor:
        p = torch.softmax(outputs.detach(), dim=1)
        return (p * u - p * (p * u).sum(dim=1, keepdim=True)) / outputs.shape[0]

    def hessian_blocks(self, outputs: Tensor, targets: Tensor) -> Tensor:
        p = torch.softmax(outputs.detach(), dim=1)
        return (torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)) / outputs.shape[0]


class SquaredError(Loss):
    """Squared error, mean over the batch and mean ("mse", as torch's MSELoss) or sum ("sse") over outputs.

    L = (1 / (B s)) sum_b |f_b - y_b|^2 with s = o (mean) or 1 (sum), so H_L = 2 I / (B s).
    """

    def __init__(self, over_outputs: str = "mean"):
        if over_outputs not in ("mean", "sum"):
            raise ValueError(f"SquaredError over_outputs must be 'mean' or 'sum', got {over_outputs!r}")
        self.over_outputs = over_outputs
        self.name = "mse" if over_outputs == "mean" else "sse"

    def _scale(self, outputs: Tensor) -> float:
        b, o = outputs.shape
        return 1.0 / (b * (o if self.over_outputs == "mean" else 1))

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return (outputs - targets.view_as(outputs)).pow(2).sum() * self._scale(outputs)

    def output_grad(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return 2.0 * self._scale(outputs) * (outputs.detach() - targets.view_as(outputs))

    def hessian_vp(self, outputs: Tensor, targets: Tensor, u: Tensor) -> Tensor:
        return 2.0 * self._scale(outputs) * u

    def hessian_blocks(self, outputs: Tensor, targets: Tensor) -> Tensor:
        b, o = outputs.shape
        eye = torch.eye(o, dtype=outputs.dtype, device=outputs.device)
        return (2.0 * self._scale(outputs)) * eye.expand(b, o, o).clone()


class AutogradLoss(Loss):
    """Any other differentiable batch-mean loss: H_L products by autograd (the base-class defaults)."""

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor], name: str = "custom"):
        self.fn, self.name = fn, name

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return self.fn(outputs, targets)


LOSSES: dict[str, Callable[[], Loss]] = {
    "cross_entropy": CrossEntropy,
    "mse": lambda: SquaredError("mean"),
    "sse": lambda: SquaredError("sum"),
}


def get_loss(name: str | Loss | Callable) -> Loss:
    """A Loss by name (cross_entropy | mse | sse), a Loss as is, or any callable wrapped with autograd H_L."""
    if isinstance(name, Loss):
        return name
    if callable(name):
        return AutogradLoss(name, getattr(name, "__name__", "custom"))
    if name not in LOSSES:
        raise ValueError(f"Unknown loss {name!r}: the dataset's `loss` must be one of {sorted(LOSSES)}.")
    return LOSSES[name]()
