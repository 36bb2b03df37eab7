"""scikit-learn's [Pedregosa2011] 8x8 handwritten digits: 1,797 images that ship inside the package (no download).

The offline default dataset for ``python run.py`` and for fast tests.
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from data.base import Splits, TensorPairDataset
from validation.checks import fail, nonnegative_int, positive_int


def build_digits(
    root: str | None = None, download: bool = False, *, num_test: int = 300, split_seed: int = 0
) -> Splits:
    """``root`` and ``download`` are accepted for a uniform interface and ignored.

    ``num_test``: held-out images, stratified by class; ``split_seed``: the split is fixed by this seed alone, so runs
    with different training seeds see the same split.
    """
    num_test = positive_int("dataset.num_test", num_test)
    images, labels = load_digits(return_X_y=True)  # float64 (1797, 64) with values 0..16, int labels
    if num_test > len(labels) - 10:
        fail("dataset.num_test", num_test, f"must leave training images: at most {len(labels) - 10} of {len(labels)}.")
    x_train, x_test, y_train, y_test = train_test_split(
        images / 16.0, labels, test_size=num_test, stratify=labels,
        random_state=nonnegative_int("dataset.split_seed", split_seed),
    )
    # Standardise with one mean and one std over all training pixels (like MNIST's 0.1307 / 0.3081).
    mean, std = x_train.mean(), x_train.std()

    def tensors(x, y) -> TensorPairDataset:
        inputs = torch.from_numpy((x - mean) / std).reshape(-1, 1, 8, 8)
        return TensorPairDataset(inputs, torch.from_numpy(y).long())

    return Splits(
        "digits", tensors(x_train, y_train), tensors(x_test, y_test), (1, 8, 8), 10, "cross_entropy", in_memory=True
    )
