"""What every diagnostic returns: a small record with its numbers and its cost, ready for JSON and metrics.

A record is a dataclass. ``to_dict()`` gives everything JSON can hold (tensors become lists), except the
parameter-sized vectors named in ``VECTORS`` (eigenvectors, diagonals, directions), which stay tensors on the
record: a ResNet's eigenvector does not belong in a JSON file. ``scalars()`` gives the flat ``{name: float}`` that a
training loop logs as metrics (``diag/<name>``).

Cost is counted in curvature-vector products (H v or G v), gradients, loss evaluations and wall-clock seconds
(``Meter``; on a GPU it synchronises once at the start and once at the end, never per product).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, ClassVar

import torch
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class Cost:
    """What a diagnostic spent: products (H v or G v), gradients, loss evaluations and wall-clock seconds."""

    products: int = 0
    gradients: int = 0
    loss_evals: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


class Meter:
    """Counts a diagnostic's work while it runs: ``meter = Meter(device)``; ``meter.loss_evals += 1``;
    ``meter.cost(operator)`` at the end (the operator's product count since the meter started)."""

    def __init__(self, device: torch.device, operator: Any = None):
        self.device = torch.device(device)
        self.start_products = operator.products if operator is not None else 0
        self.gradients = 0
        self.loss_evals = 0
        _sync(self.device)
        self.t0 = time.perf_counter()

    def cost(self, operator: Any = None) -> Cost:
        _sync(self.device)
        products = operator.products - self.start_products if operator is not None else 0
        return Cost(products, self.gradients, self.loss_evals, time.perf_counter() - self.t0)


class Record:
    """Base of the result dataclasses: JSON export and metric scalars."""

    VECTORS: ClassVar[tuple[str, ...]] = ()   # parameter-sized fields left out of to_dict()

    def to_dict(self) -> dict[str, Any]:
        """Every field except ``VECTORS`` as JSON-ready Python values (tensors become nested lists)."""
        out = {}
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            if field.name not in self.VECTORS:
                out[field.name] = to_json(getattr(self, field.name))
        return out

    def scalars(self) -> dict[str, float]:
        """Flat ``{name: float}`` for metric logging; subclasses name their quantities."""
        raise NotImplementedError


def to_json(value: Any) -> Any:
    """Tensors, records, tuples and dicts as plain JSON values; non-finite floats become None."""
    if isinstance(value, (Record, Cost)):
        return value.to_dict()
    if isinstance(value, Tensor):
        value = value.detach().cpu().tolist()
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def cost_scalars(prefix: str, cost: Cost) -> dict[str, float]:
    return {f"{prefix}_products": float(cost.products), f"{prefix}_seconds": float(cost.seconds)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
