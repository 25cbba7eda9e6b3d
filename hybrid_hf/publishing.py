"""One atomic writer for every output folder: written beside the output under a temporary name, renamed into place
when complete. A failure or a kill leaves no half-written output, and an existing folder is replaced only when asked.

    check_output(out, force)             # before anything is loaded: an existing folder is refused
    with output_lock(out):               # one writer at a time; what a killed run left is cleaned up
        with staged_folder(out, force) as tmp:
            model.save_pretrained(tmp)   # renamed to `out` when the block ends without an error
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .cards import write_model_card
from .errors import OutputBusyError, OutputExistsError, OutputNotWritableError, UsageError, first_line

logger = logging.getLogger(__name__)

# Keys `from_pretrained` records in tokenizer_config.json about how the files were loaded (from a local folder).
_LOAD_TIME_TOKENIZER_KEYS = ("is_local", "local_files_only")


def is_model_folder(folder: Path) -> bool:
    """Whether `folder` holds a saved model (a config.json)."""
    return (folder / "config.json").is_file()


def _is_empty_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def check_source(output: Path, *sources: str | os.PathLike | None) -> None:
    """Refuse an `output` that is one of the `sources` or a folder holding one: writing it would replace the source.
    Paths are compared resolved (links followed, `..` and relative spellings made absolute); a source that is no
    path on this machine (a Hub id) is skipped."""
    resolved_output = Path(output).expanduser().resolve()
    for source in sources:
        if not source or not Path(source).expanduser().exists():
            continue
        resolved_source = Path(source).expanduser().resolve()
        if resolved_output == resolved_source or resolved_output in resolved_source.parents:
            raise UsageError(f"output {str(output)!r} would replace the source {str(source)!r}; choose another folder")


def check_output(
    output: Path,
    force: bool,
    *sources: str | os.PathLike | None,
    replaceable: Callable[[Path], bool] = is_model_folder,
    kind: str = "a model folder (no config.json)",
) -> None:
    """Refuse an `output` that is or holds one of the `sources` (`check_source`), and an existing one unless
    `force`; with `force`, refuse one that is a file, or a non-empty folder that `replaceable` refuses (`kind` names
    what it accepts): user files, which replacing would delete. An empty folder holds nothing to lose: it is written
    into without `force`."""
    check_source(output, *sources)
    if not (output.exists() or output.is_symlink()) or _is_empty_folder(output):
        return
    if not force:
        raise OutputExistsError(f"output {str(output)!r} already exists; pass --force to replace it")
    if not (output.is_dir() and replaceable(output)):
        raise OutputExistsError(
            f"refusing to replace {str(output)!r} with --force: it is not {kind}; "
            "choose another output or remove it yourself"
        )


@contextlib.contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold the lock file `.OUTPUT.lock` beside `output` while it is being written.

    A second command writing the same OUTPUT meanwhile fails at once (`OutputBusyError`) instead of racing. Holding
    the lock, nobody else is writing OUTPUT, so the temporary folders beside it (`.OUTPUT.tmp-*`, `.OUTPUT.old-*`)
    are what a killed run left: they are removed, once a previous OUTPUT moved aside by a replacement killed halfway
    is back in place (`_recover`). An output folder that cannot be written is reported here, before
    anything is loaded. The lock (a `flock`, released by the system even when the process is killed) is removed on
    exit.
    """
    import fcntl

    lock_path = output.parent / f".{output.name}.lock"
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        while True:
            handle = open(lock_path, "a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                raise OutputBusyError(
                    f"another process is writing {str(output)!r} (it holds {lock_path.name}); wait for it to finish"
                ) from None
            # The previous holder may have removed the file between our open and flock: lock the current one.
            if lock_path.exists() and os.path.samestat(os.fstat(handle.fileno()), os.stat(lock_path)):
                break
            handle.close()
    except OutputBusyError:
        raise
    except OSError as error:
        reason = (
            "a file is in the way of its folder"
            if isinstance(error, (FileExistsError, NotADirectoryError))
            else (error.strerror or str(error))
        )
        raise OutputNotWritableError(f"cannot write the output {str(output)!r}: {reason}") from None
    try:
        _recover(output)
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        handle.close()


def _leftovers(output: Path, pattern: str) -> list[Path]:
    """The folders beside `output` named `.OUTPUT<pattern>`, newest first."""
    found = glob.glob(os.path.join(glob.escape(str(output.parent)), f".{glob.escape(output.name)}{pattern}"))
    return sorted(map(Path, found), key=lambda path: path.lstat().st_mtime_ns, reverse=True)


def _recover(output: Path) -> None:
    """Clean up after a run killed while writing `output` (the caller holds its lock).

    A `--force` replacement (`publish`) moves the previous OUTPUT into `.OUTPUT.old-*/old` before it renames the new
    one into place; killed in between, OUTPUT is missing and the aside holds the only complete copy: it is moved
    back. Then the temporary folders (`.OUTPUT.tmp-*`, unfinished or never published) and the asides are removed.
    """
    if not (output.exists() or output.is_symlink()):
        for aside in _leftovers(output, ".old-*"):
            if os.path.lexists(aside / "old"):
                logger.warning("Restoring %s from %s, moved aside by an interrupted replacement", output, aside)
                os.rename(aside / "old", output)
                break
    for pattern in (".tmp-*", ".old-*"):
        for stale in _leftovers(output, pattern):
            logger.info("Removing %s, left by an interrupted run", stale)
            shutil.rmtree(stale, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normalize_modes(folder: Path) -> None:
    """Give the folder and every file in it the mode the umask implies (`mkdtemp` makes folders private, and some
    writers create private 0600 files); files hard-linked from elsewhere (a streamed conversion's host shards) keep
    theirs."""
    os.chmod(folder, 0o777 & ~_umask())
    mode = 0o666 & ~_umask()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_nlink == 1:
            os.chmod(path, mode)


def publish(tmp: Path, output: Path, force: bool = False) -> None:
    """Rename the finished `tmp` folder to `output`; an existing `output` is replaced only with `force`, and put back
    should the replacement fail."""
    if not (output.exists() or output.is_symlink()) or _is_empty_folder(output):
        os.rename(tmp, output)  # an empty folder is replaced by the rename itself
        return
    if not force:
        raise OutputExistsError(f"output {str(output)!r} already exists; pass --force to replace it")
    # A non-empty folder cannot be renamed over: move the old one aside (in a folder of its own), move the new one
    # in, then delete the old one. Should the second rename fail, the old one goes back.
    aside = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.old-"))
    try:
        os.rename(output, aside / "old")
    except BaseException:
        shutil.rmtree(aside, ignore_errors=True)
        raise
    try:
        os.rename(tmp, output)
    except BaseException:
        os.rename(aside / "old", output)  # should this fail too, the old output stays in `aside`, not deleted
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(output: Path, force: bool = False) -> Iterator[Path]:
    """A temporary folder beside `output` to write into; when the block ends without an error, its modes are made
    those of an ordinary folder and it is renamed to `output` (`publish`). Any error removes it."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.tmp-"))
    try:
        yield tmp
        normalize_modes(tmp)
        publish(tmp, output, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once published


def save_tokenizer(tokenizer, folder: Path) -> None:
    """`tokenizer.save_pretrained(folder)`, without what `from_pretrained` recorded about how it was loaded (from a
    local folder), which is not a property of the tokenizer."""
    tokenizer.save_pretrained(folder)
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    if any(key in data for key in _LOAD_TIME_TOKENIZER_KEYS):
        for key in _LOAD_TIME_TOKENIZER_KEYS:
            data.pop(key, None)
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


@contextlib.contextmanager
def write_errors(output: Path) -> Iterator[None]:
    """Report a write that fails in the block (a full disk, a read-only file system, no permission: an `OSError`,
    or safetensors' `SafetensorError`, which is not one) as an `OutputNotWritableError` naming `output`."""
    from safetensors import SafetensorError

    try:
        yield
    except UsageError:
        raise
    except (OSError, SafetensorError) as error:
        raise OutputNotWritableError(f"could not write {str(output)!r}: {first_line(error)}") from error


def save_model(output: Path, model, tokenizer=None, force: bool = False, card: dict | None = None) -> None:
    """Save `model`, its tokenizer and (with `card`, the arguments of `cards.write_model_card`) a model card into
    `output`, atomically (`staged_folder`). A failing write is an `OutputNotWritableError` naming the output
    (`write_errors`), and leaves nothing behind."""
    with write_errors(output), staged_folder(output, force) as tmp:
        vars(model.config).pop("_model_name_or_path", None)  # a GGUF file's `general.name`, not a Hub id
        model.save_pretrained(tmp)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        if card is not None:
            write_model_card(tmp, **card)
