"""Resuming an interrupted fine-tuning run from the Trainer checkpoints it left beside its output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import MissingInputError, OutputExistsError, UsageError

#: the Trainer checkpoints of OUTPUT (`--save-steps`) go into the folder OUTPUT + this suffix, beside it
CHECKPOINTS_SUFFIX = ".checkpoints"
#: the arguments of the run that wrote the checkpoints, in that folder (a resumed run must match them)
RUN_FILE = "finetune_run.json"


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


def resume_point(checkpoints: Path, run: dict[str, Any], resume: bool) -> Path | None:
    """The checkpoint to resume from (`resume`), after checking it was written by the same run; refuses to start
    over on top of the checkpoints of an interrupted run (`resume=False`)."""
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
    try:
        before = json.loads((checkpoints / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UsageError(f"cannot resume from {checkpoints}: its {RUN_FILE} is missing or unreadable") from None
    changed = [
        f"{key} {before.get(key)!r} then, {value!r} now" for key, value in run.items() if before.get(key) != value
    ]
    if changed:
        raise UsageError(
            f"cannot resume from {checkpoints}: it was written with other arguments ({'; '.join(changed)}); "
            "rerun with the same ones, or remove that folder to start over"
        )
    return last
