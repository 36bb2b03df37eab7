"""Metric rows and where they go.

Every optimizer step produces one row (a flat dict). Values may still be 0-dim tensors on the GPU: `MetricsLogger`
keeps rows pending and converts all of their tensors with one device-to-host copy per device when it flushes, so the
training loop never waits for the GPU just to log. Flushed rows go to every sink. A sink is anything with
`log(row)` and `close()`; `JSONLSink` (metrics.jsonl, one JSON object per line) is the source of truth, the W&B sink
(runner/wandb_sink.py) is optional.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch


class Sink(Protocol):
    def log(self, row: dict[str, Any]) -> None: ...

    def close(self, failed: bool = False) -> None: ...


class JSONLSink:
    """Appends each row to a JSON-lines file as ONE write of one complete line, so the file only ever holds whole rows.

    Non-finite values are written as NaN / Infinity / -Infinity (Python's json and pandas read them back). When a
    write fails (a full disk: ENOSPC, EDQUOT, or EFBIG past a file-size limit), the partial line is cut off again and
    `DiskFullError` is raised: every row before it stays readable. `rows` counts the rows in the file; a checkpoint
    records it, and a resumed run reopens the file with `keep_rows` to drop the rows logged after that checkpoint.
    """

    def __init__(self, path: str | Path, keep_rows: int | None = None) -> None:
        self.path = Path(path)
        if keep_rows is None:
            self.rows = 0
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        else:
            self.rows = keep_rows
            keep_first_rows(self.path, keep_rows)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._size = os.fstat(self._fd).st_size

    def log(self, row: dict[str, Any]) -> None:
        line = (json.dumps(row) + "\n").encode("utf-8")
        try:
            written = 0
            while written < len(line):  # os.write may write less than asked; the line is complete or cut off
                written += os.write(self._fd, line[written:])
        except OSError as exc:
            try:
                os.ftruncate(self._fd, self._size)  # drop the partial line: the file ends with a complete row again
            except OSError:
                pass  # not a regular file (e.g. /dev/full): nothing to cut back
            raise _disk_full(exc, self.path) from exc
        self._size += len(line)
        self.rows += 1

    def sync(self) -> None:
        """Make the rows written so far durable (called before a checkpoint records `rows`)."""
        os.fsync(self._fd)

    def close(self, failed: bool = False) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _disk_full(exc: OSError, path: Path) -> OSError:
    from runner.errors import DiskFullError, is_disk_full

    if not is_disk_full(exc):
        return exc
    return DiskFullError(exc.errno, exc.strerror, str(path))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl file. A last line without its newline (a write cut short by a crash or a full
    disk in an older file) is skipped when it is not valid JSON; any other unreadable line is an error naming it."""
    with open(path, encoding="utf-8") as file:
        lines = file.read().split("\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):  # the trailing partial line
                break
            raise ValueError(f"{path}: line {number} is not a JSON row ({exc.msg}).") from None
    return rows


def keep_first_rows(path: Path, rows: int) -> None:
    """Atomically cut `path` down to its first `rows` complete lines (a resumed run drops the rows it will redo)."""
    from runner.checkpoint import atomic_write_bytes

    data = path.read_bytes() if path.exists() else b""
    lines = data.split(b"\n")[:-1]  # complete lines only; a trailing partial line is dropped
    if len(lines) < rows:
        raise ValueError(f"{path} holds {len(lines)} complete rows but the checkpoint recorded {rows}: the metrics "
                         "file does not belong to this checkpoint.")
    kept = b"".join(line + b"\n" for line in lines[:rows])
    if kept != data:
        atomic_write_bytes(path, kept)


class MetricsLogger:
    """Buffers rows whose values may be tensors; `flush()` converts them to Python numbers and sends them on."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks
        self._pending: list[dict[str, Any]] = []

    @property
    def pending(self) -> list[dict[str, Any]]:
        """Rows recorded since the last flush (the last one may still be extended, e.g. with eval metrics)."""
        return self._pending

    def record(self, row: dict[str, Any]) -> None:
        self._pending.append(row)

    def pending_rows(self) -> list[dict[str, Any]]:
        """The pending rows as plain Python values (for a checkpoint), without flushing them."""
        return _to_python(self._pending)

    def restore_pending(self, rows: list[dict[str, Any]]) -> None:
        self._pending = [dict(row) for row in rows]

    def flush(self) -> list[dict[str, Any]]:
        """Convert the pending rows, send them to every sink, and return them."""
        rows = _to_python(self._pending)
        self._pending = []
        for row in rows:
            for sink in self.sinks:
                sink.log(row)
        return rows

    def close(self, failed: bool = False) -> None:
        try:
            if self._pending:
                self.flush()
        except Exception:
            if not failed:  # after a failure, the first error is the one to report
                raise
        finally:
            for sink in self.sinks:
                sink.close(failed=failed)

    @property
    def rows_written(self) -> int:
        """Rows in metrics.jsonl (the first sink; 0 on ranks that write no files)."""
        return self.sinks[0].rows if self.sinks else 0

    def sync(self) -> None:
        if self.sinks:
            self.sinks[0].sync()


def first_nonfinite(rows: list[dict[str, Any]], key: str = "loss") -> dict[str, Any] | None:
    """The first row whose `key` is NaN or infinite, or None."""
    for row in rows:
        value = row.get(key)
        if isinstance(value, float) and not math.isfinite(value):
            return row
    return None


def _to_python(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with every tensor replaced by a Python number: one stacked copy to the host per device."""
    by_device: dict[torch.device, list[tuple[int, str, torch.Tensor]]] = defaultdict(list)
    converted = [dict(row) for row in rows]
    for i, row in enumerate(converted):
        for key, value in row.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise ValueError(f"metric {key!r} must be a scalar, got a tensor of shape {tuple(value.shape)}")
                by_device[value.device].append((i, key, value.detach().reshape(())))
            elif isinstance(value, np.generic):
                row[key] = value.item()
    for device, entries in by_device.items():
        if device.type == "cpu":  # no transfer to save: .item() is the cheapest conversion
            values = [t.item() for _, _, t in entries]
        else:
            values = torch.stack([t.to(torch.float64) for _, _, t in entries]).cpu().tolist()
        for (i, key, tensor), value in zip(entries, values):
            if tensor.dtype == torch.bool:
                value = bool(value)
            elif not tensor.is_floating_point():
                value = int(value)
            converted[i][key] = value
    return converted
