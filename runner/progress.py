"""The runner's step monitor: a long step shows its progress, and a stop signal can abandon it.

The optimisers' inner loops (CG iterations, backtracking and line-search trials, K-FAC's backward passes and
eigendecompositions) report to the monitor of the step being taken (optimizers/monitor.py). `StepProgress` is the
runner's monitor. While a step runs it

* shows the last report on the progress bar (at most twice a second) and logs one INFO line every
  `trainer.progress_every_seconds` seconds of the step (default 10): `step 1: CG iteration 12 of <=250, |r| 0.031,
  q -0.12, 31 s`, and `step 1: done in 93 s` at its end when it logged any;
* raises `StepInterrupted` at the first report after a stop signal (SIGTERM, SIGUSR1/2, SIGINT) when the step is
  *abortable*. The loop (runner/train.py) then puts back the state saved before the step (`RunState.before_step`,
  `undo_step`: parameters, buffers, the optimiser's state, the random generators and the batch order's position),
  so the checkpoint it writes is the one the previous step boundary would have written, and a resumed run repeats
  the uninterrupted one bit for bit, as if the abandoned step had never started.

Saving that state costs a copy of the model and of the optimiser's state, which is nothing next to a long step but
can be a good share of a short one (an L-BFGS history on a small batch). So a step is abortable when the state is
worth saving (`worth_saving`): the first step of the process, or a step after one that took at least
`LONG_STEP_SECONDS` while the last copy took at most `COPY_SHARE` of it. Other steps end before the signal is acted
on, as every step did before: they are short. In a data-parallel run the decisions are collective (`any_rank`):
every rank saves or none does, and the stop check inside an abortable step is one small all-reduce per report, so
all ranks abandon the same step at the same report.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from typing import Any

from optimizers.monitor import StepInterrupted, StepMonitor, describe
from runner.distributed import any_rank, world_size
from runner.signals import StopSignals

log = logging.getLogger("curvlab")

LONG_STEP_SECONDS = 1.0  # a step after one at least this long can be abandoned ...
COPY_SHARE = 0.05        # ... when saving the state before it took at most this share of that step
BAR_SECONDS = 0.5        # the progress bar shows the step's progress at most this often
NAMES = {"residual": "|r|", "model": "q"}  # how a reported value is shown (others by their own name)


class StepProgress(StepMonitor):
    """The monitor the runner hands the optimiser (`optimizer.configure(monitor=...)`); see the module docstring."""

    active = True

    def __init__(self, signals: StopSignals, every_seconds: float | None) -> None:
        self.signals = signals
        self.every = every_seconds
        self.bar: Any = None        # the tqdm bar, when one is shown
        self.copy_seconds = 0.0     # how long the last `RunState.before_step` took
        self.step, self.abortable, self.t0 = 0, False, 0.0
        self._next_log = self._next_bar = math.inf
        self._logged = False
        self._last: tuple[Any, ...] | None = None  # the last report (formatted only when shown)

    def worth_saving(self, step_time: float | None) -> bool:
        """Whether to save the state before the next step so that a signal can abandon it (this rank's view; the
        loop makes it collective). `step_time`: the last step's, None before the first step."""
        if step_time is None:
            return True
        return step_time >= LONG_STEP_SECONDS and self.copy_seconds <= COPY_SHARE * step_time

    @contextlib.contextmanager
    def stepping(self, step: int, start: float, abortable: bool) -> Iterator[None]:
        """Around `optimizer.step`: step number `step`, started at `start` (time.perf_counter)."""
        self.step, self.t0, self.abortable = step, start, abortable
        self._next_log = start + self.every if self.every else math.inf
        self._next_bar = start + BAR_SECONDS
        self._logged, self._last = False, None
        postfix = self.bar.postfix if self.bar is not None else None
        try:
            yield
        finally:
            if self.bar is not None and self._last is not None:
                self.bar.postfix = postfix  # back to the loss shown between steps
            self.abortable = False
        if self._logged:
            log.info(f"step {step}: done in {time.perf_counter() - start:.0f} s")

    def report(self, activity: str, i: int, *, of: int | None = None, at_most: int | None = None,
               **values: float) -> None:
        now = time.perf_counter()
        self._last = (activity, i, of, at_most, values)
        if now >= self._next_log:
            log.info(f"step {self.step}: {self.line(now)}")
            self._logged, self._next_log = True, now + self.every
        if self.bar is not None and now >= self._next_bar:
            self.bar.set_postfix_str(self.line(now))
            self._next_bar = now + BAR_SECONDS
        if self.abortable and self._stop_requested():
            activity, i, of, at_most, _ = self._last
            raise StepInterrupted(self.signals.requested or "a stop signal on another rank",
                                  describe(activity, i, of, at_most))

    def line(self, now: float) -> str:
        """`CG iteration 12 of <=250, |r| 0.031, q -0.12, 31 s`: the last report and the step's elapsed time."""
        if self._last is None:
            return f"{now - self.t0:.0f} s"
        activity, i, of, at_most, values = self._last
        shown = [describe(activity, i, of, at_most)]
        shown += [f"{NAMES.get(name, name)} {value:.3g}" for name, value in values.items()]
        return ", ".join([*shown, f"{now - self.t0:.0f} s"])

    def _stop_requested(self) -> bool:
        requested = self.signals.requested is not None
        return any_rank(requested)[0] if world_size() > 1 else requested
