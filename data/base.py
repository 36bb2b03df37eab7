"""What every dataset builder returns, plus the small helpers the builders share.

A builder is a function ``build_<name>(root, download=False, *, <options>) -> Splits`` whose options are typed
keyword arguments: the runner checks the keys and types of the ``dataset`` group against the annotations
(``validation.checks.check_call``) before it calls the builder, and the builder checks value ranges with the same
shared checks (``dataset.num_test=0 must be an integer >= 1.``). Small datasets come back as ``TensorPairDataset``
(two tensors, batched by index in ``data.batching``); large ones as ordinary torch datasets that go through a
``DataLoader``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
import torch
from torch.utils.data import Dataset

LOSSES = ("cross_entropy", "mse", "sse")


@dataclass
class Splits:
    name: str
    train: Dataset  # a TensorPairDataset when in_memory
    test: Dataset  # the test split, or a held-out split where the problem has none
    input_shape: tuple[int, ...]  # per-sample input shape, e.g. (1, 28, 28), (3, 32, 32), (2,)
    num_outputs: int  # classes for classification; output dimension for regression
    loss: str  # "cross_entropy" | "mse" | "sse" (sse = sum over outputs, mean over the batch)
    in_memory: bool  # True -> both splits are TensorPairDataset, held on the device and batched by index

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"Splits.loss={self.loss!r} for dataset '{self.name}' is not one of {LOSSES}.")


class TensorPairDataset(Dataset):
    """A whole split as two tensors: ``inputs`` (N, *input_shape) and ``targets`` (N,) or (N, num_outputs).

    Integer targets are class labels; floating targets are regression outputs.
    """

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        if inputs.shape[0] != targets.shape[0]:
            raise ValueError(f"inputs have {inputs.shape[0]} samples but targets have {targets.shape[0]}.")
        self.inputs = inputs
        self.targets = targets

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.targets[index]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> TensorPairDataset:
        """Both tensors on ``device``; inputs (and regression targets) in ``dtype``, class labels as ``torch.long``.

        Returns ``self``'s tensors unchanged (no copy) when they already match.
        """
        targets_dtype = dtype if self.targets.is_floating_point() else torch.long
        return TensorPairDataset(
            self.inputs.to(device=device, dtype=dtype), self.targets.to(device=device, dtype=targets_dtype)
        )


def resolve_root(dataset: str, root: str | os.PathLike | None) -> str:
    """``root`` as an absolute path (``~`` and environment variables expanded)."""
    if root is None or str(root) == "":
        raise FileNotFoundError(
            f"Dataset '{dataset}' needs a data folder but data_root is empty. Set data_root=/path/to/data on the "
            f"command line or export the CURVLAB_DATA environment variable."
        )
    return os.path.abspath(os.path.expanduser(os.path.expandvars(str(root))))


def missing_files_error(
    dataset: str, folder: str, expected: str, reason: str = "", can_download: bool = True
) -> FileNotFoundError:
    """The one-paragraph error every builder raises when its files are not on disk (or could not be downloaded)."""
    because = f" ({reason})" if reason else ""
    download = ", or set dataset.download=true on a machine with internet access" if can_download else ""
    return FileNotFoundError(
        f"Dataset '{dataset}' was not found: searched {folder}{because}. Expected {expected}. To fix it, point "
        f"data_root=/path/to/data (or the CURVLAB_DATA environment variable) at the folder that holds the "
        f"dataset{download}."
    )
