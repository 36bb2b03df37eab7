"""What a run writes about itself into its output folder, besides the metrics.

config.yaml    the resolved config (every interpolation filled in): rerun it with `python run.py --config-path ...`
run_info.json  code version (git commit, dirty flag), library versions, machine; how the model computes (execution:
               precision, channels-last, compile; added once the run is set up)
summary.json   the outcome (status ok | diverged | interrupted | error, exit code, steps, final losses, best
               accuracy, wall time, the last checkpoint's step, the run it resumed)
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "torchvision", "hydra-core", "omegaconf", "wandb", "numpy")


def write_config(cfg: DictConfig, output_dir: Path) -> None:
    OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)


def write_run_info(output_dir: Path) -> dict[str, Any]:
    info = {
        "git": git_info(),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "command": sys.argv,
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_device_count": torch.cuda.device_count(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    _write_json(output_dir / "run_info.json", info)
    return info


def add_run_info(output_dir: Path, **entries: Any) -> None:
    """Add entries known only once the run is set up (e.g. ``execution``: precision, channels-last, compile) to
    run_info.json."""
    path = output_dir / "run_info.json"
    info = json.loads(path.read_text()) if path.exists() else {}
    _write_json(path, {**info, **entries})


def write_summary(output_dir: Path, summary: dict[str, Any]) -> None:
    _write_json(output_dir / "summary.json", summary)


def git_info() -> dict[str, Any]:
    """The commit of the curvlab checkout and whether it has uncommitted changes ("unknown" outside git)."""
    try:
        commit = _git("rev-parse", "HEAD")
        dirty = bool(_git("status", "--porcelain"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": "unknown"}
    return {"commit": commit, "dirty": dirty}


def _git(*args: str) -> str:
    result = subprocess.run(
        ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
    )
    return result.stdout.strip()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Through a temporary file and a rename: a reader (or a crash) never sees half a file."""
    from runner.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(data, indent=2, default=str) + "\n").encode("utf-8"))
