"""One GPU per job when several single-GPU jobs share a node (hydra/launcher=submitit_local on an 8-GPU machine).

submitit's local executor starts every job of a sweep at once and shows each of them every GPU (hydra#2757), so with
`device=auto` they would all train on cuda:0. Instead each such job takes an exclusive lock file per GPU,
`<lock folder>/gpu<i>.lock` (fcntl.flock), on the first free device, holds it until the process exits (the lock goes
with the process, even after kill -9) and trains on that device; a job that finds every GPU taken waits for one.

Used by runner/device.py for `device=auto` when the job runs under submitit's local executor with one task and
several GPUs are visible, or whenever CURVLAB_GPU_LOCKS names a lock folder (for jobs started by other means). The
default lock folder is per user and per machine, so two sweeps on the same node share the GPUs correctly too.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import IO

log = logging.getLogger("curvlab")
_held: list[IO[bytes]] = []  # the open lock files: kept for the life of the process


def lock_folder() -> Path:
    default = os.path.join(tempfile.gettempdir(), f"curvlab-gpu-locks-{os.getuid()}")
    folder = os.environ.get("CURVLAB_GPU_LOCKS") or default
    return Path(folder)


def wanted(device_count: int) -> bool:
    """Whether this job should take a GPU lock: several GPUs visible, one rank, and a local sweep (or asked)."""
    one_rank = int(os.environ.get("WORLD_SIZE", "1")) == 1 and int(os.environ.get("SUBMITIT_LOCAL_NTASKS", "1")) == 1
    asked = bool(os.environ.get("CURVLAB_GPU_LOCKS")) or os.environ.get("SUBMITIT_EXECUTOR") == "local"
    return device_count > 1 and one_rank and asked


def claim_gpu(device_count: int, folder: Path | None = None, poll_s: float = 2.0) -> int:
    """Lock the first free GPU index in [0, device_count) and return it; wait while all are taken."""
    folder = folder or lock_folder()
    folder.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        for index in range(device_count):
            file = open(folder / f"gpu{index}.lock", "ab")
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                file.close()
                continue
            _held.append(file)
            return index
        if not waited:
            log.info(f"all {device_count} GPUs are taken by other jobs (locks in {folder}); waiting for one")
            waited = True
        time.sleep(poll_s)
