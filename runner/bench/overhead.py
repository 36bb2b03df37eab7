"""The runner's training throughput against a bare PyTorch loop on the same model, batch and device (issue 2).

    python scripts/bench_runner.py                     # MNIST MLP and CIFAR basic CNN, SGD, CPU
    python scripts/bench_runner.py --steps 300 --repeats 5 --device cuda

The bare loop is what a person writes by hand: the same preloaded tensors, a random permutation, index, forward,
``loss.backward()``, ``torch.optim.SGD.step()``. The runner is ``runner.train.train`` on the composed Hydra config
(logger=none, evaluation only at the end). Both take the same number of steps; runs alternate (bare, runner, bare,
...) and the medians are compared. The runner's time is its own ``wall_time`` (the sum of its step times, which
include building the Objective, the optimiser's step contract and metric recording, but not evaluation), and the
end-to-end loop time is printed beside it. CIFAR files cannot be had here, so the CIFAR case writes random images
in CIFAR-10's real on-disk format (throughput does not depend on pixel values).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from runner.schema import register_configs
from runner.train import train


def write_fake_cifar10(root: Path, n_train: int = 10000, n_test: int = 1000) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per_batch = n_train // 5
    for i in range(1, 6):
        batch = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, per_batch).tolist()}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
    test = {"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n_test).tolist()}
    (folder / "test_batch").write_bytes(pickle.dumps(test, protocol=2))
    meta = {"label_names": [f"class{i}" for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))


def compose_cfg(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def bare_loop(cfg, steps: int, device: torch.device) -> float:
    """A hand-written loop over the same data and model; returns seconds for ``steps`` steps."""
    torch.manual_seed(cfg.seed)
    splits = instantiate(cfg.dataset)
    model = instantiate(cfg.model, input_shape=splits.input_shape, num_outputs=splits.num_outputs).to(device)
    x_all = splits.train.inputs.to(device=device, dtype=torch.float32)
    y_all = splits.train.targets.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optimizer.lr, momentum=cfg.optimizer.momentum)
    b = cfg.trainer.batch_size
    n = x_all.shape[0] // b
    perm = torch.randperm(x_all.shape[0], device=device)
    model.train()
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        j = i % n
        if j == 0 and i > 0:
            perm = torch.randperm(x_all.shape[0], device=device)
        idx = perm[j * b:(j + 1) * b]
        x, y = x_all[idx], y_all[idx]
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    sync(device)
    return time.perf_counter() - t0


def runner_loop(cfg, out: Path) -> tuple[float, float]:
    """The runner on the same config; returns (its summed step time, the end-to-end loop time)."""
    t0 = time.perf_counter()
    result = train(cfg, output_dir=out)
    total = time.perf_counter() - t0
    summary = json.loads((out / "summary.json").read_text())
    assert result.status == "ok", summary
    return summary["wall_time"], total


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cases", nargs="+", default=["mnist_mlp", "cifar_cnn"], choices=["mnist_mlp", "cifar_cnn"])
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="curvlab-bench-"))
    data_root = os.environ.get("CURVLAB_DATA", str(ROOT / "data"))
    cases = {
        "mnist_mlp": ("MNIST, MLP 784-800-10, batch 128", data_root, ["dataset=mnist", "model=mlp_800"]),
        "cifar_cnn": ("CIFAR-10 format, basic CNN, batch 128", str(tmp / "cifar"), ["dataset=cifar10", "model=cifar_basic_cnn"]),
    }
    if "cifar_cnn" in args.cases:
        write_fake_cifar10(tmp / "cifar")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {device}, {args.steps} SGD steps")
    print(f"| {'case':40s} | {'bare loop s':>11s} | {'runner s':>9s} | {'overhead':>8s} | {'runner end-to-end s':>19s} |")
    print(f"| {'-' * 40} | {'-' * 10}: | {'-' * 8}: | {'-' * 7}: | {'-' * 18}: |")
    for key in args.cases:
        label, root, overrides = cases[key]
        cfg = compose_cfg(overrides + [
            f"data_root={root}", "optimizer=sgd", f"device={args.device}", "logger=none",
            f"trainer.max_steps={args.steps}", "trainer.max_epochs=null", "trainer.batch_size=128",
            f"trainer.eval_every={10 * args.steps}", "trainer.checkpoint=false", "trainer.progress=false",
        ])
        bare, ours, total = [], [], []
        for r in range(args.repeats):
            bare.append(bare_loop(cfg, args.steps, device))
            step_sum, end_to_end = runner_loop(cfg, tmp / f"{key}-{r}")
            ours.append(step_sum)
            total.append(end_to_end)
        b, o = statistics.median(bare), statistics.median(ours)
        print(f"| {label:40s} | {b:11.2f} | {o:9.2f} | {100 * (o / b - 1):+7.1f}% | {statistics.median(total):19.2f} |")


if __name__ == "__main__":
    main()
