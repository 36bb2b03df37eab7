"""Where and in which precision a run computes: `device=` and `dtype=` from the config."""

from __future__ import annotations

import os

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(name: str) -> torch.device:
    """`auto` (CUDA when present, else CPU), `cpu`, `cuda` or `cuda:N`, checked against this machine."""
    if name == "auto":
        return _auto_cuda() if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"device={name!r} is not a device curvlab can use. Choose one of: auto, cpu, cuda, cuda:N.")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} was requested but this machine has no usable CUDA GPU; use device=cpu.")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"device={name!r} does not exist: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}."
            )
    return device


def _auto_cuda() -> torch.device:
    """cuda:LOCAL_RANK for a rank of a multi-GPU job; a GPU of its own for each job of a local sweep
    (runner/gpu_lock.py); else the current device."""
    from runner.gpu_lock import claim_gpu, wanted

    count = torch.cuda.device_count()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]) % count)
    if wanted(count):
        index = claim_gpu(count)
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cuda")


def resolve_dtype(name: str) -> torch.dtype:
    """`float32` or `float64`: the precision of the parameters, inputs and every curvature product."""
    if name not in DTYPES:
        raise ValueError(
            f"dtype={name!r} is not supported. Choose one of: {', '.join(DTYPES)} (half precision is not supported: "
            f"curvature products and line searches need at least float32)."
        )
    return DTYPES[name]


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings measure the computation rather than its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
