"""scripts/evaluate_run.py end to end: train a tiny run with run.py, then evaluate its final weights on both splits
and compare with an independent computation (plain cross-entropy and argmax on the split tensors)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.digits import build_digits
from models.mlp import build_mlp

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_final_weights_are_evaluated_on_the_whole_training_split(tmp_path):
    folder = tmp_path / "sweep" / "0"
    trained = run([str(ROOT / "run.py"), "model.hidden=[8]", "trainer.max_steps=5", "dtype=float64", "threads=1",
                   "trainer.progress=false", f"hydra.run.dir={folder}"], tmp_path)
    assert trained.returncode == 0, trained.stderr
    done = run([str(ROOT / "scripts/evaluate_run.py"), str(tmp_path / "sweep")], tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads((folder / "final_eval.json").read_text())
    summary = json.loads((folder / "summary.json").read_text())
    assert result["step"] == 5
    assert abs(result["eval/loss"] - summary["eval"]["eval/loss"]) < 1e-12
    assert result["eval/accuracy"] == summary["eval"]["eval/accuracy"]
    splits = build_digits()
    model = build_mlp(splits.input_shape, splits.num_outputs, hidden=[8]).double()
    model.load_state_dict(torch.load(folder / "checkpoint.pt", weights_only=True)["model"])
    with torch.no_grad():
        logits = model(splits.train.inputs.double())
    loss = torch.nn.functional.cross_entropy(logits, splits.train.targets)
    accuracy = (logits.argmax(1) == splits.train.targets).double().mean()
    assert abs(result["train/loss"] - float(loss)) < 1e-12 and result["train/accuracy"] == float(accuracy)
    assert len(splits.train) != len(splits.test)  # the two splits really are different data


def test_a_folder_without_runs_is_a_clear_error(tmp_path):
    done = run([str(ROOT / "scripts/evaluate_run.py"), str(tmp_path)], tmp_path)
    assert done.returncode == 2 and "no run folder" in done.stderr and "Traceback" not in done.stderr
