"""Fair tuning: real Hydra with the real hydra-optuna-sweeper and optuna, real `python run.py -m search=...`
subprocesses on digits. The objective each trial returned (objective.json, the sweeper's optimization_results.yaml)
is checked against the metrics files read here with plain json."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution

from runner import tuning
from runner.schema import TuneConfig, register_configs
from tests import registry

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (REPO / "conf" / "search").glob("*.yaml"))


def start(script: str, *args: str, cwd: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "CURVLAB_DEBUG")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(REPO / script), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def done(tmp_path_factory) -> dict:
    """name -> (exit code, stdout, stderr, folder); the invocations run at the same time."""
    root = tmp_path_factory.mktemp("tuning")
    fast = ["threads=1", "trainer.progress=false", "trainer.max_steps=6", "trainer.eval_every=2"]
    jobs = {
        "sweep": start("run.py", "-m", "search=sgd", "hydra.sweeper.n_trials=2", *fast,
                       f"hydra.sweep.dir={root / 'sweep'}", cwd=root),
        "diverged": start("run.py", "-m", "search=sgd", "hydra.sweeper.n_trials=1", "optimizer.lr=1e20", *fast,
                          f"hydra.sweep.dir={root / 'diverged'}", cwd=root),
        "mismatch": start("run.py", "-m", "search=sgd", "tune.metric=eval/loss", "tune.objective=final", *fast,
                          f"hydra.sweep.dir={root / 'mismatch'}", cwd=root),
    }
    return {name: (*finish(job), root / name) for name, job in jobs.items()}


def finish(job: subprocess.Popen) -> tuple[int, str, str]:
    stdout, stderr = job.communicate(timeout=600)
    return job.returncode, stdout, stderr


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> tuple:
    """scripts/tune.py on two optimisers (four run.py processes one after another)."""
    root = tmp_path_factory.mktemp("tune_script")
    job = start("scripts/tune.py", "--optimizers", "sgd,adam", "--trials", "2", "--eval-seeds", "7", "--out",
                str(root / "out"), "--report-target", "eval/accuracy=0.3", "threads=1", "trainer.progress=false",
                "trainer.max_steps=6", "trainer.eval_every=2", cwd=root)
    return (*finish(job), root / "out")


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def accuracies(run_dir: Path) -> list[float]:
    return [r["eval/accuracy"] for r in rows_of(run_dir) if "eval/accuracy" in r]


def trial_params(run_dir: Path) -> dict[str, float]:
    overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    return {o.split("=")[0]: float(o.split("=")[1]) for o in overrides if o.startswith("optimizer.")}


# ---------------------------------------------------------------- the optuna sweep, end to end


def test_optuna_sweep_runs_two_trials_and_returns_what_the_files_hold(done):
    code, _, stderr, folder = done["sweep"]
    assert code == 0, stderr
    trials = sorted(p for p in folder.iterdir() if p.name.isdigit())
    assert [t.name for t in trials] == ["0", "1"]
    best_of = {}
    for trial in trials:
        returned = json.loads((trial / "objective.json").read_text())
        assert returned["value"] == max(accuracies(trial))  # tune.objective=best of eval/accuracy
        assert returned["direction"] == "maximize"
        params = trial_params(trial)
        assert set(params) == {"optimizer.lr", "optimizer.momentum"}  # conf/search/sgd.yaml
        assert 1e-3 <= params["optimizer.lr"] <= 1.0 and 0.0 <= params["optimizer.momentum"] <= 0.99
        assert yaml.safe_load((trial / "config.yaml").read_text())["optimizer"]["lr"] == params["optimizer.lr"]
        best_of[trial.name] = (returned["value"], params)
    results = yaml.safe_load((folder / "optimization_results.yaml").read_text())
    value, params = max(best_of.values(), key=lambda vp: vp[0])
    assert results["best_value"] == value
    assert results["best_params"] == params


def test_a_diverged_trial_returns_the_worst_value(done):
    code, _, stderr, folder = done["diverged"]
    assert code == 3, stderr  # run.py's exit codes are unchanged: a diverged job makes the sweep exit 3
    assert json.loads((folder / "0" / "summary.json").read_text())["status"] == "diverged"
    assert json.loads((folder / "0" / "objective.json").read_text())["value"] == -math.inf
    assert yaml.safe_load((folder / "optimization_results.yaml").read_text())["best_value"] == -math.inf


def test_a_direction_that_contradicts_the_objective_stops_before_the_first_trial(done):
    code, _, stderr, folder = done["mismatch"]
    assert code == 2
    assert ("curvlab: error: hydra.sweeper.direction=maximize, but the objective (tune.objective=final of "
            "tune.metric=eval/loss, mode min) must be minimized. Set hydra.sweeper.direction=minimize") in stderr
    assert "Traceback" not in stderr and not folder.exists()


# ---------------------------------------------------------------- the objective, against the files


def test_each_objective_equals_what_the_metrics_file_holds(done):
    trial = done["sweep"][3] / "0"
    rows = rows_of(trial)
    evals = [r for r in rows if "eval/accuracy" in r]
    target = evals[1]["eval/accuracy"]  # reached first at the second evaluation, or earlier
    first = next(r for r in evals if r["eval/accuracy"] >= target)

    def value(**tune) -> float | None:
        return tuning.objective_value(OmegaConf.structured(TuneConfig(**tune)), trial, "ok")

    assert value(objective="best") == max(r["eval/accuracy"] for r in evals)
    assert value(objective="final") == evals[-1]["eval/accuracy"]
    assert value(metric="eval/loss", objective="best") == min(r["eval/loss"] for r in evals)
    assert value(metric="train/loss", objective="final") == evals[-1]["train/loss"]
    assert value(objective="steps_to_target", target=target) == first["step"]
    assert value(objective="time_to_target", target=target) == first["wall_time"]
    assert value(objective="steps_to_target", target=1.01) == math.inf  # never reached
    assert value(metric="eval/mse") is None  # not logged: the sweeper fails the trial
    assert tuning.objective_value(OmegaConf.structured(TuneConfig()), trial, "diverged") == -math.inf
    assert tuning.objective_value(OmegaConf.structured(TuneConfig(metric="eval/loss")), trial, "diverged") == math.inf


@pytest.mark.parametrize("tune, message", [
    (dict(objective="highest"), "tune.objective=highest is not an objective. Choose one of: best, final, "
                                "steps_to_target, time_to_target."),
    (dict(mode="up"), "tune.mode=up is not a mode. Choose one of: auto, max, min."),
    (dict(objective="time_to_target"), "tune.objective=time_to_target needs tune.target="),
    (dict(metric=""), "tune.metric is empty"),
])
def test_bad_tune_values_are_refused(tune, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tuning.check(OmegaConf.structured(TuneConfig(**tune)))


def test_direction_follows_the_objective():
    def direction(**tune) -> str:
        return tuning.direction(OmegaConf.structured(TuneConfig(**tune)))

    assert direction() == "maximize"  # best eval/accuracy
    assert direction(metric="eval/loss") == "minimize"
    assert direction(metric="eval/loss", mode="max") == "maximize"
    assert direction(objective="steps_to_target", target=0.9) == "minimize"


# ---------------------------------------------------------------- the presets


def compose_search(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_search_space_is_valid_for_its_optimizer_at_both_ends(preset):
    cfg = compose_search(f"search={preset}")
    assert cfg.hydra.runtime.choices["optimizer"] == preset
    params = cfg.hydra.sweeper.params
    distributions, fixed = create_params_from_overrides([f"{k}={v}" for k, v in params.items()])  # the plugin's parser
    assert set(distributions) == set(params) and not fixed
    for end in (0, -1):
        values = [f"{key}={ends(d)[end]}" for key, d in distributions.items()]
        cfg = compose_search(f"search={preset}", *values)  # fails on a key the optimizer's config lacks
        optimizer = hydra.utils.instantiate(cfg.optimizer)(torch.nn.Linear(3, 2).parameters())
        assert optimizer is not None


def ends(distribution) -> tuple:
    """The two ends of an optuna distribution: (low, high), or the first and last choice."""
    if isinstance(distribution, CategoricalDistribution):
        return distribution.choices[0], distribution.choices[-1]
    return distribution.low, distribution.high


def test_every_optimizer_choice_has_a_search_preset():
    """Every conf/optimizer choice of the registry (tests/registry.py) but the generic adapter, whose class is the
    user's, can be tuned with the same budget: conf/search/<choice>.yaml exists and selects it."""
    missing = sorted(set(registry.choices()) - {"torch_optim"} - set(PRESETS))
    assert not missing, f"add conf/search/<name>.yaml for {missing} (the hyperparameters the method's authors tune)"


@pytest.mark.parametrize("preset", PRESETS)
def test_every_search_range_contains_the_default(preset):
    """A preset searches around the default of each key it tunes. Two defaults cannot lie in a range: null (a rule
    picks the value, e.g. CurveBall's damping) and 0 under a log range (0 switches the option off; log-uniform
    cannot draw it)."""
    cfg = compose_search(f"search={preset}")
    distributions, _ = create_params_from_overrides([f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()])
    for key, distribution in distributions.items():
        absent = object()
        default = OmegaConf.select(cfg, key, default=absent, throw_on_missing=True)
        assert default is not absent, f"{preset}: {key} is not a key of optimizer={preset}"
        if default is None or (default == 0 and "Log" in type(distribution).__name__):
            continue
        if isinstance(distribution, CategoricalDistribution):
            assert default in distribution.choices, (key, default, distribution)
        else:
            assert distribution.low <= default <= distribution.high, (key, default, distribution)


def test_every_optimizer_gets_the_same_tuning_budget():
    expected = {"sgd", "adam", "hf", "curveball", "newton", "newton_cg", "lbfgs"}
    assert expected <= set(PRESETS)
    budgets = set()
    for preset in PRESETS:
        text = yaml.safe_load((REPO / "conf" / "search" / f"{preset}.yaml").read_text())
        assert set(text["hydra"]["sweeper"]) == {"params"}  # the budget is set once, in curvlab_optuna.yaml
        cfg = compose_search(f"search={preset}")
        assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
        budgets.add(cfg.hydra.sweeper.n_trials)
    assert budgets == {20}


# ---------------------------------------------------------------- scripts/tune.py


@pytest.mark.slow
def test_tune_script_tunes_each_optimizer_then_evaluates_the_best_on_fresh_seeds(script):
    code, stdout, stderr, out = script
    assert code == 0, stderr
    for optimizer in ("sgd", "adam"):
        tuned = sorted(p for p in (out / "tune" / optimizer).iterdir() if p.name.isdigit())
        assert len(tuned) == 2  # the equal budget
        assert {yaml.safe_load((t / "config.yaml").read_text())["seed"] for t in tuned} == {0}
        best = yaml.safe_load((out / "tune" / optimizer / "optimization_results.yaml").read_text())
        assert best["best_value"] == max(max(accuracies(t)) for t in tuned)
        (evaluated,) = [p for p in (out / "eval" / optimizer).iterdir() if p.name.isdigit()]
        config = yaml.safe_load((evaluated / "config.yaml").read_text())
        assert config["seed"] == 7  # a seed the tuning never saw
        assert trial_params(evaluated) == best["best_params"]
    assert "| sgd | 2 |" in (out / "best_configs.md").read_text()
    assert len((out / "trials.csv").read_text().splitlines()) == 1 + 4
    summary = (out / "report" / "summary.md").read_text()
    assert summary.splitlines()[2].startswith("| sgd | 1 ok |") and summary.splitlines()[3].startswith("| adam |")
    assert "steps to eval/accuracy≥0.3" in summary and summary in stdout
    assert (out / "report" / "curves_vs_step.png").is_file()


def test_tune_script_refuses_evaluation_seeds_that_were_tuned_on(capsys):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import tune as tune_script
    finally:
        sys.path.remove(str(REPO / "scripts"))
    assert tune_script.main(["--eval-seeds", "0,1", "--tuning-seed", "0"]) == 2
    assert "must not contain the tuning seed 0" in capsys.readouterr().err
    assert tune_script.main(["--optimizers", "sgd,rmsprop"]) == 2
    assert f"--optimizers rmsprop: no search preset. Choose from: {', '.join(PRESETS)}" in capsys.readouterr().err
