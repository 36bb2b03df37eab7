"""curvlab's command line: compose a config with Hydra, train, and say where the results are.

    python run.py --help                                  config groups, their choices and every key
    python run.py dataset=mnist optimizer=adam            one run -> outputs/<date>/<time>/
    python run.py -m optimizer=sgd,adam seed=0,1          a sweep -> outputs/multirun/<date_time>/<job>/

Exit codes: 0 ok; 2 bad configuration or input (one paragraph on stderr; CURVLAB_DEBUG=1 shows the traceback);
3 training diverged. In a sweep every job runs and the exit code is the worst of them (2 before 3).
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from runner.errors import EXIT_DIVERGED, EXIT_OK, EXIT_USER_ERROR, debug_enabled, describe_user_error
from runner.schema import register_configs

register_configs()
_outcome = {"exit_code": EXIT_OK, "sweep_dir": None}


def _fail(code: int) -> None:
    if _outcome["exit_code"] != EXIT_USER_ERROR:
        _outcome["exit_code"] = code


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Train; return the tuning objective (cfg.tune, runner/tuning.py) for sweepers such as optuna (None: failed)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from runner import tuning
    from runner.train import train  # imported here: config errors are reported without loading torch

    if HydraConfig.get().mode == RunMode.MULTIRUN:
        _outcome["sweep_dir"] = os.path.abspath(HydraConfig.get().sweep.dir)
    try:
        tuning.check(cfg.tune, HydraConfig.get().sweeper)
        result = train(cfg)
    except Exception as exc:
        message = describe_user_error(exc)
        if message is None or debug_enabled():
            raise
        print(f"curvlab: error: {message}", file=sys.stderr)
        _fail(EXIT_USER_ERROR)
        return
    if result.status == "diverged":
        _fail(EXIT_DIVERGED)
    return tuning.objective_value(cfg.tune, result.output_dir, result.status)


if __name__ == "__main__":
    os.environ["HYDRA_FULL_ERROR"] = "1"  # config errors reach the handler below instead of Hydra's printer
    try:
        main()
    except Exception as exc:
        message = describe_user_error(exc, during_job=False)
        if message is None or debug_enabled():
            raise
        print(f"curvlab: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    if _outcome["sweep_dir"]:
        print(f"curvlab: results in {_outcome['sweep_dir']}")
    sys.exit(_outcome["exit_code"])
