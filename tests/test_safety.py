"""No run destroys another, and failures end with one clear message: real processes, real files, real limits.

* unique run and sweep folders (two sweeps on the same folder name, at once), and reruns into a folder that holds
  results refused with exit 2 before anything is written into it;
* a full disk (RLIMIT_FSIZE in the child makes writes past a size fail with EFBIG, as ENOSPC would; /dev/full for
  ENOSPC itself): exit 5, one message, every complete metrics row readable, the previous checkpoint intact;
* corrupt or truncated dataset files (real MNIST files copied and damaged, a CIFAR folder of garbage): one message
  naming the file, exit 2;
* the sweep report of the launching command (basic and submitit launchers), a 2-task submitit job with gloo, a
  preempted submitit job that requeues itself and resumes, torchrun's ranks sharing one folder, one GPU per job.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data.vision import build_cifar10, build_mnist
from runner.checkpoint import CHECKPOINT, PREVIOUS, load_checkpoint
from runner.errors import DiskFullError, describe_disk_full
from runner.gpu_lock import claim_gpu
from runner.metrics import JSONLSink, read_jsonl
from runner.run_dir import create_unique
from runner.train import train
from tests.runs import REPO, env, make_config, metrics, start, wait_for_rows, without_times

DATA = os.environ.get("CURVLAB_DATA")
needs_mnist = pytest.mark.skipif(not DATA, reason="CURVLAB_DATA is not set: point it at the folder holding MNIST/raw")
SMALL = ["model.hidden=[8]", "trainer.batch_size=64", "trainer.log_every=1", "trainer.max_epochs=null"]


def file_size_limit(limit: int):
    """preexec_fn: every file the child writes is limited to `limit` bytes (EFBIG past it, SIGXFSZ ignored)."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def curvlab_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("curvlab:")]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- folders


@pytest.mark.slow
def test_two_sweeps_on_the_same_folder_name_get_two_folders(tmp_path):
    """Both sweeps resolve the same folder name at the same time (as two sweeps started in the same second do with
    ${now:...}); the exclusive mkdir gives the second one `sweep-2`."""
    args = ["-m", "seed=0,1", "trainer.max_steps=2", f"hydra.sweep.dir=${{curvlab.unique_dir:{tmp_path / 'sweep'}}}"]
    processes = [start(args, tmp_path) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    folders = sorted(out.strip().splitlines()[-1].removeprefix("curvlab: results in ") for out, _ in outputs)
    assert folders == [str(tmp_path / "sweep"), str(tmp_path / "sweep-2")]
    for folder in folders:
        for job in ("0", "1"):
            assert json.loads((Path(folder) / job / "summary.json").read_text())["status"] == "ok"


def _create(path: str, queue) -> None:
    queue.put(create_unique(Path(path)))


def test_concurrent_processes_never_get_the_same_folder(tmp_path):
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [context.Process(target=_create, args=(str(tmp_path / "run"), queue)) for _ in range(6)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    got = sorted(queue.get(timeout=10) for _ in workers)
    assert got == sorted([str(tmp_path / "run")] + [str(tmp_path / f"run-{n}") for n in range(2, 7)])


def _rank_folder(rank: int, port: int, path: str, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RUN_ID="test")
    from runner.run_dir import unique_dir

    queue.put((rank, unique_dir(path)))


def test_ranks_that_start_in_different_seconds_share_rank_0s_folder(tmp_path):
    """As under torchrun: the store is served (here by the test, there by torchrun's agent); rank 1 resolves
    ${now:...} one second later than rank 0 and still gets rank 0's folder."""
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    ranks = [context.Process(target=_rank_folder, args=(rank, store.port, str(tmp_path / f"10-00-0{rank}"), queue))
             for rank in (1, 0)]
    for process in ranks:
        process.start()
    got = dict(queue.get(timeout=60) for _ in ranks)
    for process in ranks:
        process.join(30)
    assert got == {0: str(tmp_path / "10-00-00"), 1: str(tmp_path / "10-00-00")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["10-00-00"]


@pytest.mark.slow
def test_a_rerun_into_a_folder_with_results_is_refused_and_changes_nothing(tmp_path):
    args = ["trainer.max_steps=3", f"hydra.run.dir={tmp_path / 'run'}"]
    first = start(args, tmp_path)
    assert first.wait(timeout=300) == 0
    before = snapshot(tmp_path / "run")
    again = start(args + ["seed=1"], tmp_path)
    _, stderr = again.communicate(timeout=300)
    assert again.returncode == 2
    assert curvlab_lines(stderr) == [
        f"curvlab: error: the run folder {tmp_path / 'run'} already holds the results of another run (metrics.jsonl, "
        f"summary.json, checkpoint.pt); curvlab never writes over them. Continue that run with trainer.resume=true, "
        f"or choose a new folder with hydra.run.dir=... (hydra.sweep.dir=... with -m), or leave it unset for a fresh "
        f"unique one."]
    assert "Traceback" not in stderr and snapshot(tmp_path / "run") == before  # .hydra/ and run.log included
    sweep_args = ["-m", "seed=0,1", "trainer.max_steps=2", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    assert start(sweep_args, tmp_path).wait(timeout=300) == 0
    before = snapshot(tmp_path / "sweep")
    rerun = start(sweep_args, tmp_path)
    _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 2 and f"the run folder {tmp_path / 'sweep' / '0'} already holds" in stderr
    assert snapshot(tmp_path / "sweep") == before


# ---------------------------------------------------------------- a full disk


def test_a_full_disk_while_logging_keeps_every_complete_row_and_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    args = [*SMALL, "trainer.max_steps=2000", "trainer.checkpoint_every=50", f"hydra.run.dir={run}"]
    process = start(args, tmp_path, preexec_fn=file_size_limit(40_000))  # ~220 rows; checkpoints are ~30 kB
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 5, stderr
    lines = curvlab_lines(stderr)
    assert len(lines) == 1 and "Traceback" not in stderr
    assert lines[0] == (f"curvlab: error: out of disk space writing {run / 'metrics.jsonl'} (File too large). The run "
                        f"stopped: every complete row is in metrics.jsonl. The last checkpoint is intact. Free some "
                        f"space (or raise the quota / file-size limit) and continue with trainer.resume={run}")
    data = (run / "metrics.jsonl").read_bytes()
    assert data.endswith(b"\n") and len(data) <= 40_000  # the cut-off row was removed again
    rows = read_jsonl(run / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(1, len(rows) + 1)) and len(rows) > 150
    saved = load_checkpoint(run / CHECKPOINT)
    assert saved["progress"]["step"] == len(rows) // 50 * 50 and saved["metrics"]["rows"] == saved["progress"]["step"]
    assert not list(run.glob("*.tmp"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "error" and summary["exit_code"] == 5 and "DiskFullError" in summary["error"]


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    args = ["model.hidden=[64]", "trainer.batch_size=64", "trainer.log_every=1", "trainer.max_epochs=null",
            f"hydra.run.dir={run}"]
    assert start([*args, "trainer.max_steps=20"], tmp_path).wait(timeout=300) == 0  # checkpoint.pt of ~63 kB
    before = (run / CHECKPOINT).read_bytes()
    process = start([*args, "trainer.max_steps=40", "trainer.checkpoint_every=5", "trainer.resume=true"], tmp_path,
                    preexec_fn=file_size_limit(40_000))
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 5, stderr
    assert curvlab_lines(stderr)[0].startswith(f"curvlab: error: out of disk space writing {run / CHECKPOINT}")
    assert (run / CHECKPOINT).read_bytes() == before and load_checkpoint(run / CHECKPOINT)["progress"]["step"] == 20
    assert not list(run.glob("*.tmp"))
    assert [row["step"] for row in read_jsonl(run / "metrics.jsonl")] == list(range(1, 26))


def test_the_disk_full_message_names_the_run_folder_or_says_it_cannot_be_resumed(tmp_path):
    error = DiskFullError(errno.ENOSPC, "No space left on device", str(tmp_path / "metrics.jsonl"))
    assert describe_disk_full(error, tmp_path).endswith(
        f"{tmp_path} holds no checkpoint yet, so the run cannot be resumed: free some space (or raise the quota / "
        f"file-size limit) and start it again.")
    (tmp_path / PREVIOUS).write_bytes(b"")  # checkpoint.pt torn or gone: the previous one still resumes
    assert describe_disk_full(error, tmp_path).endswith(f"and continue with trainer.resume={tmp_path}")


def test_enospc_on_the_metrics_stream_is_a_disk_full_error(tmp_path):
    sink = JSONLSink(tmp_path / "metrics.jsonl")
    os.close(sink._fd)
    sink._fd = os.open("/dev/full", os.O_WRONLY)  # every write fails with ENOSPC
    with pytest.raises(DiskFullError, match="No space left on device"):
        sink.log({"step": 1, "loss": 1.0})
    sink.close()


# ---------------------------------------------------------------- corrupt data


def _mnist_copy(root: Path) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        shutil.copyfile(Path(DATA) / "MNIST" / "raw" / name, raw / name)
    return raw


@needs_mnist
@pytest.mark.parametrize("damage, file, message", [
    ("truncate", "train-images-idx3-ubyte",
     r"its header announces 60,000 x 28 x 28 bytes of images .* but the file has 100\."),
    ("random", "t10k-labels-idx1-ubyte", r"its magic number is 0x[0-9a-f]{8}, not the 0x00000801 of an idx file"),
    ("label", "train-labels-idx1-ubyte", r"label 200 at index 7 is outside 0\.\.9"),
])
def test_a_damaged_mnist_file_is_named(tmp_path, damage, file, message):
    path = _mnist_copy(tmp_path) / file
    if damage == "truncate":
        os.truncate(path, 100)
    elif damage == "random":
        path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))
    else:
        with open(path, "r+b") as handle:
            handle.seek(8 + 7)
            handle.write(bytes([200]))
    with pytest.raises(ValueError, match=rf"Dataset 'mnist': the file {path} is corrupt or truncated: {message}"):
        build_mnist(str(tmp_path))


def test_a_cifar_folder_of_garbage_is_named(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / name).write_bytes(np.random.default_rng(1).bytes(3000))
    with pytest.raises(ValueError, match=rf"the file {folder / 'data_batch_1'} is corrupt or truncated: it is not a "
                                         r"pickled CIFAR file \(UnpicklingError"):
        build_cifar10(str(tmp_path))


@needs_mnist
def test_corrupt_data_from_the_command_line_is_one_paragraph_and_exit_2(tmp_path):
    path = _mnist_copy(tmp_path / "data") / "train-images-idx3-ubyte"
    os.truncate(path, 100)
    process = start(["dataset=mnist", f"data_root={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 2 and "Traceback" not in stderr
    assert curvlab_lines(stderr) == [stderr.strip().splitlines()[-1]]
    assert f"the file {path} is corrupt or truncated" in stderr and "not found" not in stderr


# ---------------------------------------------------------------- sweeps and launchers


def test_the_sweep_reports_its_jobs_and_exits_with_the_worst(tmp_path):
    args = ["-m", "optimizer.lr=0.05,1e10,-1", "trainer.batch_size=100", "trainer.log_every=4",
            f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    process = start(args, tmp_path)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 2, stderr  # a user error (lr=-1) is worse than a divergence
    lines = stdout.strip().splitlines()
    assert lines[-2:] == ["curvlab: sweep of 3 jobs: 1 ok, 1 diverged, 0 interrupted, 1 failed",
                          f"curvlab: results in {tmp_path / 'sweep'}"]
    assert "curvlab: job 2 failed (exit code 2): " in stderr and "Traceback" not in stderr


@pytest.mark.slow
def test_a_two_task_submitit_job_trains_on_two_gloo_ranks_and_rank_0_writes(tmp_path):
    args = ["-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=5",
            "hydra.launcher.cpus_per_task=1", "trainer.max_steps=5", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    process = subprocess.Popen([sys.executable, "run.py", *args, "device=cpu", "threads=1"], cwd=REPO, env=env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # submitit imports from cwd
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    assert "curvlab: sweep of 1 jobs: 1 ok, 0 diverged, 0 interrupted, 0 failed" in stdout
    job = tmp_path / "sweep" / "0"
    saved = load_checkpoint(job / CHECKPOINT)
    assert saved["world_size"] == 2 and len(saved["rng"]) == 2  # both ranks' random states
    visible = sorted(p.name for p in (tmp_path / "sweep").iterdir() if not p.name.startswith("."))
    assert visible == ["0", "multirun.yaml"]  # one job folder: rank 1 made none
    assert len(list((tmp_path / "sweep").glob(".submitit/*/*_1_log.out"))) == 1  # rank 1 ran, and wrote no files


def test_the_slurm_preset_makes_one_task_per_gpu_and_asks_for_the_preemption_signal(tmp_path):
    """conf/hydra/launcher/slurm.yaml, turned into sbatch options the way hydra-submitit-launcher does it, and written
    by submitit's own sbatch writer (no SLURM needed)."""
    from hydra import compose, initialize_config_dir
    from submitit.slurm.slurm import SlurmExecutor, _make_sbatch_string

    make_config()  # registers the schema and the resolvers
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.nodes=2",
                                           "hydra.launcher.tasks_per_node=8", "hydra.launcher.partition=gpu",
                                           "hydra.launcher.account=proj"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher") and launcher.max_num_timeout == 3
    generic = SlurmExecutor._equivalence_dict()
    keys = ("nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task", "timeout_min", "signal_delay_s", "partition",
            "account")
    params = {generic.get(key, key): launcher[key] for key in keys}
    script = _make_sbatch_string(command="python -u -m submitit.core._submit x", folder=tmp_path, **params)
    for line in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=8", "--time=240",
                 "--signal=USR2@120", "--partition=gpu", "--account=proj"):
        assert f"#SBATCH {line}\n" in script, line


def _task_pids(marker: str) -> list[int]:
    """The processes running submitit tasks whose command line mentions `marker`."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in command and any(marker.encode() in part for part in command):
            pids.append(int(entry.name))
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the submitit task through /proc")
def test_a_preempted_submitit_job_checkpoints_requeues_and_resumes_identically(tmp_path):
    """SIGUSR2 (what SLURM sends before the time limit) to the job's task: the run checkpoints, hands over to submitit,
    which requeues the job; the requeued job resumes from the checkpoint in the same folder."""
    run_args = ["model.hidden=[16]", "trainer.batch_size=64", "trainer.log_every=1", "trainer.max_epochs=null",
                "trainer.max_steps=300"]
    args = ["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", "hydra.launcher.cpus_per_task=1",
            f"hydra.sweep.dir={tmp_path / 'sweep'}", *run_args]
    process = subprocess.Popen([sys.executable, "run.py", *args, "device=cpu", "threads=1"], cwd=REPO, env=env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job = tmp_path / "sweep" / "0"
    wait_for_rows(job / "metrics.jsonl", 20, process)
    pids = _task_pids(str(tmp_path))
    assert len(pids) == 1
    os.kill(pids[0], signal.SIGUSR2)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    assert "curvlab: sweep of 1 jobs: 1 ok, 0 diverged, 0 interrupted, 0 failed" in stdout
    task_err = "".join(p.read_text() for p in (tmp_path / "sweep").glob(".submitit/*/*_0_log.err"))
    assert "curvlab: interrupted by SIGUSR2 after step" in task_err
    summary = json.loads((job / "summary.json").read_text())
    assert summary["status"] == "ok" and 20 <= summary["resumed_from"]["step"] < 300
    reference = train(make_config(*run_args), tmp_path / "reference")
    assert reference.status == "ok"
    assert without_times(metrics(job)) == without_times(metrics(tmp_path / "reference"))


@pytest.mark.slow
def test_torchrun_ranks_share_one_folder_and_only_rank_0_writes(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    process = subprocess.Popen([str(torchrun), "--standalone", "--nproc_per_node=2", str(REPO / "run.py"),
                                "device=cpu", "threads=1", "trainer.max_steps=3"], cwd=tmp_path, env=env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    folders = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(folders) == 1 and stdout.count("curvlab: results in ") == 1  # rank 1 used rank 0's folder
    saved = load_checkpoint(folders[0] / CHECKPOINT)
    assert saved["world_size"] == 2 and len(saved["rng"]) == 2
    assert (folders[0] / ".hydra").is_dir() and len(metrics(folders[0])) == 3


def _claim(count: int, folder: str, queue, hold: float) -> None:
    queue.put((claim_gpu(count, Path(folder), poll_s=0.05), time.monotonic()))
    time.sleep(hold)


def test_each_job_of_a_local_sweep_locks_a_gpu_of_its_own(tmp_path):
    """Three jobs, two GPUs: two jobs get different devices at once, the third waits for one to exit."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    start_time = time.monotonic()
    jobs = [context.Process(target=_claim, args=(2, str(tmp_path), queue, 1.0)) for _ in range(3)]
    for job in jobs:
        job.start()
    claims = sorted((queue.get(timeout=30) for _ in jobs), key=lambda claim: claim[1])
    for job in jobs:
        job.join(30)
    assert sorted(index for index, _ in claims[:2]) == [0, 1]
    assert claims[2][1] - start_time >= 0.9  # the third got a GPU only after a holder exited
