"""`hybrid-hf inspect MODEL (--text FILE | --prompt TEXT) --out DIR [--max-tokens 512] [--layers 0,5,9] [--force]`.

Runs a hybrid model on a text and writes what each hybrid layer predicts (`spans.collect_spans`): three figures
(`plots.plot_spans`) and `spans.json`, and prints a table per layer. DIR is written like every output
(`publishing`): atomically, never over the model, and over an existing non-empty folder only with `--force` and
only when it holds nothing but an earlier inspection.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import MissingInputError, UsageError
from ..loading import load_model, load_source_config
from ..model.configuration_hybrid import HYBRID_PREFIX
from ..plots import FIGURES, plot_spans
from ..publishing import check_output, output_lock, staged_folder, write_errors
from ..spans import JSON_NAME, check_layers, collect_spans, summary_table, write_json
from ..tasks import is_encoder
from . import ArgumentParser


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="hybrid-hf inspect",
        description="Plot the spans and temperatures a hybrid model predicts for a text.",
    )
    parser.add_argument("model", help="folder of a hybrid model, with its tokenizer")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", type=Path, help="file with the text to run the model on")
    source.add_argument("--prompt", help="the text itself")
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNGs and spans.json (created)")
    parser.add_argument(
        "--force", action="store_true", help="replace --out if it exists (only an earlier inspection's folder)"
    )
    parser.add_argument("--max-tokens", type=int, default=512, help="keep the first N tokens (default: 512)")
    parser.add_argument(
        "--layers", help="layer indices for the span-along-sequence plot, e.g. 0,5,9 (default: first, middle, last)"
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the modeling code the folder ships (auto_map); never needed for hybrid models",
    )
    return parser


def _parse_layers(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--layers must be comma-separated layer indices like 0,5,9, got {text!r}") from None
    if not layers:
        raise UsageError(f"--layers must name at least one layer, got {text!r}")
    return layers


def _read_text(args) -> str:
    if args.text is not None:
        if not args.text.is_file():
            raise MissingInputError(f"text file not found: {args.text}")
        text = args.text.read_text(encoding="utf-8", errors="replace")
        where = f"text file {args.text}"
    else:
        text = args.prompt
        where = "--prompt"
    if not text.strip():
        raise UsageError(f"{where} is empty; give some text to run the model on")
    return text


def load_hybrid(model_path: str, trust_remote_code: bool = False):
    """A hybrid model (causal LM, or base model for encoders) and its tokenizer, both from one folder."""
    folder = Path(model_path)
    if not folder.exists():
        raise MissingInputError(f"model folder not found: {model_path}")
    if not folder.is_dir():
        raise UsageError(f"model must be a folder (with config.json and a tokenizer), got a file: {model_path}")
    if not (folder / "config.json").is_file():
        raise MissingInputError(f"no config.json in {model_path}; is it a saved model folder?")
    config = load_source_config(model_path, trust_remote_code)  # one-line errors for a bad config, before weights
    if not config.model_type.startswith(HYBRID_PREFIX):
        raise UsageError(
            f"{model_path} has no hybrid attention layers (model_type {config.model_type!r}); "
            f"convert it first with `hybrid-hf convert {model_path} OUT_DIR` and inspect OUT_DIR"
        )
    task = "base" if is_encoder(config) else "causal_lm"
    return load_model(model_path, task, config=config, trust_remote_code=trust_remote_code)


def is_inspection(folder: Path) -> bool:
    """Whether `folder` holds an earlier inspection and nothing else (spans.json and the figures)."""
    names = {path.name for path in folder.iterdir()}
    return JSON_NAME in names and names <= {JSON_NAME, *FIGURES}


def _check_out(args) -> None:
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out must be a folder, but {args.out} is a file")
    check_output(
        args.out, args.force, args.model, replaceable=is_inspection, kind="an earlier inspection (spans.json, figures)"
    )


def inspect_model(model_path: str, text: str, max_tokens: int, layers: list[int] | None, trust_remote_code=False):
    """The `spans.SpanRecord` of the hybrid model in `model_path` on the first `max_tokens` tokens of `text`."""
    model, tokenizer = load_hybrid(model_path, trust_remote_code)
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    limit = min(max_tokens, positions) if positions else max_tokens
    encoded = tokenizer(text, return_tensors="pt", truncation=True, max_length=limit)
    input_ids = encoded["input_ids"][:, :limit]
    if input_ids.shape[1] == 0:
        raise UsageError("the text gives no tokens")
    attention_mask = encoded.get("attention_mask")
    attention_mask = attention_mask[:, :limit] if attention_mask is not None else None

    record = collect_spans(model, input_ids, attention_mask)
    ids = input_ids[0][attention_mask[0].bool()] if attention_mask is not None else input_ids[0]
    record.tokens = tokenizer.convert_ids_to_tokens(ids.tolist())
    if layers is not None:
        check_layers(record, layers)
    return record


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_tokens < 1:
        raise UsageError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    plot_layers = _parse_layers(args.layers)
    text = _read_text(args)
    args.out = args.out.expanduser().absolute()
    _check_out(args)
    with output_lock(args.out):  # a busy or unwritable --out fails here, before loading
        _check_out(args)  # again: another run may have written it meanwhile
        record = inspect_model(args.model, text, args.max_tokens, plot_layers, args.trust_remote_code)
        with write_errors(args.out), staged_folder(args.out, args.force) as tmp:
            names = [path.name for path in plot_spans(record, tmp, plot_layers)]
            names.append(write_json(record, tmp / JSON_NAME).name)
    print(
        f"{record.num_tokens} tokens, {len(record.layers)} hybrid layers, "
        f"{record.num_heads} span{'s' if record.num_heads > 1 else ''} per token"
    )
    print(summary_table(record))
    for name in names:
        print(f"wrote {args.out / name}")
    return 0
