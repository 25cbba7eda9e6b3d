#!/usr/bin/env python
"""Fine-tune a model (hybrid or not) with `Trainer`: `hybrid-hf finetune` as a script, with the same arguments.

    python scripts/finetune_hybrid.py MODEL OUTPUT --data FILE [--steps N] [--lora] [any TrainingArguments flag] ...
    python scripts/finetune_hybrid.py args.yaml

Run from a checkout it uses the checkout's `hybrid_hf` (its dependencies must be installed); see `--help`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hybrid_hf.commands import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
