"""Cost and accuracy of the curvature diagnostics against PyHessian and curvlinops.

The body is `runner.bench.diagnostics` (its docstring has the details); this file keeps the command line.
"""
from runner.bench.diagnostics import main

if __name__ == "__main__":
    raise SystemExit(main())
