"""Corrupt or truncated dataset files: find the file and say so in one paragraph (a ValueError, exit code 2).

A dataset whose files are all present but unreadable (an MNIST file cut short, random bytes, a CIFAR folder of
garbage, labels out of range) is a different problem from a missing dataset and gets its own message naming the
file. The MNIST checks read only the 8- or 16-byte idx headers and the file sizes (cheap, before torchvision reads the
files); the CIFAR batches are examined one by one only after reading them failed.

CIFAR files are pickles, and a pickle can name any function for the loader to call: a crafted `data_batch_1` in a data
folder would run code the moment `pickle.load` reads it. Every CIFAR file is therefore read by `load_cifar_file`,
whose `CIFARUnpickler` resolves only the few names a real CIFAR batch refers to (NumPy's array and dtype rebuilders,
see `CIFAR_GLOBALS`); any other name is refused before anything is called ("not a CIFAR batch file").

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

# Every global a CIFAR file may name. The originals (Python 2 cPickle, NumPy 1.x) hold dicts of byte strings, lists of
# ints and strings, and uint8 arrays, which pickle as numpy.core.multiarray._reconstruct(numpy.ndarray, ...) with a
# numpy.dtype; NumPy 2 writes numpy._core.*, protocol 5 numpy._core.numeric._frombuffer, and Python 3's protocol 2
# writes bytes as _codecs.encode(text, "latin1"). None of them can call anything else.
CIFAR_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),
})


class NotACIFARFile(pickle.UnpicklingError):
    """A pickle names a function or class that no CIFAR file holds; nothing of it was called."""


class CIFARUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only `CIFAR_GLOBALS`: dicts, lists, strings, bytes, numbers and NumPy arrays
    load as usual; a file that asks for anything else (os.system, builtins.open, ...) raises NotACIFARFile before the
    name is even imported."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in CIFAR_GLOBALS:
            raise NotACIFARFile(f"it asks the loader for {module}.{name}, which no CIFAR batch holds")
        return super().find_class(module, name)


def load_cifar_file(dataset: str, path: str) -> Any:
    """The content of one CIFAR file (a batch or the meta file) read with `CIFARUnpickler` (latin1, as torchvision
    reads the Python 2 originals). ValueError naming the file when it is not a pickle or names anything else."""
    try:
        with open(path, "rb") as file:
            return CIFARUnpickler(file, encoding="latin1").load()
    except NotACIFARFile as exc:
        raise ValueError(
            f"Dataset '{dataset}': the file {path} is not a CIFAR batch file: {exc}; a CIFAR file holds only dicts, "
            f"lists, strings, numbers and NumPy arrays, so it was not loaded (nothing in it ran). Replace it with a "
            f"good copy (or delete it and set dataset.download=true on a machine with internet access)."
        ) from None
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 -- whatever unpickling random bytes raises
        detail = " ".join(str(exc).split())[:100]
        raise corrupt_file_error(dataset, path, f"it is not a pickled CIFAR file ({type(exc).__name__}: {detail})"
                                 ) from None


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
        entry = load_cifar_file(dataset, path)
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
