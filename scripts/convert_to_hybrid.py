#!/usr/bin/env python
"""Convert a pretrained checkpoint into a hybrid one: `hybrid-hf convert` as a script, with the same arguments.

    python scripts/convert_to_hybrid.py SOURCE OUTPUT [--hybrid-layers ...] [--local-layers ...]

Run from a checkout it uses the checkout's `hybrid_hf` (its dependencies must be installed); see `--help`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hybrid_hf.commands import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
