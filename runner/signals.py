"""Stop requests: SIGTERM, SIGUSR1, SIGUSR2 and SIGINT end a run cleanly at the next step boundary.

What SLURM, submitit and a user send: SIGTERM (scancel, preemption, the end of the time limit), SIGUSR1/SIGUSR2
(`--signal=...@seconds` before the limit; submitit uses USR2), SIGINT (Ctrl-C). While `StopSignals` is active, each of
them only records that a stop was requested; the loop finishes the current step, checkpoints, writes summary.json
with status "interrupted" and returns (runner/train.py). A second SIGINT stops at once (KeyboardInterrupt; summary.json
then records exit code 130). Once the run's outcome is decided and summary.json is being written, the run calls
`seal()`: a signal after that changes nothing, so the exit code always agrees with summary.json. run.py, whose process
ends with the run, then ignores the stop signals until it exits (`ignore_stop_signals`): a second Ctrl-C 0.3 s after
the first, while Python tears down its modules, would otherwise kill the process (exit 130) after summary.json was
written with 4.

Handlers already installed are respected (as PyTorch Lightning does):

* a handler the user installed (any Python callable that is not Python's or submitit's own) is still called, right
  after the request is recorded;
* submitit's preemption handler (USR2 under submitit: checkpoint the job and requeue it) is deferred: `hand_over()`
  calls it after the run has checkpointed, so the requeued job resumes from that checkpoint (hydra#2042: the launcher
  resubmits with the same arguments but saves no state itself).

Handlers can only be installed from the main thread; elsewhere `StopSignals` does nothing.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")
                     if hasattr(signal, name))



def install(handler: Any) -> dict[int, Any]:
    """Makes `handler` the handler of every stop signal and returns the handlers it replaced (for `restore`). Handlers
    can only be installed from the main thread: elsewhere it installs nothing."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}


def restore(previous: dict[int, Any]) -> None:
    """Puts back the handlers `install` replaced."""
    for signum, handler in previous.items():
        signal.signal(signum, handler)


class StopSignals:
    """Context manager: while active, the stop signals set `requested` (the signal's name) instead of killing."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self.signum: int | None = None
        self.sealed = False  # the run's outcome is decided: signals are no longer acted on
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        self._previous = install(self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        restore(self._previous)

    def seal(self) -> None:
        """The run's outcome is decided (summary.json is about to be written): from now on a stop signal, a second
        Ctrl-C included, changes nothing."""
        self.sealed = True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.sealed:
            if signum == signal.SIGINT and self.requested == "SIGINT":
                raise KeyboardInterrupt  # a second Ctrl-C: stop now
            if self.requested is None:
                self.requested, self.signum = signal.Signals(signum).name, signum
        previous = self._previous.get(signum)
        if _user_handler(previous):
            previous(signum, frame)

    def hand_over(self) -> bool:
        """After the run checkpointed: call submitit's deferred handler for the signal received (it requeues the job
        and exits the process), if there is one. Returns False when there was none."""
        previous = self._previous.get(self.signum) if self.signum is not None else None
        if not _submitit_handler(previous):
            return False
        try:
            previous(self.signum, None)  # checkpoint() of the launcher, then requeue and exit the process
        except Exception as exc:  # noqa: BLE001 -- submitit's UncompletedJobError: e.g. timed out too many times
            print(f"curvlab: submitit did not requeue the job: {exc}", file=sys.stderr)
            return False
        return True


def ignore_stop_signals() -> None:
    """For a process that ends with its run (run.py): from here on the stop signals are ignored, so nothing that
    arrives after summary.json was written changes the exit code (it is the one summary.json records)."""
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


def _submitit_handler(handler: Any) -> bool:
    owner = getattr(handler, "__self__", None)
    return owner is not None and type(owner).__module__.startswith("submitit.")


def _user_handler(handler: Any) -> bool:
    """A Python handler someone else installed (not the defaults, not Python's Ctrl-C handler, not submitit's)."""
    return (callable(handler) and handler not in (signal.SIG_DFL, signal.SIG_IGN, signal.default_int_handler)
            and not _submitit_handler(handler))

