"""Running diagnostics inside a training run without changing the run: ``with isolated(model): ...``.

The diagnostics themselves draw from a private generator and never move the parameters, but building an
``Objective`` on a diagnostic batch runs the model's forward pass: in train mode that updates batch-norm running
statistics and draws dropout masks from the global RNG. ``isolated`` restores, on exit, every buffer of the model,
every parameter's ``.grad``, and the global CPU and CUDA RNG states, so the training trajectory continues bit for
bit as if no diagnostic had run.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def isolated(model: nn.Module) -> Iterator[None]:
    """Restore the model's buffers and gradients and the global RNG states when the block exits."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    grads = {name: None if p.grad is None else p.grad.detach().clone() for name, p in model.named_parameters()}
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for name, b in model.named_buffers():
                    b.copy_(buffers[name])
                for name, p in model.named_parameters():
                    p.grad = grads[name]
