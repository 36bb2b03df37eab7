"""Seeding every random number generator a run touches, and capturing / restoring their states for a checkpoint.

The states are stored as tensors and plain Python values, so a checkpoint loads with torch.load(weights_only=True):
Python's state is a tuple of ints already; NumPy's (legacy MT19937 tuple with a uint32 array) is converted.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Same seed, same config, same machine -> the same metrics, bit for bit."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_states() -> dict[str, Any]:
    """The state of Python's, NumPy's and torch's (CPU and every CUDA device) generators, as plain values."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    states: dict[str, Any] = {
        "python": random.getstate(),  # (version, tuple of 625 ints, gauss_next)
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states()` captured (CUDA states only where this machine has the same devices)."""
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy = states["numpy"]
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
