"""The race: AlgoPerf's external-tuning protocol in one command (Dahl et al. 2023, "Benchmarking Neural Network
Training Algorithms", arXiv 2306.07179).

    python -m runner.race --workloads digits_mlp,sine_mlp --methods sgd,adam,lbfgs --trials 20 \\
        --seeds 1000,1001,1002,1003,1004 --out outputs/race/first threads=1
    curvlab-race ...                       the same command, as the installed console script

For every workload (conf/workload/<name>.yaml: dataset, model, batch size, budget, validation metric and target) and
every method (conf/search/<method>.yaml: an optuna search space):

1. tune: `python run.py -m workload=W search=M` with --trials optuna trials on the tuning seed, objective
   time_to_target of the workload's metric (every method gets the same number of trials) -> <out>/tune/W/M/<trial>/;
2. re-run the best trial's configuration on each of --seeds (seeds the tuning never saw) -> <out>/eval/W/M/<job>/;
3. the verdict (runner/report/verdict.py) -> <out>/verdict/: time and steps to target per workload and seed (median
   and spread), the performance profiles by wall-clock and by steps with their scores, and for each pair of methods
   on each workload whether the difference across seeds is significant; plus the report of each workload's re-runs
   (runner/report/cli.py: tables and curves) in <out>/verdict/<workload>/.

The best trial is the one with the shortest time to target; trials that never reached it are ranked by the best value
of the metric they did reach (so a method that never reaches the target is still re-run with its most promising
configuration), then by trial number.

Resuming: every trial and re-run is a run folder, and the same command continues where it stopped (after Ctrl-C, a
SIGTERM, a crash or a reboot). Finished sweeps are skipped without starting run.py; an unfinished one is run again
with trainer.resume=true: its finished jobs return their recorded objective without training (runner/sweep.py), an
interrupted job resumes from its checkpoint, and the seeded optuna sampler proposes the same trials as before. A
job folder that holds results but neither a final summary nor a checkpoint (a process killed with SIGKILL before it
could checkpoint) is moved to <out>/set_aside/ (never deleted) and its trial runs again. The plan is recorded in
<out>/race.json; the same --out with another plan is refused.

Launchers: the trials and re-runs go through any Hydra launcher: --launcher basic (default: one job after another in
one process), submitit_local, or slurm (conf/hydra/launcher/slurm.yaml; hydra.launcher.* overrides go to every run).
Wall-clock comparisons need runs that do not share cores: launch jobs side by side only on separate machines.

A stop signal (SIGTERM, SIGINT, SIGUSR1, SIGUSR2) is passed on to run.py: the running job checkpoints, no further job
starts, and the race exits with code 4; run the same command to continue.
Exit codes: 0 verdict written; 2 bad options or a different plan in --out; 4 interrupted (continue by running the same
command); 1 a sweep failed before finishing its jobs (its log is in <out>/logs/).

`scripts/tune.py` (`tune_main`) is the same protocol for one problem given by overrides instead of a workload, with
any tune.objective, and the report instead of the verdict.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from runner import signals, tuning
from runner.report import quantities as q
from runner.report.load import read_rows

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
EXIT_OK, EXIT_FAILED, EXIT_USER_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 4
FINAL = ("ok", "diverged", "error")  # a job with one of these statuses is done (runner/sweep.py: finished_job)
CPU_WORKLOADS = ("digits_mlp", "mnist_mlp800", "mnist_tanh_mlp", "mnist_linear_relu", "fashion_mlp",
                 "mnist_simple_cnn", "sine_mlp")  # the default --workloads: real data, minutes on a CPU
# The default --methods: the whole race of issue 18. First-order baselines: SGD with momentum, Adam, NAdamW (AlgoPerf's
# baseline). Today's winners: Muon, Schedule-Free AdamW, Shampoo, SOAP, PSGD Kron (AlgoPerf 2024, Kasimbeg et al.
# 2025, arXiv 2502.15015; the CIFAR-10 and nanoGPT speed records). curvlab's second-order methods: K-FAC, CurveBall,
# Hessian-free, L-BFGS (which needs fixed or full batches, optimizers/lbfgs.py: --set lbfgs:trainer.batching=full).
# Dense Newton, Newton-CG, AdaHessian, Sophia, NLCG and GD have presets too and join through --methods.
DEFAULT_METHODS = ("sgd", "adam", "nadamw", "muon", "schedule_free", "shampoo", "soap", "psgd",
                   "kfac", "curveball", "hf", "lbfgs")
LAUNCHERS = {"basic": [], "submitit_local": ["hydra/launcher=submitit_local"], "slurm": ["hydra/launcher=slurm"]}
RESERVED = ("seed", "workload", "search", "optimizer", "trainer.resume", "hydra.sweep.dir", "hydra.sweeper",
            "hydra/sweeper", "hydra/launcher")  # set by the race itself


class RaceError(ValueError):
    """Bad options or a folder that belongs to another plan: one paragraph, exit 2."""


class Interrupted(Exception):
    """A stop signal arrived: the running sweep checkpointed and stopped."""


class SweepFailed(Exception):
    """run.py ended without finishing the sweep's jobs, for another reason than a stop signal."""


# ---------------------------------------------------------------------------------------------- running run.py -m


class Runner:
    """Starts `python run.py -m ...` one at a time, passes stop signals on to it, and remembers that one came."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.child: subprocess.Popen | None = None
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Runner:
        self._previous = signals.install(self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        signals.restore(self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = self.requested or signal.Signals(signum).name
        if self.child is not None and self.child.returncode is None:  # no waitpid here: wait() may hold its lock
            try:  # the child has its own process group (jobs of submitit_local included): one signal reaches all
                os.killpg(self.child.pid, signum)
            except ProcessLookupError:
                pass

    def check(self) -> None:
        if self.requested:
            raise Interrupted(self.requested)

    def sweep(self, args: list[str], log_name: str) -> int:
        """`python run.py -m *args`, its output appended to <logs>/<log_name>.log; returns its exit code."""
        self.check()
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{log_name}.log"
        command = [sys.executable, str(ROOT / "run.py"), "-m", *args]
        with open(log, "a", encoding="utf-8") as file:
            file.write(f"\n$ {' '.join(command)}\n")
            file.flush()
            self.child = subprocess.Popen(command, stdout=file, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = self.child.wait()  # a signal handler runs meanwhile; wait() resumes after it (PEP 475)
            finally:
                self.child = None
        if self.requested:
            raise Interrupted(self.requested)
        return code


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------- job folders


def summary_of(job: Path) -> dict[str, Any] | None:
    try:
        return json.loads((job / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_finished(job: Path) -> bool:
    summary = summary_of(job)
    return summary is not None and summary.get("status") in FINAL and summary.get("exit_code") != 5


def complete(sweep_dir: Path, jobs: int) -> bool:
    """Whether jobs 0 .. jobs-1 of the sweep all finished."""
    return all(is_finished(sweep_dir / str(i)) for i in range(jobs))


def set_aside(sweep_dir: Path, jobs: int, store: Path) -> list[Path]:
    """Move job folders that hold results but cannot be resumed (no final summary, no checkpoint) to `store`, so
    that the continued sweep runs those jobs afresh. Nothing is deleted."""
    from runner.checkpoint import CHECKPOINT, PREVIOUS
    from runner.run_dir import existing_results

    moved = []
    for i in range(jobs):
        job = sweep_dir / str(i)
        if not job.is_dir() or is_finished(job):
            continue
        if (job / CHECKPOINT).exists() or (job / PREVIOUS).exists() or not existing_results(job):
            continue
        place, n = store / job.relative_to(store.parent), 1  # <out>/set_aside/tune/W/M/<job>-<n>
        while place.with_name(f"{place.name}-{n}").exists():
            n += 1
        target = place.with_name(f"{place.name}-{n}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(job), str(target))
        moved.append(target)
    return moved


# ---------------------------------------------------------------------------------------------- one method


@dataclass
class Best:
    trial: int
    value: float | None  # the tuning objective (None: the trial failed)
    params: list[str]  # the searched keys as the trial's overrides: optimizer.lr=0.0123
    folder: str


def best_trial(sweep_dir: Path, trials: int) -> Best:
    """The best of the sweep's trials: the best tuning objective (minimised or maximised as tune.* says), then the
    best value of tune.metric (which separates trials that never reached a target), then the lowest trial number."""
    ranked = []
    for i in range(trials):
        job = sweep_dir / str(i)
        status = (summary_of(job) or {}).get("status")
        value = reached = None
        if status in ("ok", "diverged") and (job / "config.yaml").is_file():
            tune = SimpleNamespace(**yaml.safe_load((job / "config.yaml").read_text(encoding="utf-8"))["tune"])
            value = tuning.objective_value(tune, job, status)
            reached = q.best(read_rows(job / "metrics.jsonl"), tune.metric, tuning.metric_mode(tune))
            value = None if value is None or math.isnan(value) else value
            sign = 1.0 if tuning.direction(tune) == "minimize" else -1.0
            metric_sign = -1.0 if tuning.metric_mode(tune) == "max" else 1.0
        key = (math.inf if value is None else sign * value, math.inf if reached is None else metric_sign * reached, i)
        ranked.append((key, i, value, job))
    _, i, value, job = min(ranked, key=lambda item: item[0])
    return Best(trial=i, value=value, params=searched_overrides(job), folder=str(job))


def searched_overrides(job: Path) -> list[str]:
    """The trial's overrides of the keys its sweeper searched (hydra.sweeper.params), as written by the sweeper."""
    hydra_cfg = yaml.safe_load((job / ".hydra" / "hydra.yaml").read_text(encoding="utf-8"))["hydra"]
    keys = set((hydra_cfg.get("sweeper") or {}).get("params") or {})
    overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text(encoding="utf-8")) or []
    return [o for o in overrides if o.split("=", 1)[0] in keys]


def trial_records(sweep_dir: Path, trials: int, label: dict[str, str]) -> list[dict[str, Any]]:
    """One record per trial: its searched values, status and returned objective (objective.json, if written)."""
    records = []
    for i in range(trials):
        job = sweep_dir / str(i)
        try:
            returned = json.loads((job / "objective.json").read_text(encoding="utf-8"))["value"]
        except (OSError, ValueError, KeyError):
            returned = None
        records.append({**label, "trial": i, "status": (summary_of(job) or {}).get("status"), "value": returned,
                        "params": " ".join(searched_overrides(job)) if (job / ".hydra").is_dir() else "",
                        "folder": str(job)})
    return records


# ---------------------------------------------------------------------------------------------- the race


@dataclass
class Plan:
    workloads: list[str]
    methods: list[str]
    trials: int
    tuning_seed: int
    seeds: list[int]
    launcher: str
    sets: dict[str, list[str]] = field(default_factory=dict)  # method -> its own fixed overrides
    overrides: list[str] = field(default_factory=list)  # for every run
    alpha: float = 0.05

    def method_overrides(self, method: str) -> list[str]:
        return [*self.sets.get(method, []), *self.overrides, *LAUNCHERS[self.launcher]]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runner.race", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="key=value overrides for every run, e.g. threads=1")
    p.add_argument("--workloads", default=",".join(CPU_WORKLOADS),
                   help="comma-separated conf/workload/ names (default: %(default)s)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma-separated conf/search/ presets (default: %(default)s)")
    p.add_argument("--trials", type=int, default=20,
                   help="optuna trials per method and workload, the equal budget (default: %(default)s)")
    p.add_argument("--tuning-seed", type=int, default=0, help="the seed of every tuning trial")
    p.add_argument("--seeds", default="1000,1001,1002,1003,1004",
                   help="seeds of the re-runs of each best configuration, not the tuning seed (default: %(default)s)")
    p.add_argument("--launcher", default="basic", choices=sorted(LAUNCHERS), help="Hydra launcher of every sweep")
    p.add_argument("--set", action="append", default=[], metavar="METHOD:KEY=VALUE", dest="sets",
                   help="an override for one method's runs only, e.g. hf:trainer.batch_size=1000 (repeatable)")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of the pairwise tests (Holm)")
    p.add_argument("--out", default=None, help="the race folder (default: outputs/race/<date_time>)")
    return p.parse_args(argv)


def names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def plan_from(args: argparse.Namespace) -> tuple[Plan, Path]:
    workloads, methods = names(args.workloads), names(args.methods)
    _check_choices("--workloads", workloads, "workload")
    _check_choices("--methods", methods, "search")
    if args.trials < 1:
        raise RaceError(f"--trials {args.trials} must be at least 1.")
    seeds = _seeds("--seeds", args.seeds, args.tuning_seed)
    sets: dict[str, list[str]] = {}
    for item in args.sets:
        method, _, override = item.partition(":")
        if method not in methods or "=" not in override:
            raise RaceError(f"--set {item} must be METHOD:KEY=VALUE with METHOD one of --methods "
                            f"({', '.join(methods)}), e.g. --set hf:trainer.batch_size=1000.")
        sets.setdefault(method, []).append(override)
    for override in [*args.overrides, *(o for s in sets.values() for o in s)]:
        key = override.split("=", 1)[0].lstrip("+~")
        if any(key == r or key.startswith(r + ".") for r in RESERVED):
            raise RaceError(f"{override}: the race sets {key} itself (the workload, method, seeds, sweep folders and "
                            f"launcher come from its options: --workloads, --methods, --seeds, --tuning-seed, --out, "
                            f"--launcher).")
    if not 0 < args.alpha < 1:
        raise RaceError(f"--alpha {args.alpha} must be between 0 and 1, e.g. 0.05.")
    out = Path(args.out or ROOT / "outputs" / "race" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    plan = Plan(workloads, methods, args.trials, args.tuning_seed, seeds, args.launcher, sets, list(args.overrides),
                args.alpha)
    return plan, out


def _check_choices(option: str, chosen: list[str], group: str) -> None:
    available = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    unknown = [c for c in chosen if c not in available]
    if not chosen or unknown:
        raise RaceError(f"{option} {','.join(unknown) or '(none)'}: not in conf/{group}/. Choose from: "
                        f"{', '.join(available)}.")


def _seeds(option: str, text: str, tuning_seed: int) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise RaceError(f"{option} {text} must be comma-separated integers, e.g. 1000,1001,1002.") from None
    if not seeds or tuning_seed in seeds or len(set(seeds)) != len(seeds):
        raise RaceError(f"{option} {text} must be distinct, non-empty and must not contain the tuning seed "
                        f"{tuning_seed}: the comparison runs on seeds the tuning never saw.")
    return seeds


def record_plan(plan: Plan, out: Path) -> None:
    """Write <out>/race.json, or check that the one there holds the same plan (a continued race)."""
    path = out / "race.json"
    mine = asdict(plan)
    if path.is_file():
        recorded = json.loads(path.read_text(encoding="utf-8"))["plan"]
        differs = [key for key in mine if recorded.get(key) != mine[key]]
        if differs:
            shown = "; ".join(f"{k}: {recorded.get(k)!r} there, {mine[k]!r} now" for k in differs)
            raise RaceError(f"{out} holds a race with another plan ({shown}). Continue it with the same options, or "
                            f"choose a new folder with --out.")
        return
    out.mkdir(parents=True, exist_ok=True)
    from runner.metadata import git_info

    record = {"plan": mine, "command": sys.argv, "started": datetime.now().isoformat(timespec="seconds"),
              "git": git_info()}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def compose(overrides: list[str]) -> Any:
    """The composed config (with hydra's part) for `overrides`; a bad combination raises RaceError."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from runner.run_dir import register_resolvers
    from runner.schema import register_configs

    register_configs()
    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return hydra_compose("config", overrides=overrides, return_hydra_config=True)
    except Exception as exc:  # noqa: BLE001 -- Hydra's composition errors: report them as the user's input
        raise RaceError(f"python run.py {' '.join(overrides)} does not compose: {' '.join(str(exc).split())}") from None


@dataclass
class Cell:
    """One workload and one method: where its sweeps go and what they need."""
    workload: str
    method: str
    optimizer: str  # the optimizer group choice of the method's search preset
    direction: str  # minimize (time_to_target) unless the overrides chose another tune.objective
    tune_dir: Path
    eval_dir: Path


def cells(plan: Plan, out: Path) -> list[Cell]:
    found = []
    for workload in plan.workloads:
        for method in plan.methods:
            cfg = compose([f"workload={workload}", f"search={method}", *plan.method_overrides(method)])
            tuning.check(cfg.tune)
            found.append(Cell(workload, method, cfg.hydra.runtime.choices["optimizer"], tuning.direction(cfg.tune),
                              out / "tune" / workload / method, out / "eval" / workload / method))
    return found


def tune_cell(runner: Runner, plan: Plan, cell: Cell, out: Path) -> Best:
    label = f"{cell.method} on {cell.workload}"
    if not complete(cell.tune_dir, plan.trials):
        for moved in set_aside(cell.tune_dir, plan.trials, out / "set_aside"):
            print(f"curvlab race: {moved.name}: an unfinished trial without a checkpoint, moved to {moved}")
        print(f"curvlab race: tuning {label}: {plan.trials} trials in {cell.tune_dir}", flush=True)
        code = runner.sweep([f"workload={cell.workload}", f"search={cell.method}",
                             f"hydra.sweeper.n_trials={plan.trials}", f"hydra.sweeper.direction={cell.direction}",
                             f"hydra.sweep.dir={cell.tune_dir}", f"seed={plan.tuning_seed}", "trainer.resume=true",
                             *plan.method_overrides(cell.method)], f"tune_{cell.workload}_{cell.method}")
        _finished_or_fail(cell.tune_dir, plan.trials, code, out / "logs" / f"tune_{cell.workload}_{cell.method}.log")
    best = best_trial(cell.tune_dir, plan.trials)
    (cell.tune_dir / "best.json").write_text(json.dumps(asdict(best), indent=2) + "\n", encoding="utf-8")
    return best


def eval_cell(runner: Runner, plan: Plan, cell: Cell, best: Best, out: Path) -> None:
    if complete(cell.eval_dir, len(plan.seeds)):
        return
    for moved in set_aside(cell.eval_dir, len(plan.seeds), out / "set_aside"):
        print(f"curvlab race: {moved.name}: an unfinished run without a checkpoint, moved to {moved}")
    print(f"curvlab race: re-running the best configuration of {cell.method} on {cell.workload} "
          f"({' '.join(best.params) or 'its defaults'}) on seeds {','.join(map(str, plan.seeds))}", flush=True)
    log = f"eval_{cell.workload}_{cell.method}"
    code = runner.sweep([f"workload={cell.workload}", f"optimizer={cell.optimizer}", *best.params,
                         f"seed={','.join(map(str, plan.seeds))}", f"hydra.sweep.dir={cell.eval_dir}",
                         "trainer.resume=true", *plan.method_overrides(cell.method)], log)
    _finished_or_fail(cell.eval_dir, len(plan.seeds), code, out / "logs" / f"{log}.log")


def _finished_or_fail(sweep_dir: Path, jobs: int, code: int, log: Path) -> None:
    if code == EXIT_INTERRUPTED:
        raise Interrupted("a stop signal")
    if not complete(sweep_dir, jobs):
        raise SweepFailed(f"python run.py -m ... into {sweep_dir} stopped with exit code {code} before its {jobs} "
                          f"jobs finished; the end of its log ({log}):\n{tail(log)}")


def run_race(plan: Plan, out: Path) -> Any:
    from runner.report.tables import markdown_table, write_csv
    from runner.report.verdict import build_verdict

    record_plan(plan, out)
    todo = cells(plan, out)
    runs = len(todo) * (plan.trials + len(plan.seeds))
    print(f"curvlab race: {len(plan.workloads)} workloads x {len(plan.methods)} methods, {plan.trials} trials and "
          f"{len(plan.seeds)} re-runs each ({runs} runs; finished ones are not run again) in {out}", flush=True)
    with Runner(out / "logs") as runner:
        bests = {}
        for cell in todo:
            bests[(cell.workload, cell.method)] = tune_cell(runner, plan, cell, out)
        for cell in todo:
            eval_cell(runner, plan, cell, bests[(cell.workload, cell.method)], out)
        runner.check()
    rows = [[c.workload, c.method, plan.trials, "—" if bests[(c.workload, c.method)].value is None else
             f"{bests[(c.workload, c.method)].value:.6g}", " ".join(bests[(c.workload, c.method)].params)]
            for c in todo]
    tuned = markdown_table(["workload", "method", "trials", "best tuning value", "best configuration"], rows,
                           align=["---", "---", "---:", "---:", "---"])
    verdict_dir = out / "verdict"
    verdict_dir.mkdir(parents=True, exist_ok=True)
    write_csv(verdict_dir / "trials.csv", [r for c in todo for r in trial_records(
        c.tune_dir, plan.trials, {"workload": c.workload, "method": c.method})])
    folders = {(c.workload, c.method): c.eval_dir for c in todo}
    return build_verdict(folders, plan.workloads, plan.methods, verdict_dir, alpha=plan.alpha, tuned=tuned,
                         plan=asdict(plan))


def main(argv: list[str] | None = None) -> int:
    from runner.report.load import ReportError

    try:
        plan, out = plan_from(parse_args(argv))
        verdict = run_race(plan, out)
    except Interrupted as exc:
        print(f"curvlab race: interrupted by {exc}; every finished trial and run is kept. Run the same command again "
              f"to continue where it stopped.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (RaceError, ReportError) as exc:
        print(f"curvlab race: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except SweepFailed as exc:
        print(f"curvlab race: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(verdict.markdown)
    print(f"curvlab race: verdict in {verdict.out}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- scripts/tune.py


def tune_main(argv: list[str] | None = None) -> int:
    """scripts/tune.py: tune each optimiser on one problem given by overrides, re-run the best on fresh seeds, report
    (the race for one ad-hoc problem, with any tune.objective)."""
    from runner.report.cli import build_report
    from runner.report.load import ReportError
    from runner.report.tables import markdown_table, write_csv

    p = argparse.ArgumentParser(prog="tune.py", description="Compare optimisers fairly on one problem: tune each "
                                "with the same trial budget, evaluate the best configuration of each on fresh seeds.")
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
    args = p.parse_args(argv)
    try:
        optimizers = names(args.optimizers)
        presets = sorted(f.stem for f in (CONF / "search").glob("*.yaml"))
        unknown = [o for o in optimizers if o not in presets]
        if not optimizers or unknown:
            raise RaceError(f"--optimizers {','.join(unknown) or '(none)'}: no search preset. Choose from: "
                            f"{', '.join(presets)} (conf/search/<optimizer>.yaml).")
        if args.trials < 1:
            raise RaceError(f"--trials {args.trials} must be at least 1.")
        seeds = _seeds("--eval-seeds", args.eval_seeds, args.tuning_seed)
        tune = SimpleNamespace(metric=args.metric, objective=args.objective, mode=args.mode, target=args.target)
        tuning.check(tune)
        out = Path(args.out or ROOT / "outputs" / "tune" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")).resolve()
        tune_args = [f"tune.metric={tune.metric}", f"tune.objective={tune.objective}", f"tune.mode={tune.mode}",
                     f"tune.target={'null' if tune.target is None else tune.target}"]
        targets = list(args.report_target)
        if args.objective.endswith("_to_target"):
            targets.append(f"{args.metric}{'>=' if tuning.metric_mode(tune) == 'max' else '<='}{args.target}")
        out.mkdir(parents=True, exist_ok=True)
        bests = {}
        with Runner(out / "logs") as runner:
            for optimizer in optimizers:
                folder = out / "tune" / optimizer
                if not complete(folder, args.trials):
                    set_aside(folder, args.trials, out / "set_aside")
                    print(f"curvlab tune: tuning {optimizer}: {args.trials} trials in {folder}", flush=True)
                    code = runner.sweep([f"search={optimizer}", f"hydra.sweeper.n_trials={args.trials}",
                                         f"hydra.sweeper.direction={tuning.direction(tune)}",
                                         f"hydra.sweep.dir={folder}", f"seed={args.tuning_seed}",
                                         "trainer.resume=true", *tune_args, *args.overrides], f"tune_{optimizer}")
                    _finished_or_fail(folder, args.trials, code, out / "logs" / f"tune_{optimizer}.log")
                bests[optimizer] = best_trial(folder, args.trials)
            for optimizer in optimizers:
                folder = out / "eval" / optimizer
                if not complete(folder, len(seeds)):
                    set_aside(folder, len(seeds), out / "set_aside")
                    print(f"curvlab tune: evaluating {optimizer} on seeds {','.join(map(str, seeds))}", flush=True)
                    code = runner.sweep([f"optimizer={optimizer}", *bests[optimizer].params,
                                         f"seed={','.join(map(str, seeds))}", f"hydra.sweep.dir={folder}",
                                         "trainer.resume=true", *tune_args, *args.overrides], f"eval_{optimizer}")
                    _finished_or_fail(folder, len(seeds), code, out / "logs" / f"eval_{optimizer}.log")
        objective = f"{tune.objective} {tune.metric}" + (f" (target {tune.target})" if tune.target else "")
        rows = [[o, args.trials, "—" if b.value is None else f"{b.value:.6g}", " ".join(b.params)]
                for o, b in bests.items()]
        table = (f"Tuning: {args.trials} optuna trials per optimiser on seed {args.tuning_seed}, objective {objective} "
                 f"({tuning.direction(tune)}d); evaluation seeds {','.join(map(str, seeds))}; problem: "
                 f"{' '.join(args.overrides) or 'the defaults'}.\n\n"
                 + markdown_table(["optimizer", "trials", "best tuning value", "best configuration"], rows,
                                  align=["---", "---:", "---:", "---"]))
        (out / "best_configs.md").write_text(table, encoding="utf-8")
        write_csv(out / "trials.csv", [r for o in optimizers for r in trial_records(
            out / "tune" / o, args.trials, {"optimizer": o})])
        report = build_report([out / "eval" / o for o in optimizers], by=["optimizer"], targets=targets,
                              out=out / "report")
    except Interrupted as exc:
        print(f"curvlab tune: interrupted by {exc}; run the same command again to continue.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (RaceError, ReportError, ValueError, OSError) as exc:
        print(f"curvlab tune: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except SweepFailed as exc:
        print(f"curvlab tune: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"\n{table}\n{report.markdown}")
    print(f"curvlab tune: tuning in {out / 'tune'}, evaluation runs in {out / 'eval'}, report in {report.out}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
