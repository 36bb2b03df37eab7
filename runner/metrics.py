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
from collections import defaultdict
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch


class Sink(Protocol):
    def log(self, row: dict[str, Any]) -> None: ...

    def close(self, failed: bool = False) -> None: ...


class JSONLSink:
    """Appends each row to a JSON-lines file and flushes it, so a crash never loses a logged row.

    Non-finite values are written as NaN / Infinity / -Infinity (Python's json and pandas read them back).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = open(self.path, "w", encoding="utf-8")

    def log(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self, failed: bool = False) -> None:
        self._file.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl file."""
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


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

    def flush(self) -> list[dict[str, Any]]:
        """Convert the pending rows, send them to every sink, and return them."""
        rows = _to_python(self._pending)
        self._pending = []
        for row in rows:
            for sink in self.sinks:
                sink.log(row)
        return rows

    def close(self, failed: bool = False) -> None:
        if self._pending:
            self.flush()
        for sink in self.sinks:
            sink.close(failed=failed)


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
