"""What an objective must provide: the interface every method's ``update(objective)`` is typed against.

Three classes implement it, each member written out (tests/test_interface.py checks every member of each against
the plain Objective in float64):

* ``optimizers.objective.Objective``: the loss of a model on one batch, its gradient and curvature products;
* ``optimizers.weight_decay.WeightDecayed``: F = L + eta/2 |w|^2 around any of them (what the base class hands a
  method when ``weight_decay > 0``);
* ``optimizers.micro_batch.MicroBatchedObjective``: one batch computed in micro-batches.

Vectors in parameter space are flat (P,) tensors in ``params`` order (optimizers.vec); output-space ones are shaped
like the network's outputs f (B, o). Every quantity is the global batch mean (``reduce`` is the one all-reduce of a
data-parallel run) unless marked "local". The curvature kind is a checked literal: ``checked_curvature``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol, get_args, runtime_checkable

from torch import Tensor, nn

from optimizers.losses import Loss
from validation import checks

Curvature = Literal["ggn", "hessian"]  # the Gauss-Newton matrix G = J^T H_L J, or the Hessian H of the loss
CURVATURES: tuple[Curvature, ...] = get_args(Curvature)


def checked_curvature(curvature: str) -> Curvature:
    """``curvature`` when it names a curvature; else an OptionError naming the valid choices."""
    return checks.one_of(*CURVATURES)("curvature", curvature)


@runtime_checkable
class ObjectiveLike(Protocol):
    """The loss of a model on one batch, with its gradient and curvature products (members grouped by use)."""

    # ---------------------------------------------------------------- the batch and the network
    @property
    def model(self) -> nn.Module: ...  # forward hooks (K-FAC), layer types (CurveBall's damping and J dz rule)

    @property
    def loss_fn(self) -> Loss: ...

    @property
    def inputs(self) -> Tensor: ...  # (B, ...): this rank's shard of the batch

    @property
    def targets(self) -> Tensor: ...

    @property
    def params(self) -> Sequence[Tensor]: ...  # the trainable parameters, the layout of flat vectors

    @property
    def numel(self) -> int: ...  # P

    @property
    def curvature_batch_size(self) -> int | None: ...  # None: products on the whole batch

    @property
    def micro_batch_size(self) -> int | None: ...  # None: one forward pass over the whole batch

    def set_curvature_batch_size(self, size: int) -> None: ...  # a method's curvature sub-batch, before any product

    @property
    def l2(self) -> float: ...  # eta of the weight decay in this objective (0: none)

    # ---------------------------------------------------------------- loss and gradient
    def loss(self) -> Tensor: ...  # 0-dim, detached

    def gradient(self, curvature: Curvature | None = None) -> Tensor: ...  # (P,); announces products of curvature

    def backward(self) -> Tensor: ...  # first-order path: p.grad = the gradient; returns the loss

    def l2_gradient(self) -> Tensor | None: ...  # eta w (None: no weight decay)

    def loss_at(self, delta: Tensor) -> Tensor: ...  # L(w + delta), same batch and dropout masks

    def loss_and_gradient_at(self, delta: Tensor | None = None) -> tuple[Tensor, Tensor]: ...

    def apply(self, delta: Tensor, alpha: float = 1.0) -> None: ...  # w <- w + alpha delta in place

    # ---------------------------------------------------------------- parameter-space curvature
    def curvature_vp(self, v: Tensor, curvature: Curvature = "ggn") -> Tensor: ...  # C v, C = G or H

    def ggn_vp(self, v: Tensor) -> Tensor: ...

    def hvp(self, v: Tensor) -> Tensor: ...

    def hessian_matrix(self) -> Tensor: ...  # (P, P), small models

    def per_sample_grad_sq_mean(self) -> Tensor: ...  # (P,): mean of squared per-sample gradients (of L)

    # ---------------------------------------------------------------- output space (of the data loss L)
    def outputs(self) -> Tensor: ...  # f (B, o), local

    def output_grad(self) -> Tensor: ...  # dL/df (B, o), local

    def curvature_output_grad(self) -> Tensor: ...  # dL/df on the curvature batch, local

    def loss_hessian_vp(self, u: Tensor) -> Tensor: ...  # H_L u on the curvature batch, local

    def jvp(self, v: Tensor, backend: str | None = None) -> Tensor: ...  # J v (B, o), local

    def vjp(self, w: Tensor, keep_for_jvp: bool = False) -> Tensor: ...  # J^T w (P,)

    def forward_with_jvp(self, v: Tensor) -> Tensor: ...  # J v computed by the batch's forward pass itself

    # ---------------------------------------------------------------- data parallelism and statistics
    def reduce(self, t: Tensor) -> Tensor: ...  # the global batch mean of a local batch-mean quantity

    def stats(self) -> dict[str, float]: ...  # products, their time, all-reduces: merged into a step's statistics
