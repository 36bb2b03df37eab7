"""scripts/gpu_check.sh, which runs on a lent CUDA machine only: its dry run here, on the CPU, checks that the steps
fit the time it is given and that every file and flag it names exists."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def dry_run() -> list[tuple[str, int, str]]:
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run", "/nonexistent/folder"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("gpu_check.sh --dry-run: ") and lines[0].endswith("output to /nonexistent/folder")
    steps = []
    for line in lines[1:]:
        name, limit, command = re.match(r"^(\S+)\s+(\d+)s  (.*)$", line).groups()
        steps.append((name, int(limit), command))
    return steps


def test_dry_run_lists_the_steps_within_eight_minutes():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)  # syntax
    steps = dry_run()
    names = [name for name, _, _ in steps]
    assert names == ["tests_cuda", "bench_curvature", "bench_execution", "bench_runner", "bench_peers",
                     "nccl_backend", "nccl_run"]
    assert sum(limit for _, limit, _ in steps) <= 8 * 60
    assert not Path("/nonexistent/folder").exists()  # a dry run writes nothing there
    commands = " ".join(command for _, _, command in steps)
    assert "--device cuda" in commands and "--rows execution" in commands and "--nproc_per_node=1" in commands


@pytest.mark.slow  # four benchmark scripts' --help (~40 s on a busy 2-core machine)
def test_every_file_and_flag_the_steps_name_exists():
    for name, _, command in dry_run():
        for part in command.split("; "):
            words = shlex.split(part)
            for word in words:
                if word.startswith(("tests/", "scripts/")) or word == "run.py":
                    assert (REPO / word).is_file(), (name, word)
            if words[1:2] == ["scripts/" + words[1].removeprefix("scripts/")] and words[1].startswith("scripts/bench"):
                help_text = subprocess.run([sys.executable, str(REPO / words[1]), "--help"], capture_output=True,
                                           text=True, timeout=120, cwd=REPO).stdout
                for flag in (w for w in words if w.startswith("--")):
                    assert flag in help_text, (name, flag)


def test_unknown_option_exits_2():
    result = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "unknown option --bogus" in result.stderr
