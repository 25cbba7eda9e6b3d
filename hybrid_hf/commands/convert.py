"""`hybrid-hf convert SOURCE OUTPUT [settings] [--task TASK] [--dtype DTYPE] [--no-streaming] [--force] [--no-verify]`.

Converts a checkpoint (hub id or local folder) with `checkpoint.convert_checkpoint`: checked before anything is
loaded, verified equal to the source, written atomically, in the dtype the source is stored in (`--dtype`); a local
safetensors folder is converted streamed, in constant memory.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..checkpoint import convert_checkpoint, logger
from ..loading import DTYPES
from ..settings import add_setting_arguments, settings_from_args
from ..tasks import TASKS
from ..verification import VerificationError
from . import ArgumentParser


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="hybrid-hf convert",
        description="Convert a checkpoint (hub id or local folder) into a hybrid-attention checkpoint. The "
        "converted model computes exactly what the original did (verified) until it is fine-tuned.",
    )
    parser.add_argument("source", help="hub model id or local model folder")
    parser.add_argument("output", help="folder to write (must not exist unless --force)")
    add_setting_arguments(parser)
    parser.add_argument("--force", action="store_true", help="replace OUTPUT if it exists (once the new one is done)")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept pickled pytorch_model.bin weights (they can run code when loaded) when there are no safetensors",
    )
    parser.add_argument("--task", choices=TASKS, help="model class to load (default: from the config)")
    parser.add_argument("--no-verify", action="store_true", help="skip the output-equality check")
    parser.add_argument(
        "--dtype",
        choices=("auto", *DTYPES),
        default="auto",
        help="dtype of the weights written (default auto: the dtype the source is stored in, e.g. bfloat16 stays "
        "bfloat16); verification runs in float32 whatever it is; a dtype other than the stored one is converted in "
        "memory, not streamed",
    )
    parser.add_argument(
        "--streaming",
        action=argparse.BooleanOptionalAction,
        help="constant memory: reuse the host's safetensors shards unchanged (hard-linked when possible), checked for "
        "NaN/inf, and write the new parameters into one new shard. The default for local safetensors folders; "
        "others (hub ids, pickled weights, older tensor names, --local-layers, another --dtype) are converted in "
        "memory, with a warning under --streaming. --no-streaming: always in memory",
    )
    parser.add_argument(
        "--calibration",
        metavar="FILE",
        help="with --local-layers auto: a text file to score the layers on (how much the output changes when each "
        "layer alone goes local-only); the lowest-scoring --local-fraction are made local-only",
    )
    parser.add_argument(
        "--local-fraction", type=float, default=0.5, metavar="F", help="share of the layers --local-layers auto "
        "makes local-only (default 0.5)"
    )
    parser.add_argument(
        "--calibration-tokens", type=int, default=2048, metavar="N", help="tokens of --calibration to score the "
        "layers on (default 2048)"
    )
    parser.add_argument(
        "--verify",
        choices=("slice", "full"),
        default="slice",
        help="when streamed: check a one-layer slice at each end of the model (default), or the whole model",
    )
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of the record (it may be replaced, e.g. under pytest)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers and not logger.handlers:  # nobody configured logging: progress to stderr
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    try:
        report = convert_checkpoint(
            args.source,
            args.output,
            force=args.force,
            allow_pickle=args.allow_pickle,
            task=args.task,
            verify=False if args.no_verify else args.verify,
            streaming=args.streaming,
            dtype=args.dtype,
            calibration=args.calibration,
            local_fraction=args.local_fraction,
            calibration_tokens=args.calibration_tokens,
            **settings_from_args(args),
        )
    except VerificationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0
