"""Run and sweep folders: unique by default, the same for every rank, and never another run's results.

Hydra resolves `${now:...}` in each process, so two sweeps started in the same second shared one folder (the second
replacing the first's results), and the ranks of one torchrun job could each pick their own (hydra#2070).
conf/config.yaml therefore names the folders through a resolver:

    hydra.run.dir:   ${curvlab.unique_dir:outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}}
    hydra.sweep.dir: ${curvlab.unique_dir:outputs/multirun/${now:%Y-%m-%d_%H-%M-%S}}

`unique_dir(path)` creates the folder itself with an exclusive `mkdir` and, when it exists already, takes
`path-2`, `path-3`, ... instead: two processes can never both get the same folder. The result is cached for the
process (and travels inside the pickled config to submitit's jobs and their requeues, so a requeued job finds its
own folder again). Under torchrun, rank 0 picks the folder and the other ranks read it from torchrun's rendezvous
store, so all ranks share it. A folder set explicitly (`hydra.run.dir=...`) is used as given; train() then refuses to
write into it when it already holds results, unless asked to resume (runner/resume.py).

Only rank 0 writes: `curvlab.rank_zero` gives Hydra's `.hydra/` subfolder to rank 0 only, and `curvlab.log_file`
sends the other ranks' log files to os.devnull.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

from runner.distributed import launch_rank, requeued

MAX_SUFFIX = 1000
CHECKPOINT, PREVIOUS = "checkpoint.pt", "checkpoint.prev.pt"  # the latest checkpoint and the one before it
RESULT_FILES = ("metrics.jsonl", "summary.json", CHECKPOINT, PREVIOUS)  # what a run leaves behind
_chosen: dict[str, str] = {}  # template -> folder, once per process


def register_resolvers() -> None:
    """Register the `curvlab.*` resolvers that conf/config.yaml uses (run.py calls this before Hydra starts)."""
    OmegaConf.register_new_resolver("curvlab.unique_dir", unique_dir, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("curvlab.rank_zero", rank_zero, replace=True)
    OmegaConf.register_new_resolver("curvlab.log_file", log_file, replace=True)


def unique_dir(path: str) -> str:
    """A folder that did not exist before, named `path` or `path-N`; the same on every rank of a torchrun job."""
    if path in _chosen:
        return _chosen[path]
    rank, world = launch_rank()
    store = _torchrun_store() if world > 1 else None
    # Not keyed by `path`: its ${now:...} part differs between ranks that started in different seconds. Every rank
    # asks for the same folders in the same order, so the n-th request of each rank means the same folder.
    key = f"curvlab/unique_dir/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{len(_chosen)}"
    if store is not None and rank != 0:
        folder = store.get(key).decode()  # waits for rank 0
    else:
        folder = create_unique(Path(path))
        if store is not None:
            store.set(key, folder)
    _chosen[path] = folder
    return folder


def create_unique(path: Path) -> str:
    """Create `path` (or the first free `path-N`) exclusively and return it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, MAX_SUFFIX + 1):
        candidate = path if n == 1 else path.with_name(f"{path.name}-{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return str(candidate)
    raise FileExistsError(f"{path} and {MAX_SUFFIX - 1} numbered variants of it exist already; choose a folder "
                          "with hydra.run.dir=... (hydra.sweep.dir=... with -m).")


def rank_zero(value: str) -> str | None:
    """`value` on rank 0, None on the others (`hydra.output_subdir`: only rank 0 writes `.hydra/`)."""
    return value if launch_rank()[0] == 0 else None


def log_file(path: str) -> str:
    """`path` on rank 0, os.devnull on the others (each rank logs to its console; rank 0 also to run.log)."""
    return path if launch_rank()[0] == 0 else os.devnull


def _torchrun_store():
    """torchrun's rendezvous store (served by its agent at MASTER_ADDR:MASTER_PORT), or None outside torchrun."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        if "TORCHELASTIC_RUN_ID" in os.environ or "MASTER_ADDR" in os.environ:
            raise ValueError(
                "this multi-rank job was not started by torchrun with its agent store, so the ranks cannot agree on "
                "a run folder by themselves: set one for all ranks with hydra.run.dir=/path/to/run (or "
                "hydra.sweep.dir=... with -m), or launch with torchrun or hydra/launcher=slurm.")
        return None
    from torch.distributed import TCPStore

    from runner.distributed import TIMEOUT

    return TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=TIMEOUT)


def existing_results(folder: Path) -> list[str]:
    """The result files `folder` holds (empty for a new folder)."""
    return [name for name in RESULT_FILES if (folder / name).exists()]


def refuse_existing(folder: Path) -> None:
    """ValueError (exit 2) naming `folder` when it holds the results of a run."""
    found = existing_results(folder)
    if found:
        raise ValueError(
            f"the run folder {folder} already holds the results of another run ({', '.join(found)}); curvlab never "
            f"writes over them. Continue that run with trainer.resume=true, or choose a new folder with "
            f"hydra.run.dir=... (hydra.sweep.dir=... with -m), or leave it unset for a fresh unique one."
        )


def resume_setting(value: object) -> bool | str | None:
    """trainer.resume as typed: None (auto), True, False or a folder (strings 'true' / 'false' / 'null' too)."""
    if isinstance(value, str) and value.lower() in ("true", "false", "null", "none", ""):
        return {"true": True, "false": False}.get(value.lower())
    if value is None or isinstance(value, (bool, str)):
        return value
    raise ValueError(f"trainer.resume={value!r} must be true, false, null or the folder of the run to continue.")


def check_folder(folder: Path, resume: object) -> None:
    """Before anything is written into `folder`: refuse it when it holds results this run does not resume."""
    setting = resume_setting(resume)
    if setting is True or (setting is None and requeued()):
        return
    if isinstance(setting, str) and Path(setting).resolve() == folder.resolve():
        return
    refuse_existing(folder)
