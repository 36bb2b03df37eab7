"""Seed 000 sec. 14.3 statistics from two run folders (GD and Newton-CG, 60 shared pre-training steps).

The body is `runner.seeds.seed000_stats` (its docstring has the details); this file keeps the command line.
"""
from runner.seeds.seed000_stats import main

if __name__ == "__main__":
    raise SystemExit(main())
