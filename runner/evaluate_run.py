"""Loss and accuracy of a finished run's final weights on the whole training split and on the test split.

    python scripts/evaluate_run.py /work/runs/sweep_folder [more run or sweep folders ...]

The runner logs the test metrics and the mean *batch* loss; tables such as seed 001's (train loss, train accuracy)
need the final weights evaluated on the whole training set. For every run folder (config.yaml + checkpoint.pt, found
recursively) this rebuilds the dataset and model from the run's resolved config, loads the checkpoint's weights
(``weights_only=True``) and evaluates both splits with the runner's own ``evaluate``. It prints one line per run and
writes ``final_eval.json`` (train/loss, train/accuracy, eval/loss, eval/accuracy, step) into the run folder.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import OmegaConf


from data.batching import make_batches
from optimizers.losses import get_loss
from runner.checkpoint import load_checkpoint
from runner.device import resolve_dtype
from runner.evaluate import evaluate


def run_folders(folders: list[str]) -> list[Path]:
    found = []
    for folder in map(Path, folders):
        found += sorted(p.parent for p in folder.rglob("checkpoint.pt") if (p.parent / "config.yaml").is_file())
    return found


def evaluate_folder(folder: Path) -> dict[str, float]:
    cfg = OmegaConf.load(folder / "config.yaml")  # resolved: data_root is an absolute path
    state = load_checkpoint(folder / "checkpoint.pt")
    splits = hydra.utils.instantiate(cfg.dataset)
    model = hydra.utils.instantiate(cfg.model, input_shape=splits.input_shape, num_outputs=splits.num_outputs)
    dtype = resolve_dtype(cfg.dtype)
    model = model.to(dtype=dtype)
    model.load_state_dict(state["model"])
    loss_fn, classification = get_loss(splits.loss), splits.loss == "cross_entropy"
    out: dict[str, float] = {"step": state["progress"]["step"]}
    for prefix, split in (("train", splits.train), ("eval", splits.test)):
        batches = make_batches(split, batch_size=cfg.trainer.eval_batch_size, mode="sequential", dtype=dtype)
        out.update({f"{prefix}/{k.split('/')[1]}": float(v) for k, v in
                    evaluate(model, loss_fn, batches, classification).items()})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    folders = run_folders(args.folders)
    if not folders:
        print(f"evaluate_run: error: no run folder (config.yaml with checkpoint.pt) under {', '.join(args.folders)}.",
              file=sys.stderr)
        sys.exit(2)
    for folder in folders:
        result = evaluate_folder(folder)
        (folder / "final_eval.json").write_text(json.dumps(result, indent=1) + "\n")
        print(folder, " ".join(f"{k}={v:.6g}" for k, v in result.items()), flush=True)


if __name__ == "__main__":
    main()
