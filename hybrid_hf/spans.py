"""Look inside a hybrid model: the span and temperature each hybrid layer predicts, per head and token.

    record = collect_spans(model, input_ids, attention_mask)   # one forward pass, hooks on every span_predictor
    write_json(record, "out/spans.json")                       # the numbers
    paths = plots.plot_spans(record, "out/")                   # three PNG figures of them (needs matplotlib)

The span of a token is `s * max_span` tokens and its local-softmax temperature `tau_min + (tau_max - tau_min) * s`,
with `s` in `[0, 1]` the output of the layer's span predictor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data import model_device
from .errors import UsageError
from .model.hybrid_attention import span_temperature
from .model.modeling_hybrid import hybrid_layers

JSON_NAME = "spans.json"


@dataclass
class SpanRecord:
    """Spans and temperatures of one sequence, per hybrid layer.

    Attributes:
        layers: the model's layer index of each hybrid layer, in order.
        spans: per hybrid layer, `(H', N)` spans in tokens (`H'` = heads, or 1 when `span_per_head=False`).
        temperatures: per hybrid layer, `(H', N)` local-softmax temperatures.
        max_span, tau_min, tau_max: the hybrid settings of the model (spans lie in `[0, max_span]`).
        tokens: the `N` token strings, when known (padding dropped).
    """

    layers: list[int]
    spans: list[np.ndarray]
    temperatures: list[np.ndarray]
    max_span: int
    tau_min: float
    tau_max: float
    tokens: list[str] | None = field(default=None)

    @property
    def num_tokens(self) -> int:
        return int(self.spans[0].shape[1]) if self.spans else 0

    @property
    def num_heads(self) -> int:
        """Span values per token: the number of heads, or 1 when the heads share one span."""
        return int(self.spans[0].shape[0]) if self.spans else 0

    def mean_span_per_head(self) -> np.ndarray:
        """`(L, H')`: mean span (tokens) over the sequence, per hybrid layer and head."""
        return np.stack([span.mean(axis=1) for span in self.spans])

    def mean_temperature_per_head(self) -> np.ndarray:
        """`(L, H')`: mean temperature over the sequence, per hybrid layer and head."""
        return np.stack([temp.mean(axis=1) for temp in self.temperatures])


def collect_spans(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> SpanRecord:
    """Run `model` once and record what each hybrid layer's span predictor says about the first sequence.

    Args:
        model: a hybrid model (native, remote-code or PEFT-wrapped), causal or encoder.
        input_ids: `(B, N)` or `(N,)` token ids; only the first sequence is recorded.
        attention_mask: `(B, N)` (or `(N,)`), 1 for real tokens; padding positions are dropped from the record.

    Returns:
        A `SpanRecord` with `(H', N_real)` spans and temperatures per hybrid layer.

    Raises:
        ValueError: the model has no hybrid layers, or the input is empty.
    """
    layers = hybrid_layers(model)
    if not layers:
        raise UsageError(
            f"{type(model).__name__} has no hybrid attention layers; convert it first "
            "(`hybrid-hf convert`, or `hybrid_hf.convert(model)` in Python)"
        )
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
        attention_mask = attention_mask[None] if attention_mask is not None else None
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise UsageError(f"input_ids must be a non-empty (batch, length) tensor, got shape {tuple(input_ids.shape)}")
    length = input_ids.shape[1]
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise UsageError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
        )
    keep = attention_mask[0].bool().cpu() if attention_mask is not None else torch.ones(length, dtype=torch.bool)
    if not keep.any():
        raise UsageError("the first sequence is all padding")

    captured: dict[int, list[torch.Tensor]] = {index: [] for index in range(len(layers))}

    def make_hook(index: int):
        def hook(module, args, output):
            captured[index].append(output.detach())

        return hook

    device = model_device(model)
    handles = []
    was_training = model.training
    try:
        for index, layer in enumerate(layers):
            handles.append(layer.span_predictor.register_forward_hook(make_hook(index)))
        model.eval()  # no dropout in the global branch the context is averaged from
        with torch.no_grad():
            model(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device) if attention_mask is not None else None,
            )
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    spans, temperatures = [], []
    for index, layer in enumerate(layers):
        outputs = captured[index]
        if len(outputs) != 1:
            raise RuntimeError(
                f"hybrid layer {layer.layer_idx}: its span predictor ran {len(outputs)} times in one forward pass"
            )
        scale = outputs[0][0].float().cpu()  # (H', N), or (H', 1) for an encoder's whole-sequence context
        scale = scale.expand(-1, length)[:, keep]
        config = layer.config
        spans.append((scale * config.max_span).numpy())
        temperatures.append(span_temperature(scale, config.tau_min, config.tau_max).numpy())
    config = layers[0].config
    return SpanRecord(
        layers=[int(layer.layer_idx) for layer in layers],
        spans=spans,
        temperatures=temperatures,
        max_span=int(config.max_span),
        tau_min=float(config.tau_min),
        tau_max=float(config.tau_max),
    )


def default_plot_layers(record: SpanRecord) -> list[int]:
    """First, middle and last hybrid layer (fewer when the model has fewer)."""
    picks = [record.layers[0], record.layers[len(record.layers) // 2], record.layers[-1]]
    return list(dict.fromkeys(picks))


def check_layers(record: SpanRecord, layers) -> list[int]:
    if layers is None:
        return default_plot_layers(record)
    layers = list(dict.fromkeys(int(layer) for layer in layers))
    unknown = [layer for layer in layers if layer not in record.layers]
    if not layers or unknown:
        raise UsageError(
            f"layers {unknown or layers} are not hybrid layers of this model; hybrid layers: "
            f"{_format_ranges(record.layers)}"
        )
    return layers


def _format_ranges(numbers: list[int]) -> str:
    """`[0, 1, 2, 5]` -> `"0-2, 5"`."""
    parts, start = [], None
    for i, number in enumerate(numbers):
        if start is None:
            start = number
        if i + 1 == len(numbers) or numbers[i + 1] != number + 1:
            parts.append(str(start) if start == number else f"{start}-{number}")
            start = None
    return ", ".join(parts)


def record_to_dict(record: SpanRecord) -> dict:
    """The numbers of a record, as written by `write_json`."""

    def rounded(values) -> list:
        return np.round(np.asarray(values, dtype=np.float64), 6).tolist()

    data = {
        "max_span": record.max_span,
        "tau_min": record.tau_min,
        "tau_max": record.tau_max,
        "tokens": record.num_tokens,
        "layers": [
            {
                "layer": layer,
                "mean_span_per_head": rounded(span.mean(axis=1)),
                "mean_temperature_per_head": rounded(temp.mean(axis=1)),
                "span_along_sequence": rounded(span),
            }
            for layer, span, temp in zip(record.layers, record.spans, record.temperatures, strict=False)
        ],
    }
    if record.tokens is not None:
        data["token_strings"] = list(record.tokens)
    return data


def write_json(record: SpanRecord, path) -> Path:
    """Write `record_to_dict(record)` to `path` (parent folders created); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record_to_dict(record), indent=1) + "\n", encoding="utf-8")
    return path


def summary_table(record: SpanRecord) -> str:
    """One line per hybrid layer: mean, min and max span and the mean temperature."""
    lines = [f"{'layer':>5}  {'mean span':>9}  {'min':>7}  {'max':>7}  {'mean temp':>9}  (max_span {record.max_span})"]
    for layer, span, temp in zip(record.layers, record.spans, record.temperatures, strict=False):
        lines.append(f"{layer:>5}  {span.mean():>9.2f}  {span.min():>7.2f}  {span.max():>7.2f}  {temp.mean():>9.3f}")
    return "\n".join(lines)
