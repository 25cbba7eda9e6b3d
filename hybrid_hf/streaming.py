"""Constant-memory conversion of a safetensors checkpoint on disk.

A converted checkpoint holds every host weight unchanged, so there is no need to load the host to write it. The
streamed conversion (what `hybrid-hf convert SOURCE OUTPUT` does with a local safetensors folder) writes:

- the host's safetensors shards as they are, hard-linked into OUTPUT when it is on the same file system as SOURCE
  (else copied), renamed `model-0000i-of-0000n.safetensors`; they are never loaded as a model;
- one new shard, the last, with the hybrid parameters (`span_predictor` and `mix` of each hybrid layer), made from
  the config alone: the model is built on the meta device and only the new parameters of one layer at a time are
  materialised, with the model code's own initialisation (`reset_hybrid_parameters`), and written in turn;
- a `model.safetensors.index.json` over all of them, the hybrid config with the modeling code, the generation config,
  the tokenizer and the model card the in-memory conversion writes (`ConversionReport.model_card`).

Before anything is written, every floating-point tensor of the host shards is read in chunks and checked for NaN and
infinite values (`check_finite`). Memory stays about that of one layer, whatever the size of the model. Verification
then loads a slice of the written folder (`verify="slice"`): for the first and the last hybrid layer, a one-layer
model whose vocabulary is cut to its first `SLICE_VOCAB` rows, with the layer's host weights and new parameters read
from the written shards, must give the logits of the host class with the same weights. `verify="full"` loads the
whole written folder in float32 and compares it with the source loaded by the host class, as the in-memory
conversion does.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import shutil
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .cards import write_model_card
from .conversion import _NOT_SETTINGS, NEW_PARAMETER_MODULES, hybrid_config_from, register_hybrid_class
from .errors import UsageError, first_line
from .loading import (
    SAFETENSORS_DTYPES,
    check_size,
    load_tokenizer,
    load_weights,
    non_finite_error,
    read_weight_map,
    source_location,
)
from .model.modeling_hybrid import hybrid_layers, is_new_parameter, reset_hybrid_parameters, self_attention_modules
from .publishing import save_tokenizer, staged_folder, write_errors
from .verification import VERIFY_TOLERANCE, VerificationError, max_output_difference, verification_batch

logger = logging.getLogger("hybrid_hf.checkpoint")  # the log of the convert command

#: Vocabulary rows kept by the slice verification.
SLICE_VOCAB = 256
#: `verify` values of a streamed conversion.
VERIFY_MODES = ("slice", "full", "none")

#: Bytes of a tensor `check_finite` reads at a time.
CHUNK_BYTES = 2**22

INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"
_SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def source_weight_map(folder: Path) -> dict[str, str] | None:
    """`{tensor name: shard file name}` of a local safetensors checkpoint, or None when it has none."""
    index = folder / INDEX_FILE
    if index.is_file():
        return read_weight_map(index, str(folder))
    single = folder / _SINGLE_FILE
    if single.is_file():
        with safe_open(str(single), framework="pt") as handle:
            return {name: _SINGLE_FILE for name in handle.keys()}
    return None


def streaming_refusal(source: str) -> str | None:
    """Why SOURCE cannot be converted streamed (not a local folder, no safetensors weights), or None when it can."""
    path = Path(source).expanduser()
    if not path.is_dir():
        return f"{source!r} is not a local folder"
    if not any((path / name).is_file() for name in (_SINGLE_FILE, INDEX_FILE)):
        return f"{source!r} has no safetensors weights (pickle and GGUF files are loaded whole)"
    return None


def _layouts(folder: Path, weight_map: dict[str, str]) -> dict[str, tuple[str, list[int]]]:
    """`{tensor name: (safetensors dtype, shape)}` of every tensor, read from the shards' headers only."""
    layouts = {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(str(folder / shard), framework="pt") as handle:
            for name in handle.keys():
                piece = handle.get_slice(name)
                layouts[name] = (piece.get_dtype(), list(piece.get_shape()))
    return layouts


def check_finite(folder: Path, weight_map: dict[str, str], source: str) -> None:
    """Refuse (`loading.non_finite_error`, naming the tensor) a safetensors checkpoint that holds NaN or infinite
    values. Each floating-point tensor of each shard is read in chunks of `CHUNK_BYTES` with plain reads, not a memory
    map: resident memory stays one chunk, whatever the size of the shards."""
    buffer = bytearray(CHUNK_BYTES)
    for shard in sorted(set(weight_map.values())):
        with open(folder / shard, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
            for name, entry in header.items():
                dtype = SAFETENSORS_DTYPES.get(entry.get("dtype")) if name != "__metadata__" else None
                if dtype is None:
                    continue
                begin, end = entry["data_offsets"]
                handle.seek(8 + size + begin)
                for offset in range(begin, end, CHUNK_BYTES):
                    count = handle.readinto(memoryview(buffer)[: min(CHUNK_BYTES, end - offset)])
                    if count < min(CHUNK_BYTES, end - offset):
                        raise UsageError(f"the weights of {source!r} are damaged or truncated ({shard} ends early)")
                    values = torch.frombuffer(buffer, dtype=dtype, count=count // dtype.itemsize)
                    if not torch.isfinite(values).all():
                        raise non_finite_error(source, name)


def _tensor_bytes(dtype: str, shape: list[int]) -> int:
    bits = int("".join(c for c in dtype if c.isdigit()) or 8)  # "BF16" -> 16, "BOOL" -> 8
    return math.prod(shape) * bits // 8


def write_safetensors_in_turn(
    path: Path, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]], tensors: Iterable[tuple[str, torch.Tensor]]
) -> int:
    """Write a safetensors file whose tensors arrive one at a time, so that only one is in memory at once.

    The header is written first from `layout` (`{name: (dtype, shape)}`, in file order); `tensors` must then yield
    exactly those names, in that order, with those dtypes and shapes. (`safetensors.torch.save_file` needs every
    tensor in memory together.) Returns the number of bytes of tensor data written.
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in layout.items():
        size = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": _SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]
        }  # fmt: skip
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    expected = iter(layout.items())
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name, tensor in tensors:
            want_name, (dtype, shape) = next(expected)
            if name != want_name or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise RuntimeError(f"tensor {name} {tuple(tensor.shape)} {tensor.dtype} does not follow the header")
            handle.write(tensor.detach().contiguous().view(torch.uint8).numpy().data)  # no copy
    if next(expected, None) is not None:
        raise RuntimeError(f"{path.name}: fewer tensors than its header lists")
    return offset


def _new_parameters(hybrid: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The new parameters of a model built on the meta device, one hybrid layer at a time: materialised on the CPU,
    set to their conversion values by the model code, yielded, and sent back to the meta device."""

    names = {module: name for name, module in hybrid.named_modules()}
    for layer in hybrid_layers(hybrid):
        layer.span_predictor.to_empty(device="cpu")
        layer.mix.to_empty(device="cpu")
        reset_hybrid_parameters(layer)
        for child in ("span_predictor", "mix"):
            for name, parameter in getattr(layer, child).named_parameters():
                yield f"{names[layer]}.{child}.{name}", parameter
        layer.span_predictor.to("meta")
        layer.mix.to("meta")
        _release_freed_memory()


def _release_freed_memory() -> None:
    """Hand the memory freed since the last call back to the system. glibc's allocator keeps freed blocks of a few
    MB in its heap, where the next layer's blocks do not always fit: without this, resident memory grows by about
    the size of all new parameters over a conversion. (`malloc_trim`; nothing on other C libraries.)"""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _link_or_copy(source: Path, target: Path) -> bool:
    """Hard-link `source` to `target` (True), or copy it when the file system does not allow it (False)."""
    try:
        os.link(source, target)
        return True
    except OSError:
        shutil.copyfile(source, target)
        return False


def _slice_config(config, layer: int, vocab: int):
    """A one-layer copy of a host config: lists with one entry per layer keep layer `layer`'s, the vocabulary its
    first `vocab` rows."""

    fields = {k: v for k, v in config.to_dict().items() if k not in _NOT_SETTINGS}
    layers = config.num_hidden_layers
    for name, value in fields.items():
        if isinstance(value, list) and len(value) == layers and name != "hybrid_layers":
            fields[name] = [value[layer]]
    fields.update(num_hidden_layers=1, vocab_size=vocab)
    pad = fields.get("pad_token_id")
    if isinstance(pad, int) and pad >= vocab:
        fields["pad_token_id"] = None
    return type(config)(**fields)


def verify_slice(folder: Path, host_config, host_class, settings: dict, tokenizer=None) -> tuple[float, int]:
    """Max abs difference of the logits of one-layer slices of the written folder (first and last hybrid layer,
    `SLICE_VOCAB` vocabulary rows) against the host class with the same weights; and the tokens compared."""
    from accelerate import init_empty_weights


    weight_map = source_weight_map(folder)
    hybrid_class = register_hybrid_class(host_class)
    layers = list(hybrid_config_from(host_config, **settings).hybrid_layers or range(host_config.num_hidden_layers))
    settings = {k: v for k, v in settings.items() if k != "hybrid_layers"}  # the slice's one layer is hybrid
    vocab = min(int(host_config.vocab_size), SLICE_VOCAB)
    worst, tokens = 0.0, 0
    for layer in sorted({layers[0], layers[-1]}):
        piece = _slice_config(host_config, layer, vocab)
        with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary tables) real
            host = host_class(piece)
            hybrid = hybrid_class(hybrid_config_from(piece, **settings))
        attention = self_attention_modules(host)[0]
        name = next(name for name, module in host.named_modules() if module is attention)
        head, found, _ = name.partition(".0.")
        if not found:
            raise UsageError(f"cannot cut a slice of {host_class.__name__}; verify the whole model (--verify full)")
        shapes = {name: list(tensor.shape) for name, tensor in hybrid.state_dict().items()}
        stored_names = {name: _stored_name(name, f"{head}.0.", f"{head}.{layer}.") for name in shapes}
        tensors = _read_slice(folder, weight_map, stored_names, shapes)
        host.load_state_dict({k: v for k, v in tensors.items() if k in host.state_dict()}, strict=False, assign=True)
        hybrid.load_state_dict(tensors, strict=False, assign=True)
        for model in (host, hybrid):
            model.tie_weights()
            on_meta = [name for name, parameter in model.named_parameters() if parameter.is_meta]
            if on_meta:
                raise ValueError(f"the written checkpoint lacks {on_meta[0]} (layer {layer})")
            model.eval()
        batch = verification_batch(piece, tokenizer)
        difference = max_output_difference(host, hybrid, batch)
        worst = difference if math.isnan(difference) else max(worst, difference)
        tokens += int(batch["attention_mask"].sum())
        if math.isnan(worst):
            break
    return worst, tokens


def _stored_name(name: str, slice_prefix: str, stored_prefix: str) -> str:
    """The name under which the checkpoint stores the slice's tensor `name` (its one layer is layer 0 in the slice)."""
    return stored_prefix + name.removeprefix(slice_prefix) if name.startswith(slice_prefix) else name


def _read_slice(
    folder: Path, weight_map: dict[str, str], names: dict[str, str], shapes: dict[str, list[int]]
) -> dict[str, torch.Tensor]:
    """`{slice name: tensor}` read from the shards (`names` maps a slice name to its stored name, `shapes` to its
    shape in the slice): of a tensor with more rows than the slice has (the vocabulary), only the first rows are
    read. Tied tensors missing from the shards are left out."""
    by_shard: dict[str, list[str]] = {}
    for name, stored in names.items():
        if stored in weight_map:
            by_shard.setdefault(weight_map[stored], []).append(name)
    tensors = {}
    for shard, wanted in by_shard.items():
        with safe_open(str(folder / shard), framework="pt") as handle:
            for name in wanted:
                stored = handle.get_slice(names[name])
                shape, want = list(stored.get_shape()), shapes[name]
                if shape != want and (shape[1:] != want[1:] or shape[0] < want[0]):
                    raise ValueError(f"{names[name]} is {shape} in {shard}, but the model expects {want}")
                tensors[name] = stored[: want[0]] if shape != want else handle.get_tensor(names[name])
    return tensors


class NotStreamable(ValueError):
    """The checkpoint's tensors are not named as the model names them (an older layout): convert it in memory."""


def plan(source: Path, host_config, host_class, settings: dict) -> dict:
    """Check a local safetensors checkpoint against its model, from the shards' headers and the config alone.

    Returns `{"hybrid": the hybrid model on the meta device, in the host weights' dtype, "weight_map", "layouts",
    "new": the names of the new parameters in model order}`. Raises `NotStreamable` when the stored tensor names are
    not the model's, `UsageError` when their shapes differ from the config's.
    """

    weight_map = source_weight_map(source)
    layouts = _layouts(source, weight_map)
    stored = sum(math.prod(shape) for _, shape in layouts.values())
    check_size(host_config, host_class, str(source), stored, memory=None)
    with torch.device("meta"):
        hybrid = register_hybrid_class(host_class)(hybrid_config_from(host_config, **settings))
    expected = hybrid.state_dict()
    new = [name for name in expected if is_new_parameter(name)]
    tied = set(getattr(hybrid, "all_tied_weights_keys", None) or {})
    stored, wanted = set(weight_map), set(expected) - set(new)
    if stored - wanted or wanted - stored - tied:
        odd = sorted(stored - wanted) or sorted(wanted - stored - tied)
        raise NotStreamable(f"its tensor names are not those of {host_class.__name__} (e.g. {odd[0]!r})")
    for name in sorted(stored):
        if list(expected[name].shape) != layouts[name][1]:
            raise UsageError(
                f"the weights of {str(source)!r} do not match its config.json: {name} is {layouts[name][1]} in the "
                f"weights but {list(expected[name].shape)} by the config (check vocab_size and the other sizes)"
            )
    # The new parameters take the dtype of the host weights of their attention module.
    module = new[0].split(f".{NEW_PARAMETER_MODULES[0]}.")[0].split(f".{NEW_PARAMETER_MODULES[1]}.")[0] + "."
    host_dtype = next(layouts[name][0] for name in expected if name.startswith(module) and name in layouts)
    hybrid.to(SAFETENSORS_DTYPES[host_dtype])
    return {"hybrid": hybrid, "weight_map": weight_map, "layouts": layouts, "new": new}


def write_streamed(source: Path, tmp: Path, planned: dict, tokenizer=None) -> dict[str, int]:
    """Write the streamed conversion `planned` (see `plan`) of the checkpoint `source` into the empty folder `tmp`.
    Returns `{"linked": shards hard-linked, "copied": shards copied}`."""
    from transformers import GenerationConfig
    from transformers.dynamic_module_utils import custom_object_save

    hybrid, weight_map, layouts = planned["hybrid"], planned["weight_map"], planned["layouts"]
    shards = sorted(set(weight_map.values()))
    total = len(shards) + 1
    names = {shard: f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i, shard in enumerate(shards)}
    new_shard = f"model-{total:05d}-of-{total:05d}.safetensors"
    parameters = dict(hybrid.named_parameters())
    new_layout = {name: (parameters[name].dtype, tuple(parameters[name].shape)) for name in planned["new"]}
    new_bytes = write_safetensors_in_turn(tmp / new_shard, new_layout, _new_parameters(hybrid))
    linked = sum(_link_or_copy(source / shard, tmp / names[shard]) for shard in shards)
    weight_map = {**{name: names[shard] for name, shard in weight_map.items()}, **dict.fromkeys(new_layout, new_shard)}
    index = {
        "metadata": {"total_size": sum(_tensor_bytes(*layout) for layout in layouts.values()) + new_bytes},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    # What `save_pretrained` writes besides the weights: the config (with dtype and class), the modeling code, the
    # generation config.
    hybrid.config.dtype = str(hybrid.dtype).removeprefix("torch.")
    hybrid.config.architectures = [type(hybrid).__name__]
    vars(hybrid.config).pop("_model_name_or_path", None)  # a GGUF file's `general.name`, not a Hub id (`save_model`)
    custom_object_save(hybrid, tmp, config=hybrid.config)
    hybrid.config.save_pretrained(tmp)
    if hybrid.can_generate():
        generation = hybrid.generation_config
        if (source / "generation_config.json").is_file():
            generation = GenerationConfig.from_pretrained(source)
        generation.save_pretrained(tmp)
    if tokenizer is not None:
        save_tokenizer(tokenizer, tmp)
    return {"linked": linked, "copied": len(shards) - linked}


def verify_full(folder: Path, source: Path, host_class, tokenizer=None) -> tuple[float, int]:
    """Max abs difference of the logits of the whole written folder (float32) against the source loaded by the host
    class (float32, checked as the in-memory conversion checks it); and the tokens compared."""

    host = load_weights(host_class, str(source))
    hybrid = register_hybrid_class(host_class).from_pretrained(folder, dtype=torch.float32).eval()
    batch = verification_batch(host.config, tokenizer)
    return max_output_difference(host, hybrid, batch), int(batch["attention_mask"].sum())


def convert_streamed(source: str, output: Path, config, host_class, task: str, settings: dict, force: bool,
                     verify: str = "slice"):
    """The streamed `convert_checkpoint` of a local safetensors folder (see the module docstring): checked, written
    into a temporary folder beside `output`, verified there (`verify`: "slice", "full" or "none"), given its model
    card and renamed into place. Returns a `ConversionReport`; raises `NotStreamable` before writing anything when
    the checkpoint's tensor names are not the model's, and `OutputNotWritableError` naming `output` when a write fails
    (a full disk), leaving nothing behind."""
    from .checkpoint import ConversionReport

    if verify not in VERIFY_MODES:
        raise UsageError(f"verify must be one of {', '.join(VERIFY_MODES)}, got {verify!r}")
    location = Path(source_location(source))
    try:
        planned = plan(location, config, host_class, settings)
    except SafetensorError as error:
        raise UsageError(f"the weights of {source!r} are damaged or truncated ({first_line(error)})") from None
    check_finite(location, planned["weight_map"], source)
    hybrid = planned["hybrid"]
    tokenizer = load_tokenizer(str(location), required=False)
    with write_errors(output), staged_folder(output, force) as tmp:
        written = write_streamed(location, tmp, planned, tokenizer)
        logger.info("Wrote %s: %d host shard(s) hard-linked, %d copied, one new shard", output.name,
                    written["linked"], written["copied"])
        max_difference, tokens = None, 0
        if verify != "none":
            if verify == "slice":
                max_difference, tokens = verify_slice(tmp, config, host_class, settings, tokenizer)
            else:
                max_difference, tokens = verify_full(tmp, location, host_class, tokenizer)
            logger.info("Verification (%s): max |difference| %.3g over %d tokens", verify, max_difference, tokens)
            if not max_difference <= VERIFY_TOLERANCE:
                raise VerificationError(
                    f"the converted model's outputs differ from the source's by {max_difference:.3g} "
                    f"(tolerance {VERIFY_TOLERANCE:g}); nothing was written"
                )
        new = sum(parameter.numel() for name, parameter in hybrid.named_parameters() if name in set(planned["new"]))
        report = ConversionReport(
            source=source,
            architecture=config.model_type,
            source_class=host_class.__name__,
            model_class=type(hybrid).__name__,
            task=task,
            layers_converted=len(hybrid_layers(hybrid)),
            layers_total=len(self_attention_modules(hybrid)),
            parameters_added=new,
            parameters_total=sum(parameter.numel() for parameter in hybrid.parameters()),
            max_difference=max_difference,
            verification_tokens=tokens,
            tokenizer_saved=tokenizer is not None,
            output=output.absolute(),
            dtype=str(hybrid.dtype).removeprefix("torch."),
            streamed=True,
        )
        write_model_card(tmp, **report.model_card(hybrid.config))
    return report
