"""Seed 001 (Veitch, second-order methods on Fashion-MNIST) Tables 1-4 from run folders, beside the paper's values.

The body is `runner.seeds.seed001_tables` (its docstring has the details); this file keeps the command line.
"""
from runner.seeds.seed001_tables import main

if __name__ == "__main__":
    raise SystemExit(main())
