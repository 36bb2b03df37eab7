"""A long configuration says so before its first step (`trainer.estimate_cost`, on by default).

Before the first step the runner times one forward and backward pass on a few training samples (`SAMPLES`), outside
the run: inside `isolated(model)` (optimizers/diagnostics/isolation.py), which restores the batch-norm running
statistics, the gradients and the random generators afterwards, with the gradient taken by `torch.autograd.grad`
(no `.grad` is written) and the samples read from the training split directly (the batch order is not touched). So
the run computes the same bits with and without it (tests/test_cost.py).

The time per sample, scaled to the batch this rank computes, is one gradient's cost; the optimiser's
`gradients_per_step()` (a rough count of gradient-equivalents per step, the upper end where the work varies, such as
a CG iteration cap) scales it to a step, and the steps left in the budget to the run. A WARNING when a step is
expected to take more than `STEP_SECONDS` or the run more than `RUN_HOURS`, for example

    expected up to about 10 min per step on cpu (one gradient ~2.3 s on a batch of 128, timed on 16 samples;
    HessianFree with up to optimizer.cg_max_iters=250 CG iterations: up to ~302 gradients per step); 1 step ~ 10 min.
    To shorten it: a GPU (device=cuda), a smaller trainer.batch_size, a smaller model, or fewer products per step
    (the optimizer options named above).

The estimate is rough: a few samples overstate the per-sample cost of a small model (fixed overheads), and an upper
end such as 250 CG iterations is rarely reached (Hessian-free's ResNet-50 step on digits took 55). It costs one or
two passes over `SAMPLES` samples, once per run.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from optimizers.diagnostics.isolation import isolated
from runner.device import synchronize

log = logging.getLogger("curvlab")

SAMPLES = 16          # samples timed
STEP_SECONDS = 10.0   # warn when a step is expected to take longer ...
RUN_HOURS = 1.0       # ... or the rest of the run
REPEAT_BELOW = 0.5    # a first pass shorter than this (s) is repeated, and the faster one kept (warm-up)


def gradient_seconds(model: nn.Module, loss_fn: Any, train: Any, batch: int, device: torch.device,
                     dtype: torch.dtype) -> tuple[float, int]:
    """(seconds of one forward and backward pass on a batch of `batch` samples, the samples timed), measured on the
    first samples of the split `train` without changing anything the run computes."""
    k = max(1, min(SAMPLES, batch, len(train)))
    params = [p for p in model.parameters() if p.requires_grad]
    with isolated(model):  # buffers, gradients and random generators restored on exit
        inputs, targets = _samples(train, k)
        inputs = inputs.to(device=device, dtype=dtype)
        targets = targets.to(device=device, dtype=dtype if targets.is_floating_point() else torch.long)
        times = []
        while len(times) < 2 and (not times or times[0] < REPEAT_BELOW):
            synchronize(device)
            start = time.perf_counter()
            with torch.enable_grad():
                torch.autograd.grad(loss_fn(model(inputs), targets), params, allow_unused=True)
            synchronize(device)
            times.append(time.perf_counter() - start)
    return min(times) * batch / k, k


def _samples(train: Any, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(train, "inputs") and hasattr(train, "targets"):  # a TensorPairDataset
        return train.inputs[:k], train.targets[:k]
    pairs = [train[i] for i in range(k)]  # a dataset with transforms (inside isolated: its random draws are undone)
    return torch.stack([torch.as_tensor(x) for x, _ in pairs]), torch.as_tensor([y for _, y in pairs])


def estimate(model: nn.Module, optimizer: Any, loss_fn: Any, train: Any, batch: int, steps: int,
             device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The estimate's numbers and its sentence; `warn` when a step or the run will be long."""
    gradient, timed = gradient_seconds(model, loss_fn, train, batch, device, dtype)
    count, how = optimizer.gradients_per_step()
    step = gradient * count
    run = step * steps
    upper = "up to " if "up to" in how else ""
    text = (f"expected {upper}about {duration(step)} per step on {device.type} (one gradient ~{duration(gradient)} "
            f"on a batch of {batch}, timed on {timed} samples; {type(optimizer).__name__} with {how}); {steps} "
            f"step{'s' if steps != 1 else ''} ~ {duration(run)}.")
    warn = step > STEP_SECONDS or run > RUN_HOURS * 3600
    if warn:
        gpu = "" if device.type == "cuda" else "a GPU (device=cuda), "
        text += (f" To shorten it: {gpu}a smaller trainer.batch_size, a smaller model, or fewer products per step "
                 f"(the optimizer options named above); trainer.estimate_cost=false skips this estimate.")
    return {"gradient_seconds": gradient, "gradients_per_step": count, "step_seconds": step, "run_seconds": run,
            "warn": warn, "text": text}


def report(model: nn.Module, optimizer: Any, loss_fn: Any, train: Any, batch: int, steps: int, device: torch.device,
           dtype: torch.dtype, show: bool = True) -> dict[str, Any] | None:
    """Log the estimate (`show`: rank 0; the other ranks measure too, so that none of them waits for rank 0 in its
    first collective): a WARNING when the run will be long, else a DEBUG line. None when nothing is left to run."""
    if steps < 1 or len(train) == 0:
        return None
    found = estimate(model, optimizer, loss_fn, train, batch, steps, device, dtype)
    if show:
        (log.warning if found["warn"] else log.debug)(found["text"])
    return found


def duration(seconds: float) -> str:
    """`0.004 s`, `2.3 s`, `12 min`, `3.5 h`, `140 days`: two significant digits below 10, whole numbers above."""
    for unit, size, below in (("s", 1, 60), ("min", 60, 3600), ("h", 3600, 48 * 3600), ("days", 86400, float("inf"))):
        if seconds < below:
            value = seconds / size
            return f"{value:.2g} {unit}" if value < 10 else f"{value:.0f} {unit}"
    raise AssertionError(seconds)
