"""One loader for every command: a source's config, weights and tokenizer, checked, with one-line errors.

    config = load_source_config("HuggingFaceTB/SmolLM2-135M-Instruct")   # nothing but the config: checks first
    model, tokenizer = load_model("path/to/folder", task="causal_lm")     # float32, eval mode, checked weights

A source is a hub id or a local folder. A local folder of a hybrid model needs no remote code: its hybrid classes
are registered from its `model_type`. Code a folder ships runs only with `trust_remote_code`, and pickled weights
load only with `allow_pickle`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
from pathlib import Path

import torch

from .conversion import register_model_type
from .errors import MissingInputError, UsageError, first_line, validation_message
from .model.configuration_hybrid import HYBRID_PREFIX
from .model.modeling_hybrid import CheckpointMismatchError, load_report_problem
from .tasks import TASK_TABLE, choose_task, model_classes

logger = logging.getLogger(__name__)

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
_CONFIG_SIZES = (
    "vocab_size",
    "hidden_size",
    "n_embd",
    "num_attention_heads",
    "n_head",
    "num_key_value_heads",
    "num_hidden_layers",
    "n_layer",
)


@contextlib.contextmanager
def quiet_transformers():
    """Transformers' progress bars and info/warning logs off for the duration; restored afterwards."""
    from transformers.utils import logging as transformers_logging

    bars, verbosity = transformers_logging.is_progress_bar_enabled(), transformers_logging.get_verbosity()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()


def _is_offline() -> bool:
    from huggingface_hub.constants import is_offline_mode

    return bool(is_offline_mode())


def is_hub_id(source: str) -> bool:
    """Whether `source` is a valid hub model id (`org/name`)."""
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(source)
    except ValueError:
        return False
    return True


def source_location(source: str) -> str:
    """What to hand `from_pretrained`: the expanded path of a local folder (`~/model`), else SOURCE as is."""
    path = Path(source).expanduser()
    return str(path) if path.exists() else source


def _check_config_file(config_file: Path, source: str) -> None:
    """Refuse, before `AutoConfig` is asked (it may not know the architecture at all, or fail deep inside on a bad
    size), an architecture transformers does not know and sizes (`_CONFIG_SIZES`) that are not positive integers."""
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
        model_type = data.get("model_type")
    except (ValueError, AttributeError) as error:
        raise UsageError(f"source {source!r} has an unreadable config.json: {first_line(error)}") from error
    if isinstance(model_type, str) and model_type.startswith(HYBRID_PREFIX):
        try:
            register_model_type(model_type)  # so that the Auto classes load it without its shipped code
        except ValueError as error:
            raise UsageError(f"source {source!r} has an unknown model_type in config.json: {error}") from None
    elif isinstance(model_type, str):
        model_classes(model_type)  # UsageError when transformers has no class for it
    for name in _CONFIG_SIZES:
        value = data.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UsageError(f"invalid config in {source!r}: `{name}` must be a positive integer, got {value!r}")


def _check_heads(config) -> None:
    """Refuse a config whose heads do not divide its hidden size (BERT's config does not check it itself)."""
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if getattr(config, "head_dim", None) or not isinstance(heads, int) or not isinstance(hidden, int):
        return
    if heads <= 0 or hidden % heads:
        raise UsageError(
            f"invalid config: the hidden size ({hidden}) is not a multiple of the number of attention heads ({heads})"
        )


def load_source_config(source: str, trust_remote_code: bool = False):
    """The config of SOURCE (`AutoConfig`), with one-line errors for sources that are not models.

    `trust_remote_code` lets a config's `auto_map` run the code it names; a local hybrid folder never needs it (its
    hybrid classes are registered from its `model_type`)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"source {source!r} is a file, not a model folder")
        if not (path / "config.json").is_file():
            raise MissingInputError(f"source {source!r} is not a model folder: it has no config.json")
        _check_config_file(path / "config.json", source)
    elif not is_hub_id(source):
        raise MissingInputError(f"source {source!r} not found: no such folder, and not a valid hub model id")
    try:
        config = AutoConfig.from_pretrained(source_location(source), trust_remote_code=trust_remote_code)
    except (StrictDataclassError, ValueError) as error:
        raise UsageError(f"invalid config in {source!r}: {validation_message(error)}") from error
    except OSError as error:
        if path.exists():
            raise UsageError(f"could not read the config of {source!r}: {first_line(error)}") from error
        where = (
            "the hub is not reachable (offline mode)"
            if _is_offline()
            else (f"the hub has no such model or is not reachable ({first_line(error)})")
        )
        raise MissingInputError(f"source {source!r} not found: no such local folder, and {where}") from error
    _check_heads(config)
    return config


def read_weight_map(index: Path, source: str) -> dict[str, str]:
    """`{tensor name: shard file name}` of a sharded checkpoint's index file (`model.safetensors.index.json` or
    `pytorch_model.bin.index.json`), checked: a non-empty `weight_map` whose shards are plain file names in the
    index's folder, with the suffix of its format (`.safetensors` or `.bin`). One-line `UsageError` otherwise."""
    suffix = ".safetensors" if index.name == _SAFETENSORS_FILES[1] else ".bin"
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise UsageError(f"source {source!r} has an unreadable {index.name} ({first_line(error)})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise UsageError(f"source {source!r} has an unreadable {index.name}: its `weight_map` lists no tensors")
    for shard in set(weight_map.values()):
        plain = isinstance(shard, str) and shard not in ("", ".", "..") and Path(shard).name == shard
        if not plain or "\\" in shard or not shard.endswith(suffix):
            raise UsageError(
                f"source {source!r} has an invalid {index.name}: shard {shard!r} must be a plain file name in the "
                f"folder ending in {suffix}"
            )
    return weight_map


def _with_layers(config, layers: int):
    """A copy of `config` with `layers` layers (lists of one entry per layer cut to them), every layer hybrid."""
    total = config.num_hidden_layers
    copy = config.__class__.from_dict(config.to_dict())
    for name, value in vars(config).items():
        if isinstance(value, list) and len(value) == total and name not in ("hybrid_layers", "local_layers"):
            setattr(copy, name, value[:layers])
    copy.num_hidden_layers = layers
    if getattr(copy, "hybrid_layers", None) is not None or getattr(copy, "local_layers", None):
        copy.hybrid_layers, copy.local_layers, copy.layer_scores = None, None, None  # a hybrid layer costs the most
    return copy


def parameter_count(config, model_class) -> int:
    """The parameters of `model_class` built from `config`, counted without allocating any: models of one and of two
    layers are built on the meta device, and the cost of a layer is extrapolated to `num_hidden_layers` (a whole
    model on the meta device takes seconds per thousand layers). `model_class`: an Auto class or a model class."""
    counts = []
    for layers in (1, 2):
        with torch.device("meta"):
            piece = _with_layers(config, layers)
            model = model_class.from_config(piece) if hasattr(model_class, "_model_mapping") else model_class(piece)
        counts.append(sum(parameter.numel() for parameter in model.parameters()))
    return counts[0] + (counts[1] - counts[0]) * (config.num_hidden_layers - 1)


def _largest_field(config, model_class) -> tuple[str, object] | None:
    """The size field of `config` (an integer above the family's default) whose default value shrinks the model
    most, with its value; None when no field is above its default."""
    fields = config.to_dict()
    try:
        defaults = type(config)().to_dict()
    except Exception:  # noqa: BLE001 - a family without defaults for every field: no field to blame
        return None
    shrunk = []
    for name, value in fields.items():
        default = defaults.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or not isinstance(default, int) or value <= default:
            continue
        try:
            shrunk.append((parameter_count(config.__class__.from_dict({**fields, name: default}), model_class), name))
        except Exception:  # noqa: BLE001 - a field the model cannot be built without; not the one to blame
            continue
    return (min(shrunk)[1], fields[min(shrunk)[1]]) if shrunk else None


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (`MemAvailable` plus free swap); None where unknown."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return (int(fields["MemAvailable"].split()[0]) + int(fields.get("SwapFree", "0 kB").split()[0])) * 1024
    except (OSError, KeyError, ValueError):
        return None


#: The dtypes a conversion may write (`dtype="auto"`: the one the source's weights are stored in).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: safetensors' names of the floating-point dtypes.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def stored_values(source: str) -> dict[str, int] | None:
    """`{safetensors dtype ("BF16", "F32", "I64"...): number of values}` of a local folder's safetensors weights,
    read from the files' headers; None for other sources (a hub id, pickled weights)."""
    from safetensors import SafetensorError, safe_open

    path = Path(source).expanduser()
    if (path / _SAFETENSORS_FILES[0]).is_file():
        shards = [_SAFETENSORS_FILES[0]]
    elif (path / _SAFETENSORS_FILES[1]).is_file():
        shards = sorted(set(read_weight_map(path / _SAFETENSORS_FILES[1], source).values()))
    else:
        return None
    values: dict[str, int] = {}
    for shard in shards:
        try:
            with safe_open(str(path / shard), framework="pt") as handle:
                for name in handle.keys():
                    piece = handle.get_slice(name)
                    values[piece.get_dtype()] = values.get(piece.get_dtype(), 0) + math.prod(piece.get_shape())
        except SafetensorError as error:
            raise UsageError(f"the weights of {source!r} are damaged or truncated ({first_line(error)})") from None
    return values


def stored_parameter_count(source: str) -> int | None:
    """The number of values in a local folder's safetensors weights, read from the files' headers; None for other
    sources (a hub id, pickled weights)."""
    values = stored_values(source)
    return None if values is None else sum(values.values())


def stored_dtype(source: str, config) -> torch.dtype:
    """The dtype SOURCE's weights are stored in (transformers' `dtype="auto"`): of a local safetensors folder, the
    floating-point dtype holding most values (from the headers); else the config's `dtype`; else float32."""
    floats = {SAFETENSORS_DTYPES[k]: n for k, n in (stored_values(source) or {}).items() if k in SAFETENSORS_DTYPES}
    if floats:
        return max(floats, key=floats.get)
    dtype = getattr(config, "dtype", None)
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def non_finite_error(source: str, name: str) -> UsageError:
    """The error for weights of SOURCE that hold NaN or infinite values (tensor `name`)."""
    return UsageError(
        f"the weights of {source!r} hold NaN or infinite values ({name}): the file is damaged or the training that "
        "wrote it diverged"
    )


def check_size(config, model_class, source: str, stored: int | None, memory: int | None, dtype=torch.float32):
    """Refuse, before anything is allocated, a config that describes far more parameters than its weights hold
    (`stored`; a new task head is allowed for), or more than fit in `memory` bytes in `dtype`: a one-line
    `UsageError` naming the config field to check. A config that cannot be built even on the meta device is left to
    the loader's own errors."""
    try:
        count = parameter_count(config, model_class)
    except Exception:  # noqa: BLE001 - the estimate is a guard, not a second loader
        return
    size = count * (dtype.itemsize if isinstance(dtype, torch.dtype) else 4)
    if stored is not None and count > 2 * stored + 2**20:
        problem = f"its config.json describes {count:,} parameters but its weights hold {stored:,}"
    elif memory is not None and size > memory:
        problem = (
            f"its config.json describes {count:,} parameters, {size / 2**30:,.1f} GiB, beyond the "
            f"{memory / 2**30:,.1f} GiB of memory available"
        )
    else:
        return
    field = _largest_field(config, model_class)
    check = f"; check `{field[0]}` ({field[1]})" if field else ""
    raise UsageError(f"source {source!r} is refused before loading: {problem}{check}")


def check_weights(source: str, allow_pickle: bool) -> None:
    """For a local folder: safetensors weights, or pickled `.bin` weights only when `allow_pickle`; an index lists
    shards that are plain file names of its format (`read_weight_map`), all of them there."""
    path = Path(source).expanduser()
    if not path.is_dir():
        return  # a hub id: `from_pretrained(use_safetensors=...)` decides, see `load_weights`
    if any((path / name).is_file() for name in _SAFETENSORS_FILES):
        index = path / _SAFETENSORS_FILES[1]
    elif any((path / name).is_file() for name in _PICKLE_FILES):
        if not allow_pickle:
            raise UsageError(
                f"source {source!r} has only pickled PyTorch weights (pytorch_model.bin), which can run code when "
                "loaded; pass --allow-pickle (allow_pickle=True) if you trust it"
            )
        index = path / _PICKLE_FILES[1]
    else:
        raise MissingInputError(f"source {source!r} has no weights (model.safetensors or pytorch_model.bin)")
    if index.is_file() and not (path / _SAFETENSORS_FILES[0]).is_file():
        shards = sorted(set(read_weight_map(index, source).values()))
        missing = [shard for shard in shards if not (path / shard).is_file()]
        if missing:
            raise MissingInputError(
                f"source {source!r} lacks {', '.join(missing)}, listed in {index.name}: the checkpoint is incomplete"
            )


def load_weights(model_class, source: str, allow_pickle: bool = False, **kwargs):
    """`model_class.from_pretrained(source, **kwargs)` (in float32 unless `dtype` is given), in eval mode, checked:
    one-line `UsageError`s for pickled weights (unless `allow_pickle`), damaged or truncated files, weights whose
    shapes do not match the config (e.g. `vocab_size`), weights missing from the checkpoint or stored beyond the model
    (`load_report_problem`: nothing is left random), weights with NaN or inf, and pickles that hold more than tensors
    (never run: `torch.load(weights_only=True)`)."""
    from safetensors import SafetensorError

    check_weights(source, allow_pickle)
    try:
        with quiet_transformers():  # the load report would break the one-line error contract
            model, info = model_class.from_pretrained(
                source_location(source),
                # Safetensors only, unless pickles are allowed: then safetensors when present, else `.bin`.
                use_safetensors=True if not allow_pickle else None,
                ignore_mismatched_sizes=True,  # reported below, by name
                output_loading_info=True,
                **{"dtype": torch.float32, **kwargs},
            )
    except CheckpointMismatchError as error:  # a hybrid class's own check
        raise UsageError(first_line(error)) from None
    except ValueError as error:  # a config the model cannot be built from (e.g. an attention implementation)
        raise UsageError(f"could not load {source!r}: {first_line(error)}") from None
    except SafetensorError as error:
        raise UsageError(f"the weights of {source!r} are damaged or truncated ({first_line(error)})") from None
    except pickle.UnpicklingError as error:
        found = [line.strip() for line in str(error).splitlines() if "GLOBAL" in line]
        raise UsageError(
            f"the pickled weights of {source!r} hold more than tensors and were not loaded (they could run code): "
            f"{found[0] if found else first_line(error)}"
        ) from None
    except OSError as error:
        if not allow_pickle and not Path(source).expanduser().is_dir() and "safetensors" in str(error):
            raise UsageError(
                f"source {source!r} has no safetensors weights; pickled weights (pytorch_model.bin) are only "
                "loaded with --allow-pickle (allow_pickle=True)"
            ) from error
        raise UsageError(f"could not load the weights of {source!r}: {first_line(error)}") from error
    problem = load_report_problem(model, info)
    if problem is not None:
        raise UsageError(f"the weights of {source!r} {problem}")
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise non_finite_error(source, name)
    return model.eval()


def load_tokenizer(source: str, required: bool = True, trust_remote_code: bool = False):
    """The source's tokenizer. Without one (or with one that does not load): a `UsageError` when `required`, else
    None with a log line saying why."""
    from transformers import AutoTokenizer

    path = Path(source).expanduser()
    if path.is_dir() and not any((path / name).is_file() for name in _TOKENIZER_FILES):
        if required:
            raise UsageError(
                f"no usable tokenizer in {source} (no tokenizer files); save one there with tokenizer.save_pretrained"
            )
        logger.info("No tokenizer files in %s; converting the model alone", source)
        return None
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(source_location(source), trust_remote_code=trust_remote_code)
    except Exception as error:  # noqa: BLE001 - any tokenizer failure means "no usable tokenizer"
        if required:
            raise UsageError(
                f"no usable tokenizer in {source} ({first_line(error)}); save one there with tokenizer.save_pretrained"
            ) from None
        logger.warning("No tokenizer saved: loading it from %s failed (%s)", source, first_line(error))
        return None


def load_model(
    source: str | os.PathLike,
    task: str | None = None,
    *,
    config=None,
    tokenizer_required: bool = True,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    **kwargs,
):
    """Load SOURCE for `task` (default: the task of its config's class) with its tokenizer: `(model, tokenizer)`.

    The model class is the task's Auto class (`AutoModelForCausalLM` for `"causal_lm"`, ...), which builds the host
    class of a host checkpoint and the hybrid class of a hybrid one. `config`: SOURCE's config when already loaded
    (`load_source_config`). `kwargs` go to `from_pretrained` (e.g. `dtype`). The tokenizer is None when SOURCE has
    none and `tokenizer_required` is False.
    """
    import transformers

    source = os.fspath(source)
    config = config if config is not None else load_source_config(source, trust_remote_code)
    auto_class = getattr(transformers, TASK_TABLE[choose_task(config, task)].auto_class)
    check_weights(source, allow_pickle)
    stored = stored_parameter_count(source)
    check_size(config, auto_class, source, stored, available_memory(), kwargs.get("dtype", torch.float32))
    model = load_weights(auto_class, source, allow_pickle, trust_remote_code=trust_remote_code, **kwargs)
    tokenizer = load_tokenizer(source, tokenizer_required, trust_remote_code)
    return model, tokenizer
