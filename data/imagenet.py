"""ImageNet [Deng2009] (or any subset of it, e.g. ImageNet-100) from folders of class subfolders of JPEGs.

Expected tree (``<root>/imagenet`` unless the ``path`` option names another folder)::

    train/<class id, e.g. n01440764>/*.JPEG
    val/<class id>/*.JPEG        (the same class folders as train/)

Images are decoded and transformed per sample, so this dataset always goes through a DataLoader.
"""

from __future__ import annotations

import os

from torchvision import datasets, transforms

from data.base import Splits, missing_files_error, resolve_root
from validation.checks import positive_int

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
EXPECTED_TREE = (
    "train/<class>/*.JPEG and val/<class>/*.JPEG, one subfolder per class with the same class folders in both "
    "(the official validation images must first be sorted into class subfolders)"
)


def build_imagenet(
    root: str, download: bool = False, *, path: str | None = None, image_size: int = 224
) -> Splits:
    """ImageNet from ``path`` (default ``<root>/imagenet``); ``image_size`` is the side of the square crops."""
    size = positive_int("dataset.image_size", image_size)
    folder = resolve_root("imagenet", path or os.path.join(resolve_root("imagenet", root), "imagenet"))
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose(
        [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]
    )
    # Standard evaluation crop: resize the short side to 256/224 of the crop size (256 for 224), then centre-crop.
    val_tf = transforms.Compose(
        [transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size), transforms.ToTensor(), normalize]
    )
    split_sets = []
    for split, transform in (("train", train_tf), ("val", val_tf)):
        split_folder = os.path.join(folder, split)
        if not os.path.isdir(split_folder):
            raise missing_files_error("imagenet", folder, EXPECTED_TREE, f"no {split}/ folder", can_download=False)
        try:
            split_sets.append(datasets.ImageFolder(split_folder, transform=transform))
        except FileNotFoundError as error:  # no class folders, or class folders without images
            raise missing_files_error("imagenet", folder, EXPECTED_TREE, str(error), can_download=False) from error
    train, val = split_sets
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))[:5]
        only_val = sorted(set(val.classes) - set(train.classes))[:5]
        raise ValueError(
            f"ImageNet in {folder}: train/ and val/ must hold the same class folders, or the labels disagree; "
            f"found {len(train.classes)} in train/ and {len(val.classes)} in val/ (only in train: {only_train}, "
            f"only in val: {only_val})."
        )
    return Splits("imagenet", train, val, (3, size, size), len(train.classes), "cross_entropy", in_memory=False)
