"""Long steps show their progress, and a stop signal inside one abandons it (runner/progress.py, optimizers/monitor.py).

* Every method with an inner loop (CG iterations, CG backtracking, line-search trials, L-BFGS's function evaluations,
  K-FAC's Fisher backward passes and eigendecompositions) is stopped by a real signal at one of its reports in step 3:
  the step is abandoned, the checkpoint is the one of step 2, summary.json says where it stopped, and the resumed run's
  metrics, parameters, optimiser state and random states equal an uninterrupted run's, bit for bit. The signal is sent
  from a logging handler at the progress line of that report (every report is logged here), so it lands exactly there.
* A real `python run.py` process is signalled once it has printed its first progress line inside step 2 (the slow
  HF step of `SLOW`): it ends within one CG iteration, and `trainer.resume=true` continues bit for bit.
* Without a runner, a step reports nothing and computes the same bits as with a monitor.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from optimizers.cg import pcg
from optimizers.hf import HessianFree
from optimizers.monitor import StepInterrupted, StepMonitor, current, describe
from optimizers.objective import Objective
from runner import progress
from runner.checkpoint import CHECKPOINT, load_checkpoint
from runner.progress import StepProgress
from runner.train import train
from tests.runs import CPU, REPO, assert_same_tensors, env, make_config, metrics, start, without_times

TORCHRUN = Path(sys.executable).with_name("torchrun")

SMALL = ["trainer.batch_size=64", "trainer.log_every=1", "trainer.eval_every=2",
         "trainer.max_epochs=null", "trainer.max_steps=4", "trainer.progress_every_seconds=1e-9"]

# method, its overrides, the report of step 3 at which the signal comes
CASES = {
    "hf-cg": ("hf", [], "CG iteration 2 "),
    "hf-batch-norm": ("hf", ["model=cifar_basic_cnn_bn"], "CG iteration 2 "),  # running statistics moved in the step
    "hf-backtracking": ("hf", [], "CG backtracking 1 "),
    "hf-line-search": ("hf", ["optimizer.ls_initial_rate=4.0"], "line-search trial 1 "),
    "newton_cg": ("newton_cg", ["dtype=float64", "optimizer.damping=1.0", "optimizer.trust_radius=null"],
                  "CG iteration 2 "),  # without the trust region, whose boundary may end CG at iteration 1
    "newton-armijo": ("newton", ["dtype=float64", "model.hidden=[4]", "optimizer.ls_initial_rate=4.0"],
                      "line-search trial 1 "),
    "gd-armijo": ("gd", ["optimizer.step_size=armijo", "optimizer.ls_initial_rate=8.0"], "line-search trial 1 "),
    "nlcg": ("nlcg", ["dtype=float64", "trainer.batching=fixed"], "line-search trial 1 "),
    "lbfgs": ("lbfgs", ["dtype=float64", "trainer.batching=fixed"], "function evaluation 2"),
    "kfac-inverse": ("kfac", ["optimizer.inverse_every=1"], "K-FAC eigendecomposition 1 of 2"),
    "kfac-fisher": ("kfac", ["optimizer.fisher=ggn"], "K-FAC Fisher backward 4 of 10"),
}


class SignalAt(logging.Handler):
    """Sends `signum` to this process when a log line starts with `prefix` (once)."""

    def __init__(self, prefix: str, signum: int = signal.SIGUSR1) -> None:
        super().__init__(logging.INFO)
        self.prefix, self.signum, self.sent = prefix, signum, False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.sent and record.getMessage().startswith(self.prefix):
            self.sent = True
            os.kill(os.getpid(), self.signum)


@pytest.fixture
def every_step_abortable(monkeypatch):
    """Short steps, made abortable (the runner saves the state before steps of at least a second only)."""
    monkeypatch.setattr(StepProgress, "worth_saving", lambda self, step_time: True)


@pytest.fixture
def curvlab_log():
    logger = logging.getLogger("curvlab")
    level = logger.level
    logger.setLevel(logging.INFO)
    handlers: list[logging.Handler] = []
    yield handlers
    for handler in handlers:
        logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.mark.parametrize("case", list(CASES))
def test_a_signal_inside_a_step_abandons_it_and_the_resumed_run_is_identical(case, tmp_path, every_step_abortable,
                                                                            curvlab_log):
    name, extra, at = CASES[case]
    model = [] if any(arg.startswith("model=") for arg in extra) else ["model.hidden=[16]"]
    args = [*SMALL, f"optimizer={name}", *model, *extra]
    trigger = SignalAt(f"step 3: {at}")
    curvlab_log.append(trigger)
    logging.getLogger("curvlab").addHandler(trigger)
    stopped = train(make_config(*args), tmp_path / "stopped")
    assert trigger.sent, f"no progress line 'step 3: {at}...' was logged"
    assert stopped.status == "interrupted" and stopped.steps == 2
    summary = json.loads((tmp_path / "stopped" / "summary.json").read_text())
    assert summary["interrupted_by"] == "SIGUSR1" and summary["exit_code"] == 4 and summary["checkpoint_step"] == 2
    assert summary["abandoned_step"]["step"] == 3 and (summary["abandoned_step"]["at"] + " ").startswith(at)
    assert [row["step"] for row in metrics(tmp_path / "stopped")] == [1, 2]
    assert load_checkpoint(tmp_path / "stopped" / CHECKPOINT)["progress"]["step"] == 2

    resumed = train(make_config(*args, f"trainer.resume={tmp_path / 'stopped'}"), tmp_path / "resumed")
    reference = train(make_config(*args), tmp_path / "reference")
    assert resumed.status == reference.status == "ok" and resumed.steps == 4
    assert without_times(metrics(tmp_path / "resumed")) == without_times(metrics(tmp_path / "reference"))
    final, expected = (load_checkpoint(tmp_path / folder / CHECKPOINT) for folder in ("resumed", "reference"))
    for key in ("model", "optimizer"):
        assert_same_tensors(final[key], expected[key], key)
    for key in ("torch", "batches"):
        assert_same_tensors(final["rng"][0][key], expected["rng"][0][key], key)


def test_a_short_step_is_not_abandoned_and_the_signal_stops_at_the_boundary(tmp_path, curvlab_log, monkeypatch):
    """Steps shorter than LONG_STEP_SECONDS save no state: the signal inside step 3 ends the run after it."""
    monkeypatch.setattr(progress, "LONG_STEP_SECONDS", 1e9)
    trigger = SignalAt("step 3: CG iteration 2 ")
    curvlab_log.append(trigger)
    logging.getLogger("curvlab").addHandler(trigger)
    stopped = train(make_config(*SMALL, "optimizer=hf"), tmp_path / "stopped")
    assert trigger.sent and stopped.status == "interrupted" and stopped.steps == 3
    assert stopped.summary["abandoned_step"] is None


def test_progress_lines_name_the_step_the_work_and_the_elapsed_time(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="curvlab")
    train(make_config(*SMALL, "optimizer=hf", "trainer.max_steps=1", "optimizer.cg_min_iters=5"), tmp_path / "a")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step 1: ")]
    cg = [line for line in lines if line.startswith("step 1: CG iteration ")]
    assert cg[0].startswith("step 1: CG iteration 1 of <=250, |r| ") and ", q -" in cg[0] and cg[0].endswith(" s")
    assert len(cg) == metrics(tmp_path / "a")[0]["cg/iters"]  # one report per CG iteration
    assert lines[-1].startswith("step 1: done in ")


def test_no_progress_lines_with_null_and_the_option_is_checked(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="curvlab")
    train(make_config(*SMALL, "optimizer=hf", "trainer.max_steps=1", "trainer.progress_every_seconds=null"),
          tmp_path / "a")
    assert not [r for r in caplog.records if r.getMessage().startswith("step 1: ")]
    with pytest.raises(ValueError, match=r"trainer.progress_every_seconds=0.0 must be a positive number"):
        train(make_config(*SMALL, "trainer.progress_every_seconds=0"), tmp_path / "b")


def _hf_problem(dtype=torch.float64):
    torch.manual_seed(0)
    x, y = torch.randn(64, 6, dtype=dtype), torch.randint(0, 3, (64,))
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)
    return model, x, y


class Recorder(StepMonitor):
    active = True

    def __init__(self) -> None:
        self.reports: list[str] = []

    def report(self, activity, i, *, of=None, at_most=None, **values):
        self.reports.append(describe(activity, i, of, at_most))


def test_a_library_step_without_a_monitor_reports_nothing_and_a_monitor_changes_no_bit():
    results = []
    for monitor in (None, Recorder()):
        model, x, y = _hf_problem()
        optimizer = HessianFree(model.parameters(), cg_min_iters=6)
        if monitor is not None:
            optimizer.configure(monitor=monitor)
        for _ in range(3):
            optimizer.step(Objective(model, "cross_entropy", x, y))
        results.append((dict(model.state_dict()), optimizer.state_dict()))
    assert_same_tensors(results[0], results[1])
    assert monitor.reports[0] == "CG iteration 1 of <=250" and "CG backtracking 1 of <=" in " ".join(monitor.reports)
    assert current().active is False  # outside a step: the library's default, which does nothing


def test_a_monitor_can_stop_cg_after_any_iteration():
    class StopAt(StepMonitor):
        active = True

        def report(self, activity, i, **kwargs):
            if i == 3:
                raise StepInterrupted("test", activity)

    a = torch.eye(5, dtype=torch.float64) * torch.arange(1.0, 6.0, dtype=torch.float64)
    from optimizers.monitor import monitoring
    with monitoring(StopAt()), pytest.raises(StepInterrupted, match="test"):
        pcg(lambda v: a @ v, torch.ones(5, dtype=torch.float64), min_iters=5, max_iters=5, martens_tol=0.0)
    assert pcg(lambda v: a @ v, torch.ones(5, dtype=torch.float64), max_iters=5).iterations == 5  # no monitor: no stop


def test_the_copy_is_weighed_against_the_step():
    monitor = StepProgress(signals=None, every_seconds=None)
    assert monitor.worth_saving(None)  # before the first step: always
    assert not monitor.worth_saving(0.5)  # a short step
    monitor.copy_seconds = 0.01
    assert monitor.worth_saving(2.0)
    monitor.copy_seconds = 0.5  # the copy would cost a quarter of the step
    assert not monitor.worth_saving(2.0)


# ---------------------------------------------------------------- a real process, a real signal, mid-CG
# HF on the whole digits training split in float64 with a tiny damping, its products on the whole batch too
# (curvature_fraction=1): CG needs its 600 iterations (a few ms each), so each step takes seconds and the signal lands
# inside CG's loop.
SLOW = ["optimizer=hf", "dtype=float64", "trainer.batch_size=null", "optimizer.damping=1e-6",
        "optimizer.curvature_fraction=1.0",
        "optimizer.cg_min_iters=600", "optimizer.cg_max_iters=600", "trainer.max_steps=2", "trainer.max_epochs=null",
        "trainer.progress_every_seconds=0.2", "trainer.log_every=1"]


def _wait_for_line(process, prefix: str, timeout: float = 300) -> list[str]:
    """stdout lines (the log) up to the first that contains `prefix` (the process keeps running)."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise AssertionError(f"the run ended before printing {prefix!r}: {''.join(lines)}")
        lines.append(line)
        if prefix in line:
            return lines
    raise AssertionError(f"no {prefix!r} within {timeout} s")


def test_sigterm_inside_a_cg_solve_ends_the_run_within_an_iteration_and_it_resumes(tmp_path):
    folder = tmp_path / "run"
    process = start([*SLOW, f"hydra.run.dir={folder}"], tmp_path)
    _wait_for_line(process, "step 2: CG iteration")  # step 1 took seconds: step 2 can be abandoned
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    waited = time.monotonic() - sent
    assert process.returncode == 4, stderr
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["interrupted_by"] == "SIGTERM"
    assert summary["steps"] == 1 and summary["checkpoint_step"] == 1
    at = summary["abandoned_step"]
    assert at["step"] == 2 and at["at"].startswith("CG iteration ") and at["at"].endswith(" of <=600")
    assert int(at["at"].split()[2]) < 600  # stopped inside the solve, not at its end
    assert f"curvlab: interrupted by SIGTERM during step 2, abandoned at {at['at']}: the run stands after step 1 " \
           f"(epoch 1.00); checkpoint saved; continue with trainer.resume={folder}\n" in stderr
    assert "Traceback" not in stderr
    assert waited < 60, waited  # one CG iteration and a checkpoint, not the rest of the step

    process = start([*SLOW, f"hydra.run.dir={folder}", "trainer.resume=true"], tmp_path)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    reference = train(make_config(*SLOW), tmp_path / "reference")
    assert reference.status == "ok"
    assert without_times(metrics(folder)) == without_times(metrics(tmp_path / "reference"))
    final, expected = (load_checkpoint(path / CHECKPOINT) for path in (folder, tmp_path / "reference"))
    for key in ("model", "optimizer"):
        assert_same_tensors(final[key], expected[key], key)


def _worker_of_rank(launcher_pid: int, rank: int, timeout: float = 120) -> int:
    """The pid of torchrun's worker process with RANK=rank."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
        for pid in children:
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return int(pid)
        time.sleep(0.1)
    raise AssertionError(f"no worker of rank {rank}")


@pytest.mark.slow
def test_two_ranks_abandon_the_same_step_when_one_is_signalled_and_resume_bit_for_bit(tmp_path):
    """torchrun, 2 gloo ranks: SIGTERM to rank 1 alone, mid-CG in step 2. The stop check inside the step is collective,
    so both ranks abandon step 2 at the same CG iteration (no rank is left waiting in an all-reduce), rank 0 writes
    the checkpoint of step 1, and a 2-rank resume equals an uninterrupted 2-rank run."""
    def torchrun(folder: Path, *extra: str) -> subprocess.Popen:
        return subprocess.Popen([str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(REPO / "run.py"), *CPU,
                                 *SLOW, f"hydra.run.dir={folder}", *extra], cwd=tmp_path, env=env(PYTHONPATH=str(REPO)),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    folder = tmp_path / "run"
    launcher = torchrun(folder)
    _wait_for_line(launcher, "step 2: CG iteration")
    os.kill(_worker_of_rank(launcher.pid, 1), signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=300)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] == 1, stderr
    assert summary["abandoned_step"]["step"] == 2 and summary["abandoned_step"]["at"].startswith("CG iteration ")
    assert summary["interrupted_by"] == "a stop signal on another rank"  # rank 0 writes it; rank 1 had the signal

    resumed = torchrun(folder, "trainer.resume=true")
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr
    reference = torchrun(tmp_path / "reference")
    _, stderr = reference.communicate(timeout=600)
    assert reference.returncode == 0, stderr
    assert without_times(metrics(folder)) == without_times(metrics(tmp_path / "reference"))


def test_a_checkpoint_from_before_the_progress_keys_resumes_and_they_may_change(tmp_path):
    """trainer.progress_every_seconds and trainer.estimate_cost only show things: a checkpoint written without them
    (before they existed) or with other values resumes."""
    from omegaconf import OmegaConf

    from runner.resume import check_same_config

    now = OmegaConf.to_container(make_config(), resolve=True)
    old = OmegaConf.to_container(make_config(), resolve=True)
    del old["trainer"]["progress_every_seconds"], old["trainer"]["estimate_cost"]
    check_same_config(old, now, tmp_path / "checkpoint.pt")
    changed = OmegaConf.to_container(make_config("trainer.progress_every_seconds=1", "trainer.estimate_cost=false"),
                                     resolve=True)
    check_same_config(now, changed, tmp_path / "checkpoint.pt")
