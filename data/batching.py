"""Turn a dataset split into epochs of mini-batches that are already on the device.

Modes (the ``trainer.batching`` config key):
  shuffle     a new permutation every epoch, drawn from a torch.Generator seeded with ``seed`` (deterministic);
  fixed       one permutation drawn once; the same mini-batches come back in the same order every epoch
              ([Seed001-Veitch], eq. 28: batches fixed throughout training, R = ceil(m / m_b) of them);
  full        one batch holding the whole split (``batch_size`` is ignored; [Seed000-Thesis] uses b = 60,000 on MNIST);
  sequential  the split in its stored order, in batches (for evaluation).

A ``TensorPairDataset`` is moved to the device once, and batches are slices or ``index_select`` of the device tensors:
no DataLoader and no host copies per step. Any other dataset goes through a ``DataLoader``.

Data parallelism (``shard=(rank, world)``): every rank draws the same global order from the same seeded generator and
keeps its part of each GLOBAL batch (``tensor_split``: sizes differ by at most one), so ``batch_size`` means the same
on 1 or N ranks. ``global_batch`` is the size of the global batch last handed out (the Objective weights each
rank's mean by its share of it). In-memory splits are held whole on every rank's device.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from data.base import TensorPairDataset

MODES = ("shuffle", "fixed", "full", "sequential")


class Batches:
    """Iterable over ONE epoch of ``(inputs, targets)`` per ``iter()``; ``len()`` is the number of steps per epoch.

    Resumable mid-epoch: ``state_dict()`` holds the shuffling generator's state at the start of the current epoch and
    the number of batches already handed out in it; after ``load_state_dict`` the next ``iter()`` draws the same
    permutation again and starts at the next batch, without touching the batches it skips.
    """

    num_samples: int

    def __init__(self, num_samples: int, batch_size: int, mode: str, drop_last: bool, seed: int,
                 shard: tuple[int, int] = (0, 1)) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.mode = mode
        self.drop_last = drop_last
        self.rank, self.world = shard
        self.global_batch = 0  # the size of the global batch last handed out
        self.generator = torch.Generator().manual_seed(seed)
        self.position = 0  # batches handed out in the current epoch
        self._epoch_start: Tensor | None = None  # the generator's state when the current epoch began
        self._skip = 0  # batches to skip at the next iter() (set by load_state_dict)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        start, self._skip = self._skip, 0
        self._epoch_start = self.generator.get_state()
        self.position = start
        for batch in self._epoch(start):
            self.position += 1  # counted before the batch is used, so a checkpoint after its step includes it
            yield batch

    def _epoch(self, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The batches of one epoch from batch number ``start`` on (drawing this epoch's order first)."""
        raise NotImplementedError

    def _global_batches(self, order: Tensor | None, start: int) -> Iterator[Tensor | slice]:
        """This rank's part of each global batch of the epoch, from batch ``start`` on: indices into ``order``'s
        permutation, or a slice of the stored order when ``order`` is None."""
        b = self.batch_size
        for first in range(start * b, len(self) * b, b):
            size = min(b, self.num_samples - first)
            self.global_batch = size
            low, high = shard_bounds(size, self.rank, self.world)
            yield slice(first + low, first + high) if order is None else order[first + low:first + high]

    def state_dict(self) -> dict[str, Any]:
        """The batch order's position: the generator's state at the epoch start and the batches used since."""
        if self._skip:  # loaded and not iterated since: the position it was loaded with
            return {"generator": self.generator.get_state(), "position": self._skip}
        if self._epoch_start is None or self.position >= len(self):  # between two epochs
            return {"generator": self.generator.get_state(), "position": 0}
        return {"generator": self._epoch_start.clone(), "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self._skip = int(state.get("position", 0))
        self._epoch_start, self.position = None, 0


class TensorBatches(Batches):
    """Batches of a split held as two device tensors."""

    def __init__(
        self,
        dataset: TensorPairDataset,
        batch_size: int,
        mode: str,
        device: torch.device | str,
        dtype: torch.dtype,
        seed: int,
        drop_last: bool,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        super().__init__(len(dataset), batch_size, mode, drop_last, seed, shard)
        data = dataset.to(device, dtype)
        self.inputs, self.targets = data.inputs, data.targets
        if mode == "fixed":
            # Store the split in the order of the one fixed permutation; every epoch then yields plain slices.
            order = torch.randperm(self.num_samples, generator=self.generator).to(self.inputs.device)
            self.inputs, self.targets = self.inputs[order], self.targets[order]

    def _epoch(self, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        if self.mode == "shuffle":
            order = torch.randperm(self.num_samples, generator=self.generator).to(self.inputs.device)
            for index in self._global_batches(order, start):
                yield self.inputs.index_select(0, index), self.targets.index_select(0, index)
        else:
            for part in self._global_batches(None, start):
                yield self.inputs[part], self.targets[part]


class _EpochOrder(Sampler):
    """This rank's index lists, one per global batch, for the rest of the current epoch (set by ``LoaderBatches``
    before each epoch; the DataLoader's ``batch_sampler``). The DataLoader iterates it in the main process, so this
    works with persistent workers too."""

    def __init__(self) -> None:
        self.indices: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class LoaderBatches(Batches):
    """Batches from a ``DataLoader`` (images decoded and augmented on the fly), moved to the device per step.

    The epoch's order is drawn here (not by the DataLoader), so it resumes mid-epoch like ``TensorBatches``. The
    workers' seeds come from a second generator that is part of the state too. Augmentation randomness resumes bit
    for bit with ``num_workers=0`` (it then uses the main process's torch generator, which a checkpoint restores);
    with workers, a resumed epoch re-seeds them, so its augmentations differ from the uninterrupted run's.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        mode: str,
        device: torch.device | str,
        dtype: torch.dtype,
        seed: int,
        drop_last: bool,
        num_workers: int,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        super().__init__(len(dataset), batch_size, mode, drop_last, seed, shard)
        self.device = torch.device(device)
        self.dtype = dtype
        self.fixed_order = torch.randperm(self.num_samples, generator=self.generator) if mode == "fixed" else None
        self.worker_seeds = torch.Generator().manual_seed(seed + 1)
        self._order = _EpochOrder()
        self._workers_start = self.worker_seeds.get_state()
        self.loader = DataLoader(
            dataset,
            batch_sampler=self._order,
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=num_workers > 0,
            generator=self.worker_seeds,
        )

    def _epoch(self, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        if self.mode == "shuffle":
            order = torch.randperm(self.num_samples, generator=self.generator)
        else:
            order = self.fixed_order if self.fixed_order is not None else torch.arange(self.num_samples)
        parts = list(self._global_batches(order, start))
        sizes = [(min(self.batch_size, self.num_samples - i * self.batch_size)) for i in range(start, len(self))]
        self._order.indices = [p.tolist() for p in parts]
        self._workers_start = self.worker_seeds.get_state()  # the DataLoader draws this epoch's worker seed from it
        for size, (inputs, targets) in zip(sizes, self.loader):
            self.global_batch = size
            targets_dtype = self.dtype if targets.is_floating_point() else torch.long
            yield (
                inputs.to(self.device, self.dtype, non_blocking=True),
                targets.to(self.device, targets_dtype, non_blocking=True),
            )

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        mid_epoch = state["position"] > 0
        return {**state, "worker_seeds": self._workers_start if mid_epoch else self.worker_seeds.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "worker_seeds" in state:
            self.worker_seeds.set_state(state["worker_seeds"])
        self._workers_start = self.worker_seeds.get_state()  # what state_dict() gives back until the next epoch


def make_batches(
    dataset: Dataset,
    *,
    batch_size: int | None,
    mode: str = "shuffle",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    drop_last: bool = False,
    num_workers: int = 0,
    shard: tuple[int, int] = (0, 1),
) -> Batches:
    """Epochs of ``(inputs, targets)`` on ``device``: inputs in ``dtype``, labels ``torch.long``.

    ``batch_size=None`` or ``mode="full"`` gives one batch holding the whole split.
    """
    if mode not in MODES:
        raise ValueError(f"trainer.batching={mode!r} is not a batching mode. Choose one of: {', '.join(MODES)}.")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype} for the inputs must be a floating-point dtype (torch.float32 or float64).")
    num_samples = len(dataset)
    if mode == "full" or batch_size is None:
        mode, batch_size, drop_last = "full", max(num_samples, 1), False
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer (or null for full-batch training).")
    if drop_last and batch_size > num_samples:
        raise ValueError(
            f"batch_size={batch_size} with drop_last=true leaves no batch from a split of {num_samples} samples; "
            f"lower the batch size or set drop_last=false."
        )
    last = num_samples % batch_size if not drop_last else 0
    if mode != "sequential" and (batch_size < shard[1] or 0 < last < shard[1]):
        small = batch_size if batch_size < shard[1] else last
        raise ValueError(f"trainer.batch_size={batch_size} is the global batch, shared by {shard[1]} ranks, but a batch "
                         f"of {small} samples would leave a rank without data: choose another batch size or set "
                         f"trainer.drop_last=true.")
    if isinstance(dataset, TensorPairDataset):
        return TensorBatches(dataset, batch_size, mode, device, dtype, seed, drop_last, shard)
    return LoaderBatches(dataset, batch_size, mode, device, dtype, seed, drop_last, num_workers, shard)


def shard_bounds(size: int, rank: int, world: int) -> tuple[int, int]:
    """[low, high) of rank's part of ``size`` items split as ``torch.tensor_split`` splits them."""
    q, r = divmod(size, world)
    low = rank * q + min(rank, r)
    return low, low + q + (1 if rank < r else 0)
