"""Which rank this process is, the process group, and the few collective helpers the runner needs.

Every rank runs the same loop; only rank 0 writes files. Launchers:

* ``torchrun --nproc_per_node=N run.py ...`` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT;
* a SLURM or local job of hydra-submitit-launcher with ``tasks_per_node`` > 1 runs one task per rank:
  ``init_distributed`` calls ``submitit.helpers.TorchDistributedEnvironment().export()`` to set the same variables;
* anything else is a single process, and every function here is a cheap no-op.

`launch_rank()` reads the rank from the environment without importing torch, so the config resolvers
(runner/run_dir.py) can use it before anything is built.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

TIMEOUT = timedelta(seconds=60)  # a rank that does not answer ends the job instead of hanging


def under_submitit() -> bool:
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def requeued() -> bool:
    """Running as a job its scheduler may have started before: under submitit, or a requeued SLURM job."""
    return under_submitit() or int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def launch_rank() -> tuple[int, int]:
    """(global rank, world size) as the launcher set them, before any process group exists."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if under_submitit():
        from submitit import JobEnvironment

        env = JobEnvironment()
        return env.global_rank, env.num_tasks
    return 0, 1


def init_distributed(backend: str | None = None) -> tuple[int, int]:
    """Join the process group when the launcher started several ranks; returns (rank, world size).

    Under submitit, exports MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK (and CUDA_VISIBLE_DEVICES = the local
    rank) first. Backend: NCCL when CUDA is available, else gloo. Call it before anything touches CUDA.
    """
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rank, world = launch_rank()
    if world == 1:
        return 0, 1
    if "RANK" not in os.environ and under_submitit():
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=torch.cuda.is_available())
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=TIMEOUT)
    return rank, world


def close_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather(value: Any) -> list[Any]:
    """`value` from every rank, indexed by rank (``[value]`` in a single process). Collective: all ranks call it."""
    import torch.distributed as dist

    if world_size() == 1:
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def any_rank(*flags: bool) -> tuple[bool, ...]:
    """For each flag: True on every rank when it is True on any rank (a stop request, a due checkpoint), so all
    ranks take the same decision. One small all-reduce; collective: all ranks call it at the same step."""
    if world_size() == 1:
        return flags
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    values = torch.tensor([int(flag) for flag in flags], device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in values.tolist())
