"""Compare optimisers fairly on one problem: tune each with the same trial budget, evaluate the best configuration
of each on fresh seeds, and report (DeepOBS / AlgoPerf practice).

    python scripts/tune.py --optimizers sgd,adam,hf --trials 20 trainer.max_epochs=3 threads=1
    python scripts/tune.py --optimizers sgd,hf --trials 10 --objective time_to_target --target 0.97 \
        --eval-seeds 100,101,102 --out outputs/tune_digits dataset=digits trainer.max_epochs=5

For each optimiser: `python run.py -m search=<optimizer>` (hydra-optuna-sweeper, conf/search/<optimizer>.yaml) with
`--trials` trials on the tuning seed, all into <out>/tune/<optimizer>/; then the best parameters on every
evaluation seed into <out>/eval/<optimizer>/. Finally <out>/best_configs.md (the best configuration of each method),
<out>/trials.csv (every trial) and the report of the evaluation runs in <out>/report/ (curves of each method's best
configuration). The trailing key=value overrides define the problem and go to every run (tuning and evaluation).
Exit codes: 0 ok; 2 bad options, or a sweep that stopped on a bad configuration.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository root, when not installed

from runner import tuning  # noqa: E402
from runner.report.cli import build_report  # noqa: E402
from runner.report.load import ReportError  # noqa: E402
from runner.report.tables import markdown_table, write_csv  # noqa: E402

EXIT_OK, EXIT_USER_ERROR = 0, 2
RUN_OK = (0, 3)  # run.py: 0 ok, 3 some run diverged (a diverged trial is a result, not a failure)


class TuneError(ValueError):
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tune.py", description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="key=value overrides that define the problem (every run gets them)")
    p.add_argument("--optimizers", default="sgd,adam,hf", help="comma-separated conf/search/ presets")
    p.add_argument("--trials", type=int, default=20, help="optuna trials per optimiser (the equal budget)")
    p.add_argument("--tuning-seed", type=int, default=0, help="the seed of every tuning trial")
    p.add_argument("--eval-seeds", default="1000,1001,1002", help="seeds of the final comparison (not the tuning seed)")
    p.add_argument("--metric", default="eval/accuracy", help="tune.metric")
    p.add_argument("--objective", default="best", choices=tuning.OBJECTIVES, help="tune.objective")
    p.add_argument("--mode", default="auto", choices=tuning.MODES, help="tune.mode")
    p.add_argument("--target", type=float, default=None, help="tune.target (for *_to_target objectives)")
    p.add_argument("--report-target", action="append", default=[], metavar="METRIC=VALUE",
                   help="also report steps and time to this target (repeatable); the tuning target is added")
    p.add_argument("--out", default=None, help="output folder (default: outputs/tune/<date_time>)")
    return p.parse_args(argv)


def plan(args: argparse.Namespace) -> SimpleNamespace:
    """The checked settings: optimisers with a preset, disjoint seeds, a valid tune.* objective."""
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    presets = sorted(p.stem for p in (ROOT / "conf" / "search").glob("*.yaml"))
    unknown = [o for o in optimizers if o not in presets]
    if not optimizers or unknown:
        raise TuneError(f"--optimizers {','.join(unknown) or '(none)'}: no search preset. Choose from: "
                        f"{', '.join(presets)} (conf/search/<optimizer>.yaml).")
    if args.trials < 1:
        raise TuneError(f"--trials {args.trials} must be at least 1.")
    try:
        seeds = [int(s) for s in args.eval_seeds.split(",") if s.strip()]
    except ValueError:
        raise TuneError(
            f"--eval-seeds {args.eval_seeds} must be comma-separated integers, e.g. 1000,1001,1002.") from None
    if not seeds or args.tuning_seed in seeds:
        raise TuneError(f"--eval-seeds {args.eval_seeds} must be non-empty and must not contain the tuning seed "
                        f"{args.tuning_seed}: the comparison runs on seeds the tuning never saw.")
    tune = SimpleNamespace(metric=args.metric, objective=args.objective, mode=args.mode, target=args.target)
    tuning.check(tune)
    out = Path(args.out or ROOT / "outputs" / "tune" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    targets = list(args.report_target)
    if args.objective.endswith("_to_target"):
        targets.append(f"{args.metric}{'>=' if tuning.metric_mode(tune) == 'max' else '<='}{args.target}")
    return SimpleNamespace(optimizers=optimizers, trials=args.trials, tuning_seed=args.tuning_seed, seeds=seeds,
                           tune=tune, out=out, targets=targets, overrides=list(args.overrides))


def tune_overrides(p: SimpleNamespace) -> list[str]:
    t = p.tune
    return [f"tune.metric={t.metric}", f"tune.objective={t.objective}", f"tune.mode={t.mode}",
            f"tune.target={'null' if t.target is None else t.target}"]


def run(args: list[str]) -> None:
    command = [sys.executable, str(ROOT / "run.py"), "-m", *args]
    print("curvlab tune: " + " ".join(command[1:]), flush=True)
    code = subprocess.run(command).returncode
    if code not in RUN_OK:
        raise TuneError(f"run.py stopped with exit code {code} (its message is above); nothing was compared.")


def tune_one(p: SimpleNamespace, optimizer: str) -> dict:
    """The optuna sweep of one optimiser; returns its best parameters and value."""
    folder = p.out / "tune" / optimizer
    run([f"search={optimizer}", f"hydra.sweeper.n_trials={p.trials}",
         f"hydra.sweeper.direction={tuning.direction(p.tune)}", f"hydra.sweep.dir={folder}",
         f"seed={p.tuning_seed}", *tune_overrides(p), *p.overrides])
    results = yaml.safe_load((folder / "optimization_results.yaml").read_text(encoding="utf-8"))
    return {"optimizer": optimizer, "best_value": results["best_value"], "best_params": results["best_params"]}


def evaluate_one(p: SimpleNamespace, best: dict) -> None:
    params = [f"{key}={value}" for key, value in best["best_params"].items()]
    run([f"optimizer={best['optimizer']}", *params, f"seed={','.join(map(str, p.seeds))}",
         f"hydra.sweep.dir={p.out / 'eval' / best['optimizer']}", *tune_overrides(p), *p.overrides])


def trials(p: SimpleNamespace) -> list[dict]:
    """Every trial's returned objective (objective.json, written by runner.tuning.RecordObjective)."""
    records = []
    for optimizer in p.optimizers:
        for path in sorted((p.out / "tune" / optimizer).glob("*/objective.json"), key=lambda f: int(f.parent.name)):
            record = json.loads(path.read_text(encoding="utf-8"))
            params = [o for o in record["overrides"] if o.startswith("optimizer.")]
            records.append({"optimizer": optimizer, "trial": int(path.parent.name), "value": record["value"],
                            "params": " ".join(params), "folder": str(path.parent)})
    return records


def best_table(p: SimpleNamespace, bests: list[dict]) -> str:
    objective = f"{p.tune.objective} {p.tune.metric}" + (f" (target {p.tune.target})" if p.tune.target else "")
    rows = [[b["optimizer"], p.trials, f"{b['best_value']:.6g}",
             ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in b["best_params"].items())]
            for b in bests]
    head = (f"Tuning: {p.trials} optuna trials per optimiser on seed {p.tuning_seed}, objective {objective} "
            f"({tuning.direction(p.tune)}d); evaluation seeds {','.join(map(str, p.seeds))}; problem: "
            f"{' '.join(p.overrides) or 'the defaults'}.\n\n")
    headers = ["optimizer", "trials", "best tuning value", "best configuration"]
    return head + markdown_table(headers, rows, align=["---", "---:", "---:", "---"])


def main(argv: list[str] | None = None) -> int:
    try:
        p = plan(parse_args(argv))
        p.out.mkdir(parents=True, exist_ok=True)
        bests = [tune_one(p, optimizer) for optimizer in p.optimizers]
        for best in bests:
            evaluate_one(p, best)
        table = best_table(p, bests)
        (p.out / "best_configs.md").write_text(table, encoding="utf-8")
        write_csv(p.out / "trials.csv", trials(p))
        report = build_report([p.out / "eval" / o for o in p.optimizers], by=["optimizer"], targets=p.targets,
                              out=p.out / "report")
    except (TuneError, ReportError, ValueError, OSError) as exc:
        print(f"curvlab tune: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"\n{table}\n{report.markdown}")
    print(f"curvlab tune: tuning in {p.out / 'tune'}, evaluation runs in {p.out / 'eval'}, report in {report.out}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
