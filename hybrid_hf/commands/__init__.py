"""`hybrid-hf`: the command line. Each command is a module with a `main(argv) -> int` that parses its arguments
and calls the library; `benchmarks` and `examples` bring their own.

Errors a user can fix (`UsageError` and its kin, `UnsupportedHostError`) are reported as one line with exit
status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading

from ..errors import UsageError, first_line
from ..model.modeling_hybrid import UnsupportedHostError

COMMANDS = {
    "convert": ("hybrid_hf.commands.convert", "convert a checkpoint (hub id or folder) into a hybrid one"),
    "finetune": ("hybrid_hf.commands.finetune", "fine-tune a model on text files with Trainer (optionally LoRA)"),
    "inspect": ("hybrid_hf.commands.inspect", "plot the learned spans and temperatures of a hybrid model"),
    "bench": ("hybrid_hf.benchmarks.bench", "benchmark the local kernel and hybrid models against the alternatives"),
    "demo": ("hybrid_hf.examples.demo", "convert SmolLM2-135M-Instruct, fine-tune it on Shakespeare and report"),
}
#: the errors reported as one line
USER_ERRORS = (UsageError, UnsupportedHostError)


class ArgumentParser(argparse.ArgumentParser):
    """The commands' argument parser: a bad argument is a `UsageError` (one line through `run`), not usage + exit."""

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run(main, argv: list[str] | None = None) -> int:
    """Run a command's `main`, turning user errors into a one-line message and exit status 2.

    SIGTERM (e.g. `kill`, a job scheduler's time limit) is handled like Ctrl-C: the command stops, removes its
    temporary folders and says "interrupted".
    """
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    try:
        return main(argv)
    except USER_ERRORS as error:
        return fail(first_line(error))
    except KeyboardInterrupt:
        return fail("interrupted")
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: hybrid-hf COMMAND [ARGS]\n\ncommands:\n" + "\n".join(lines), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return run(module.main, argv[1:])
