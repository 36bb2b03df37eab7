"""The race (runner/race.py) end to end with the real runner: real `python -m runner.race` and `python run.py -m`
processes, the real hydra-optuna-sweeper, real signals, the basic and the submitit_local launchers.

Everything the verdict prints is recomputed here from the run folders with plain json/yaml and independent
arithmetic (the workloads' targets read from conf/workload/, times from metrics.jsonl, medians with `statistics`,
scores by numerical integration, p-values by enumerating every split), sharing no code with runner/report.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from runner.race import main as race_main
from tests.runs import REPO, env, start, wait_for_rows
from tests.test_race_stats import brute_force_p

INF = math.inf


def race(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "runner.race", *args], cwd=cwd, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 1500) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, stdout, stderr


def jobs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def summary_of(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def workload_target(name: str) -> tuple[str, float, bool]:
    """(metric, target, higher is better) from the workload's own file."""
    node = yaml.safe_load((REPO / "conf" / "workload" / f"{name}.yaml").read_text())["workload"]
    return node["metric"], float(node["target"]), "accuracy" in node["metric"]


def time_and_steps(run: Path, workload: str) -> tuple[float, float]:
    metric, target, up = workload_target(workload)
    for row in rows_of(run):
        value = row.get(metric)
        if isinstance(value, float) and math.isfinite(value) and (value >= target if up else value <= target):
            return row["wall_time"], row["step"]
    return INF, INF


def area_score(ratios: list[float]) -> float:
    """The profile's normalised area from tau = 1 to 4 by the trapezoidal rule on a fine grid."""
    grid = np.linspace(1.0, 4.0, 30_001)
    heights = (np.array(ratios)[None, :] <= grid[:, None]).mean(axis=1)
    return float(np.trapezoid(heights, grid) / 3.0)


# ---------------------------------------------------------------- options


@pytest.mark.parametrize("args, message", [
    (["--workloads", "digits_mlp,mnist_mlp"], "--workloads mnist_mlp: not in conf/workload/. Choose from: "
                                               "cifar10_basic_cnn, cifar10_resnet18, digits_mlp"),
    (["--methods", "sgd,rmsprop"], "--methods rmsprop: not in conf/search/. Choose from: adahessian, adam, curveball"),
    (["--seeds", "0,1"], "must not contain the tuning seed 0"),
    (["--trials", "0"], "--trials 0 must be at least 1."),
    (["--methods", "sgd", "--set", "hf:trainer.batch_size=1000"], "--set hf:trainer.batch_size=1000 must be "
                                                                 "METHOD:KEY=VALUE with METHOD one of --methods (sgd)"),
    (["seed=3"], "seed=3: the race sets seed itself"),
    (["hydra.sweep.dir=/tmp/x"], "hydra.sweep.dir=/tmp/x: the race sets hydra.sweep.dir itself"),
    (["--workloads", "digits_mlp", "--methods", "sgd", "model.hidden=abc,def"], "does not compose"),
])
def test_bad_options_exit_2_with_one_paragraph(tmp_path, capsys, args, message):
    assert race_main([*args, "--out", str(tmp_path / "race")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("curvlab race: error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "race" / "tune").exists()


def test_another_plan_in_the_same_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "race"
    out.mkdir()
    plan = {"workloads": ["digits_mlp"], "methods": ["sgd"], "trials": 5, "tuning_seed": 0, "seeds": [1000],
            "launcher": "basic", "sets": {}, "overrides": [], "alpha": 0.05}
    (out / "race.json").write_text(json.dumps({"plan": plan}))
    assert race_main(["--workloads", "digits_mlp", "--methods", "sgd", "--trials", "6", "--seeds", "1000",
                      "--out", str(out)]) == 2
    assert "holds a race with another plan (trials: 5 there, 6 now)" in capsys.readouterr().err


@pytest.mark.parametrize("launcher, target", [("basic", "BasicLauncher"), ("submitit_local", "LocalLauncher"),
                                              ("slurm", "SlurmLauncher")])
def test_every_cell_composes_with_each_launcher_and_a_methods_own_batch(tmp_path, launcher, target):
    from runner.race import Plan, cells, compose

    plan = Plan(["digits_mlp", "imagenet_resnet50"], ["sgd", "hf"], 2, 0, [1000], launcher,
                {"hf": ["trainer.batch_size=1000"]}, ["threads=1"])
    found = cells(plan, tmp_path)
    assert [(c.workload, c.method, c.optimizer, c.direction) for c in found] == [
        (w, m, m, "minimize") for w in plan.workloads for m in plan.methods]
    cfg = compose(["workload=imagenet_resnet50", "search=hf", *plan.method_overrides("hf")])
    assert cfg.hydra.launcher._target_.endswith(target) and cfg.trainer.batch_size == 1000 and cfg.threads == 1
    assert compose(["workload=imagenet_resnet50", "search=sgd", *plan.method_overrides("sgd")]).trainer.batch_size \
        == 256


def test_the_default_race_is_issue_18s_every_method_on_every_cpu_workload():
    """The default --methods is the race the issue asks for (first-order baselines, today's winners, the second-order
    methods), and each of them composes with a small workload through its own search preset."""
    from runner.race import DEFAULT_METHODS, Plan, cells, parse_args

    assert parse_args([]).methods.split(",") == list(DEFAULT_METHODS)
    assert set(DEFAULT_METHODS) >= {"sgd", "adam", "nadamw", "muon", "schedule_free", "shampoo", "soap", "psgd",
                                    "kfac", "curveball", "hf", "lbfgs"}
    for method in DEFAULT_METHODS:
        assert (REPO / "conf" / "search" / f"{method}.yaml").is_file(), method
    plan = Plan(["digits_mlp"], list(DEFAULT_METHODS), 1, 0, [1000], "basic", {}, ["threads=1"])
    found = cells(plan, Path("/nonexistent"))
    assert [(c.method, c.optimizer) for c in found] == [(m, m) for m in DEFAULT_METHODS]


def test_only_unresumable_unfinished_jobs_are_set_aside(tmp_path):
    from runner.race import complete, set_aside

    sweep = tmp_path / "out" / "tune" / "w" / "m"
    for job, files in {"0": {"summary.json": '{"status": "ok", "exit_code": 0}', "metrics.jsonl": "{}\n"},
                       "1": {"metrics.jsonl": '{"step": 1}\n'},  # killed before its first checkpoint
                       "2": {"summary.json": '{"status": "interrupted"}', "checkpoint.pt": "x"},  # resumable
                       "3": {".hydra/overrides.yaml": "[]"},  # started, nothing written yet
                       "4": {"summary.json": '{"status": "error", "exit_code": 5}', "metrics.jsonl": "{}\n"}}.items():
        for name, text in files.items():
            (sweep / job / name).parent.mkdir(parents=True, exist_ok=True)
            (sweep / job / name).write_text(text)
    assert not complete(sweep, 1 + 4) and complete(sweep, 1)
    moved = set_aside(sweep, 5, tmp_path / "out" / "set_aside")
    assert [m.relative_to(tmp_path / "out").as_posix() for m in moved] == ["set_aside/tune/w/m/1-1",
                                                                          "set_aside/tune/w/m/4-1"]
    assert (moved[0] / "metrics.jsonl").read_text() == '{"step": 1}\n'  # kept, not deleted
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "2", "3"]


# ---------------------------------------------------------------- continuing a sweep (runner/sweep.py)


def test_a_sweep_stops_on_sigterm_and_continues_without_redoing_finished_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "seed=0,1,2", "trainer.max_epochs=null", "trainer.max_steps=600", "trainer.eval_every=300",
            f"hydra.sweep.dir={sweep}"]
    process = start(args, tmp_path)
    wait_for_rows(sweep / "0" / "metrics.jsonl", 20, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 4, stderr
    assert "curvlab: the sweep stops: job 0 was interrupted by SIGTERM, so no further job was started." in stderr
    assert summary_of(sweep / "0")["status"] == "interrupted" and (sweep / "0" / "checkpoint.pt").is_file()
    assert [p.name for p in jobs(sweep)] == ["0"]  # jobs 1 and 2 were never started

    process = start([*args, "trainer.resume=true"], tmp_path)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert [summary_of(job)["status"] for job in jobs(sweep)] == ["ok"] * 3
    assert summary_of(sweep / "0")["resumed_from"]["step"] > 0  # job 0 continued from its checkpoint
    assert [len(rows_of(job)) for job in jobs(sweep)] == [600] * 3
    before = {job.name: (job / "metrics.jsonl").read_bytes() for job in jobs(sweep)}

    process = start([*args, "trainer.resume=true"], tmp_path)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert stdout.count("holds this job's finished run (status ok); not run again.") == 3
    assert {job.name: (job / "metrics.jsonl").read_bytes() for job in jobs(sweep)} == before


# ---------------------------------------------------------------- the protocol end to end


@pytest.fixture(scope="module")
def protocol(tmp_path_factory) -> tuple:
    """Two workloads x three methods, two trials each, two re-run seeds."""
    root = tmp_path_factory.mktemp("race")
    out = root / "race"
    process = race("--workloads", "digits_mlp,sine_mlp", "--methods", "sgd,adam,curveball", "--trials", "2",
                   "--seeds", "1000,1001", "--out", str(out), "threads=1", "trainer.progress=false",
                   "trainer.max_steps=1000", cwd=root)
    return (*finish(process), out)


@pytest.mark.slow
def test_the_protocol_tunes_reruns_and_its_verdict_matches_the_runs_own_metrics(protocol):
    code, stdout, stderr, out = protocol
    assert code == 0, stderr
    workloads, methods = ["digits_mlp", "sine_mlp"], ["sgd", "adam", "curveball"]
    medians = {"time": {}, "steps": {}}
    per_seed = {}
    for w, m in itertools.product(workloads, methods):
        tuned = jobs(out / "tune" / w / m)
        assert len(tuned) == 2  # the equal budget
        assert {yaml.safe_load((t / "config.yaml").read_text())["seed"] for t in tuned} == {0}
        # The best trial: the shortest time to target, ties (never reached) broken by the best metric value.
        metric, _, up = workload_target(w)
        key = [(time_and_steps(t, w)[0], -max(r[metric] for r in rows_of(t) if metric in r) if up else
                min(r[metric] for r in rows_of(t) if metric in r), int(t.name)) for t in tuned]
        best = min(key)[2]
        best_overrides = [o for o in yaml.safe_load((tuned[best] / ".hydra" / "overrides.yaml").read_text())
                          if o.startswith("optimizer.")]
        assert json.loads((out / "tune" / w / m / "best.json").read_text())["trial"] == best
        evaluated = jobs(out / "eval" / w / m)
        assert [yaml.safe_load((e / "config.yaml").read_text())["seed"] for e in evaluated] == [1000, 1001]
        for e in evaluated:
            overrides = yaml.safe_load((e / ".hydra" / "overrides.yaml").read_text())
            assert [o for o in overrides if o.startswith("optimizer.")] == best_overrides
        values = [time_and_steps(e, w) for e in evaluated]
        per_seed[(w, m)] = values
        medians["time"][(w, m)] = statistics.median(v[0] for v in values)
        medians["steps"][(w, m)] = statistics.median(v[1] for v in values)

    verdict = out / "verdict"
    table = list(csv.DictReader(open(verdict / "per_seed.csv")))
    assert len(table) == len(workloads) * len(methods) * 2
    for row in table:
        run = Path(row["run"])
        expected_time, expected_steps = time_and_steps(run, row["workload"])
        assert float(row["time"]) == expected_time and float(row["steps"]) == expected_steps

    scores = {r["method"]: r for r in csv.DictReader(open(verdict / "scores.csv"))}
    text = (verdict / "verdict.md").read_text()
    for kind in ("time", "steps"):
        for m in methods:
            ratios = []
            for w in workloads:
                best = min(medians[kind][(w, other)] for other in methods)
                mine = medians[kind][(w, m)]
                ratios.append(INF if not math.isfinite(best) or not math.isfinite(mine) else mine / best)
            assert float(scores[m][f"score_{kind}"]) == pytest.approx(area_score(ratios), abs=2e-4)
        printed = {m: float(x) for m, x in re.findall(r"^\| (\w+) \| ([0-9.]+) \| [0-9.]+ \|", text, re.M)}
        if kind == "time":
            assert printed.keys() == set(methods)
            for m in methods:
                assert printed[m] == pytest.approx(float(scores[m]["score_time"]), abs=6e-4)

    pairs = list(csv.DictReader(open(verdict / "pairs.csv")))
    assert len(pairs) == len(workloads) * 3
    for pair in pairs:
        a = [v[0] for v in per_seed[(pair["workload"], pair["a"])]]
        b = [v[0] for v in per_seed[(pair["workload"], pair["b"])]]
        assert float(pair["time p"]) == pytest.approx(brute_force_p(a, b))
        assert pair["time verdict"] == "no significant difference"  # two seeds each: p >= 1/3
    for w in workloads:
        assert (verdict / w / "summary.md").is_file() and (verdict / w / "curves_vs_time.png").is_file()
    assert (verdict / "profile_time.png").is_file() and (verdict / "profile_steps.png").is_file()
    assert text in stdout


# ---------------------------------------------------------------- interrupted and continued


@pytest.mark.slow
def test_the_protocol_continues_after_sigterm_without_redoing_finished_runs(tmp_path):
    args = ["--workloads", "digits_mlp", "--methods", "sgd,adam", "--trials", "3", "--seeds", "1000", "threads=1",
            "trainer.progress=false", "trainer.stop_at_target=null", "trainer.max_steps=500",
            "trainer.eval_every=100"]
    reference = race(*args, "--out", str(tmp_path / "reference"), cwd=tmp_path)  # the same plan, never interrupted
    code, _, stderr = finish(reference)
    assert code == 0, stderr

    out = tmp_path / "race"
    process = race(*args, "--out", str(out), cwd=tmp_path)
    interrupted = out / "tune" / "digits_mlp" / "adam" / "1"
    wait_for_rows(interrupted / "metrics.jsonl", 20, process, timeout=600)
    os.kill(process.pid, signal.SIGTERM)  # to the race's process only: it passes the signal on
    code, _, stderr = finish(process, timeout=300)
    assert code == 4, stderr
    assert "curvlab race: interrupted by SIGTERM" in stderr and "Run the same command again" in stderr
    assert summary_of(interrupted)["status"] == "interrupted" and (interrupted / "checkpoint.pt").is_file()
    assert not (out / "tune" / "digits_mlp" / "adam" / "2").exists() and not (out / "eval").exists()
    finished = [*jobs(out / "tune" / "digits_mlp" / "sgd"), out / "tune" / "digits_mlp" / "adam" / "0"]
    before = {str(j): ((j / "metrics.jsonl").read_bytes(), (j / "objective.json").read_text()) for j in finished}

    code, stdout, stderr = finish(race(*args, "--out", str(out), cwd=tmp_path))
    assert code == 0, stderr
    assert {str(j): ((j / "metrics.jsonl").read_bytes(), (j / "objective.json").read_text()) for j in finished} \
        == before  # not run again, and the same objective returned to the sampler
    assert summary_of(interrupted)["status"] == "ok" and summary_of(interrupted)["resumed_from"]["step"] > 0
    for method in ("sgd", "adam"):  # the seeded sampler proposed the same trials as in the uninterrupted race
        for mine, theirs in zip(jobs(out / "tune" / "digits_mlp" / method),
                                jobs(tmp_path / "reference" / "tune" / "digits_mlp" / method), strict=True):
            assert (yaml.safe_load((mine / ".hydra" / "overrides.yaml").read_text())
                    == yaml.safe_load((theirs / ".hydra" / "overrides.yaml").read_text()))
    assert (out / "verdict" / "verdict.md").is_file()

    # A third run finds everything finished: no run.py at all, only the verdict again.
    code, stdout, stderr = finish(race(*args, "--out", str(out), cwd=tmp_path))
    assert code == 0 and "curvlab race: tuning" not in stdout and "curvlab race: re-running" not in stdout


# ---------------------------------------------------------------- another launcher


@pytest.mark.slow
def test_the_protocol_runs_its_trials_through_submitit(tmp_path):
    out = tmp_path / "race"
    code, stdout, stderr = finish(race("--workloads", "digits_mlp", "--methods", "sgd", "--trials", "2", "--seeds",
                                       "1000", "--launcher", "submitit_local", "--out", str(out), "threads=1",
                                       "trainer.progress=false", cwd=tmp_path))
    assert code == 0, stderr
    tuned = out / "tune" / "digits_mlp" / "sgd"
    assert (tuned / ".submitit").is_dir() and len(jobs(tuned)) == 2
    assert all(summary_of(j)["status"] == "ok" for j in [*jobs(tuned), *jobs(out / "eval" / "digits_mlp" / "sgd")])
    assert "| digits_mlp (eval/accuracy≥" in (out / "verdict" / "verdict.md").read_text()
