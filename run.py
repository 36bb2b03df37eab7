"""curvlab's command line: compose a config with Hydra, train, and say where the results are.

    python run.py --help                                  config groups, their choices and every key
    python run.py dataset=mnist optimizer=adam            one run -> outputs/<date>/<time>/
    python run.py -m optimizer=sgd,adam seed=0,1          a sweep -> outputs/multirun/<date_time>/<job>/
    python run.py workload=mnist_mlp800 optimizer=hf      a race workload (conf/workload/; python -m runner.race)

Exit codes: 0 ok; 1 a bug (a traceback); 2 bad configuration or input (one paragraph on stderr; CURVLAB_DEBUG=1 shows
the traceback), including a run folder that holds another run's results; 3 training diverged; 4 interrupted by
SIGTERM / SIGUSR1 / SIGUSR2 / SIGINT after a checkpoint (continue with trainer.resume=<folder>); 5 out of disk space;
130 a second SIGINT (stopped at once). A single run exits with the exit_code its summary.json records: once that
file is written, further stop signals are ignored until the process ends. A sweep (-m, any launcher) reports how many
jobs ended ok / diverged / interrupted / failed, from their summary.json files, and exits with the worst job's code. A
stop signal stops an in-process sweep after the job it interrupted; the same command with
hydra.sweep.dir=<its folder> trainer.resume=true continues it, without running its finished jobs again
(runner/sweep.py).
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig

from runner.errors import (EXIT_KILLED, EXIT_OK, EXIT_USER_ERROR, debug_enabled, describe_disk_full,
                           describe_user_error, exit_code_for, is_disk_full)
from runner.run_dir import register_resolvers
from runner.schema import register_configs
from runner.signals import ignore_stop_signals
from runner import sweep

register_configs()
register_resolvers()
_outcome = {"exit_code": EXIT_OK}


def _fail(code: int) -> None:
    _outcome["exit_code"] = max(_outcome["exit_code"], code, key=sweep.SEVERITY.index)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Train; return the tuning objective (cfg.tune, runner/tuning.py) for sweepers such as optuna (None: failed or
    interrupted)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from runner import tuning
    from runner.train import train  # imported here: config errors are reported without loading torch

    hydra_config = HydraConfig.get()
    single = hydra_config.mode == RunMode.RUN
    try:
        tuning.check(cfg.tune, hydra_config.sweeper)
        out = Path(hydra_config.runtime.output_dir)
        finished = sweep.finished_job(cfg, out)
        if finished is not None:  # continuing a sweep: this job's run is done (runner/sweep.py)
            status = finished["status"]
            print(f"curvlab: {out} holds this job's finished run (status {status}); not run again.")
            _fail(finished.get("exit_code") if finished.get("exit_code") in sweep.SEVERITY else 1)
            return tuning.objective_value(cfg.tune, out, status) if status != "error" else None
        result = train(cfg)
    except Exception as exc:  # every job of a sweep runs, whatever another one raised
        if single:
            ignore_stop_signals()  # the outcome (and summary.json) is decided: the process ends with this code
        code = exit_code_for(exc)
        _report_error(exc, code, hydra_config.runtime.output_dir)
        _fail(code)
        return None
    if single:
        ignore_stop_signals()  # summary.json is written: a late Ctrl-C must not turn exit code 4 into 130
    _fail(sweep.STATUS_CODES[result.status])
    if result.status == "interrupted":
        if sweep.in_process_sweep():
            raise sweep.SweepStopped(f"job {result.output_dir.name} was interrupted by "
                                     f"{result.summary.get('interrupted_by') or 'a stop signal'}")
        return None
    return tuning.objective_value(cfg.tune, result.output_dir, result.status)


def _report_error(exc: BaseException, code: int, run_folder: str) -> None:
    """One paragraph on stderr for known errors; the traceback for bugs (and with CURVLAB_DEBUG=1). In a
    data-parallel run the paragraph names the rank (a bug's too, after its traceback)."""
    from runner.distributed import launch_rank

    rank, world = launch_rank()
    who = f"rank {rank} of {world}: " if world > 1 else ""
    if code == 1 or debug_enabled():
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    if is_disk_full(exc):
        print(f"curvlab: {who}error: {describe_disk_full(exc, run_folder)}", file=sys.stderr)
    elif code != 1:
        print(f"curvlab: {who}error: {describe_user_error(exc)}", file=sys.stderr)
    elif who:
        print(f"curvlab: {who}failed with {type(exc).__name__}: {' '.join(str(exc).split())[:300]}", file=sys.stderr)


if __name__ == "__main__":
    os.environ["HYDRA_FULL_ERROR"] = "1"  # config errors reach the handler below instead of Hydra's printer
    try:
        main()
    except sweep.FolderRefused as exc:
        print(f"curvlab: error: {exc}", file=sys.stderr)
        _fail(EXIT_USER_ERROR)
    except sweep.SweepStopped as exc:
        print(f"curvlab: the sweep stops: {exc}, so no further job was started. Run the same "
              f"command with trainer.resume=true to continue it (finished jobs are not run again).", file=sys.stderr)
        _fail(sweep.STATUS_CODES["interrupted"])
    except KeyboardInterrupt:
        ignore_stop_signals()  # a third Ctrl-C must not cut this short: summary.json already says 130
        print("curvlab: stopped at once by SIGINT, without a new checkpoint (the last one, if any, is intact).",
              file=sys.stderr)
        _fail(EXIT_KILLED)
    except Exception as exc:
        message = describe_user_error(exc, during_job=False)
        if "sweep" not in sweep.started and (message is None or debug_enabled()):
            raise
        if message is None:  # a launcher failed on a job (e.g. submitit's FailedJobError): the report below says more
            message = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
        print(f"curvlab: error: {message}", file=sys.stderr)
        _fail(EXIT_USER_ERROR if "sweep" not in sweep.started else 1)
    if "sweep" in sweep.started:
        _fail(sweep.report(sweep.started["sweep"]))
        print(f"curvlab: results in {sweep.started['sweep']}")
    ignore_stop_signals()  # the exit code is decided: a signal during Python's shutdown must not change it
    sys.exit(_outcome["exit_code"])
