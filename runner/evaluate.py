"""Test-set evaluation: mean loss, and accuracy when the task is classification.

In a data-parallel run every rank evaluates its shard of each test batch and the totals (loss sum, correct
predictions, samples) are summed across ranks in one all-reduce: exact totals, not a mean of means.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from optimizers.losses import Loss


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
