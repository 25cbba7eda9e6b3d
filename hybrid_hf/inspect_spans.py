"""Look inside a hybrid model: the span and temperature each hybrid layer predicts, per head and token.

Library:

    record = collect_spans(model, input_ids, attention_mask)   # one forward pass, hooks on every span_predictor
    paths = plot_spans(record, "out/")                         # three PNG figures
    write_json(record, "out/spans.json")                       # the numbers behind them

Command (through `hybrid-hf`):

    hybrid-hf inspect MODEL (--text FILE | --prompt TEXT) --out DIR [--max-tokens 512] [--layers 0,5,9]
                      [--trust-remote-code]

The span of a token is `s * max_span` tokens and its local-softmax temperature `tau_min + (tau_max - tau_min) * s`,
with `s` in `[0, 1]` the output of the layer's span predictor.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .cli import ArgumentParser, quiet_transformers
from .modeling_hybrid import hybrid_layers
from .training import model_device

SPAN_HEATMAP = "span_heatmap.png"
TEMPERATURE_HEATMAP = "temperature_heatmap.png"
SPAN_ALONG_SEQUENCE = "span_along_sequence.png"
JSON_NAME = "spans.json"

#: above this many heads (or span values shared by all heads), the sequence plot draws the head mean and range
MAX_HEAD_LINES = 16


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
        raise ValueError(
            f"{type(model).__name__} has no hybrid attention layers; convert it first "
            "(`hybrid-hf convert`, or `hybrid_hf.convert(model)` in Python)"
        )
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
        attention_mask = attention_mask[None] if attention_mask is not None else None
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty (batch, length) tensor, got shape {tuple(input_ids.shape)}")
    length = input_ids.shape[1]
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
        )
    keep = attention_mask[0].bool().cpu() if attention_mask is not None else torch.ones(length, dtype=torch.bool)
    if not keep.any():
        raise ValueError("the first sequence is all padding")

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
        temperatures.append((config.tau_min + (config.tau_max - config.tau_min) * scale).numpy())
    config = layers[0].config
    return SpanRecord(
        layers=[int(layer.layer_idx) for layer in layers],
        spans=spans,
        temperatures=temperatures,
        max_span=int(config.max_span),
        tau_min=float(config.tau_min),
        tau_max=float(config.tau_max),
    )


def _default_plot_layers(record: SpanRecord) -> list[int]:
    """First, middle and last hybrid layer (fewer when the model has fewer)."""
    picks = [record.layers[0], record.layers[len(record.layers) // 2], record.layers[-1]]
    return list(dict.fromkeys(picks))


def _check_layers(record: SpanRecord, layers) -> list[int]:
    if layers is None:
        return _default_plot_layers(record)
    layers = list(dict.fromkeys(int(layer) for layer in layers))
    unknown = [layer for layer in layers if layer not in record.layers]
    if not layers or unknown:
        raise ValueError(
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


def _heatmap(fig, values: np.ndarray, record: SpanRecord, title: str, label: str, vmin: float, vmax: float, fmt: str):
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
    rows, cols = values.shape
    ax.set_title(title)
    ax.set_xlabel("head" if record.num_heads > 1 else "all heads (one shared span)")
    ax.set_ylabel("layer")
    ax.set_xticks(range(cols), [str(h) for h in range(cols)] if record.num_heads > 1 else ["shared"])
    step = max(1, rows // 32)
    ax.set_yticks(range(0, rows, step), [str(record.layers[r]) for r in range(0, rows, step)])
    if rows * cols <= 256:  # small grids get their numbers written in
        middle = (vmin + vmax) / 2
        for r in range(rows):
            for c in range(cols):
                ax.text(c, r, format(values[r, c], fmt), ha="center", va="center", fontsize=8,
                        color="black" if values[r, c] > middle else "white")
    bar = fig.colorbar(image, ax=ax)
    bar.set_label(label)
    return ax, bar


def plot_spans(record: SpanRecord, out_dir, layers=None) -> list[Path]:
    """Draw the record as three PNGs in `out_dir` (created) and return their paths.

    1. `span_heatmap.png`: mean span per layer (rows) and head (columns); the colour scale runs 0 to `max_span`.
    2. `temperature_heatmap.png`: the same for the temperature, on `tau_min` to `tau_max`.
    3. `span_along_sequence.png`: span per token for the chosen `layers` (model layer indices; default: first,
       middle and last hybrid layer), one line per head (or the head mean and range when there are many), with
       `max_span` drawn as a dashed line.

    Uses matplotlib's Agg canvas directly: no pyplot, no change to the global backend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    plot_layers = _check_layers(record, layers)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, cols = len(record.layers), record.num_heads
    size = (min(max(7.0, 4 + 0.6 * cols), 16), min(max(3.5, 2.5 + 0.4 * rows), 14))
    n = record.num_tokens
    paths = []

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    _heatmap(
        fig, record.mean_span_per_head(), record,
        f"Mean local span per layer and head ({n} tokens)",
        f"span (tokens); 0 to max_span = {record.max_span}", 0.0, float(record.max_span), ".1f",
    )
    paths.append(out_dir / SPAN_HEATMAP)
    fig.savefig(paths[-1], dpi=120)

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    _heatmap(
        fig, record.mean_temperature_per_head(), record,
        f"Mean local-softmax temperature per layer and head ({n} tokens)",
        f"temperature ({record.tau_min:g} at span 0 to {record.tau_max:g} at max_span)",
        record.tau_min, record.tau_max, ".2f",
    )
    paths.append(out_dir / TEMPERATURE_HEATMAP)
    fig.savefig(paths[-1], dpi=120)

    fig = Figure(figsize=(min(6 + n / 40, 16), 2.6 * len(plot_layers) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(plot_layers), 1, sharex=True, squeeze=False)[:, 0]
    positions = np.arange(n)
    for ax, layer in zip(axes, plot_layers):
        span = record.spans[record.layers.index(layer)]  # (H', N)
        if span.shape[0] == 1:
            ax.plot(positions, span[0], color="C0", label="all heads (shared)")
        elif span.shape[0] <= MAX_HEAD_LINES:
            for head, row in enumerate(span):
                ax.plot(positions, row, color=f"C{head % 10}", linewidth=1.2,
                        linestyle="-" if head < 10 else "--", label=f"head {head}")
        else:
            ax.fill_between(positions, span.min(axis=0), span.max(axis=0), color="C0", alpha=0.25,
                            label=f"min-max over {span.shape[0]} heads")
            ax.plot(positions, span.mean(axis=0), color="C0", label="head mean")
        ax.axhline(record.max_span, color="black", linestyle=":", linewidth=1, label=f"max_span = {record.max_span}")
        ax.set_ylim(0, record.max_span * 1.08)
        ax.set_xlim(-0.5, max(n - 0.5, 0.5))
        ax.set_title(f"layer {layer}")
        ax.set_ylabel("span (tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    axes[-1].set_xlabel("token position")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle("Local span along the sequence")
    paths.append(out_dir / SPAN_ALONG_SEQUENCE)
    fig.savefig(paths[-1], dpi=120)
    return paths


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
            for layer, span, temp in zip(record.layers, record.spans, record.temperatures)
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
    for layer, span, temp in zip(record.layers, record.spans, record.temperatures):
        lines.append(
            f"{layer:>5}  {span.mean():>9.2f}  {span.min():>7.2f}  {span.max():>7.2f}  {temp.mean():>9.3f}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="hybrid-hf inspect",
        description="Plot the spans and temperatures a hybrid model predicts for a text.",
    )
    parser.add_argument("model", help="folder of a hybrid model, with its tokenizer")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", type=Path, help="file with the text to run the model on")
    source.add_argument("--prompt", help="the text itself")
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNGs and spans.json (created)")
    parser.add_argument("--max-tokens", type=int, default=512, help="keep the first N tokens (default: 512)")
    parser.add_argument(
        "--layers", help="layer indices for the span-along-sequence plot, e.g. 0,5,9 (default: first, middle, last)"
    )
    parser.add_argument(
        "--trust-remote-code", action="store_true",
        help="run the modeling code the folder ships (auto_map); never needed for hybrid models",
    )
    return parser


def _parse_layers(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--layers must be comma-separated layer indices like 0,5,9, got {text!r}") from None
    if not layers:
        raise ValueError(f"--layers must name at least one layer, got {text!r}")
    return layers


def _read_text(args) -> str:
    if args.text is not None:
        if not args.text.is_file():
            raise ValueError(f"text file not found: {args.text}")
        text = args.text.read_text(encoding="utf-8", errors="replace")
        where = f"text file {args.text}"
    else:
        text = args.prompt
        where = "--prompt"
    if not text.strip():
        raise ValueError(f"{where} is empty; give some text to run the model on")
    return text


def load_model_and_tokenizer(model_path: str, trust_remote_code: bool = False):
    """A hybrid model (causal LM, or base model for encoders) and its tokenizer, both from one folder.

    No code shipped with the folder runs unless `trust_remote_code` (the hybrid classes are registered from the
    folder's `model_type`); damaged weights get one-line errors (`checkpoint.load_weights`).
    """
    import transformers

    from .architectures import is_encoder
    from .checkpoint import load_source_config, load_weights
    from .configuration_hybrid import HYBRID_PREFIX

    folder = Path(model_path)
    if not folder.exists():
        raise ValueError(f"model folder not found: {model_path}")
    if not folder.is_dir():
        raise ValueError(f"model must be a folder (with config.json and a tokenizer), got a file: {model_path}")
    if not (folder / "config.json").is_file():
        raise ValueError(f"no config.json in {model_path}; is it a saved model folder?")
    config = load_source_config(model_path, trust_remote_code)  # one-line errors for a bad config, before weights
    if not config.model_type.startswith(HYBRID_PREFIX):
        raise ValueError(
            f"{model_path} has no hybrid attention layers (model_type {config.model_type!r}); "
            f"convert it first with `hybrid-hf convert {model_path} OUT_DIR` and inspect OUT_DIR"
        )
    auto_class = transformers.AutoModel if is_encoder(config) else transformers.AutoModelForCausalLM
    with quiet_transformers():  # progress bars and load reports would break the one-line error contract
        model = load_weights(auto_class, model_path, model_path, trust_remote_code=trust_remote_code)
    if not hybrid_layers(model):
        raise ValueError(
            f"{model_path} has no hybrid attention layers (model_type {model.config.model_type!r}); "
            f"convert it first with `hybrid-hf convert {model_path} OUT_DIR` and inspect OUT_DIR"
        )
    try:
        with quiet_transformers():
            tokenizer = transformers.AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(
            f"no usable tokenizer in {model_path} ({first}); save one there with tokenizer.save_pretrained"
        ) from None
    return model, tokenizer


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    plot_layers = _parse_layers(args.layers)
    text = _read_text(args)
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out must be a folder, but {args.out} is a file")

    model, tokenizer = load_model_and_tokenizer(args.model, args.trust_remote_code)
    limit = args.max_tokens
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if positions and limit > positions:
        limit = positions
    encoded = tokenizer(text, return_tensors="pt", truncation=True, max_length=limit)
    input_ids = encoded["input_ids"][:, :limit]
    if input_ids.shape[1] == 0:
        raise ValueError("the text gives no tokens")
    attention_mask = encoded.get("attention_mask")
    attention_mask = attention_mask[:, :limit] if attention_mask is not None else None

    record = collect_spans(model, input_ids, attention_mask)
    ids = input_ids[0][attention_mask[0].bool()] if attention_mask is not None else input_ids[0]
    record.tokens = tokenizer.convert_ids_to_tokens(ids.tolist())
    if plot_layers is not None:
        _check_layers(record, plot_layers)

    paths = plot_spans(record, args.out, plot_layers)
    paths.append(write_json(record, args.out / JSON_NAME))
    print(f"{record.num_tokens} tokens, {len(record.layers)} hybrid layers, "
          f"{record.num_heads} span{'s' if record.num_heads > 1 else ''} per token")
    print(summary_table(record))
    for path in paths:
        print(f"wrote {path}")
    return 0
