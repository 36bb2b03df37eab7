"""Corrupt or truncated dataset files: find the file and say so in one paragraph (a ValueError, exit code 2).

A dataset whose files are all present but unreadable (an MNIST file cut short, random bytes, a CIFAR folder of
garbage, labels out of range) is a different problem from a missing dataset and gets its own message naming the
file. The MNIST checks read only the 8- or 16-byte idx headers and the file sizes (cheap, before torchvision reads the
files); the CIFAR batches are examined one by one only after torchvision failed on them.

idx format (LeCun et al., "The MNIST database"): a big-endian header, magic 0x00000801 (labels, 1 dimension) or
0x00000803 (images, 3 dimensions), one 4-byte size per dimension, then the unsigned bytes.
"""

from __future__ import annotations

import os
import pickle
import struct
from typing import Any

import numpy as np

IDX_MAGIC = {"labels": (0x00000801, 1), "images": (0x00000803, 3)}


def corrupt_file_error(dataset: str, path: str, reason: str) -> ValueError:
    return ValueError(
        f"Dataset '{dataset}': the file {path} is corrupt or truncated: {reason}. Replace it with a good copy (or "
        f"delete it and set dataset.download=true on a machine with internet access)."
    )


def check_idx_file(dataset: str, path: str, kind: str) -> tuple[int, ...]:
    """The dimensions an idx file's header announces, after checking its magic number and its size."""
    magic, ndim = IDX_MAGIC[kind]
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        header = file.read(4 + 4 * ndim)
    if len(header) < 4 + 4 * ndim:
        raise corrupt_file_error(dataset, path, f"it has {size} bytes, fewer than an idx header")
    found = struct.unpack(">I", header[:4])[0]
    if found != magic:
        raise corrupt_file_error(dataset, path, f"its magic number is {found:#010x}, not the {magic:#010x} of an "
                                                f"idx file of {kind}")
    dims = struct.unpack(f">{ndim}I", header[4:])
    expected = len(header) + int(np.prod(dims))
    if size != expected:
        shape = " x ".join(f"{d:,}" for d in dims)
        raise corrupt_file_error(dataset, path, f"its header announces {shape} bytes of {kind} ({expected:,} bytes "
                                                f"in all) but the file has {size:,}")
    return dims


def check_mnist_folder(dataset: str, folder: str) -> None:
    """Check the four idx files of MNIST / Fashion-MNIST in `folder` (all present) and that each split's image and
    label counts agree."""
    for split in ("train", "t10k"):
        images = os.path.join(folder, f"{split}-images-idx3-ubyte")
        labels = os.path.join(folder, f"{split}-labels-idx1-ubyte")
        n_images = check_idx_file(dataset, images, "images")[0]
        n_labels = check_idx_file(dataset, labels, "labels")[0]
        if n_images != n_labels:
            raise corrupt_file_error(dataset, labels, f"it holds {n_labels:,} labels but {images} holds "
                                                      f"{n_images:,} images")


def check_labels(dataset: str, path: str, labels: Any, classes: int) -> None:
    """Every label in [0, classes), else a ValueError naming `path` and the first bad label."""
    labels = np.asarray(labels)
    bad = np.flatnonzero((labels < 0) | (labels >= classes))
    if bad.size:
        raise corrupt_file_error(dataset, path, f"label {int(labels[bad[0]])} at index {int(bad[0])} is outside "
                                                f"0..{classes - 1} ({bad.size:,} of {labels.size:,} labels out of "
                                                f"range)")


def find_bad_cifar_file(dataset: str, folder: str, files: list[str], classes: int) -> None:
    """Raise the error for the first unreadable CIFAR file in `folder`: a batch that is not a pickled dict holding an
    (N, 3072) uint8 `data` array and N labels in [0, classes), or a meta file (the last of `files`) that is not a
    pickled dict. Returns when every file looks right."""
    label_key = "labels" if classes == 10 else "fine_labels"  # CIFAR-100: the fine labels
    for name in files:
        path = os.path.join(folder, name)
        entry = _unpickle(dataset, path)
        if not isinstance(entry, dict):
            raise corrupt_file_error(dataset, path, f"it holds a {type(entry).__name__}, not the dict of a CIFAR file")
        if name == files[-1]:
            continue  # the meta file: label names only
        if "data" not in entry or label_key not in entry:
            raise corrupt_file_error(dataset, path, f"it does not hold the 'data' and '{label_key}' entries of a "
                                                    f"CIFAR batch")
        data = np.asarray(entry["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise corrupt_file_error(dataset, path, f"its 'data' is {data.dtype} of shape {data.shape}, not uint8 "
                                                    f"images of 3 x 32 x 32 = 3072 bytes each")
        if len(entry[label_key]) != len(data):
            raise corrupt_file_error(dataset, path, f"it holds {len(data)} images but {len(entry[label_key])} labels")
        check_labels(dataset, path, entry[label_key], classes)


def _unpickle(dataset: str, path: str) -> Any:
    try:
        with open(path, "rb") as file:
            return pickle.load(file, encoding="latin1")  # torchvision's own format, from the user's data folder
    except Exception as exc:  # noqa: BLE001 -- whatever unpickling random bytes raises
        detail = " ".join(str(exc).split())[:100]
        raise corrupt_file_error(dataset, path, f"it is not a pickled CIFAR file ({type(exc).__name__}: {detail})"
                                 ) from None
