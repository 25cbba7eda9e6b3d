"""`hybrid-hf convert`: turn a checkpoint (hub id or local folder) into a hybrid one, verified, written atomically.

    hybrid-hf convert SOURCE OUTPUT [--max-span N] [--ramp N] [--tau-min X] [--tau-max X] [--shared-span]
                      [--layers 0,1,2] [--span-loss-coef X]
                      [--initial-span X] [--force] [--allow-pickle] [--task TASK] [--no-verify]

The library entry point is `convert_checkpoint`. What it does, in order:

1. Cheap checks first (nothing is loaded yet): OUTPUT does not exist (or `force`), SOURCE is a model folder or a
   reachable hub id, transformers knows its architecture, its heads divide its hidden size, the hybrid settings
   are valid, and its weights are safetensors (pickled `.bin` weights only with `allow_pickle`).
2. Load the host model in float32 with the class the table names for the task, and `convert` it.
3. Verify on a short fixed batch (tokenized text when the source has a tokenizer, else fixed ids; the second row
   is padded) that the converted model's outputs equal the host's (max abs difference <= `VERIFY_TOLERANCE`).
4. Write model (safetensors) and tokenizer into a temporary folder beside OUTPUT and rename it into place. Any
   failure, or Ctrl-C, removes the temporary folder; an existing OUTPUT (with `force`) is replaced only once the
   new folder is complete.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import logging
import os
import pickle
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .architectures import TASKS, default_task, model_classes
from .cli import ArgumentParser, first_line, quiet_transformers
from .configuration_hybrid import HYBRID_PREFIX
from .conversion import register_model_type

logger = logging.getLogger(__name__)

#: Largest max abs difference between host and converted outputs that verification accepts.
VERIFY_TOLERANCE = 1e-4
#: Text tokenized for verification when the source has a tokenizer.
VERIFY_TEXT = (
    "The hybrid layer keeps the pretrained attention as its global branch and adds a local branch whose span "
    "each token learns. At conversion the mix is the identity on the global branch, so the converted model "
    "computes exactly what the original did."
)
#: Number of token ids used for verification when there is no tokenizer.
VERIFY_LENGTH = 48

_SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
_PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
# Sizes in config.json that must be positive integers (a 0 or a string fails deep inside transformers otherwise).
_CONFIG_SIZES = ("vocab_size", "hidden_size", "n_embd", "num_attention_heads", "n_head", "num_key_value_heads",
                 "num_hidden_layers", "n_layer")
# Keys `from_pretrained` records in tokenizer_config.json about how the files were loaded (from a local folder).
_LOAD_TIME_TOKENIZER_KEYS = ("is_local", "local_files_only")


class VerificationError(RuntimeError):
    """The converted model's outputs differ from the host's by more than the tolerance."""


@dataclass
class ConversionReport:
    """What `convert_checkpoint` did.

    Attributes:
        source: the SOURCE as given (hub id or folder).
        architecture: the host `model_type` (e.g. `"llama"`).
        source_class: the host class loaded (e.g. `"LlamaForCausalLM"`).
        model_class: the hybrid class written (e.g. `"HybridLlamaForCausalLM"`).
        task: the task of both classes (`"causal_lm"`, `"base"`, ...).
        layers_converted: number of attention layers made hybrid.
        layers_total: number of attention layers of the model.
        parameters_added: parameters of the hybrid model minus those of the host.
        parameters_total: parameters of the hybrid model.
        max_difference: max abs difference of the outputs (logits, or last hidden state) over real tokens;
            `None` when verification was skipped.
        verification_tokens: number of real (unpadded) tokens verification ran on.
        tokenizer_saved: whether the source's tokenizer was written beside the model.
        output: the folder written.
    """

    source: str
    architecture: str
    source_class: str
    model_class: str
    task: str
    layers_converted: int
    layers_total: int
    parameters_added: int
    parameters_total: int
    max_difference: float | None
    verification_tokens: int
    tokenizer_saved: bool
    output: Path

    def summary(self) -> str:
        """A few lines for people: what was converted, how, and where it went."""
        host_parameters = self.parameters_total - self.parameters_added
        share = 100.0 * self.parameters_added / host_parameters if host_parameters else 0.0
        if self.max_difference is None:
            verification = "skipped"
        else:
            verification = (
                f"max |difference| {self.max_difference:.3g} over {self.verification_tokens} tokens "
                f"(tolerance {VERIFY_TOLERANCE:g})"
            )
        lines = [
            f"source:       {self.source}",
            f"architecture: {self.architecture} ({self.source_class} -> {self.model_class})",
            f"layers:       {self.layers_converted} of {self.layers_total} converted",
            f"parameters:   +{self.parameters_added:,} ({share:.2f}% of {host_parameters:,})",
            f"verification: {verification}",
            f"tokenizer:    {'saved' if self.tokenizer_saved else 'none (the source has no usable tokenizer)'}",
            f"output:       {self.output}",
        ]
        return "\n".join(lines)


# --- checks on the inputs (nothing loaded yet) ---------------------------------------------------


def _is_offline() -> bool:
    try:
        from huggingface_hub.constants import is_offline_mode

        return bool(is_offline_mode())
    except ImportError:  # older huggingface_hub: the environment variables only
        names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
        return any(os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE") for name in names)


def is_hub_id(source: str) -> bool:
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(source)
    except ValueError:
        return False
    return True


def _validation_message(error: Exception) -> str:
    """The readable part of a strict-dataclass validation error (its cause), else the error's first line."""
    cause = error.__cause__ or error.__context__
    if cause is not None and str(cause):
        return str(cause).splitlines()[0]
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _check_config_file(config_file: Path, source: str) -> None:
    """Refuse, before `AutoConfig` is asked (it may not know the architecture at all, or fail deep inside on a bad
    size), an architecture transformers does not know and sizes (`_CONFIG_SIZES`) that are not positive integers."""
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
        model_type = data.get("model_type")
    except (ValueError, AttributeError) as error:
        raise ValueError(f"source {source!r} has an unreadable config.json: {str(error).splitlines()[0]}") from error
    if isinstance(model_type, str) and model_type.startswith(HYBRID_PREFIX):
        register_model_type(model_type)  # so that the Auto classes load it without its shipped code
    elif isinstance(model_type, str):
        model_classes(model_type)  # ValueError when transformers has no class for it
    for name in _CONFIG_SIZES:
        value = data.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"invalid config in {source!r}: `{name}` must be a positive integer, got {value!r}")


def source_location(source: str) -> str:
    """What to hand `from_pretrained`: the expanded path of a local folder (`~/model`), else SOURCE as is."""
    path = Path(source).expanduser()
    return str(path) if path.exists() else source


def load_source_config(source: str, trust_remote_code: bool = False):
    """The config of SOURCE (`AutoConfig`), with one-line errors for sources that are not models.

    `trust_remote_code` lets a config's `auto_map` run the code it names; a local hybrid folder never needs it (its
    hybrid classes are registered from its `model_type`)."""
    from transformers import AutoConfig

    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # pragma: no cover - older huggingface_hub
        StrictDataclassError = ValueError  # noqa: N806

    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"source {source!r} is a file, not a model folder")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"source {source!r} is not a model folder: it has no config.json")
        _check_config_file(path / "config.json", source)
    elif not is_hub_id(source):
        raise FileNotFoundError(f"source {source!r} not found: no such folder, and not a valid hub model id")
    try:
        config = AutoConfig.from_pretrained(source_location(source), trust_remote_code=trust_remote_code)
    except StrictDataclassError as error:
        raise ValueError(f"invalid config in {source!r}: {_validation_message(error)}") from error
    except OSError as error:
        if path.exists():
            raise OSError(f"could not read the config of {source!r}: {str(error).splitlines()[0]}") from error
        if _is_offline():
            raise FileNotFoundError(
                f"source {source!r} not found: no such local folder, and the hub is not reachable (offline mode)"
            ) from error
        raise FileNotFoundError(
            f"source {source!r} not found: no such local folder, and the hub has no such model or is not reachable "
            f"({str(error).splitlines()[0]})"
        ) from error
    return config


def _check_heads(config) -> None:
    """Refuse a config whose heads do not divide its hidden size (BERT's config does not check it itself)."""
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if getattr(config, "head_dim", None) or not isinstance(heads, int) or not isinstance(hidden, int):
        return
    if heads <= 0 or hidden % heads:
        raise ValueError(
            f"invalid config: the hidden size ({hidden}) is not a multiple of the number of attention heads ({heads})"
        )


def choose_task(config, task: str | None) -> str:
    """`task` if given; else the task of `config.architectures[0]` when it is one; else the default."""
    classes = model_classes(config.model_type)
    if task is not None:
        if task not in classes:
            raise ValueError(f"task {task!r} is not available for {config.model_type}; available: {', '.join(classes)}")
        return task
    for name in getattr(config, "architectures", None) or []:
        for candidate, class_name in classes.items():
            if class_name == name:
                return candidate
        break  # only the first entry names the checkpoint's class
    return default_task(config)


def _check_weights(source: str, allow_pickle: bool) -> None:
    """For a local folder: safetensors weights, or pickled `.bin` weights only when `allow_pickle`; every shard an
    index lists is there."""
    path = Path(source).expanduser()
    if not path.is_dir():
        return  # a hub id: `from_pretrained(use_safetensors=...)` decides, see `load_weights`
    if any((path / name).is_file() for name in _SAFETENSORS_FILES):
        index = path / _SAFETENSORS_FILES[1]
    elif any((path / name).is_file() for name in _PICKLE_FILES):
        if not allow_pickle:
            raise ValueError(
                f"source {source!r} has only pickled PyTorch weights (pytorch_model.bin), which can run code when "
                "loaded; pass --allow-pickle (allow_pickle=True) if you trust it"
            )
        index = path / _PICKLE_FILES[1]
    else:
        raise FileNotFoundError(f"source {source!r} has no weights (model.safetensors or pytorch_model.bin)")
    if index.is_file() and not (path / _SAFETENSORS_FILES[0]).is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"source {source!r} has an unreadable {index.name} ({first_line(error)})") from None
        missing = [shard for shard in shards if not (path / shard).is_file()]
        if missing:
            raise FileNotFoundError(
                f"source {source!r} lacks {', '.join(missing)}, listed in {index.name}: the checkpoint is incomplete"
            )


def check_output(output: Path, force: bool, source: str | None = None) -> None:
    """Refuse an existing `output` unless `force`; with `force`, refuse one that is not a model folder (a file, or a
    non-empty folder without config.json: user files, which replacing would delete) or that holds `source`."""
    if not (output.exists() or output.is_symlink()):
        return
    if not force:
        raise FileExistsError(f"output {str(output)!r} already exists; pass --force to replace it")
    source_path = Path(source).expanduser() if source is not None else None
    if source_path is not None and source_path.exists():
        resolved_output, resolved_source = output.resolve(), source_path.resolve()
        if resolved_output == resolved_source or resolved_output in resolved_source.parents:
            raise ValueError(f"output {str(output)!r} would replace the source {source!r}; choose another folder")
    if not (output.is_dir() and ((output / "config.json").is_file() or not any(output.iterdir()))):
        raise FileExistsError(
            f"refusing to replace {str(output)!r} with --force: it is not a model folder (no config.json); "
            "choose another output or remove it yourself"
        )


@contextlib.contextmanager
def output_lock(output: Path):
    """Hold the lock file `.OUTPUT.lock` beside `output` while it is being written.

    A second command writing the same OUTPUT meanwhile fails at once (`BlockingIOError`) instead of racing. Holding
    the lock, nobody else is writing OUTPUT, so the temporary folders beside it (`.OUTPUT.tmp-*`, `.OUTPUT.old-*`)
    are what a killed run left: they are removed. An output folder that cannot be written is reported here, before
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
                raise BlockingIOError(
                    f"another process is writing {str(output)!r} (it holds {lock_path.name}); wait for it to finish"
                ) from None
            # The previous holder may have removed the file between our open and flock: lock the current one.
            if lock_path.exists() and os.path.samestat(os.fstat(handle.fileno()), os.stat(lock_path)):
                break
            handle.close()
    except BlockingIOError:
        raise
    except OSError as error:
        reason = "a file is in the way of its folder" if isinstance(error, (FileExistsError, NotADirectoryError)) else (
            error.strerror or str(error)
        )
        raise OSError(f"cannot write the output {str(output)!r}: {reason}") from None
    try:
        for pattern in (".tmp-*", ".old-*"):
            for stale in glob.glob(os.path.join(glob.escape(str(output.parent)), f".{glob.escape(output.name)}{pattern}")):
                logger.info("Removing %s, left by an interrupted run", stale)
                shutil.rmtree(stale, ignore_errors=True)
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        handle.close()


# --- loading, verifying, writing -------------------------------------------------------------------


def load_weights(model_class, location: str, source: str, allow_pickle: bool = False, **kwargs):
    """`model_class.from_pretrained(location, **kwargs)` (in float32 unless `dtype` is given), in eval mode, checked: one-line `ValueError`s
    for pickled weights (unless `allow_pickle`), damaged or truncated files, weights whose shapes do not match the
    config (e.g. `vocab_size`), weights with NaN or inf, and pickles that hold more than tensors (never run:
    `torch.load(weights_only=True)`)."""
    import torch
    from safetensors import SafetensorError

    _check_weights(source, allow_pickle)
    try:
        with quiet_transformers():  # the load report would break the one-line error contract
            model, info = model_class.from_pretrained(
                location,
                # Safetensors only, unless pickles are allowed: then safetensors when present, else `.bin`.
                use_safetensors=True if not allow_pickle else None,
                ignore_mismatched_sizes=True,  # reported below, by name
                output_loading_info=True,
                **{"dtype": torch.float32, **kwargs},
            )
    except SafetensorError as error:
        raise ValueError(f"the weights of {source!r} are damaged or truncated ({first_line(error)})") from None
    except pickle.UnpicklingError as error:
        found = [line.strip() for line in str(error).splitlines() if "GLOBAL" in line]
        raise ValueError(
            f"the pickled weights of {source!r} hold more than tensors and were not loaded (they could run code): "
            f"{found[0] if found else first_line(error)}"
        ) from None
    except OSError as error:
        if not allow_pickle and not Path(source).expanduser().is_dir() and "safetensors" in str(error):
            raise ValueError(
                f"source {source!r} has no safetensors weights; pickled weights (pytorch_model.bin) are only "
                "loaded with --allow-pickle (allow_pickle=True)"
            ) from error
        raise
    if info["mismatched_keys"]:
        name, stored, expected = sorted(info["mismatched_keys"])[0]
        raise ValueError(
            f"the weights of {source!r} do not match its config.json: {name} is {list(stored)} in the weights but "
            f"{list(expected)} by the config (check vocab_size and the other sizes)"
        )
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(
                f"the weights of {source!r} hold NaN or infinite values ({name}): the file is damaged or the training "
                "that wrote it diverged"
            )
    return model.eval()


def _has_tokenizer_files(source: str) -> bool:
    path = Path(source).expanduser()
    return not path.is_dir() or any((path / name).is_file() for name in _TOKENIZER_FILES)


def _load_tokenizer(source: str):
    """The source's tokenizer, or None when it has none (or none that loads: a warning says why)."""
    if not _has_tokenizer_files(source):
        logger.info("No tokenizer files in %s; converting the model alone", source)
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as error:  # noqa: BLE001 - any tokenizer failure means "no tokenizer", reported
        logger.warning("No tokenizer saved: loading it from %s failed (%s)", source, str(error).splitlines()[0])
        return None


def verification_batch(config, tokenizer=None) -> dict:
    """A fixed batch of two rows: the tokenized `VERIFY_TEXT` (or fixed ids), and its first half, right-padded."""
    import torch

    vocab = int(config.vocab_size)
    ids: list[int] = []
    if tokenizer is not None:
        try:
            ids = list(tokenizer(VERIFY_TEXT)["input_ids"])
        except Exception as error:  # noqa: BLE001 - fall back to fixed ids
            logger.warning("Tokenizing the verification text failed (%s); using fixed ids", error)
            ids = []
        if ids and not all(0 <= i < vocab for i in ids):
            logger.warning("The tokenizer gives ids outside the model's vocabulary (%d); using fixed ids", vocab)
            ids = []
    if len(ids) < 4:
        ids = [(5 + 37 * i) % vocab for i in range(VERIFY_LENGTH)]
    max_positions = getattr(config, "max_position_embeddings", None)
    if isinstance(max_positions, int) and max_positions > 0:
        ids = ids[:max_positions]
    pad = getattr(config, "pad_token_id", None)
    if not isinstance(pad, int) or not 0 <= pad < vocab:
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        pad = pad if isinstance(pad, int) and 0 <= pad < vocab else 0
    half = max(len(ids) // 2, 1)
    input_ids = torch.tensor([ids, ids[:half] + [pad] * (len(ids) - half)])
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, half:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _main_output(outputs):
    logits = getattr(outputs, "logits", None)
    return logits if logits is not None else outputs.last_hidden_state


def max_output_difference(host, hybrid, batch: dict) -> float:
    """Max abs difference of the two models' logits (or last hidden states) over the batch's real tokens."""
    import torch

    with torch.inference_mode():
        expected = _main_output(host(**batch)).float()
        actual = _main_output(hybrid(**batch)).float()
    if expected.shape != actual.shape:
        raise VerificationError(f"output shapes differ: {tuple(expected.shape)} vs {tuple(actual.shape)}")
    difference = (actual - expected).abs()
    mask = batch["attention_mask"]
    if difference.dim() == 3 and difference.shape[:2] == mask.shape:
        difference = difference[mask.bool()]  # per-token outputs: padded positions are not outputs of the model
    if difference.numel() == 0:
        return 0.0
    # nan (from either model) counts as a failure
    return float("nan") if torch.isnan(difference).any() else float(difference.max())


def _count_parameters(model) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(tmp: Path, output: Path, force: bool) -> None:
    """Rename the finished `tmp` folder to `output`; an existing `output` (only with `force`) is replaced."""
    if not (output.exists() or output.is_symlink()):
        os.rename(tmp, output)
        return
    if not force:
        raise FileExistsError(f"output {str(output)!r} already exists; pass --force to replace it")
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


def drop_load_time_keys(path: Path) -> None:
    """Remove what `from_pretrained` recorded about how the tokenizer was loaded (not a property of it)."""
    if not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    if any(key in data for key in _LOAD_TIME_TOKENIZER_KEYS):
        for key in _LOAD_TIME_TOKENIZER_KEYS:
            data.pop(key, None)
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _normalize_modes(folder: Path) -> None:
    """Give every file the mode the umask implies (some writers create private 0600 files via `mkstemp`); files
    hard-linked from elsewhere (a streamed conversion's host shards) keep theirs."""
    mode = 0o666 & ~_umask()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_nlink == 1:
            os.chmod(path, mode)


@contextlib.contextmanager
def atomic_output(output: Path, force: bool):
    """A temporary folder beside `output` to write into; renamed into place when the block ends without error (an
    existing `output` is replaced only with `force`, and put back should the replacement fail), else removed."""
    parent = output.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{output.name}.tmp-"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the output is an ordinary folder
        yield tmp
        _normalize_modes(tmp)
        _publish(tmp, output, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_atomically(output: Path, hybrid, tokenizer, force: bool, card: dict | None = None) -> None:
    """Save model and tokenizer (and, with `card`, the arguments of `training.write_model_card`, a model card) into
    a temporary folder beside `output`, then rename it into place (`atomic_output`)."""
    with atomic_output(output, force) as tmp:
        vars(hybrid.config).pop("_model_name_or_path", None)  # a GGUF file's `general.name`, not a Hub id
        hybrid.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            drop_load_time_keys(tmp / "tokenizer_config.json")
        if card is not None:
            from .training import write_model_card

            write_model_card(tmp, **card)


def convert_checkpoint(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    force: bool = False,
    allow_pickle: bool = False,
    task: str | None = None,
    verify: bool | str = True,
    streaming: bool = False,
    **settings,
) -> ConversionReport:
    """Convert the checkpoint SOURCE (hub id or local folder) into a hybrid checkpoint in the folder OUTPUT.

    Args:
        source: a hub model id or a local model folder whose attention goes through transformers' attention
            interface.
        output: the folder to write; must not exist unless `force`.
        force: replace an existing `output` (only once the new one is complete).
        allow_pickle: accept pickled `pytorch_model.bin` weights when the source has no safetensors.
        task: `"base"`, `"causal_lm"`, `"masked_lm"` or `"sequence_classification"`; by default the task of the
            source's `config.architectures[0]`, else `causal_lm` for decoders and `base` for encoders.
        verify: check that the converted model's outputs equal the source's (max abs difference <= 1e-4); with
            `streaming`, `"slice"` (or True: a one-layer slice at each end) or `"full"` (the whole model).
        streaming: for a local safetensors folder, write the host shards unchanged (hard-linked or copied) beside one
            new shard, in constant memory (`hybrid_hf.streaming`); other sources are converted in memory, with a
            message.
        **settings: hybrid settings (see `HybridSettings`); a `None` value means the default.

    Returns:
        A `ConversionReport`.

    Raises:
        ValueError, OSError (FileNotFoundError, FileExistsError, ...): bad input, one-line messages.
        VerificationError: the converted model's outputs differ; nothing is written.
    """
    import torch
    import transformers

    from .conversion import check_host_class, check_setting_names, convert, hybrid_config_from
    from .modeling_hybrid import hybrid_layers, self_attention_modules

    start = time.perf_counter()
    source = os.fspath(source)
    output = Path(output).expanduser()
    check_setting_names(settings)  # TypeError, as for `convert`
    settings = {name: value for name, value in settings.items() if value is not None}
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")

    check_output(output, force, source)
    config = load_source_config(source)
    if config.model_type.startswith(HYBRID_PREFIX):
        raise ValueError(f"source {source!r} is already a hybrid model (model_type {config.model_type!r})")
    _check_heads(config)
    hybrid_config_from(config, **settings)  # ValueError for settings out of range, before loading any weight
    task = choose_task(config, task)
    class_name = model_classes(config.model_type)[task]
    check_host_class(getattr(transformers, class_name))  # UnsupportedHostError (a ValueError) saying why
    _check_weights(source, allow_pickle)

    with output_lock(output):  # held from loading to writing; a busy or unwritable output fails here
        check_output(output, force, source)  # again: another run may have written it meanwhile
        location = source_location(source)
        if streaming:
            report = _convert_streamed(source, output, config, class_name, task, settings, force, verify)
            if report is not None:
                logger.info("Done in %.1f s", time.perf_counter() - start)
                return report
        model = load_weights(getattr(transformers, class_name), location, source, allow_pickle)
        tokenizer = _load_tokenizer(location)
        logger.info("Loaded %s from %s (float32)", class_name, source)

        hybrid = convert(model, **settings)
        logger.info("Converted to %s", type(hybrid).__name__)
        hybrid.eval()

        max_difference, tokens = None, 0
        if verify:
            batch = verification_batch(config, tokenizer)
            tokens = int(batch["attention_mask"].sum())
            max_difference = max_output_difference(model, hybrid, batch)
            logger.info("Verification: max |difference| %.3g over %d tokens", max_difference, tokens)
            if not max_difference <= VERIFY_TOLERANCE:  # also catches nan
                raise VerificationError(
                    f"the converted model's outputs differ from the source's by {max_difference:.3g} "
                    f"(tolerance {VERIFY_TOLERANCE:g}); nothing was written"
                )

        host_parameters, hybrid_parameters = _count_parameters(model), _count_parameters(hybrid)
        report = ConversionReport(
            source=source,
            architecture=config.model_type,
            source_class=type(model).__name__,
            model_class=type(hybrid).__name__,
            task=task,
            layers_converted=len(hybrid_layers(hybrid)),
            layers_total=len(self_attention_modules(hybrid)),
            parameters_added=hybrid_parameters - host_parameters,
            parameters_total=hybrid_parameters,
            max_difference=max_difference,
            verification_tokens=tokens,
            tokenizer_saved=tokenizer is not None,
            output=output.absolute(),
        )
        del model
        with torch.no_grad():
            logger.info("Writing %s", output)
            write_atomically(output, hybrid, tokenizer, force)
    logger.info("Done in %.1f s", time.perf_counter() - start)
    return report


def _convert_streamed(source, output, config, class_name, task, settings, force, verify) -> ConversionReport | None:
    """`streaming.convert_streamed`, or None (with a message) when the source needs the in-memory path."""
    import transformers

    from .streaming import NotStreamable, convert_streamed, streaming_refusal

    reason = streaming_refusal(source)
    if reason is None:
        mode = {True: "slice", False: "none"}.get(verify, verify)
        try:
            return convert_streamed(source, output, config, getattr(transformers, class_name), task, settings, force,
                                    verify=mode)
        except NotStreamable as error:
            reason = str(error)
    logger.warning("Converting in memory: %s", reason)
    return None


# --- command line -------------------------------------------------------------------------------------


def layer_list(text: str) -> list[int] | None:
    """Parse `--layers` / `--hybrid-layers`: comma-separated indices, or `all` (None)."""
    if text.strip().lower() == "all":
        return None
    if not re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*,?\s*", text):
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 0,1,2 (or 'all'), got {text!r}")
    return [int(part) for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="hybrid-hf convert",
        description="Convert a checkpoint (hub id or local folder) into a hybrid-attention checkpoint. The "
        "converted model computes exactly what the original did (verified) until it is fine-tuned.",
    )
    parser.add_argument("source", help="hub model id or local model folder")
    parser.add_argument("output", help="folder to write (must not exist unless --force)")
    hybrid = parser.add_argument_group("hybrid settings (defaults: those of HybridSettings)")
    hybrid.add_argument("--max-span", type=int, help="longest local span, in tokens")
    hybrid.add_argument("--ramp", type=int, help="width of the soft edge of the span mask, in tokens")
    hybrid.add_argument("--tau-min", type=float, help="local softmax temperature at the shortest span")
    hybrid.add_argument("--tau-max", type=float, help="local softmax temperature at the longest span")
    hybrid.add_argument(
        "--shared-span", action="store_true", help="one span per token shared by its heads (default: one per head)"
    )
    hybrid.add_argument("--layers", type=layer_list, help="layers to make hybrid, e.g. 0,1,2 (default: all)")
    hybrid.add_argument("--span-loss-coef", type=float, help="weight of the span penalty added to the loss")
    hybrid.add_argument("--initial-span", type=float, help="initial span as a fraction of --max-span, in (0, 1)")
    parser.add_argument("--force", action="store_true", help="replace OUTPUT if it exists (once the new one is done)")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept pickled pytorch_model.bin weights (they can run code when loaded) when there are no safetensors",
    )
    parser.add_argument("--task", choices=TASKS, help="model class to load (default: from the config)")
    parser.add_argument("--no-verify", action="store_true", help="skip the output-equality check")
    parser.add_argument(
        "--streaming",
        action="store_true",
        help="constant memory: reuse the host's safetensors shards unchanged (hard-linked when possible) and write "
        "the new parameters into one new shard (local safetensors folders; others are converted in memory)",
    )
    parser.add_argument(
        "--verify",
        choices=("slice", "full"),
        default="slice",
        help="with --streaming: check a one-layer slice at each end of the model (default), or the whole model",
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
    """`hybrid-hf convert ...`. Bad input raises (`cli.run` turns it into one line and exit status 2)."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers and not logger.handlers:  # nobody configured logging: progress to stderr
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    settings = {
        "max_span": args.max_span,
        "ramp": args.ramp,
        "tau_min": args.tau_min,
        "tau_max": args.tau_max,
        "span_per_head": False if args.shared_span else None,
        "hybrid_layers": args.layers,
        "span_loss_coef": args.span_loss_coef,
        "initial_span": args.initial_span,
    }
    try:
        report = convert_checkpoint(
            args.source,
            args.output,
            force=args.force,
            allow_pickle=args.allow_pickle,
            task=args.task,
            verify=False if args.no_verify else args.verify,
            streaming=args.streaming,
            **settings,
        )
    except VerificationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


__all__ = ["ConversionReport", "VerificationError", "convert_checkpoint", "main"]
