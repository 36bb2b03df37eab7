"""Progress from inside a long step, and a way to stop it there: ``StepMonitor``, ``StepInterrupted``.

A second-order step can run for minutes (Hessian-free's CG on a ResNet-50 on a CPU). The library's inner loops
report each unit of work to the monitor of the step being taken, with the numbers a person watching would want:

| where | ``report(activity, i, ...)`` | values |
| --- | --- | --- |
| ``pcg`` (optimizers/cg.py): HF, Newton-CG | ``"CG iteration"`` i, ``at_most`` max_iters | ``residual`` abs(r), ``model`` q(x_i) |
| ``cg_backtrack`` (HF) | ``"CG backtracking"`` (loss evaluations) | ``loss`` |
| ``armijo`` (HF, GD, Newton, NLCG) | ``"line-search trial"`` j, ``at_most`` max_evals | ``rate``, ``loss`` |
| NLCG's strong Wolfe search | ``"line-search trial"`` j, ``at_most`` ls_max_evals | ``rate``, ``loss`` |
| ``TorchAdapter``'s closure (L-BFGS) | ``"function evaluation"`` j | ``loss`` |
| K-FAC | ``"K-FAC Fisher backward"`` k ``of`` n, ``"K-FAC eigendecomposition"`` k ``of`` n | |

CurveBall, SGD, Adam and the other first-order steps make a fixed, small number of products and report nothing.

``report`` may raise ``StepInterrupted``: the step is then abandoned where it is. The parameters may have moved (a
torch.optim line search moves them in place), the optimiser's state may be half updated (K-FAC's factors before its
eigendecompositions), so whoever raises it must put back what it saved before the step; curvlab's runner does
(runner/progress.py). ``StepInterrupted`` derives from ``BaseException``, like ``KeyboardInterrupt``, so an
``except Exception`` on the way does not swallow it.

A monitor is set with ``optimizer.configure(monitor=...)`` and is in effect while ``optimizer.step`` runs
(``Optimizer.step`` makes it the ``current()`` one); code outside a step sees ``NO_MONITOR``. A library user who sets
none gets no reports, no extra work (``active`` is False, so ``pcg`` fetches no extra residual norm) and no change
in any result: a monitor only reads values the step computes anyway.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar


class StepInterrupted(BaseException):
    """Raised by a monitor's ``report`` to abandon the step being taken; ``where`` says what it was doing."""

    def __init__(self, reason: str, where: str = "") -> None:
        super().__init__(f"{reason} ({where})" if where else reason)
        self.reason, self.where = reason, where


class StepMonitor:
    """Receives the progress of the step being taken. This base class ignores it (``active`` is False)."""

    active = False  # False: the reporting code may skip work done only for the report

    def report(self, activity: str, i: int, *, of: int | None = None, at_most: int | None = None,
               **values: float) -> None:
        """``activity`` number ``i`` (1-based) is done, out of ``of`` (exactly) or ``at_most`` (a cap); ``values``
        are floats already on the host (``residual``, ``model``, ``loss``, ``rate``). May raise StepInterrupted."""


NO_MONITOR = StepMonitor()
_CURRENT: ContextVar[StepMonitor] = ContextVar("curvlab_step_monitor", default=NO_MONITOR)


def current() -> StepMonitor:
    """The monitor of the step being taken (``NO_MONITOR`` outside ``Optimizer.step``)."""
    return _CURRENT.get()


@contextlib.contextmanager
def monitoring(monitor: StepMonitor) -> Iterator[StepMonitor]:
    """Make ``monitor`` the ``current()`` one inside the block."""
    token = _CURRENT.set(monitor)
    try:
        yield monitor
    finally:
        _CURRENT.reset(token)


def describe(activity: str, i: int, of: int | None = None, at_most: int | None = None) -> str:
    """``CG iteration 12 of <=250``, ``K-FAC eigendecomposition 3 of 8``, ``function evaluation 2``."""
    total = f" of {of}" if of is not None else f" of <={at_most}" if at_most is not None else ""
    return f"{activity} {i}{total}"
