"""Resuming an interrupted fine-tuning run from the Trainer checkpoints it left beside its output.

A checkpoint is checked before anything is loaded or run (`check_checkpoint`): a missing optimizer or schedule state
(the run would not continue where it stopped), a damaged file, a link, or a pickle that holds more than tensors is
one line naming the file.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import MissingInputError, OutputExistsError, OutputNotWritableError, UsageError, first_line

#: the Trainer checkpoints of OUTPUT (`--save-steps`) go into the folder OUTPUT + this suffix, beside it
CHECKPOINTS_SUFFIX = ".checkpoints"
#: the arguments of the run that wrote the checkpoints, in that folder (a resumed run must match them)
RUN_FILE = "finetune_run.json"
#: the run's arguments that name a model: the same model whatever the spelling of its path
PATH_ARGUMENTS = ("model", "distill_from")
#: what a checkpoint needs beside trainer_state.json to continue where the run stopped: (file names, any one of
#: them; what they hold). The first name is the one the Trainer writes in a single process; the others are those
#: of sharded (FSDP) and LoRA runs.
REQUIRED_FILES = (
    (("optimizer.pt", "optimizer.bin", "optimizer_0"), "the optimizer's state"),
    (("scheduler.pt",), "the learning-rate schedule's state"),
    (
        ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors", "pytorch_model_fsdp_0"),
        "the weights",
    ),
)


def last_checkpoint(folder: Path) -> Path | None:
    """The complete Trainer checkpoint of the highest step in `folder` (one being written when the run was killed
    has no `trainer_state.json` yet: the Trainer writes it last)."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    steps = []
    for path in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if folder.is_dir() else []:
        step = path.name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-")
        if step.isdigit() and (path / "trainer_state.json").is_file():
            steps.append((int(step), path))
    return max(steps)[1] if steps else None


def discard_incomplete(folder: Path) -> Path | None:
    """Remove from `folder` the checkpoints whose writing failed or was cut short (no `trainer_state.json`), and
    `folder` itself when no complete checkpoint is left; return the last complete one."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    for path in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if folder.is_dir() else []:
        if not (path / "trainer_state.json").is_file():
            shutil.rmtree(path, ignore_errors=True)
    last = last_checkpoint(folder)
    if last is None:
        shutil.rmtree(folder, ignore_errors=True)
    return last


@contextlib.contextmanager
def checkpoint_write_errors(folder: Path) -> Iterator[None]:
    """Report a checkpoint that cannot be written into `folder` in the block (a full disk: an `OSError`, or
    safetensors' `SafetensorError`) as one `OutputNotWritableError`, after removing what was left half-written
    (`discard_incomplete`); the complete checkpoints stay for `--resume`."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as error:
        last = discard_incomplete(folder)
        kept = f"--resume continues from {last.name} once there is room" if last else "no checkpoint was kept"
        message = f"could not write a checkpoint into {folder}: {first_line(error)}; {kept}"
        raise OutputNotWritableError(message) from error


def path_or_name(name: str) -> str:
    """A model named by a local path: that path, resolved (absolute, links followed); else the name as given."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def first_non_finite(tensors: Any, prefix: str = "") -> str | None:
    """The name of the first floating-point tensor holding NaN or inf in `tensors` (a tensor, or dicts, lists and
    tuples of them, as in a state dict or an optimizer's state), or None."""
    import torch

    if isinstance(tensors, torch.Tensor):
        finite = not tensors.is_floating_point() or bool(torch.isfinite(tensors).all())
        return None if finite else prefix or "tensor"
    if isinstance(tensors, dict):
        items = tensors.items()
    else:
        items = enumerate(tensors) if isinstance(tensors, (list, tuple)) else ()
    for key, value in items:
        found = first_non_finite(value, f"{prefix}.{key}" if prefix else str(key))
        if found is not None:
            return found
    return None


def _read_json_object(path: Path, where: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UsageError(f"{where}: its {path.name} is missing or not JSON") from None
    if not isinstance(data, dict):
        raise UsageError(f"{where}: its {path.name} is not a JSON object ({type(data).__name__})")
    return data


def check_checkpoint(checkpoint: Path) -> None:
    """Refuse a Trainer checkpoint that cannot continue the run, before anything is loaded: a link in it (a
    checkpoint holds plain files), a file of `REQUIRED_FILES` missing, `trainer_state.json` that is not a JSON
    object, a damaged or truncated safetensors file, a torch file (`*.pt`, `*.pth`) that does not load as tensors
    and plain data (`weights_only`: a pickle that holds more is never run), or weights or optimizer state with NaN
    or inf. One-line `UsageError`s."""
    import torch
    from safetensors import SafetensorError, safe_open
    from transformers.trainer_pt_utils import safe_globals

    where = f"cannot resume from {checkpoint}"
    for path in (checkpoint, *sorted(checkpoint.iterdir())):
        if path.is_symlink():
            raise UsageError(f"{where}: {path.name} is a link; a checkpoint holds plain files")
    for names, what in REQUIRED_FILES:
        if not any((checkpoint / name).exists() for name in names):
            raise UsageError(
                f"{where}: {names[0]} ({what}) is missing, so the run would not continue where it stopped; "
                f"remove {checkpoint.parent} to start over"
            )
    _read_json_object(checkpoint / "trainer_state.json", where)
    for path in sorted(checkpoint.glob("*.safetensors")):
        try:
            with safe_open(path, "pt") as weights:
                names = weights.keys()  # one tensor in memory at a time
                found = next((name for name in names if first_non_finite(weights.get_tensor(name))), None)
        except (SafetensorError, OSError) as error:
            raise UsageError(f"{where}: {path.name} is damaged or truncated ({first_line(error)})") from None
        _refuse_non_finite(where, path, found)
    for path in sorted([*checkpoint.glob("*.pt"), *checkpoint.glob("*.pth")]):
        try:
            with safe_globals():  # the numpy types of the Trainer's RNG state, as the Trainer loads it
                found = first_non_finite(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
        except Exception:  # any failure to load: damaged, not a torch file, or a pickle of more than data
            raise UsageError(
                f"{where}: {path.name} is damaged, or a pickle that holds more than tensors (not loaded: it could "
                "run code)"
            ) from None
        _refuse_non_finite(where, path, found)


def _refuse_non_finite(where: str, path: Path, name: str | None) -> None:
    if name is not None:
        raise UsageError(
            f"{where}: {path.name} holds NaN or infinite values ({name}): the run had diverged by then, or the file "
            "is damaged"
        )


def _same(key: str, then: Any, now: Any) -> bool:
    if key in PATH_ARGUMENTS and isinstance(then, str) and isinstance(now, str):
        return path_or_name(then) == path_or_name(now)
    return then == now


def resume_point(checkpoints: Path, run: dict[str, Any], resume: bool) -> Path | None:
    """The checkpoint to resume from (`resume`), after checking it (`check_checkpoint`) and that it was written by
    the same run (paths compared resolved); refuses to start over on top of the checkpoints of an interrupted run
    (`resume=False`)."""
    last = last_checkpoint(checkpoints)
    if not resume:
        if last is not None:
            raise OutputExistsError(
                f"{checkpoints} holds the checkpoints of an interrupted run (last: {last.name}); pass --resume to "
                "continue it, or remove that folder to start over"
            )
        return None
    if last is None:
        raise MissingInputError(
            f"nothing to resume: no complete checkpoint in {checkpoints} (written with --save-steps)"
        )
    before = _read_json_object(checkpoints / RUN_FILE, f"cannot resume from {checkpoints}")
    check_checkpoint(last)
    changed = [
        f"{key} {before.get(key)!r} then, {value!r} now"
        for key, value in run.items()
        if not _same(key, before.get(key), value)
    ]
    if changed:
        raise UsageError(
            f"cannot resume from {checkpoints}: it was written with other arguments ({'; '.join(changed)}); "
            "rerun with the same ones, or remove that folder to start over"
        )
    return last
