"""The runner's training throughput against a bare PyTorch loop on the same model, batch and device.

The body is `runner.bench.overhead` (its docstring has the details); this file keeps the command line.
"""
from runner.bench.overhead import main

if __name__ == "__main__":
    raise SystemExit(main())
