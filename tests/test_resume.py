"""Preemption and exact resume, with real processes and real signals.

For every optimiser, `python run.py` runs in a subprocess and gets a stop signal (SIGTERM, SIGUSR1, SIGUSR2 or
SIGINT) at a random step (once metrics.jsonl has k rows); it must finish the step, checkpoint, write summary.json
with status "interrupted", print one line and exit 4. The run is then resumed from its folder, and its metrics
(every column but the wall-clock times) and its final parameters, optimiser state and random states must be
IDENTICAL to an uninterrupted run of the same config (the methods and their cases: tests/registry.py). Plus: a kill -9 during checkpoint writes, a second Ctrl-C, a
handler the user installed, weights_only checkpoints for every optimiser, and the refusals.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from data.batching import make_batches
from data.base import TensorPairDataset
from optimizers.objective import Objective
from runner.checkpoint import CHECKPOINT, PREVIOUS, load_checkpoint, load_latest, plain, save_checkpoint
from runner.metrics import JSONLSink, read_jsonl
from runner.train import train
from tests import registry
from tests.runs import (assert_same_tensors, count_rows, make_config, metrics, start, wait_for_rows,
                        without_times)

# digits, an MLP with 16 hidden units, batches of 64 (24 per epoch: interruptions fall mid-epoch), a row per step.
SMALL = ["model.hidden=[16]", "trainer.batch_size=64", "trainer.log_every=1", "trainer.eval_every=5",
         "trainer.max_epochs=null", "trainer.checkpoint_every=7"]


CASES = {name: method.resume for name, method in registry.METHODS.items()}  # budget, signal, overrides


def overrides(name: str) -> list[str]:
    case = CASES[name]
    return [*SMALL, f"optimizer={name}", f"trainer.max_steps={case.steps}", *case.overrides]


@dataclass
class Interrupted:
    folder: Path
    rows: int  # the signal is sent once metrics.jsonl has this many rows
    process: object
    stdout: str = ""
    stderr: str = ""


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> dict[str, Interrupted]:
    """Every case's run, started at once, each signalled once it has logged a random number of rows."""
    rng = random.Random(2026)
    runs = {}
    for name in CASES:
        folder = tmp_path_factory.mktemp(name)
        runs[name] = Interrupted(folder / "run", rng.randint(3, 25),
                                 start([*overrides(name), f"hydra.run.dir={folder / 'run'}"], folder))
    waiting, deadline = set(runs), time.monotonic() + 600
    while waiting and time.monotonic() < deadline:
        for name in list(waiting):
            run = runs[name]
            if count_rows(run.folder / "metrics.jsonl") >= run.rows or run.process.poll() is not None:
                run.process.send_signal(getattr(signal, CASES[name].signal))
                waiting.discard(name)
        time.sleep(0.005)
    for run in runs.values():
        run.stdout, run.stderr = run.process.communicate(timeout=600)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_a_stop_signal_checkpoints_and_the_resumed_run_is_identical(interrupted, name, tmp_path):
    run, case = interrupted[name], CASES[name]
    assert run.process.returncode == 4, run.stderr
    summary = json.loads((run.folder / "summary.json").read_text())
    stopped = summary["steps"]
    assert run.rows <= stopped < case.steps, (run.rows, stopped)
    assert summary["status"] == "interrupted" and summary["interrupted_by"] == case.signal
    assert summary["checkpoint_step"] == stopped and summary["exit_code"] == 4
    lines = [line for line in run.stderr.splitlines() if line.startswith("curvlab:")]
    assert lines == [f"curvlab: interrupted by {case.signal} after step {stopped} (epoch {stopped / 24:.2f}): "
                     f"checkpoint saved; continue with trainer.resume={run.folder}"], run.stderr
    assert "Traceback" not in run.stderr
    assert [row["step"] for row in metrics(run.folder)] == list(range(1, stopped + 1))
    saved = load_checkpoint(run.folder / CHECKPOINT)  # weights_only=True
    assert saved["progress"]["step"] == stopped and saved["metrics"]["rows"] == stopped
    if stopped > 7:  # the periodic checkpoint (every 7 steps) before the last one is kept
        assert stopped - 7 <= load_checkpoint(run.folder / PREVIOUS)["progress"]["step"] < stopped

    resumed = train(make_config(*overrides(name), f"trainer.resume={run.folder}"), tmp_path / "resumed")
    reference = train(make_config(*overrides(name)), tmp_path / "reference")
    assert resumed.status == reference.status == "ok" and resumed.steps == case.steps
    assert resumed.summary["resumed_from"]["step"] == stopped
    rows = metrics(tmp_path / "resumed")
    assert [row["step"] for row in rows] == list(range(1, case.steps + 1))  # each step exactly once
    assert without_times(rows) == without_times(metrics(tmp_path / "reference"))  # bit for bit
    final, expected = (load_checkpoint(tmp_path / folder / CHECKPOINT) for folder in ("resumed", "reference"))
    for key in ("model", "optimizer"):
        assert_same_tensors(final[key], expected[key], key)
    for key in ("torch", "cuda", "batches"):  # Python's and NumPy's may differ: a module imported late (rich) draws
        assert_same_tensors(final["rng"][0][key], expected["rng"][0][key], key)  # from them once per process
    assert {k: v for k, v in resumed.summary.items() if k not in ("wall_time", "resumed_from")} == \
        {k: v for k, v in reference.summary.items() if k not in ("wall_time", "resumed_from")}
    assert len(metrics(run.folder)) == stopped  # the interrupted run's folder is left as it was


def test_resume_in_place_from_the_command_line_and_with_a_larger_budget(interrupted, tmp_path):
    """`hydra.run.dir=<folder> trainer.resume=true` continues in the same folder, here to a budget the first run did
    not have (the budget is the one thing a resume may change)."""
    run = interrupted["sgd"]
    folder = tmp_path / "run"
    folder.mkdir()
    for name in ("metrics.jsonl", CHECKPOINT, PREVIOUS, "summary.json"):
        if (run.folder / name).exists():
            (folder / name).write_bytes((run.folder / name).read_bytes())
    args = [*overrides("sgd"), "trainer.max_steps=330", f"hydra.run.dir={folder}", "trainer.resume=true"]
    process = start(args, tmp_path)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    train(make_config(*overrides("sgd"), "trainer.max_steps=330"), tmp_path / "reference")
    assert without_times(metrics(folder)) == without_times(metrics(tmp_path / "reference"))
    assert json.loads((folder / "summary.json").read_text())["status"] == "ok"


@pytest.mark.slow
def test_kill_9_during_checkpoint_writes_always_leaves_a_loadable_checkpoint(tmp_path):
    """A checkpoint every step, each write slowed down inside (CURVLAB_TEST_SLOW_CHECKPOINT), and kill -9 at random
    moments, three times: the folder always holds a loadable checkpoint, the run resumes from it, and the final
    metrics equal an uninterrupted run's."""
    args = [*SMALL, "optimizer=hf", "trainer.max_steps=60", "trainer.checkpoint_every=1",
            f"hydra.run.dir={tmp_path / 'run'}"]
    slow = {"CURVLAB_TEST_SLOW_CHECKPOINT": "0.05"}
    rng = random.Random(9)
    for attempt in range(3):
        process = start(args + (["trainer.resume=true"] if attempt else []), tmp_path, slow)
        wait_for_rows(tmp_path / "run" / "metrics.jsonl", 5 + 12 * attempt, process)
        time.sleep(rng.uniform(0.0, 0.3))
        process.kill()
        process.communicate()
        path, state = load_latest(tmp_path / "run")  # weights_only=True; checkpoint.pt or, if torn, the previous one
        assert state["progress"]["step"] >= 1 and not (tmp_path / "run" / "summary.json").exists()
    process = start(args + ["trainer.resume=true"], tmp_path)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert not (tmp_path / "run" / (CHECKPOINT + ".tmp")).exists()
    train(make_config(*args[:-1]), tmp_path / "reference")
    assert without_times(metrics(tmp_path / "run")) == without_times(metrics(tmp_path / "reference"))


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(tmp_path):
    args = [*SMALL, "optimizer=sgd", "trainer.max_steps=1000", "trainer.checkpoint_every=5",
            f"hydra.run.dir={tmp_path / 'run'}"]
    process = start(args, tmp_path, {"CURVLAB_TEST_SLOW_CHECKPOINT": "1.0"})  # every checkpoint write takes 1 s
    deadline = time.monotonic() + 300
    while not (tmp_path / "run" / CHECKPOINT).exists() and time.monotonic() < deadline:
        time.sleep(0.005)  # the checkpoint of step 5 is complete
    process.send_signal(signal.SIGINT)  # stop after this step: the final checkpoint is written (slowly)
    time.sleep(0.4)
    process.send_signal(signal.SIGINT)  # ... and interrupted by the second Ctrl-C
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert [line for line in stderr.splitlines() if line.startswith("curvlab:")] == [
        "curvlab: stopped at once by SIGINT, without a new checkpoint (the last one, if any, is intact)."]
    assert "Traceback" not in stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["exit_code"] == 130
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT)["progress"]["step"] == summary["checkpoint_step"] == 5
    assert not (tmp_path / "run" / (CHECKPOINT + ".tmp")).exists()


LATE_SIGNALS = [("SIGINT", 0.3), ("SIGINT", 0.8), ("SIGTERM", 0.3)]  # during the checkpoint: the test above


def test_summary_json_agrees_with_the_exit_code_whenever_the_second_signal_comes(tmp_path):
    """Issue 19: a stop signal, then SIGINT `delay` seconds later, to real `run.py` processes. The second one lands in
    the last step, the final checkpoint, summary.json, Hydra's teardown or Python's shutdown (which takes ~1 s after a
    run); before the fix a SIGINT there killed the process (exit 130) after summary.json had recorded 4. Whenever it
    comes, the exit code is the one summary.json records, and the one line on stderr says the same."""
    args = [*SMALL, "optimizer=sgd", "trainer.max_steps=100000", "trainer.checkpoint_every=5"]
    runs = []
    for i, (first, delay) in enumerate(LATE_SIGNALS):
        folder = tmp_path / f"run{i}"
        runs.append((folder, first, delay, start([*args, f"hydra.run.dir={folder}"], tmp_path)))

    def signal_twice(folder: Path, first: str, delay: float, process) -> None:
        wait_for_rows(folder / "metrics.jsonl", 8, process)
        process.send_signal(getattr(signal, first))
        time.sleep(delay)
        process.send_signal(signal.SIGINT)

    senders = [threading.Thread(target=signal_twice, args=run) for run in runs]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(300)
    for folder, first, delay, process in runs:
        _, stderr = process.communicate(timeout=120)
        summary = json.loads((folder / "summary.json").read_text())
        case = f"{first} then SIGINT {delay} s later: exit {process.returncode}, {summary}, {stderr}"
        assert process.returncode == summary["exit_code"] and summary["status"] == "interrupted", case
        lines = [line for line in stderr.splitlines() if line.startswith("curvlab:")]
        if process.returncode == 4:
            assert lines == [f"curvlab: interrupted by {first} after step {summary['steps']} (epoch "
                             f"{summary['steps'] / 24:.2f}): checkpoint saved; continue with trainer.resume={folder}"]
            assert load_checkpoint(folder / CHECKPOINT)["progress"]["step"] == summary["checkpoint_step"]
        else:
            assert process.returncode == 130 and first == "SIGINT", case  # after SIGTERM a SIGINT is no 2nd Ctrl-C
            assert lines == ["curvlab: stopped at once by SIGINT, without a new checkpoint (the last one, if any, is "
                             "intact)."], case
        assert "Traceback" not in stderr


def _signal_after_rows(path: Path, rows: int, signum: int) -> threading.Event:
    """Send ``signum`` to this process once ``path`` has ``rows`` rows; setting the returned event cancels it (so a
    run that failed early never leaves a signal behind for the rest of the test session)."""
    cancel = threading.Event()

    def send() -> None:
        deadline = time.monotonic() + 120
        while count_rows(path) < rows and time.monotonic() < deadline and not cancel.is_set():
            time.sleep(0.002)
        if not cancel.is_set() and count_rows(path) >= rows:
            os.kill(os.getpid(), signum)

    threading.Thread(target=send, daemon=True).start()
    return cancel


def test_a_handler_the_user_installed_is_kept_and_still_called(tmp_path):
    calls = []

    def user_handler(signum, frame):
        calls.append(signum)

    previous = signal.signal(signal.SIGUSR1, user_handler)
    cancel = _signal_after_rows(tmp_path / "metrics.jsonl", 4, signal.SIGUSR1)
    try:
        result = train(make_config(*SMALL, "trainer.max_steps=3000"), tmp_path)
        assert result.status == "interrupted" and result.summary["interrupted_by"] == "SIGUSR1"
        assert calls == [signal.SIGUSR1]  # called once, right when the signal came
        assert signal.getsignal(signal.SIGUSR1) is user_handler  # and installed again after the run
    finally:
        cancel.set()
        signal.signal(signal.SIGUSR1, previous)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_wandb_offline_resume_starts_a_new_run_in_the_same_group(tmp_path, capsys):
    cancel = _signal_after_rows(tmp_path / "first" / "metrics.jsonl", 4, signal.SIGTERM)
    try:
        first = train(make_config(*SMALL, "trainer.max_steps=3000", "logger=wandb", "logger.group=g"),
                      tmp_path / "first")
    finally:
        cancel.set()
    assert first.status == "interrupted"
    resumed = train(make_config(*SMALL, "trainer.max_steps=40", "logger=wandb", "logger.group=g",
                                f"trainer.resume={tmp_path / 'first'}"), tmp_path / "second")
    old, new = first.summary["wandb"], resumed.summary["wandb"]
    assert new["id"] != old["id"] and new["group"] == old["group"] == "g"
    assert f"cannot be resumed (wandb#2423): this run logs to a new W&B run {new['id']} in group g, continuing " \
           f"{old['id']}" in capsys.readouterr().err
    assert len(list((tmp_path / "second" / "wandb").glob("offline-run-*"))) == 1


# ---------------------------------------------------------------- refusals


def test_a_resume_with_another_config_is_refused_naming_the_keys(interrupted, tmp_path):
    run = interrupted["hf"]
    with pytest.raises(ValueError, match=r"the config differs in optimizer\.damping \(1\.0 in the checkpoint, 3\.0 now"
                                         r"\), seed \(0 in the checkpoint, 1 now\)\. .*except for its budget"):
        train(make_config(*overrides("hf"), "optimizer.damping=3.0", "seed=1", f"trainer.resume={run.folder}"),
              tmp_path / "new")
    assert not (tmp_path / "new" / "metrics.jsonl").exists()


def test_a_checkpoint_older_than_a_config_key_resumes_while_that_key_is_null(tmp_path):
    """A checkpoint written before the config gained objective.micro_batch_size (null = the old behaviour) resumes;
    setting the new key is a config change like any other and is refused."""
    train(make_config(*SMALL, "trainer.max_steps=3"), tmp_path / "old")
    state = load_checkpoint(tmp_path / "old" / CHECKPOINT)
    del state["config"]["objective"]["micro_batch_size"]
    save_checkpoint(tmp_path / "old", {key: value for key, value in state.items() if key != "format"})
    refused = r"differs in objective\.micro_batch_size \('<unset>' in the checkpoint, 2 now"
    with pytest.raises(ValueError, match=refused):
        train(make_config(*SMALL, "trainer.max_steps=5", "objective.micro_batch_size=2",
                          f"trainer.resume={tmp_path / 'old'}"), tmp_path / "refused")
    resumed = train(make_config(*SMALL, "trainer.max_steps=5", f"trainer.resume={tmp_path / 'old'}"), tmp_path / "new")
    assert resumed.status == "ok"
    assert [row["step"] for row in metrics(tmp_path / "new")] == [1, 2, 3, 4, 5]


def test_resume_needs_a_checkpoint_and_a_fresh_folder(interrupted, tmp_path):
    with pytest.raises(ValueError, match=r"trainer.resume=\[1\] must be true, false, null or the folder of the run"):
        train(make_config(*SMALL, "trainer.max_steps=3", "trainer.resume=[1]"), tmp_path / "bad")
    with pytest.raises(ValueError, match=r"trainer.resume=true: .* holds no checkpoint .*trainer.resume=/path/to/run"):
        train(make_config(*SMALL, "trainer.max_steps=3", "trainer.resume=true"), tmp_path / "fresh")
    train(make_config(*SMALL, "trainer.max_steps=3"), tmp_path / "done")
    with pytest.raises(ValueError, match=r"already holds the results of another run"):
        train(make_config(*overrides("sgd"), f"trainer.resume={interrupted['sgd'].folder}"), tmp_path / "done")


# ---------------------------------------------------------------- the pieces


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(reason=registry.NO_CHECKPOINT[n], strict=True))
                                  if n in registry.NO_CHECKPOINT else n for n in registry.choices()])
def test_every_optimizer_state_loads_with_weights_only_and_continues_bit_for_bit(name, monkeypatch):
    """The optimiser's own state_dict (no conversion) survives torch.load(weights_only=True), and a fresh optimiser
    loaded from it takes the same next steps as the original (both from the same random state: K-FAC's sampled
    Fisher, PSGD and the Hutchinson methods draw random numbers in their steps)."""
    package = registry.choices()[name].get("cls", "torch").split(".")[0]  # an adapter choice's package
    pytest.importorskip(package)
    if package == "heavyball":  # its kernels eagerly, without torch.compile (1-2 minutes on a CPU)
        monkeypatch.setattr(pytest.importorskip("heavyball.utils"), "compile_mode", None)
    dtype = torch.float32 if registry.is_adapter_choice(name) else torch.float64  # heavyball's SOAP: float32 only
    torch.manual_seed(0)
    x, y = torch.randn(32, 6, dtype=dtype), torch.randint(0, 3, (32,))
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(dtype)
    factory = instantiate(make_config(f"optimizer={name}").optimizer)
    optimizer = factory(model.parameters())
    optimizer.configure(total_steps=10)
    for _ in range(3):
        optimizer.step(Objective(model, "cross_entropy", x, y))
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert_same_tensors(plain(optimizer.state_dict()), state)  # plain() changes nothing for this optimiser
    twin = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(dtype)
    twin.load_state_dict(model.state_dict())
    copy = factory(twin.parameters())
    copy.configure(total_steps=10)
    copy.load_state_dict(state)
    for step in range(2):
        registry.seed_draws(step)
        optimizer.step(Objective(model, "cross_entropy", x, y))
        registry.seed_draws(step)
        copy.step(Objective(twin, "cross_entropy", x, y))
    assert_same_tensors(dict(model.state_dict()), dict(twin.state_dict()))


def test_random_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    import random as python_random

    import numpy as np

    from runner.seeding import rng_states, seed_everything, set_rng_states

    seed_everything(5)
    np.random.normal(size=3)  # a cached Gaussian in NumPy's state
    save_checkpoint(tmp_path, {"rng": [rng_states()]})
    expected = (python_random.random(), np.random.normal(), np.random.rand(), torch.rand(2))
    set_rng_states(load_checkpoint(tmp_path / CHECKPOINT)["rng"][0])
    again = (python_random.random(), np.random.normal(), np.random.rand(), torch.rand(2))
    assert expected[:3] == again[:3] and torch.equal(expected[3], again[3])


def test_plain_converts_numpy_and_names_what_it_cannot_store():
    import numpy as np

    converted = plain({"a": np.arange(3), "b": np.float32(1.5), "c": (1, [torch.ones(2)])})
    assert torch.equal(converted["a"], torch.arange(3)) and converted["b"] == 1.5 and type(converted["c"]) is tuple
    with pytest.raises(TypeError, match=r"optimizer\.inner\.state\.0\.fn holds a builtins\.function"):
        plain({"inner": {"state": {0: {"fn": lambda: 0}}}}, "optimizer")


def test_a_torn_checkpoint_falls_back_to_the_previous_one_with_a_warning(tmp_path, caplog):
    save_checkpoint(tmp_path, {"progress": {"step": 1}})
    save_checkpoint(tmp_path, {"progress": {"step": 2}})
    assert load_latest(tmp_path)[1]["progress"]["step"] == 2
    (tmp_path / CHECKPOINT).write_bytes((tmp_path / CHECKPOINT).read_bytes()[:100])  # cut short
    with caplog.at_level(logging.WARNING, logger="curvlab"):
        path, state = load_latest(tmp_path)
    assert path.name == PREVIOUS and state["progress"]["step"] == 1
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [(
        "WARNING", f"cannot read {tmp_path / CHECKPOINT}: it is cut short or not a torch.save file (RuntimeError: "
                   f"PytorchStreamReader failed reading zip archive: failed finding central directory). Resuming from "
                   f"{tmp_path / PREVIOUS} (step 1) instead: the steps after step 1 will be redone.")]
    (tmp_path / CHECKPOINT).unlink()  # a crash between the two renames
    caplog.clear()
    assert load_latest(tmp_path)[1]["progress"]["step"] == 1 and not caplog.records  # nothing unreadable: silent


class _CreatesAFile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_hostile_checkpoint_is_not_run_and_the_resume_redoes_the_steps_it_names(tmp_path, caplog):
    """checkpoint.pt (step 12) replaced by a file whose unpickling would create a file: resuming warns, naming it,
    why, and the steps 11 to 12 it redoes from checkpoint.prev.pt (step 10), and ends as the uninterrupted run."""
    args = [*SMALL, "trainer.checkpoint_every=5"]
    train(make_config(*args, "trainer.max_steps=12"), tmp_path / "first")
    marker = tmp_path / "pwned"
    torch.save({"format": 1, "progress": {"step": 12}, "x": _CreatesAFile(marker)}, tmp_path / "first" / CHECKPOINT)
    with caplog.at_level(logging.WARNING, logger="curvlab"):
        resumed = train(make_config(*args, "trainer.max_steps=20", f"trainer.resume={tmp_path / 'first'}"),
                        tmp_path / "resumed")
    assert not marker.exists()
    first = tmp_path / "first"
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"cannot read {first / CHECKPOINT}: it names io.open, which a weights_only load refuses (only tensors and "
        f"plain values are allowed): a foreign or hostile file. Resuming from {first / PREVIOUS} (step 10) instead: steps 11 to 12 "
        f"will be redone (checkpoint.pt was written at step 12, as summary.json records)."]
    assert resumed.summary["resumed_from"]["step"] == 10
    train(make_config(*args, "trainer.max_steps=20"), tmp_path / "reference")
    assert without_times(metrics(tmp_path / "resumed")) == without_times(metrics(tmp_path / "reference"))


def test_a_checkpoint_with_code_in_it_is_not_loaded(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"format": 1, "x": Payload()}, tmp_path / CHECKPOINT)
    with pytest.raises(ValueError, match="no readable checkpoint"):
        load_latest(tmp_path)


@pytest.mark.parametrize("augmented", [False, True], ids=["in_memory", "dataloader"])
def test_batches_resume_mid_epoch_with_the_remaining_batches(augmented):
    data = TensorPairDataset(torch.arange(23.0).unsqueeze(1), torch.arange(23))
    dataset = data if not augmented else torch.utils.data.TensorDataset(data.inputs, data.targets)

    def epochs(batches, count):
        return [[y.tolist() for _, y in batches] for _ in range(count)]

    original = make_batches(dataset, batch_size=5, seed=3)
    expected = epochs(original, 3)
    replay = make_batches(dataset, batch_size=5, seed=3)
    taken = []
    for i, (_, y) in enumerate(replay):
        taken.append(y.tolist())
        if i == 2:
            break  # stopped after three batches of the first epoch
    state = replay.state_dict()
    resumed = make_batches(dataset, batch_size=5, seed=99)
    resumed.load_state_dict(state)
    rest = epochs(resumed, 3)
    assert taken + rest[0] == expected[0] and rest[1:] == expected[1:3]


def test_metrics_rows_are_cut_back_to_the_checkpoint_and_a_partial_last_line_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    sink = JSONLSink(path)
    for step in range(1, 6):
        sink.log({"step": step, "loss": 1.0 / step})
    sink.close()
    with open(path, "ab") as file:
        file.write(b'{"step": 6, "lo')  # a row cut short by a crash
    assert [row["step"] for row in read_jsonl(path)] == [1, 2, 3, 4, 5]
    resumed = JSONLSink(path, keep_rows=3)
    resumed.log({"step": 4, "loss": 0.0})
    resumed.close()
    assert [row["step"] for row in read_jsonl(path)] == [1, 2, 3, 4] and path.read_bytes().endswith(b"}\n")
