"""Seed 000 sec. 14.3 statistics from two run folders (GD and Newton-CG, 60 shared pre-training steps).

    python scripts/seed000_stats.py RUN_GD RUN_NEWTON

Reads each folder's metrics.jsonl and prints, for the steps after the pre-training (61 on): the losses, the
evaluations, mean step times, CG iterations and stop reasons, line-search statistics and the Hessian-vector product
cost. These are the numbers docs/reproduction/seed000.md quotes beside the thesis (Vormann, 2018, sec. 14.3).
"""
import json
import statistics
import sys
from collections import Counter

PRETRAIN_STEPS = 60


def rows(folder):
    with open(f"{folder}/metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def after_pretraining(rs):
    return [r for r in rs if r["step"] > PRETRAIN_STEPS]


def stats(gd_dir, newton_dir):
    gd, newton = rows(gd_dir), rows(newton_dir)
    for name, rs in (("gd", gd), ("newton", newton)):
        evals = {r["step"]: (round(r["train/loss"], 4), round(r["eval/loss"], 4), r["eval/accuracy"])
                 for r in rs if "eval/accuracy" in r}
        first = next(r["loss"] for r in rs if r["step"] == PRETRAIN_STEPS + 1)
        print(f"{name}: steps {rs[-1]['step']}, loss before step {PRETRAIN_STEPS + 1}: {first:.4f}, "
              f"loss before the last step: {rs[-1]['loss']:.4f}")
        print(f"{name}: evaluations (train/loss, eval/loss, eval/accuracy): {evals}")
        pre = statistics.mean(r["step_time"] for r in rs if r["step"] <= PRETRAIN_STEPS)
        post = statistics.mean(r["step_time"] for r in after_pretraining(rs))
        print(f"{name}: mean step time 1-{PRETRAIN_STEPS}: {pre:.2f} s, {PRETRAIN_STEPS + 1}-: {post:.2f} s")
    p = after_pretraining(newton)
    iters = [r["cg/iters"] for r in p]
    print(f"newton steps {len(p)}, cg/iters {iters}, mean {statistics.mean(iters):.2f}, "
          f"median {statistics.median(iters)}")
    print("cg/stop", dict(Counter(r["cg/stop"] for r in p)), "fallback", sum(r["fallback"] for r in p),
          "steps with negative directions", sum(r["cg/negative_directions"] > 0 for r in p))
    print("line_search/rate", dict(Counter(r["line_search/rate"] for r in p)),
          f"evals mean {statistics.mean(r['line_search/evals'] for r in p):.2f}")
    products = sum(r["curv/hvp_products"] for r in p)
    product_time = sum(r["curv/product_time"] for r in p)
    print(f"hvp products per step {products / len(p):.2f}; product share of step time "
          f"{product_time / sum(r['step_time'] for r in p):.2f}; seconds per product {product_time / products:.2f}")
    ratio = statistics.mean(r["step_time"] for r in p) / statistics.mean(r["step_time"] for r in after_pretraining(gd))
    print(f"newton / gd mean step time ({PRETRAIN_STEPS + 1}-): {ratio:.1f}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        sys.exit(__doc__)
    stats(argv[0], argv[1])


if __name__ == "__main__":
    main()
