"""Loss and accuracy of a finished run's final weights on the whole training split and on the test split.

The body is `runner.evaluate_run` (its docstring has the details); this file keeps the command line.
"""
from runner.evaluate_run import main

if __name__ == "__main__":
    raise SystemExit(main())
