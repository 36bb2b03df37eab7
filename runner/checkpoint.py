"""checkpoint.pt: everything needed to continue a run later (model, optimizer, position, random states)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from runner.seeding import rng_states


def save_checkpoint(
    path: Path, model: nn.Module, optimizer: Any, step: int, epoch: float, batches: Any = None
) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "epoch": epoch,
        "rng": rng_states(),
        "batches": batches.state_dict() if hasattr(batches, "state_dict") else None,
    }
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # never leave a half-written checkpoint behind
