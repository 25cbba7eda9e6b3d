"""`hybrid-hf`: the command line. Each subcommand lives in its own module with a `main(argv) -> int`."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import threading

COMMANDS = {
    "convert": ("hybrid_hf.checkpoint", "convert a checkpoint (hub id or folder) into a hybrid one"),
    "finetune": ("hybrid_hf.finetune", "fine-tune a model on text files with Trainer (optionally LoRA)"),
    "inspect": ("hybrid_hf.inspect_spans", "plot the learned spans and temperatures of a hybrid model"),
    "bench": ("hybrid_hf.bench", "benchmark the local kernel and hybrid models against the alternatives"),
    "demo": ("hybrid_hf.demo", "convert SmolLM2-135M-Instruct, fine-tune it on Shakespeare and report"),
}


class UsageError(ValueError):
    """A bad input from the user: reported as one line, no traceback, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """The commands' argument parser: a bad argument is a `UsageError` (one line through `run`), not usage + exit."""

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@contextlib.contextmanager
def quiet_transformers():
    """Transformers' progress bars and info/warning logs off for the duration; restored afterwards."""
    from transformers.utils import logging

    bars, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run(main, argv: list[str] | None = None) -> int:
    """Run a subcommand's `main`, turning user errors into a one-line message and exit status 2.

    SIGTERM (e.g. `kill`, a job scheduler's time limit) is handled like Ctrl-C: the command stops, removes its
    temporary folders and says "interrupted".
    """
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    try:
        return main(argv)
    except (ValueError, OSError) as error:  # UsageError is a ValueError
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


if __name__ == "__main__":
    sys.exit(main())
