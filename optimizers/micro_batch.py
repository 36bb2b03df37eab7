"""One objective on a batch too large for the device, computed in micro-batches.

The batch-mean loss is additive over a partition of the batch (seed 000, Def. 9.1, "batch-wise additive"):
L = sum_i (b_i / B) L_i for micro-batches of sizes b_i. Everything a method reads in parameter space is linear in the
per-sample losses, so the gradient, every curvature product, trial losses, the per-sample statistics and the explicit
Hessian are the (b_i / B)-weighted sums of the micro-batches' own ``Objective`` quantities, all-reduced once across
data-parallel ranks. Output-space quantities are concatenated over the micro-batches: J v as is, and g_f and H_L u
scaled by b_i / B (they carry the batch mean's 1/B). A method therefore takes exactly the step it would take on the
whole batch, for networks without batch normalisation (batch norm normalises each micro-batch with its own statistics,
as in ordinary gradient accumulation).

Only one micro-batch's graph is alive at a time: a piece's caches are released after every use and rebuilt when
needed again (same dropout masks, running statistics untouched). Memory then scales with ``micro_batch_size``; the
price is a forward pass (and the Jacobian backend's set-up) per micro-batch per product, so prefer the
``forward_ad`` backend, which has no set-up.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from validation import checks
from optimizers.interface import Curvature, checked_curvature
from optimizers.losses import Loss
from optimizers.objective import Objective, _distributed, weighted_all_reduce
from optimizers.vec import add_to_params, flatten, unflatten


class MicroBatchedObjective:
    """The objective's interface (``ObjectiveLike``) on ``inputs`` split into pieces of ``micro_batch_size`` samples."""

    l2 = 0.0
    curvature_batch_size = None

    def __init__(self, model: nn.Module, loss_fn: Loss | str, inputs: Tensor, targets: Tensor, *,
                 micro_batch_size: int, global_batch_size: int | None = None, **options: Any):
        size = checks.positive_int("objective.micro_batch_size", micro_batch_size)
        if options.get("curvature_batch_size") is not None:
            raise checks.OptionError("objective.curvature_batch_size cannot be combined with "
                                     "objective.micro_batch_size (set one of them to null).")
        self.micro_batch_size = size
        self.model, self.inputs, self.targets = model, inputs, targets
        self.parts = [Objective(model, loss_fn, x, y, **options) for x, y in zip(inputs.split(size), targets.split(size))]
        for part in self.parts:
            part.local = True  # the pieces never all-reduce: their weighted sum is reduced once
        self.weights = [part.inputs.shape[0] / inputs.shape[0] for part in self.parts]
        whole = Objective(model, loss_fn, inputs[:1], targets[:1], global_batch_size=global_batch_size, **options)
        self.share = inputs.shape[0] / (global_batch_size or inputs.shape[0] * (_world()))
        self.loss_fn, self.params, self.names, self.numel = whole.loss_fn, whole.params, whole.names, whole.numel
        self.jacobian_backend = whole.jacobian_backend
        self.comm = {"calls": 0, "bytes": 0, "seconds": 0.0}
        self._cache: dict[str, Tensor] = {}
        self._versions: tuple[int, ...] | None = None

    def set_curvature_batch_size(self, size: int) -> None:
        """A curvature sub-batch is not supported with micro-batches (as ``objective.curvature_batch_size``)."""
        raise checks.OptionError(
            f"a curvature mini-batch of {size} samples (the optimizer's curvature_fraction) cannot be combined with "
            "objective.micro_batch_size: set optimizer.curvature_fraction=1 or objective.micro_batch_size=null.")

    # ------------------------------------------------------------------ the pieces
    def _each(self, fn: Callable[[Objective], Any]) -> Iterator[Any]:
        """fn(piece) for every micro-batch, releasing each piece's graph before the next one is built."""
        for part in self.parts:
            try:
                yield fn(part)
            finally:
                part.release()

    def _sum(self, fn: Callable[[Objective], Tensor]) -> Tensor:
        """reduce(sum_i (b_i / B) fn(piece_i)): a parameter-space quantity of the whole batch."""
        return self.reduce(sum(w * r for w, r in zip(self.weights, self._each(fn))))

    def _sum_pair(self, fn: Callable[[Objective], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """(reduce(sum_i w_i l_i), reduce(sum_i w_i g_i)) for fn(piece_i) = (l_i, g_i), a loss and a parameter-space
        vector, accumulated piece by piece: one partial sum is alive, not one vector per piece (same order, so the
        same bits, as summing a list)."""
        loss, vector = 0, 0
        for w, (l, g) in zip(self.weights, self._each(fn)):
            loss, vector = loss + w * l, vector + w * g
        return self.reduce(loss), self.reduce(vector)

    def _cached(self, key: str, compute: Callable[[], Tensor]) -> Tensor:
        versions = tuple(p._version for p in self.params)
        if versions != self._versions:
            self._cache, self._versions = {}, versions
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def reduce(self, t: Tensor) -> Tensor:
        return weighted_all_reduce(t, self.share, self.comm) if _distributed() else t

    # ------------------------------------------------------------------ loss and gradient
    def loss(self) -> Tensor:
        return self._cached("loss", lambda: self._sum(lambda p: p.loss()))

    def gradient(self, curvature: Curvature | None = None) -> Tensor:
        """The gradient (the loss comes from the same pieces' forward passes and is cached too)."""
        if curvature is not None:
            checked_curvature(curvature)
        def piece(part: Objective) -> tuple[Tensor, Tensor]:
            gradient = part.gradient(curvature)  # first: it may run the forward pass its products need
            return part.loss(), gradient

        def compute() -> Tensor:
            self._cache["loss"], gradient = self._sum_pair(piece)
            return gradient

        return self._cached("gradient", compute)

    def backward(self) -> Tensor:
        """p.grad = the whole batch's gradient (each piece's backward scaled by b_i / B; one flat all-reduce)."""
        losses = list(self._each(lambda p: p.backward(scale=self.weights[self.parts.index(p)])))
        if _distributed():
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            for p, g in zip(self.params, unflatten(self.reduce(flatten(grads)), self.params)):
                p.grad = g
        return self.reduce(sum(w * l for w, l in zip(self.weights, losses)))

    def l2_gradient(self) -> None:
        return None

    # ------------------------------------------------------------------ parameter-space products
    def ggn_vp(self, v: Tensor) -> Tensor:
        return self._sum(lambda p: p.ggn_vp(v))

    def hvp(self, v: Tensor) -> Tensor:
        return self._sum(lambda p: p.hvp(v))

    def curvature_vp(self, v: Tensor, curvature: Curvature = "ggn") -> Tensor:
        return self.ggn_vp(v) if checked_curvature(curvature) == "ggn" else self.hvp(v)

    def loss_at(self, delta: Tensor) -> Tensor:
        return self._sum(lambda p: p.loss_at(delta))

    def loss_and_gradient_at(self, delta: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._sum_pair(lambda p: p.loss_and_gradient_at(delta))

    def per_sample_grad_sq_mean(self) -> Tensor:
        return self._sum(lambda p: p.per_sample_grad_sq_mean())

    def hessian_matrix(self) -> Tensor:
        return self._sum(lambda p: p.hessian_matrix())

    # ------------------------------------------------------------------ output space: concatenated
    def _cat(self, fn: Callable[[Objective], Tensor], scaled: bool = False) -> Tensor:
        parts = list(self._each(fn))
        return torch.cat([w * t for w, t in zip(self.weights, parts)] if scaled else parts)

    def outputs(self) -> Tensor:
        return self._cat(lambda p: p.outputs())

    def output_grad(self) -> Tensor:
        return self._cat(lambda p: p.output_grad(), scaled=True)

    curvature_output_grad = output_grad

    def loss_hessian_vp(self, u: Tensor) -> Tensor:
        pieces = u.split(self.micro_batch_size)
        return torch.cat([w * p.loss_hessian_vp(ui) for w, p, ui in zip(self.weights, self.parts, pieces)])

    def jvp(self, v: Tensor, backend: str | None = None) -> Tensor:
        return self._cat(lambda p: p.jvp(v, backend))

    def forward_with_jvp(self, v: Tensor) -> Tensor:
        return self.jvp(v)

    def vjp(self, w: Tensor, keep_for_jvp: bool = False) -> Tensor:
        pieces = dict(zip(map(id, self.parts), w.split(self.micro_batch_size)))
        return self.reduce(sum(self._each(lambda p: p.vjp(pieces[id(p)]))))

    # ------------------------------------------------------------------ updates and statistics
    def apply(self, delta: Tensor, alpha: float = 1.0) -> None:
        add_to_params(self.params, delta, alpha)
        self._cache = {}

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for part in self.parts:
            for key, value in part.stats().items():
                out[key] = out.get(key, 0.0) + value
        if self.comm["calls"]:
            out.update({"comm/all_reduces": float(self.comm["calls"]), "comm/bytes": float(self.comm["bytes"]),
                        "comm/time": self.comm["seconds"]})
        out["micro_batches"] = float(len(self.parts))
        return out


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if _distributed() else 1
