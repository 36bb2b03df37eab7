"""Compare optimisers fairly on one problem: tune each with the same trial budget, evaluate the best configuration
of each on fresh seeds, and report (DeepOBS / AlgoPerf practice). The body is runner/race.py's `tune_main`; for a
suite of workloads with performance profiles and significance tests use `python -m runner.race`.

    python scripts/tune.py --optimizers sgd,adam,hf --trials 20 trainer.max_epochs=3 threads=1
    python scripts/tune.py --optimizers sgd,hf --trials 10 --objective time_to_target --target 0.97 \\
        --eval-seeds 100,101,102 --out outputs/tune_digits dataset=digits trainer.max_epochs=5

For each optimiser: `python run.py -m search=<optimizer>` (hydra-optuna-sweeper, conf/search/<optimizer>.yaml) with
`--trials` trials on the tuning seed, all into <out>/tune/<optimizer>/; then the best parameters on every
evaluation seed into <out>/eval/<optimizer>/. Finally <out>/best_configs.md (the best configuration of each method),
<out>/trials.csv (every trial) and the report of the evaluation runs in <out>/report/ (curves of each method's best
configuration). The trailing key=value overrides define the problem and go to every run (tuning and evaluation).
The same command with the same --out continues an interrupted comparison (finished runs are not run again; the logs
of the sweeps are in <out>/logs/).
Exit codes: 0 ok; 2 bad options; 4 interrupted by a signal (run it again to continue); 1 a sweep failed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, when not installed

from runner.race import tune_main as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
