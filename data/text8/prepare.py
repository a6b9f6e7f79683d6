"""Prepare text8: python data/text8/prepare.py [--source FILE] (--help for all options).

All the logic is in data/prepare_common.py; this script only picks the dataset.
"""

import sys
from pathlib import Path

# Make the repository root importable so that "data.prepare_common" resolves from any cwd.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data.prepare_common import main  # noqa: E402  (needs the path set above)

if __name__ == "__main__":
    raise SystemExit(main("text8"))
