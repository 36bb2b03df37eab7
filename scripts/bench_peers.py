"""Per-step cost of curvlab's CurveBall, HF and K-FAC against an SGD step and against the public implementations.

The body is `runner.bench.peers` (its docstring has the details); this file keeps the command line.
"""
from runner.bench.peers import main

if __name__ == "__main__":
    raise SystemExit(main())
