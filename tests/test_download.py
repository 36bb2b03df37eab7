"""Standard datasets download on first use (data/download.py): a real HTTP download through torchvision, files
present never touch the network, and no network fails fast with one paragraph (exit code 2), for real.

The download test serves the real MNIST archives (the .gz files beside the data in CURVLAB_DATA, checked by
torchvision against its own MD5s) from a local HTTP server. The offline tests use hosts under `.invalid`, which never
resolve (RFC 2606), and the real mirrors on a machine without a network (skipped where they can be reached).
"""

from __future__ import annotations

import functools
import http.server
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from torchvision import datasets

from data.download import REACH_TIMEOUT, unreachable
from data.vision import build_cifar10, build_cifar100, build_fashion_mnist, build_mnist
from tests.runs import REPO, make_config, start
from tests.test_data import write_cifar10, write_cifar100

DATA = Path(os.environ.get("CURVLAB_DATA", ""))
MNIST_RAW = DATA / "MNIST" / "raw"
OFFLINE = "http://curvlab-test.invalid/"


class _Server:
    """A local HTTP server of `folder` that records the paths it is asked for (torchvision asks twice per file: once
    to follow redirects, once for the file)."""

    def __init__(self, folder: Path) -> None:
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                outer.requests.append(self.path)

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # a client that closed early (the redirect probe)
                pass

        self.httpd = Server(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def no_network(monkeypatch):
    """Fails the test if anything tries to resolve a host or open a connection."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access: {args}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.skipif(not (MNIST_RAW / "train-images-idx3-ubyte.gz").is_file(), reason="needs MNIST's .gz files")
def test_mnist_downloads_on_first_use_and_never_again(tmp_path, monkeypatch):
    with _Server(MNIST_RAW) as server:
        monkeypatch.setattr(datasets.MNIST, "mirrors", [server.url])
        splits = build_mnist(str(tmp_path))  # download=True is the default
        assert len(splits.train) == 60_000 and len(splits.test) == 10_000
        assert set(server.requests) == {f"/{name}" for name, _ in datasets.MNIST.resources}
        asked = len(server.requests)
        reference = build_mnist(str(DATA), download=False)
        assert torch.equal(splits.train.inputs, reference.train.inputs)
        with pytest.MonkeyPatch.context() as patch:  # second use: the files are there, no request at all
            patch.setattr(socket.socket, "connect", lambda *a: (_ for _ in ()).throw(AssertionError("network")))
            build_mnist(str(tmp_path))
        assert len(server.requests) == asked


def test_present_files_are_never_downloaded_again(tmp_path, no_network):
    """download=true (the default) with every file on disk: no host is resolved, no connection opened, and CIFAR's
    files are read as they are (no MD5s: these are small files in the real format)."""
    assert len(build_mnist(str(DATA)).train) == 60_000
    assert len(build_fashion_mnist(str(DATA), num_train=100).train) == 100
    write_cifar10(tmp_path)
    write_cifar100(tmp_path)
    assert len(build_cifar10(str(tmp_path)).train) == 20
    assert len(build_cifar100(str(tmp_path)).train) == 12


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "cifar100"])
def test_a_missing_dataset_without_network_fails_fast_naming_the_folder_and_the_offline_way(name, tmp_path,
                                                                                             monkeypatch):
    build, cls, folder = {
        "mnist": (build_mnist, datasets.MNIST, "MNIST/raw"),
        "fashion_mnist": (build_fashion_mnist, datasets.FashionMNIST, "FashionMNIST/raw"),
        "cifar10": (build_cifar10, datasets.CIFAR10, "cifar-10-batches-py"),
        "cifar100": (build_cifar100, datasets.CIFAR100, "cifar-100-python"),
    }[name]
    if hasattr(cls, "mirrors"):
        monkeypatch.setattr(cls, "mirrors", [OFFLINE])
    else:
        monkeypatch.setattr(cls, "url", OFFLINE + cls.filename)
    begun = time.monotonic()
    with pytest.raises(FileNotFoundError) as error:
        build(str(tmp_path))
    assert time.monotonic() - begun < REACH_TIMEOUT
    message = str(error.value)
    assert message.startswith(f"Dataset '{name}' is not in {tmp_path / folder} and could not be downloaded: no "
                              f"network (curvlab-test.invalid: ")
    assert "\n" not in message and "CURVLAB_DATA" in message and "data_root=" in message
    assert f"copy those files into {tmp_path / folder}" in message
    assert not any(Path(tmp_path).rglob("*.gz")) and not any(Path(tmp_path).rglob("*.tar.gz"))


def test_with_download_false_nothing_is_tried(tmp_path, no_network):
    with pytest.raises(FileNotFoundError, match=r"\(dataset.download is false\)"):
        build_mnist(str(tmp_path), download=False)
    with pytest.raises(FileNotFoundError, match=r"\(dataset.download is false\)"):
        build_cifar10(str(tmp_path), download=False)


def test_an_unanswered_host_is_given_up_after_the_timeout(monkeypatch):
    """A resolver or host that never answers costs `timeout` seconds, not a hang (the helper thread is abandoned)."""
    def never_answers(*args, **kwargs):
        time.sleep(30)
        raise TimeoutError("timed out")  # as a real connection would, long after the test: the abandoned thread ends

    monkeypatch.setattr(socket, "create_connection", never_answers)
    begun = time.monotonic()
    why = unreachable(["https://example.org/a"], timeout=0.5)
    assert time.monotonic() - begun < 2 and why == "example.org: no answer within 0.5 s"


def test_the_standard_datasets_download_by_default_and_imagenet_does_not():
    for name in ("mnist", "fashion_mnist", "cifar10", "cifar100"):
        assert make_config(f"dataset={name}").dataset.download is True
    assert make_config("dataset=imagenet").dataset.download is False


@pytest.mark.skipif(unreachable(datasets.MNIST.mirrors, timeout=3) is None,
                    reason="the MNIST mirrors can be reached: this machine would download MNIST")
def test_python_run_py_dataset_mnist_offline_exits_2_with_the_message(tmp_path):
    """The README's MNIST line on this machine (no network) with an empty data_root: one paragraph, exit 2, fast."""
    begun = time.monotonic()
    process = start(["dataset=mnist", f"data_root={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'run'}"], REPO)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2, stderr
    assert time.monotonic() - begun < 60
    assert f"curvlab: error: Dataset 'mnist' is not in {tmp_path / 'data' / 'MNIST' / 'raw'} and could not be " \
           f"downloaded: no network (ossci-datasets.s3.amazonaws.com: " in stderr
    assert "Traceback" not in stderr
