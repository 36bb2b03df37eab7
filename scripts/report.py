"""Tables and plots from curvlab run and sweep folders: `python scripts/report.py --help`.

The body is `runner.report.cli` (its docstring has the details); this file keeps the command line.
"""
from runner.report.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
