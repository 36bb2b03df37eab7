"""Curvature diagnostics of a run, from its folder: ``python scripts/diagnose.py <run folder> [name...]``, the same as
``curvlab-diagnose`` (runner/diagnose.py, where the names, options and outputs are described)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, when not installed

from runner.diagnose import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
