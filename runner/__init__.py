"""The experiment runner: `runner.train.train(cfg)` turns a composed Hydra config into a results folder.

    schema      typed config for the runner's keys (trainer, logger, seed, device, dtype, ...)
    train       the loop: batches -> Objective -> optimizer.step, evaluation, divergence stop
    state       RunState: the run's state, its checkpoint (capture / restore / save_checkpoint) and summary.json
    evaluate    test-set loss and accuracy
    metrics     metric rows, their buffer and the metrics.jsonl sink
    wandb_sink  the optional Weights & Biases sink
    metadata    config.yaml, run_info.json, summary.json
    checkpoint  checkpoint.pt: atomic writes, weights_only loading, the checkpoint schedule
    resume      whether and from where a run resumes
    diagnostics the one registry of curvature diagnostics and the in-run `diagnostics` group
    diagnose    curvlab-diagnose (scripts/diagnose.py): the diagnostics of a run folder, with plots
    signals     SIGTERM / SIGUSR1 / SIGUSR2 / SIGINT -> stop after the current step
    run_dir     unique run and sweep folders, the same for every rank; refusing folders with results
    distributed rank, world size, process group (torchrun, submitit), collective helpers
    sweep       the sweep report of the launching command, folder checks before Hydra writes
    gpu_lock    one GPU per job for local sweeps
    device      device and dtype from the config
    seeding     seeds and random-number-generator states
    errors      user errors -> one paragraph (used by run.py)

Nothing is imported here, so that `run.py` can report config errors without loading torch.
"""
