"""Peak memory of one HF and one CurveBall step, whole batch against micro-batches (objective.micro_batch_size).

The body is `runner.bench.memory` (its docstring has the details); this file keeps the command line.
"""
from runner.bench.memory import main

if __name__ == "__main__":
    raise SystemExit(main())
