"""Tests for the data package: loaders on real files (MNIST from CURVLAB_DATA; CIFAR and ImageNet written here in
their real on-disk formats), on-device batching, the synthetic problems, and every conf/dataset/*.yaml."""

from __future__ import annotations

import inspect
import os
import pickle
import re
import struct
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_method, instantiate
from omegaconf import OmegaConf
from PIL import Image

from data import Batches, Splits, TensorPairDataset, make_batches
from data.digits import build_digits
from data.imagenet import build_imagenet
from data.synthetic import build_logreg2d, build_rahimi_recht, build_rosenbrock, build_sine, rahimi_recht_matrix
from data.vision import build_cifar10, build_cifar100, build_fashion_mnist, build_mnist
from validation.checks import OptionError, check_call

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "dataset"
DATA_ROOT = os.environ.get("CURVLAB_DATA")
needs_data = pytest.mark.skipif(
    not DATA_ROOT, reason="CURVLAB_DATA is not set: point it at the folder holding MNIST/raw and FashionMNIST/raw"
)


# ---------------------------------------------------------------- MNIST and Fashion-MNIST (real files)


@needs_data
@pytest.mark.parametrize(
    "build, mean, std",
    [(build_mnist, 0.1307, 0.3081), (build_fashion_mnist, 0.2860, 0.3530)],
    ids=["mnist", "fashion_mnist"],
)
def test_mnist_like_real_files(build, mean, std):
    splits = build(DATA_ROOT)
    assert splits.in_memory and splits.loss == "cross_entropy"
    assert splits.input_shape == (1, 28, 28) and splits.num_outputs == 10
    assert (len(splits.train), len(splits.test)) == (60000, 10000)
    for split in (splits.train, splits.test):
        assert isinstance(split, TensorPairDataset)
        assert split.inputs.dtype == torch.float32 and split.targets.dtype == torch.long
        assert split.inputs.shape[1:] == (1, 28, 28)
        assert split.targets.min().item() == 0 and split.targets.max().item() == 9
    raw = splits.train.inputs.double() * std + mean  # undo the normalisation: pixels back in [0, 1]
    assert round(raw.mean().item(), 4) == mean
    assert raw.min().item() == pytest.approx(0.0, abs=1e-6) and raw.max().item() == pytest.approx(1.0, abs=1e-6)
    assert abs(splits.train.inputs.mean().item()) < 1e-3  # normalised training pixels have mean ~0
    assert torch.bincount(splits.train.targets).min().item() > 5000  # every class present (5,421 to 6,742)


@pytest.mark.parametrize(
    "build, name, folder", [(build_mnist, "mnist", "MNIST/raw"), (build_cifar10, "cifar10", "cifar-10-batches-py")]
)
def test_missing_files_error(tmp_path, build, name, folder):
    """With dataset.download=false (the default, true, downloads: tests/test_download.py)."""
    searched = re.escape(str(tmp_path / folder))
    with pytest.raises(FileNotFoundError, match=rf"Dataset '{name}' was not found: searched {searched}.*data_root"):
        build(str(tmp_path), download=False)


def test_unknown_option_and_wrong_type_are_named_from_the_signature():
    """What the runner checks before it calls a builder (validation.checks.check_call on its annotations)."""
    valid = "Valid keys: root, download, num_samples, num_test, noise, seed."
    with pytest.raises(OptionError, match=rf"^dataset\.colour is not an option of dataset 'build_sine'\. {valid}$"):
        check_call("dataset", build_sine, {"colour": "red"})
    with pytest.raises(OptionError, match=r"^dataset\.augment is not an option of dataset 'build_mnist'\. "
                                          r"Valid keys: root, download, num_train\.$"):
        check_call("dataset", build_mnist, {"root": "/x", "augment": True})
    with pytest.raises(OptionError, match=r"^dataset\.noise=abc must be a finite number\.$"):
        check_call("dataset", build_sine, {"noise": "abc"})
    with pytest.raises(OptionError, match=r"^dataset\.num_test=2\.5 must be an integer\.$"):
        check_call("dataset", build_digits, {"num_test": 2.5})
    with pytest.raises(OptionError, match=r"^dataset\.root is missing: dataset 'build_cifar10' needs it"):
        check_call("dataset", build_cifar10, {"augment": True})
    assert check_call("dataset", build_imagenet, {"root": "/x", "path": None, "image_size": 64}) == {
        "root": "/x", "path": None, "image_size": 64}


@pytest.mark.parametrize(
    "build, options, message",
    [
        (build_sine, {"num_test": 0}, r"dataset\.num_test=0 must be an integer >= 1\."),
        (build_sine, {"noise": -0.1}, r"dataset\.noise=-0\.1 must be a finite number >= 0\."),
        (build_logreg2d, {"num_train": True}, r"dataset\.num_train=True must be an integer >= 1\."),
        (build_digits, {"num_test": 1790}, r"dataset\.num_test=1790 must leave training images: at most 1787"),
        (build_rahimi_recht, {"condition": 0.5}, r"dataset\.condition=0\.5 must be a finite number >= 1"),
        (build_rahimi_recht, {"x_dim": 0}, r"dataset\.x_dim=0 must be an integer >= 1\."),
        (build_rosenbrock, {"l1": -1.0}, r"dataset\.l1=-1\.0 must be a finite number >= 0\."),
    ],
)
def test_builders_check_value_ranges_with_the_shared_checks(build, options, message):
    with pytest.raises(OptionError, match=f"^{message}"):
        build(None, **options)


def test_every_dataset_builder_annotates_every_option():
    """check_call can only check the types it is told: every option of every conf/dataset target is annotated."""
    for path in sorted(CONF_DIR.glob("*.yaml")):
        fn = get_method(OmegaConf.load(path)._target_)
        hints = typing.get_type_hints(fn)
        for name, parameter in inspect.signature(fn).parameters.items():
            assert parameter.kind is parameter.VAR_KEYWORD or name in hints, (path.name, name)


# ---------------------------------------------------------------- CIFAR (small files in the real pickle format)


class _Py2Str(bytes):
    """A Python-2 ``str``: the real CIFAR batches were written by Python 2's cPickle, so their dict keys and strings
    are byte strings stored with the (SHORT_)BINSTRING opcodes, which Python 3 decodes with the reader's encoding
    (torchvision uses latin1). Python 3's pickler never writes those opcodes, hence this small pickler."""


class _Py2Pickler(pickle._Pickler):
    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        data = bytes(obj)
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[_Py2Str] = save_py2_str


def _py2(value):
    """Recursively turn str into Python-2 byte strings, like the original pickles."""
    if isinstance(value, str):
        return _Py2Str(value.encode("latin1"))
    if isinstance(value, dict):
        return {_py2(k): _py2(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_py2(v) for v in value]
    return value


def _write_pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(_py2(obj))


def _images(rng, n):
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)  # rows: 1024 red, 1024 green, 1024 blue


def write_cifar10(root: Path, per_batch: int = 4, seed: int = 0) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {"train": [], "test": []}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data, labels = _images(rng, per_batch), [int(v) for v in rng.integers(0, 10, per_batch)]
        _write_pickle(folder / name, {"batch_label": f"batch {name}", "labels": labels, "data": data,
                                      "filenames": [f"img{i}.png" for i in range(per_batch)]})
        written["test" if name == "test_batch" else "train"].append((data, labels))
    _write_pickle(folder / "batches.meta", {"num_cases_per_batch": per_batch, "num_vis": 3072,
                                            "label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog",
                                                            "frog", "horse", "ship", "truck"]})
    return written


def write_cifar100(root: Path, n_train: int = 12, n_test: int = 5, seed: int = 0) -> dict:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name, n in (("train", n_train), ("test", n_test)):
        data, fine = _images(rng, n), [int(v) for v in rng.integers(0, 100, n)]
        _write_pickle(folder / name, {"filenames": [f"img{i}.png" for i in range(n)], "batch_label": name,
                                      "fine_labels": fine, "coarse_labels": [v // 5 for v in fine], "data": data})
        written[name] = [(data, fine)]
    _write_pickle(folder / "meta", {"fine_label_names": [f"fine{i}" for i in range(100)],
                                    "coarse_label_names": [f"coarse{i}" for i in range(20)]})
    return written


def _expected_inputs(chunks, mean, std):
    data = np.concatenate([d for d, _ in chunks]).reshape(-1, 3, 32, 32) / 255.0
    return torch.from_numpy((data - np.array(mean).reshape(1, 3, 1, 1)) / np.array(std).reshape(1, 3, 1, 1))


def test_cifar_files_are_python2_pickles(tmp_path):
    write_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    assert set(entry) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert entry[b"data"].dtype == np.uint8 and entry[b"data"].shape == (4, 3072)


def test_cifar10_in_memory(tmp_path):
    from data.vision import CIFAR10_MEAN, CIFAR10_STD

    written = write_cifar10(tmp_path)
    splits = build_cifar10(str(tmp_path))
    assert splits.in_memory and splits.input_shape == (3, 32, 32) and splits.num_outputs == 10
    assert (len(splits.train), len(splits.test)) == (20, 4)
    assert splits.train.inputs.dtype == torch.float32 and splits.train.inputs.shape == (20, 3, 32, 32)
    assert splits.train.targets.tolist() == [v for _, labels in written["train"] for v in labels]
    assert splits.test.targets.tolist() == written["test"][0][1]
    expected = _expected_inputs(written["train"], CIFAR10_MEAN, CIFAR10_STD)
    torch.testing.assert_close(splits.train.inputs.double(), expected, atol=1e-5, rtol=0)


def test_cifar10_augmented_goes_through_a_dataloader(tmp_path):
    write_cifar10(tmp_path)
    splits = build_cifar10(str(tmp_path), augment=True)
    assert not splits.in_memory and not isinstance(splits.train, TensorPairDataset)
    batches = make_batches(splits.train, batch_size=8, seed=1)
    shapes = [(x.shape, y.shape, x.dtype, y.dtype) for x, y in batches]
    assert len(batches) == 3 and len(shapes) == 3
    assert shapes[0] == ((8, 3, 32, 32), (8,), torch.float32, torch.long)
    assert shapes[-1][0] == (4, 3, 32, 32)


def test_cifar100(tmp_path):
    from data.vision import CIFAR100_MEAN, CIFAR100_STD

    written = write_cifar100(tmp_path)
    splits = build_cifar100(str(tmp_path))
    assert splits.num_outputs == 100 and (len(splits.train), len(splits.test)) == (12, 5)
    assert splits.train.targets.tolist() == written["train"][0][1]  # fine labels, not coarse
    torch.testing.assert_close(
        splits.test.inputs.double(), _expected_inputs(written["test"], CIFAR100_MEAN, CIFAR100_STD), atol=1e-5, rtol=0
    )


class _WritesAFile:
    """What a crafted CIFAR batch could hold: unpickling it calls open(marker, "w"), creating the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("victim", ["data_batch_1", "test_batch", "batches.meta"])
def test_a_crafted_cifar_file_is_refused_before_it_runs_anything(tmp_path, victim):
    """A pickle whose __reduce__ would create a file, in place of one of the real-format files: refused by the
    restricted unpickler with a message naming the file, and the file is never created."""
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    path = tmp_path / "cifar-10-batches-py" / victim
    path.write_bytes(pickle.dumps({"data": _WritesAFile(marker), "labels": [0]}))
    with pytest.raises(ValueError, match=rf"Dataset 'cifar10': the file {re.escape(str(path))} is not a CIFAR batch "
                                         r"file: it asks the loader for (io|builtins)\.open, which no CIFAR batch "
                                         r"holds; .* so it was not loaded \(nothing in it ran\)"):
        build_cifar10(str(tmp_path), augment=victim == "test_batch")
    assert not marker.exists()
    with open(path, "rb") as file:  # the control: the stock unpickler would have run it
        pickle.load(file)
    assert marker.exists()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_cifar_files_from_any_pickle_protocol_and_numpy_1_names_load(tmp_path, protocol):
    """Python 3 pickles of every protocol (NumPy 2 names numpy._core.*; protocol 5 uses _frombuffer), and the NumPy 1
    names (numpy.core.multiarray._reconstruct) of the original Python 2 files, all load through the restricted
    unpickler."""
    from data.integrity import load_cifar_file

    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    blob = pickle.dumps({"data": data, "labels": [3, 7], "filenames": ["a.png", "b.png"], "n": 2.5, "raw": b"x"},
                        protocol=protocol)
    variants = [blob] + ([blob.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")] if protocol == 2
                         else [])
    assert protocol != 2 or b"numpy.core.multiarray\n_reconstruct" in variants[1]
    for i, variant in enumerate(variants):
        (tmp_path / f"batch{i}").write_bytes(variant)
        entry = load_cifar_file("cifar10", str(tmp_path / f"batch{i}"))
        assert np.array_equal(entry["data"], data) and entry["labels"] == [3, 7] and entry["raw"] == b"x"


# ---------------------------------------------------------------- ImageNet (ImageFolder of tiny JPEGs)


def write_imagenet(folder: Path, classes=("n01", "n02", "n03"), per_class: int = 2) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (folder / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / split / c / f"{c}_{i}.JPEG")


def test_imagenet_folder(tmp_path):
    write_imagenet(tmp_path / "imagenet")
    splits = build_imagenet(str(tmp_path), image_size=32)
    assert not splits.in_memory and splits.num_outputs == 3 and splits.input_shape == (3, 32, 32)
    assert (len(splits.train), len(splits.test)) == (6, 6)
    batches = make_batches(splits.train, batch_size=4, mode="shuffle", seed=0)
    got = [(x.shape, y) for x, y in batches]
    assert [shape for shape, _ in got] == [(4, 3, 32, 32), (2, 3, 32, 32)]
    assert sorted(torch.cat([y for _, y in got]).tolist()) == [0, 0, 1, 1, 2, 2]
    x, y = next(iter(make_batches(splits.test, batch_size=None)))
    assert x.shape == (6, 3, 32, 32) and y.tolist() == [0, 0, 1, 1, 2, 2]


def test_imagenet_path_option_and_errors(tmp_path):
    write_imagenet(tmp_path / "subset", classes=("a", "b"), per_class=1)
    splits = build_imagenet("/nonexistent", path=str(tmp_path / "subset"))
    assert splits.num_outputs == 2 and splits.input_shape == (3, 224, 224)
    assert splits.train[0][0].shape == (3, 224, 224)
    folder = re.escape(str(tmp_path / "imagenet"))
    with pytest.raises(FileNotFoundError, match=rf"Dataset 'imagenet' was not found: searched {folder}.*train/<class>"):
        build_imagenet(str(tmp_path))
    (tmp_path / "subset" / "val" / "b").rename(tmp_path / "subset" / "val" / "c")
    with pytest.raises(ValueError, match=r"same class folders"):
        build_imagenet(None, path=str(tmp_path / "subset"))


# ---------------------------------------------------------------- batching


def _toy(n: int = 10, dtype=torch.float32) -> TensorPairDataset:
    return TensorPairDataset(torch.arange(n, dtype=dtype).unsqueeze(1), torch.arange(n))


def _epoch(batches: Batches) -> list[list[int]]:
    return [y.tolist() for _, y in batches]


def test_shuffle_is_a_fresh_seeded_permutation_every_epoch():
    batches = make_batches(_toy(10), batch_size=3, mode="shuffle", seed=7)
    epochs = [_epoch(batches) for _ in range(3)]
    for epoch in epochs:
        assert [len(b) for b in epoch] == [3, 3, 3, 1]
        assert sorted(sum(epoch, [])) == list(range(10))  # every sample exactly once
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    again = make_batches(_toy(10), batch_size=3, mode="shuffle", seed=7)
    assert [_epoch(again) for _ in range(3)] == epochs
    other = make_batches(_toy(10), batch_size=3, mode="shuffle", seed=8)
    assert _epoch(other) != epochs[0]
    for x, y in make_batches(_toy(10), batch_size=4, seed=3):
        assert x.squeeze(1).tolist() == [float(v) for v in y.tolist()]  # inputs stay paired with their targets


def test_fixed_repeats_the_same_batches():
    batches = make_batches(_toy(10), batch_size=4, mode="fixed", seed=5)
    first = _epoch(batches)
    assert sorted(sum(first, [])) == list(range(10)) and first != [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert _epoch(batches) == first and _epoch(batches) == first


def test_full_batch_and_none_batch_size():
    for batches in (make_batches(_toy(10), batch_size=3, mode="full"), make_batches(_toy(10), batch_size=None)):
        assert len(batches) == 1 and batches.num_samples == 10
        (x, y), = list(batches)
        assert x.shape == (10, 1) and y.tolist() == list(range(10))


def test_len_with_and_without_drop_last():
    assert len(make_batches(_toy(10), batch_size=3)) == 4
    dropped = make_batches(_toy(10), batch_size=3, drop_last=True)
    assert len(dropped) == 3 and [len(b) for b in _epoch(dropped)] == [3, 3, 3]
    assert len(make_batches(_toy(9), batch_size=3)) == 3
    assert len(make_batches(_toy(10), batch_size=3, mode="fixed", drop_last=True)) == 3
    seq = make_batches(_toy(10), batch_size=4, mode="sequential")
    assert _epoch(seq) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_dtypes_float64_and_regression_targets():
    x, y = next(iter(make_batches(_toy(6), batch_size=6, dtype=torch.float64)))
    assert x.dtype == torch.float64 and y.dtype == torch.long
    regression = TensorPairDataset(torch.randn(5, 2), torch.randn(5, 1))
    x, y = next(iter(make_batches(regression, batch_size=5, mode="sequential", dtype=torch.float64)))
    assert x.dtype == torch.float64 and y.dtype == torch.float64
    torch.testing.assert_close(y, regression.targets.double())


def test_bad_batching_arguments():
    with pytest.raises(ValueError, match=r"trainer\.batching='random'.*shuffle, fixed, full"):
        make_batches(_toy(), batch_size=2, mode="random")
    with pytest.raises(ValueError, match=r"batch_size=0"):
        make_batches(_toy(), batch_size=0)
    with pytest.raises(ValueError, match=r"batch_size=20 with drop_last"):
        make_batches(_toy(), batch_size=20, drop_last=True)


def test_shuffle_state_dict_resumes_the_sequence():
    batches = make_batches(_toy(10), batch_size=5, seed=2)
    _epoch(batches)
    state = batches.state_dict()
    expected = _epoch(batches)
    resumed = make_batches(_toy(10), batch_size=5, seed=99)
    resumed.load_state_dict(state)
    assert _epoch(resumed) == expected


# ---------------------------------------------------------------- digits and synthetic problems


def test_digits_needs_no_files(tmp_path):
    splits = build_digits(str(tmp_path))
    assert list(tmp_path.iterdir()) == []
    assert (len(splits.train), len(splits.test)) == (1497, 300)
    assert splits.input_shape == (1, 8, 8) and splits.train.inputs.shape == (1497, 1, 8, 8)
    assert splits.train.targets.dtype == torch.long and splits.num_outputs == 10
    assert abs(splits.train.inputs.mean().item()) < 1e-9
    assert splits.train.inputs.std().item() == pytest.approx(1, abs=1e-3)
    assert torch.bincount(splits.test.targets).tolist() == pytest.approx([30] * 10, abs=1)  # stratified
    again = build_digits(str(tmp_path))
    assert torch.equal(again.test.inputs, splits.test.inputs)  # deterministic split


def test_logreg2d_balanced():
    splits = build_logreg2d(None, seed=3)
    assert (len(splits.train), len(splits.test)) == (800, 100)
    assert torch.bincount(splits.train.targets).tolist() == [400, 400]
    assert torch.bincount(splits.test.targets).tolist() == [50, 50]
    means = [splits.train.inputs[splits.train.targets == c].mean(0) for c in (0, 1)]
    torch.testing.assert_close(means[0], torch.tensor([-1.0, -1.0], dtype=torch.float64), atol=0.15, rtol=0)
    torch.testing.assert_close(means[1], torch.tensor([1.0, 1.0], dtype=torch.float64), atol=0.15, rtol=0)
    assert torch.equal(build_logreg2d(None, seed=3).train.inputs, splits.train.inputs)
    assert not torch.equal(build_logreg2d(None, seed=4).train.inputs, splits.train.inputs)


def test_sine():
    splits = build_sine(None, seed=0)
    assert len(splits.train) == 2000 and splits.loss == "mse" and splits.num_outputs == 1
    x, y = splits.train.inputs, splits.train.targets
    assert x.shape == (2000, 1) and y.shape == (2000, 1)
    assert (y - torch.sin(x)).std().item() == pytest.approx(0.1, rel=0.1)  # noise 0.1 * N(0, 1)
    assert x.std().item() == pytest.approx(1.0, rel=0.1)


def test_rahimi_recht_condition_number():
    a = rahimi_recht_matrix(6, 10, 1e5, seed=0)
    assert a.shape == (10, 6)
    assert torch.linalg.cond(a).item() == pytest.approx(1e5, rel=1e-6)
    splits = build_rahimi_recht(None, seed=0)
    assert splits.input_shape == (6,) and splits.num_outputs == 10 and splits.loss == "mse"
    torch.testing.assert_close(splits.train.targets, splits.train.inputs @ a.T)
    assert not torch.equal(rahimi_recht_matrix(6, 10, 1e5, seed=1), a)


def test_rosenbrock_noise():
    deterministic = build_rosenbrock(None, l1=1.0, l2=1.0, num_samples=50)
    assert torch.all(deterministic.train.inputs == 1.0) and deterministic.train.inputs.shape == (50, 1)
    assert torch.all(deterministic.train.targets == 0) and deterministic.train.targets.shape == (50, 2)
    assert deterministic.loss == "sse" and deterministic.num_outputs == 2 and deterministic.input_shape == (1,)
    noisy = build_rosenbrock(None, l1=0.0, l2=3.0, num_samples=2000, seed=1).train.inputs
    assert 0.0 <= noisy.min().item() and noisy.max().item() <= 3.0
    assert noisy.mean().item() == pytest.approx(1.5, abs=0.1)
    with pytest.raises(ValueError, match=r"^dataset\.l2=1\.0 must be >= dataset\.l1=2: the noise is drawn from U\["):
        build_rosenbrock(None, l1=2.0, l2=1.0)


# ---------------------------------------------------------------- conf/dataset/*.yaml through Hydra


def _instantiate(name: str, data_root: str) -> Splits:
    cfg = OmegaConf.create({"data_root": data_root, "seed": 0, "dataset": OmegaConf.load(CONF_DIR / f"{name}.yaml")})
    return instantiate(cfg.dataset)


def test_every_builder_has_a_config():
    names = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))
    assert names == sorted(["mnist", "fashion_mnist", "cifar10", "cifar100", "imagenet", "digits", "logreg2d", "sine",
                            "rahimi_recht", "rosenbrock"])


@pytest.mark.parametrize("name, size", [("digits", 1497), ("logreg2d", 800), ("sine", 2000), ("rahimi_recht", 1000),
                                        ("rosenbrock", 1000)])
def test_offline_configs_instantiate(tmp_path, name, size):
    splits = _instantiate(name, str(tmp_path))
    assert isinstance(splits, Splits) and splits.name == name and len(splits.train) == size


def test_file_configs_instantiate(tmp_path):
    write_cifar10(tmp_path)
    write_cifar100(tmp_path)
    write_imagenet(tmp_path / "imagenet")
    assert _instantiate("cifar10", str(tmp_path)).num_outputs == 10
    assert _instantiate("cifar100", str(tmp_path)).num_outputs == 100
    assert _instantiate("imagenet", str(tmp_path)).num_outputs == 3
    # Hydra wraps whatever the target raises in an InstantiationException; ours is its __cause__.
    with pytest.raises(InstantiationException) as caught:
        _instantiate("mnist", str(tmp_path))
    assert isinstance(caught.value.__cause__, FileNotFoundError) and "'mnist'" in str(caught.value.__cause__)


@needs_data
def test_num_train_keeps_the_first_training_images_and_the_whole_test_split():
    full, part = build_mnist(DATA_ROOT), build_mnist(DATA_ROOT, num_train=1000)
    assert (len(part.train), len(part.test)) == (1000, 10000)
    assert torch.equal(part.train.inputs, full.train.inputs[:1000])
    assert torch.equal(part.train.targets, full.train.targets[:1000])
    assert torch.equal(part.test.inputs, full.test.inputs)
    with pytest.raises(OptionError, match=r"^dataset\.num_train=60001 must not exceed the 60000 training images\.$"):
        build_fashion_mnist(DATA_ROOT, num_train=60001)
    with pytest.raises(OptionError, match=r"^dataset\.num_train=0 must be an integer >= 1\.$"):
        build_mnist(DATA_ROOT, num_train=0)


@needs_data
def test_mnist_config_instantiates():
    assert len(_instantiate("fashion_mnist", DATA_ROOT).train) == 60000
