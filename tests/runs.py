"""Helpers shared by the resume and safety tests: real `python run.py` processes, their metric files and the
in-process runner on the same configs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from runner.metrics import read_jsonl
from runner.run_dir import register_resolvers
from runner.schema import register_configs

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
CPU = ["device=cpu", "threads=1", "trainer.progress=false"]  # every run here: one CPU thread, no progress bar

def is_time(key: str) -> bool:
    """Wall-clock and memory columns (wall_time, step_time, curv/product_time, memory/max_rss_mb, ...): what two runs
    of one config differ in."""
    return key.endswith("time") or key.startswith("memory/")


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "CURVLAB_DEBUG", "CURVLAB_RUN_DIR")}
    base.update(WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    for key in [k for k in base if k.startswith(("SUBMITIT_", "SLURM_", "TORCHELASTIC_"))]:
        del base[key]  # the tests may themselves run inside a scheduler's job
    return {**base, **extra}


def start(args: list[str], cwd: Path, extra_env: dict[str, str] | None = None, **popen: Any) -> subprocess.Popen:
    """`python run.py *args` in `cwd` (flags such as -m first), with pipes for stdout and stderr."""
    flags = [arg for arg in args if arg.startswith("-")]
    overrides = [arg for arg in args if not arg.startswith("-")]
    return subprocess.Popen([sys.executable, str(REPO / "run.py"), *flags, *CPU, *overrides], cwd=cwd,
                            env=env(**(extra_env or {})), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


def count_rows(path: Path) -> int:
    """Complete rows in a metrics file that may be being written."""
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def wait_for_rows(path: Path, rows: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while count_rows(path) < rows:
        if process.poll() is not None:
            raise AssertionError(f"the run ended (exit {process.returncode}) before {path} had {rows} rows: "
                                 f"{process.stderr.read() if process.stderr else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not reach {rows} rows in {timeout} s")
        time.sleep(0.005)


def make_config(*overrides: str) -> DictConfig:
    register_configs()
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[*CPU, *overrides])


def without_times(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if not is_time(k)} for row in rows]


def metrics(folder: Path) -> list[dict[str, Any]]:
    return read_jsonl(folder / "metrics.jsonl")


def assert_same_tensors(a: Any, b: Any, where: str = "state") -> None:
    """Nested containers of tensors and plain values, equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}.{i}")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"  # NaN == NaN here
