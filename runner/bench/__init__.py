"""Benchmarks: each module measures curvlab against a baseline in the same process and prints ratios (scripts/bench_*.py
are their command lines)."""
