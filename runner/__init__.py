"""The experiment runner: `runner.train.train(cfg)` turns a composed Hydra config into a results folder.

    schema      typed config for the runner's keys (trainer, logger, seed, device, dtype, ...)
    train       the loop: batches -> Objective -> optimizer.step, evaluation, divergence stop
    evaluate    test-set loss and accuracy
    metrics     metric rows, their buffer and the metrics.jsonl sink
    wandb_sink  the optional Weights & Biases sink
    metadata    config.yaml, run_info.json, summary.json
    checkpoint  checkpoint.pt
    device      device and dtype from the config
    seeding     seeds and random-number-generator states
    errors      user errors -> one paragraph (used by run.py)

Nothing is imported here, so that `run.py` can report config errors without loading torch.
"""
