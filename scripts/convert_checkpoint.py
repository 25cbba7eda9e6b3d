#!/usr/bin/env python
"""Convert a checkpoint into a hybrid one: the same as `hybrid-hf convert SOURCE OUTPUT [options]`."""

import sys

from hybrid_hf import checkpoint, cli

if __name__ == "__main__":
    sys.exit(cli.run(checkpoint.main))
