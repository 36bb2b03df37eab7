"""Seed 003 Table 1 (Henriques et al. 2019, sec. 4): iterations to tolerance over seeds, beside the paper.

The body is `runner.seeds.seed003_table1` (its docstring has the details); this file keeps the command line.
"""
from runner.seeds.seed003_table1 import main

if __name__ == "__main__":
    raise SystemExit(main())
