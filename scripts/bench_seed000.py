"""Seed 000 Tables 14.1-14.2: time of the explicit Hessian and of one Hessian-vector product of the simple CNN.

The body is `runner.bench.seed000` (its docstring has the details); this file keeps the command line.
"""
from runner.bench.seed000 import main

if __name__ == "__main__":
    raise SystemExit(main())
