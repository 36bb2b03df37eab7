"""Tables and plots from curvlab run and sweep folders: `python scripts/report.py --help` (runner/report/cli.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, when not installed

from runner.report.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
