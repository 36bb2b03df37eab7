"""The network as a function of its parameters on one batch: the narrow view curvature backends get.

An ``Objective`` owns the batch's one real forward pass. Everything evaluated afterwards (trial losses, curvature
products, a sub-batch) re-evaluates f(w; x) functionally, with

* copies of the buffers, so batch-norm running statistics move once per batch, as in ``model(inputs)``;
* the random state of that forward pass replayed, so dropout draws the same masks;
* attention (``F.scaled_dot_product_attention``) through PyTorch's math kernel (``differentiable_twice``): the fused
  CPU and CUDA kernels have no double backward and no forward-mode AD, so a transformer's curvature would otherwise
  stop inside autograd ("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
  implemented"). The math kernel computes the same attention (to rounding) with ordinary differentiable ops.

``FunctionalModel`` is that function as a small frozen record (network, trainable parameters and their names, the
loss, the replayable random state, whether the forward pass draws random numbers at all). The Objective builds it once
the forward pass has run and hands it to the backends (``optimizers.backends``), which therefore never see, nor
import, the Objective.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from optimizers.losses import Loss


def call(model: nn.Module, params: dict[str, Tensor], x: Tensor) -> Tensor:
    """f(params; x): a functional forward with copies of the buffers (running statistics stay untouched), twice
    differentiable (``differentiable_twice``)."""
    with differentiable_twice():
        return functional_call(model, {**params, **buffer_copies(model)}, (x,))


def differentiable_twice() -> contextlib.AbstractContextManager[None]:
    """Inside the block, attention runs through PyTorch's math kernel, which has double backward and forward-mode AD
    (the fused flash and memory-efficient kernels have neither). Every forward pass whose graph curvature products
    differentiate runs inside it; only the first-order path (``Objective.backward``) keeps the fused kernels."""
    return sdpa_kernel([SDPBackend.MATH])


def buffer_copies(model: nn.Module) -> dict[str, Tensor]:
    return {n: b.clone() for n, b in model.named_buffers()}


@dataclass(frozen=True)
class RandomState:
    """The CPU (and, on a GPU, the device's) random state at one moment, to draw the same random numbers again."""

    cpu: Tensor
    cuda: Tensor | None
    device: torch.device

    @classmethod
    def capture(cls, device: torch.device) -> RandomState:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda, device)

    def unchanged(self) -> bool:
        """True when the generators are still in this state: nothing has drawn a random number since ``capture``."""
        now = RandomState.capture(self.device)
        return torch.equal(now.cpu, self.cpu) and (self.cuda is None or torch.equal(now.cuda, self.cuda))

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Inside the block the random numbers are drawn again from this state; outside, the state is untouched."""
        with torch.random.fork_rng(devices=[self.device] if self.cuda is not None else []):
            self.restore()
            yield


@dataclass(frozen=True)
class FunctionalModel:
    """f(w; x) of one batch: ``net(params_by_name, x)`` evaluates it, ``net.replay_rng()`` redraws its dropout masks.

    ``params`` are the trainable parameters in ``model.named_parameters()`` order (the flat-vector layout), ``names``
    their names (the keys ``__call__`` takes).
    """

    model: nn.Module
    names: Sequence[str]
    params: Sequence[Tensor]
    loss_fn: Loss
    random_state: RandomState  # of the batch's forward pass
    draws_random: bool = False  # the forward pass drew random numbers (dropout or stochastic depth in train mode)

    def __call__(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        return call(self.model, params, x)

    def replay_rng(self) -> contextlib.AbstractContextManager[None]:
        """Re-draw the same dropout masks as the batch's forward pass."""
        return self.random_state.replay()

    def by_name(self, tensors: Sequence[Tensor]) -> dict[str, Tensor]:
        """Parameter-shaped ``tensors`` keyed by parameter name (primals or tangents for ``torch.func``)."""
        return dict(zip(self.names, tensors))
