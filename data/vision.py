"""MNIST [LeCun1998], Fashion-MNIST [Xiao2017], CIFAR-10 and CIFAR-100 [Krizhevsky2009] from torchvision's on-disk
formats (keys in REFERENCES.md).

All four are small enough to hold in memory: the uint8 arrays that torchvision reads are normalised once into a
``TensorPairDataset``. Only augmented CIFAR training goes through per-sample transforms (and so a DataLoader).

CIFAR's files are pickles: they are read through ``data.integrity.load_cifar_file`` (a restricted unpickler that
refuses anything but NumPy arrays and plain values), never torchvision's ``pickle.load``, so a crafted file in a data
folder cannot run code.

``download`` (default true): a dataset whose files are missing is downloaded into ``root`` on first use
(data/download.py); files present are read as they are, without any network access.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torchvision import datasets, transforms
from torchvision.datasets.utils import check_integrity

from data.base import Splits, TensorPairDataset, missing_files_error, resolve_root
from data.download import download as download_into
from data.integrity import check_labels, check_mnist_folder, find_bad_cifar_file, load_cifar_file
from validation.checks import boolean, fail, optional, positive_int

MNIST_FILES = "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte"

# Per-channel mean and standard deviation of the training pixels (scaled to [0, 1]).
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def _normalised(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> float32 ``(x / 255 - mean) / std`` per channel."""
    shape = (1, len(mean), 1, 1)
    x = images.to(torch.float32).div_(255)
    return x.sub_(torch.tensor(mean).view(shape)).div_(torch.tensor(std).view(shape))


def _load_torchvision(name: str, cls: type, root: str, folder: str, expected: str, **kwargs):
    """``(train, test)`` torchvision datasets from the files on disk; a missing dataset becomes our
    FileNotFoundError."""
    try:
        train = cls(root, train=True, download=False, **kwargs)
        test = cls(root, train=False, download=False, **kwargs)
    except (RuntimeError, OSError) as error:  # torchvision's "Dataset not found"
        raise missing_files_error(name, folder, expected, "dataset.download is false") from error
    return train, test


def _mnist_like(name: str, cls: type, mean: float, std: float, root: str, download: bool,
                num_train: int | None = None) -> Splits:
    num_train = optional(positive_int)("dataset.num_train", num_train)
    root = resolve_root(name, root)
    folder = os.path.join(root, cls.__name__, "raw")
    files = [os.path.join(folder, f"{split}-{kind}") for split in ("train", "t10k")
             for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    if all(os.path.isfile(f) for f in files):
        check_mnist_folder(name, folder)  # present but cut short or not idx files: say which (not "not found")
    elif boolean("dataset.download", download):  # first use: torchvision's download of all four files
        download_into(name, folder, MNIST_FILES, cls.mirrors, lambda: cls(root, train=True, download=True))
    train, test = _load_torchvision(name, cls, root, folder, MNIST_FILES)
    for split, data in (("train", train), ("t10k", test)):
        check_labels(name, os.path.join(folder, f"{split}-labels-idx1-ubyte"), data.targets.numpy(), 10)
    # Read the uint8 tensors torchvision already parsed ((N, 28, 28)); never go through PIL images.
    if num_train is not None and num_train > len(train.data):
        fail("dataset.num_train", num_train, f"must not exceed the {len(train.data)} training images.")
    train_images = train.data if num_train is None else train.data[:num_train]  # the first num_train, in file order
    splits = [
        TensorPairDataset(_normalised(images.unsqueeze(1), (mean,), (std,)), labels[: len(images)].long())
        for images, labels in ((train_images, train.targets), (test.data, test.targets))
    ]
    return Splits(name, splits[0], splits[1], (1, 28, 28), 10, "cross_entropy", in_memory=True)


def build_mnist(root: str, download: bool = True, num_train: int | None = None) -> Splits:
    """``num_train``: train on the first N of the 60,000 training images only (null = all); the test split is whole."""
    return _mnist_like("mnist", datasets.MNIST, 0.1307, 0.3081, root, download, num_train)


def build_fashion_mnist(root: str, download: bool = True, num_train: int | None = None) -> Splits:
    """``num_train`` as for :func:`build_mnist`."""
    return _mnist_like("fashion_mnist", datasets.FashionMNIST, 0.2860, 0.3530, root, download, num_train)


def _read_cifar(dataset: datasets.CIFAR10, name: str, root: str, train: bool, download: bool) -> None:
    """torchvision's ``CIFAR10.__init__`` (download, integrity check, batches -> ``data`` (N, 32, 32, 3) uint8 and
    ``targets``, the meta file -> ``classes``), with every file read by ``load_cifar_file`` instead of
    ``pickle.load``."""
    datasets.VisionDataset.__init__(dataset, root)
    dataset.train = train
    if download:
        dataset.download()  # torchvision's: fetches the archive and checks its MD5 (data/download.py calls it)
    if not dataset._check_integrity():
        raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")
    folder = os.path.join(dataset.root, dataset.base_folder)
    entries = [load_cifar_file(name, os.path.join(folder, file))
               for file, _ in (dataset.train_list if train else dataset.test_list)]
    dataset.data = np.vstack([entry["data"] for entry in entries]).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))
    dataset.targets = [t for entry in entries for t in (entry["labels"] if "labels" in entry else entry["fine_labels"])]
    meta = os.path.join(folder, dataset.meta["filename"])
    if not check_integrity(meta, dataset.meta["md5"]):
        raise RuntimeError("Dataset metadata file not found or corrupted. You can use download=True to download it")
    dataset.classes = load_cifar_file(name, meta)[dataset.meta["key"]]
    dataset.class_to_idx = {label: i for i, label in enumerate(dataset.classes)}


class _SafeCIFAR10(datasets.CIFAR10):
    """torchvision's CIFAR-10 (its ``__getitem__`` and transforms), its files read by the restricted unpickler."""

    def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
        _read_cifar(self, "cifar10", root, train, download)


class _SafeCIFAR100(datasets.CIFAR100):
    """torchvision's CIFAR-100, its files read by the restricted unpickler; see ``_SafeCIFAR10``."""

    def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
        _read_cifar(self, "cifar100", root, train, download)


class _CIFAR10Files(_SafeCIFAR10):
    """CIFAR-10 without the MD5 checks: how the files on disk are read (present, or just downloaded, when the
    archive's MD5 was checked).

    torchvision verifies every batch file against its MD5 in ``_check_integrity`` (and ``batches.meta`` in
    ``_read_cifar``), both through ``check_integrity(path, md5)``, which only tests that the file exists when the MD5
    is None. Clearing the MD5s trusts files already on disk (hashing 180 MB at every start is slow, and the tests
    write small files in the real format).
    """

    train_list = [[name, None] for name, _ in datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in datasets.CIFAR10.test_list]
    meta = {**datasets.CIFAR10.meta, "md5": None}


class _CIFAR100Files(_SafeCIFAR100):
    """CIFAR-100 without the MD5 checks; see ``_CIFAR10Files``."""

    train_list = [[name, None] for name, _ in datasets.CIFAR100.train_list]
    test_list = [[name, None] for name, _ in datasets.CIFAR100.test_list]
    meta = {**datasets.CIFAR100.meta, "md5": None}


def _cifar(name: str, stock: type, local: type, mean, std, classes: int, root, download, augment) -> Splits:
    root = resolve_root(name, root)
    folder = os.path.join(root, stock.base_folder)
    files = [f for f, _ in stock.train_list + stock.test_list] + [stock.meta["filename"]]
    expected = f"torchvision's python-version batches in {stock.base_folder}/ ({', '.join(files)})"
    if not all(os.path.isfile(os.path.join(folder, f)) for f in files) and boolean("dataset.download", download):
        # first use: torchvision's download (the archive's MD5 checked), read back through the safe unpickler
        download_into(name, folder, expected, [stock.url], lambda: stock(root, train=False, download=True))
    train, test = _load_cifar(name, local, root, folder, files, expected, classes)

    def in_memory(d) -> TensorPairDataset:  # d.data is uint8 (N, 32, 32, 3)
        images = torch.from_numpy(d.data).permute(0, 3, 1, 2)
        return TensorPairDataset(_normalised(images, mean, std).contiguous(), torch.tensor(d.targets))

    test_set = in_memory(test)
    if not augment:
        return Splits(name, in_memory(train), test_set, (3, 32, 32), classes, "cross_entropy", in_memory=True)
    train.transform = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    # Augmented training samples are made per step (DataLoader path); the test split stays in memory.
    return Splits(name, train, test_set, (3, 32, 32), classes, "cross_entropy", in_memory=False)


def _load_cifar(name: str, cls: type, root: str, folder: str, files: list[str], expected: str, classes: int):
    """torchvision's CIFAR splits. When every file is present, a failure to read them, or a label out of range,
    names the culprit file instead of reporting the dataset as missing."""
    present = all(os.path.isfile(os.path.join(folder, f)) for f in files)
    try:
        train, test = _load_torchvision(name, cls, root, folder, expected)
    except Exception:
        if present:
            find_bad_cifar_file(name, folder, files, classes)
        raise
    if any(t < 0 or t >= classes for data in (train, test) for t in data.targets):
        find_bad_cifar_file(name, folder, files, classes)
    return train, test


def build_cifar10(root: str, download: bool = True, *, augment: bool = False) -> Splits:
    """``augment``: random crop 32 (pad 4) + horizontal flip per sample, through a DataLoader."""
    return _cifar("cifar10", _SafeCIFAR10, _CIFAR10Files, CIFAR10_MEAN, CIFAR10_STD, 10, root, download,
                  boolean("dataset.augment", augment))


def build_cifar100(root: str, download: bool = True, *, augment: bool = False) -> Splits:
    """``augment`` as for CIFAR-10."""
    return _cifar("cifar100", _SafeCIFAR100, _CIFAR100Files, CIFAR100_MEAN, CIFAR100_STD, 100, root, download,
                  boolean("dataset.augment", augment))
