"""Test-set evaluation: mean loss, and accuracy when the task is classification."""

from __future__ import annotations

from collections.abc import Iterable

import torch
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
    try:
        loss_sum: Tensor | int = 0
        correct: Tensor | int = 0
        count = 0
        for inputs, targets in batches:
            outputs = model(inputs)
            n = inputs.shape[0]
            loss_sum = loss_sum + loss_fn(outputs, targets).double() * n
            if classification:
                correct = correct + (outputs.argmax(dim=1) == targets).sum()
            count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("the test split is empty: there is nothing to evaluate on.")
    metrics = {"eval/loss": loss_sum / count}
    if classification:
        metrics["eval/accuracy"] = correct.double() / count
    return metrics
