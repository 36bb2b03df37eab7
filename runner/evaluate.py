"""Test-set evaluation: mean loss, and accuracy when the task is classification.

In a data-parallel run every rank evaluates its shard of each test batch and the totals (loss sum, correct
predictions, samples) are summed across ranks in one all-reduce: exact totals, not a mean of means.

`recompute_batch_norm`: batch-norm running statistics recomputed at the current parameters, for a method whose
eval point is not where it trained (Schedule-Free: `Optimizer.eval_point`, runner/state.py).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from optimizers.losses import Loss
from runner.distributed import average_buffers
from runner.seeding import rng_states, set_rng_states


@torch.no_grad()
def evaluate(
    model: nn.Module, loss_fn: Loss, batches: Iterable[tuple[Tensor, Tensor]], classification: bool
) -> dict[str, Tensor]:
    """`eval/loss` (the mean over samples of the batch-mean loss) and `eval/accuracy`, as 0-dim tensors.

    The model is put in eval mode (batch-norm running statistics, no dropout) and back in its previous mode after.
    """
    was_training = model.training
    model.eval()
    totals: Tensor | None = None  # [loss sum, correct, samples] in float64
    try:
        for inputs, targets in batches:
            n = inputs.shape[0]
            if n == 0:  # a rank's empty share of a last, small test batch
                continue
            outputs = model(inputs)
            correct = (outputs.argmax(dim=1) == targets).sum().double() if classification else outputs.new_zeros(())
            batch = torch.stack([loss_fn(outputs, targets).double() * n, correct.double(),
                                 torch.tensor(float(n), dtype=torch.float64, device=outputs.device)])
            totals = batch if totals is None else totals + batch
    finally:
        model.train(was_training)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device = next(model.parameters()).device
        totals = torch.zeros(3, dtype=torch.float64, device=device) if totals is None else totals
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    if totals is None or totals[2] == 0:
        raise ValueError("the test split is empty: there is nothing to evaluate on.")
    metrics = {"eval/loss": totals[0] / totals[2]}
    if classification:
        metrics["eval/accuracy"] = totals[1] / totals[2]
    return metrics


def batch_norms(model: nn.Module) -> list[_BatchNorm]:
    """The model's batch-norm layers that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recompute_batch_norm(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], count: int) -> int:
    """Recompute every batch-norm layer's running statistics at the current parameters: reset them, then average
    over the first `count` batches of `batches` in training mode with equal weights (momentum None: PreciseBN, Wu &
    Johnson 2021; the schedulefree README's recipe). The random generators end as they began (dropout masks and
    augmentations drawn here are not the run's); ranks average their statistics. Returns the batches used."""
    norms = batch_norms(model)
    if not norms or count == 0:
        return 0
    states, was_training, momenta = rng_states(), model.training, [m.momentum for m in norms]
    used = 0
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
        model.train()
        for inputs, _ in batches:
            if used == count:
                break
            if inputs.shape[0]:  # a rank's empty share of a last, small batch
                model(inputs)
            used += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
        set_rng_states(states)
    average_buffers(model)
    return used
