"""Data-parallel scaling: step time on 1 and 2 ranks for the same global batch, and the all-reduce share of a step.

The body is `runner.bench.distributed` (its docstring has the details); this file keeps the command line.
"""
from runner.bench.distributed import main

if __name__ == "__main__":
    raise SystemExit(main())
