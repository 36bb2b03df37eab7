"""Cost of curvature products and second-order steps as multiples of a gradient and of an SGD step.

The body is `runner.bench.curvature` (its docstring has the details); this file keeps the command line.
"""
from runner.bench.curvature import main

if __name__ == "__main__":
    raise SystemExit(main())
