"""The standard datasets on first use: MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 are downloaded into data_root
when their files are missing (``dataset.download: true``, the default), as torchvision and Lightning do.

* Files present: nothing touches the network (the builders check for the files first and read them as they are;
  data/integrity.py names a file that is cut short or not what it should be).
* Files missing and a network: torchvision's own download (its mirrors, the archives' MD5 checks) into the folder
  the builder reads, with a socket timeout so that a stalled connection fails instead of hanging the run.
* Files missing and no network: one paragraph naming the folder, the files expected and the offline alternative,
  exit code 2, within ``REACH_TIMEOUT`` seconds. Before downloading, the download hosts are resolved and connected to
  in a helper thread that is abandoned after ``REACH_TIMEOUT`` seconds, so a resolver that never answers cannot hang
  the run (torchvision's own requests have no timeout, and it would try every mirror for every file).
"""

from __future__ import annotations

import socket
import threading
import urllib.parse
from collections.abc import Callable, Sequence

REACH_TIMEOUT = 10.0  # seconds to resolve a download host and connect to it
READ_TIMEOUT = 60.0   # socket timeout of the download's own requests


def unreachable(urls: Sequence[str], timeout: float = REACH_TIMEOUT) -> str | None:
    """None when the host of one of ``urls`` accepts a TCP connection within ``timeout`` seconds; else why not (the
    failure of each host, e.g. ``ossci-datasets.s3.amazonaws.com: [Errno -3] Temporary failure in name
    resolution``)."""
    failures = []
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
        outcome: list[BaseException | None] = []

        def connect() -> None:
            try:
                socket.create_connection((host, port), timeout=timeout).close()
                outcome.append(None)
            except OSError as exc:
                outcome.append(exc)

        thread = threading.Thread(target=connect, name=f"curvlab-reach-{host}", daemon=True)
        thread.start()
        thread.join(timeout)
        if outcome and outcome[0] is None:
            return None
        failures.append(f"{host}: {outcome[0] if outcome else f'no answer within {timeout:g} s'}")
    return "; ".join(failures)


def download(name: str, folder: str, expected: str, urls: Sequence[str], fetch: Callable[[], object],
             timeout: float = REACH_TIMEOUT) -> None:
    """Run ``fetch`` (torchvision's download into ``folder``) when one of ``urls``' hosts can be reached; otherwise,
    or when it fails, raise the one-paragraph FileNotFoundError (exit code 2)."""
    why = unreachable(urls, timeout)
    if why is not None:
        raise not_downloaded(name, folder, expected, f"no network ({why})")
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(READ_TIMEOUT)
    try:
        fetch()
    except (OSError, RuntimeError) as exc:  # URLError, timeouts, torchvision's "Error downloading" or MD5 mismatch
        detail = " ".join(str(exc).split())
        detail = detail if len(detail) <= 300 else detail[:300] + "..."
        raise not_downloaded(name, folder, expected, f"the download failed: {detail}; delete the partial files in "
                                                     f"{folder} before trying again") from exc
    finally:
        socket.setdefaulttimeout(previous)


def not_downloaded(name: str, folder: str, expected: str, reason: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"Dataset '{name}' is not in {folder} and could not be downloaded: {reason}. Expected {expected}. To use it "
        f"without a network, copy those files into {folder} (on a machine with a network, the same command downloads "
        f"them there), or point data_root=/path/to/data or the CURVLAB_DATA environment variable at a folder that "
        f"holds them; dataset.download=false never tries the network."
    )
