"""Reports from run folders: `python scripts/report.py <folders...>`, or in Python:

    from runner.report import build_report
    report = build_report(["outputs/multirun/2026-11-26_10-00-00"], by=["optimizer"], targets=["eval/accuracy=0.97"])
    print(report.markdown)

    load        finding run folders in run/sweep folders and reading them (status ok | diverged | interrupted | error)
    quantities  final / best / mean values and the first row reaching a target (shared with runner/tuning.py)
    aggregate   grouping by config keys, seeds -> mean and min-max band
    tables      per-run and per-group records, Markdown / CSV, the tidy CSV, "ours vs paper" tables
    plots       curves against step / epoch / samples / time, per-step diagnostics, CG stop reasons, profiles
    cli         the command line (scripts/report.py)
    profiles    performance profiles and their scores (AlgoPerf)
    significance the exact two-sided rank test of two methods' per-seed times, Holm's adjustment
    verdict     the race's verdict from its re-run folders (runner/race.py)
    targets     a workload's target and budget from reference runs (python -m runner.report.targets)
"""

__all__ = ["Report", "ReportError", "Run", "build_report", "find_runs", "main", "markdown_table", "side_by_side"]
_HOMES = {"Report": "cli", "build_report": "cli", "main": "cli", "ReportError": "load", "Run": "load",
          "find_runs": "load", "markdown_table": "tables", "side_by_side": "tables"}


def __getattr__(name: str):
    """Lazy: `runner.report.quantities` (used by every run through runner/tuning.py) must not load matplotlib."""
    if name not in _HOMES:
        raise AttributeError(f"module 'runner.report' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"runner.report.{_HOMES[name]}"), name)
