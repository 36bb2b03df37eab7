"""checkpoint.pt: everything a resumed run needs, written atomically and loadable with `weights_only=True`.

Writing (`save_checkpoint`): the state goes to `checkpoint.pt.tmp` in the same folder, is flushed and fsynced, then
the current `checkpoint.pt` becomes `checkpoint.prev.pt` and the temporary file becomes `checkpoint.pt` (two
`os.replace` calls, then an fsync of the folder). A crash or a full disk at any moment leaves at least one complete
checkpoint: `load_latest` takes `checkpoint.pt`, or `checkpoint.prev.pt` when the newer one is missing or unreadable
(then with a WARNING naming the unreadable file, why it cannot be read and the steps that will be redone).

Reading (`load_checkpoint`): always `torch.load(..., weights_only=True)`, which only rebuilds tensors and plain
Python containers, so a checkpoint from someone else cannot run code. To keep it so, everything saved is converted
by `plain()` to tensors, numbers, strings, None, lists, tuples and string-keyed dicts (NumPy arrays become tensors).
"""

from __future__ import annotations

import enum
import json
import logging
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runner.errors import DiskFullError, is_disk_full
from runner.run_dir import CHECKPOINT, PREVIOUS

FORMAT = 1  # bump when the layout changes; load_latest refuses other versions

log = logging.getLogger("curvlab")


def save_checkpoint(folder: Path, state: dict[str, Any]) -> Path:
    """Write `state` (see runner.resume.capture_state) as folder/checkpoint.pt, keeping the previous one."""
    path = folder / CHECKPOINT
    tmp = folder / (CHECKPOINT + ".tmp")
    try:
        with open(tmp, "wb") as file:
            torch.save(plain({"format": FORMAT, **state}), file)
            file.flush()
            _slow_write_for_tests()
            os.fsync(file.fileno())
    except BaseException as exc:
        tmp.unlink(missing_ok=True)  # never leave a half-written temporary file behind
        if isinstance(exc, OSError) and is_disk_full(exc):
            raise DiskFullError(exc.errno, exc.strerror, str(path)) from exc
        raise
    if path.exists():
        os.replace(path, folder / PREVIOUS)
    os.replace(tmp, path)
    fsync_folder(folder)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by `save_checkpoint`, read with weights_only=True onto the CPU."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a curvlab checkpoint of format {FORMAT}.")
    return state


def load_latest(folder: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest loadable checkpoint in `folder` (checkpoint.pt, else checkpoint.prev.pt), or None if neither
    exists. A checkpoint.pt that exists but cannot be read (cut short, foreign, or holding code that weights_only
    refuses) is skipped with a WARNING naming it, why, and the steps the run will redo; ValueError when neither
    can be read."""
    failures: list[tuple[Path, str]] = []
    for name in (CHECKPOINT, PREVIOUS):
        path = folder / name
        if not path.exists():
            continue
        try:
            state = load_checkpoint(path)
        except Exception as exc:  # noqa: BLE001 -- a truncated or foreign file: try the previous one
            failures.append((path, unreadable_because(exc)))
            continue
        if failures:
            log.warning(_fallback_warning(failures[0], path, state, folder))
        return path, state
    if failures:
        raise ValueError(f"no readable checkpoint in {folder}: {'; '.join(f'{p} ({why})' for p, why in failures)}.")
    return None


def unreadable_because(exc: Exception) -> str:
    """Why torch.load(weights_only=True) or the format check refused a file, in a few words."""
    text = " ".join(str(exc).split())
    refused = re.search(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL) (\S+)", text)
    if refused:  # weights_only met something other than tensors and plain values: code, or a foreign class
        return (f"it names {refused.group(1).rstrip('.,')}, which a weights_only load refuses (only tensors and plain "
                f"values are allowed): a foreign or hostile file")
    if "PytorchStreamReader" in text or isinstance(exc, EOFError):
        return f"it is cut short or not a torch.save file ({type(exc).__name__}: {text.split('. ')[0][:120]})"
    return f"{type(exc).__name__}: {text[:160]}"


def _fallback_warning(failure: tuple[Path, str], used: Path, state: dict[str, Any], folder: Path) -> str:
    """checkpoint.pt is unreadable and checkpoint.prev.pt is used: which file, why, and which steps are redone."""
    path, why = failure
    step = int(state.get("progress", {}).get("step", 0))
    lost = _unreadable_step(folder, step)
    redo = f"steps {step + 1} to {lost[0]} will be redone ({lost[1]})" if lost else \
        f"the steps after step {step} will be redone"
    return f"cannot read {path}: {why}. Resuming from {used} (step {step}) instead: {redo}."


def _unreadable_step(folder: Path, previous: int) -> tuple[int, str] | None:
    """The step of the unreadable checkpoint.pt, as far as the run folder tells: summary.json's checkpoint_step, else
    the last step in metrics.jsonl (the run got that far); only when it lies after the previous checkpoint."""
    try:
        recorded = json.loads((folder / "summary.json").read_text(encoding="utf-8")).get("checkpoint_step")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if isinstance(recorded, int) and recorded > previous:
        return recorded, f"checkpoint.pt was written at step {recorded}, as summary.json records"
    try:
        lines = (folder / "metrics.jsonl").read_bytes().split(b"\n")[:-1]
        last = int(json.loads(lines[-1])["step"]) if lines else None
    except (OSError, ValueError, KeyError, TypeError):
        last = None
    if last is not None and last > previous:
        return last, f"metrics.jsonl reached step {last}"
    return None


def plain(value: Any, where: str = "state") -> Any:
    """`value` as tensors and plain Python types only (what torch.load(weights_only=True) accepts).

    NumPy arrays and scalars, enums and torch.Size are converted; anything else raises TypeError naming where it
    sits (e.g. `optimizer.inner.state.0.foo`), so a state that cannot be stored safely is found when it is saved.
    """
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value.detach().cpu() if isinstance(value, torch.Tensor) else value
    if isinstance(value, enum.Enum):
        return plain(value.value, where)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Size):
        return tuple(value)
    if isinstance(value, Mapping):
        return {_key(k, where): plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v, f"{where}.{i}") for i, v in enumerate(value))
    raise TypeError(f"{where} holds a {type(value).__module__}.{type(value).__qualname__}, which a checkpoint "
                    "loaded with weights_only=True cannot hold; store it as tensors and plain Python values.")


def _key(key: Any, where: str) -> Any:
    if isinstance(key, (str, int)) and not isinstance(key, bool):
        return key  # torch.optim's state is keyed by parameter index
    raise TypeError(f"{where} has a key of type {type(key).__name__} ({key!r}); use str or int keys.")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `path` through a temporary file in the same folder (fsync, rename, fsync the folder)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and is_disk_full(exc):
            raise DiskFullError(exc.errno, exc.strerror, str(path)) from exc
        raise
    os.replace(tmp, path)
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class CheckpointSchedule:
    """When to checkpoint during training: every `every_steps` steps and/or every `every_minutes` minutes of
    wall-clock time since the last checkpoint (None switches either off)."""

    def __init__(self, every_steps: int | None, every_minutes: float | None) -> None:
        self.every_steps, self.every_minutes = every_steps, every_minutes
        self.last = time.monotonic()

    def due(self, step: int) -> bool:
        if self.every_steps is not None and step % self.every_steps == 0:
            return True
        return self.every_minutes is not None and time.monotonic() - self.last >= 60 * self.every_minutes

    def done(self) -> None:
        self.last = time.monotonic()


def _slow_write_for_tests() -> None:
    """CURVLAB_TEST_SLOW_CHECKPOINT=<seconds> pauses inside every checkpoint write, between writing the temporary
    file and renaming it, so the tests can kill -9 a process in the middle of one. Unset in normal use."""
    delay = os.environ.get("CURVLAB_TEST_SLOW_CHECKPOINT")
    if delay:
        time.sleep(float(delay))
