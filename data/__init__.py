"""Datasets (``Splits`` from ``build_<name>`` functions in the submodules) and on-device batching."""

from data.base import Splits, TensorPairDataset
from data.batching import MODES, Batches, make_batches

__all__ = ["MODES", "Batches", "Splits", "TensorPairDataset", "make_batches"]
