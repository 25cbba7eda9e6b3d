"""`python -m hybrid_hf COMMAND ...`: the `hybrid-hf` command."""

import sys

from .commands import main

sys.exit(main())
