"""Held-out perplexity against mean learned span for several span-loss weights (the demo's model, text and budget).

    python -m hybrid_hf.examples.span_tradeoff     # span_loss_coef 0, 0.01, 0.1; about 3 minutes each on 2 CPU cores
    python -m hybrid_hf.examples.span_tradeoff --coefs 0 0.1 1 --steps 200 --out docs

For each weight: SmolLM2-135M-Instruct converted with the demo's settings, fine-tuned with the demo's LoRA budget on
the demo's eight plays (seed 0), then its perplexity on the held-out play's first tokens and on the Lee news corpus,
and its mean learned span on the demo's held-out passage. Writes `span_tradeoff.png` and `span_tradeoff.json`.

`--demo-report demo_output/report.json` takes the point of the demo's own weight from that demo run's first seed
(the same model: same settings, data, budget and seed), instead of training it again.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from transformers import AutoModelForCausalLM, AutoTokenizer

from hybrid_hf import convert
from hybrid_hf.data import perplexity, text_dataset
from hybrid_hf.examples.assets import held_out_split, lee_news_text, shakespeare_plays, smollm2_folder
from hybrid_hf.finetuning import finetune
from hybrid_hf.spans import collect_spans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coefs", type=float, nargs="+", default=[0.0, 0.01, 0.1], help="span_loss_coef values")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--max-span", type=int, default=32)
    parser.add_argument("--ramp", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--demo-report", help="a demo's report.json: its first seed is the point of its weight")
    parser.add_argument("--replot", action="store_true", help="only redraw the figure from OUT/span_tradeoff.json")
    parser.add_argument("--out", default="docs", help="folder of span_tradeoff.png and span_tradeoff.json")
    args = parser.parse_args()
    out = Path(args.out)
    if args.replot:
        saved = json.loads((out / "span_tradeoff.json").read_text())
        plot(saved["rows"], saved["settings"], out / "span_tradeoff.png")
        return

    source = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(source)
    host = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    train, hamlet = held_out_split(shakespeare_plays(), "hamlet")
    blocks = max(1, args.eval_tokens // args.seq_len)
    eval_sets = {
        name: (dataset := text_dataset(tokenizer, [text], args.seq_len)).select(range(min(blocks, len(dataset))))
        for name, text in (("hamlet", hamlet), ("Lee news corpus", lee_news_text()))
    }
    probe = tokenizer(hamlet[:2000], return_tensors="pt", truncation=True, max_length=256)
    rows = []
    if args.demo_report:
        rows.append(_demo_point(json.loads(Path(args.demo_report).read_text()), args))
    for coef in args.coefs:
        if any(row["span_loss_coef"] == coef for row in rows):
            continue
        print(f"span_loss_coef {coef}: fine-tuning ({args.steps} steps)")
        hybrid = convert(copy.deepcopy(host), max_span=args.max_span, ramp=args.ramp, span_loss_coef=coef)
        tuned = finetune(
            hybrid,
            None,
            texts=train[:8],
            tokenizer=tokenizer,
            lora=True,
            steps=args.steps,
            seq_len=args.seq_len,
            batch_size=4,
            lr=1e-3,
            seed=args.seed,
            quiet=True,
            eval_texts=[hamlet[:2000]],
        ).model  # (finetune's own before/after check: a short text)
        record = collect_spans(tuned, probe["input_ids"], probe["attention_mask"])
        row = {
            "span_loss_coef": coef,
            "mean_span": float(record.mean_span_per_head().mean()),
            **{f"perplexity, {name}": perplexity(tuned, data, batch_size=4) for name, data in eval_sets.items()},
        }
        print(json.dumps(row))
        rows.append(row)
    rows.sort(key=lambda row: row["span_loss_coef"])

    out.mkdir(parents=True, exist_ok=True)
    settings = {key: value for key, value in vars(args).items() if key not in ("out", "replot")}
    settings["demo_report"] = args.demo_report and Path(args.demo_report).name
    (out / "span_tradeoff.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n")
    plot(rows, settings, out / "span_tradeoff.png")
    print(f"wrote {out / 'span_tradeoff.png'} and {out / 'span_tradeoff.json'}")


def plot(rows: list[dict], settings: dict, path: Path) -> None:
    """Held-out perplexity against mean learned span, one panel per text; each y axis spans at least 2 points."""
    names = [key.removeprefix("perplexity, ") for key in rows[0] if key.startswith("perplexity, ")]
    figure = Figure(figsize=(8, 3.4), layout="constrained")
    FigureCanvasAgg(figure)
    for axes, name in zip(figure.subplots(1, len(names)), names, strict=True):
        spans = [row["mean_span"] for row in rows]
        values = [row[f"perplexity, {name}"] for row in rows]
        axes.plot(spans, values, marker="o")
        for row, x, y in zip(rows, spans, values, strict=True):
            axes.annotate(f"coef {row['span_loss_coef']:g}", (x, y), textcoords="offset points", xytext=(4, 4))
        middle, half = (max(values) + min(values)) / 2, max(1.0, (max(values) - min(values)) / 2 + 0.2)
        axes.set_ylim(middle - half, middle + half)
        axes.ticklabel_format(axis="y", useOffset=False)
        axes.set_xlabel("mean learned span (tokens)")
        axes.set_ylabel("held-out perplexity")
        axes.set_title(f"{name} ({settings['eval_tokens']} tokens)")
    figure.suptitle(
        f"SmolLM2-135M hybrid, {settings['steps']} LoRA steps, max_span {settings['max_span']}, "
        f"seed {settings['seed']}"
    )
    figure.savefig(path, dpi=110)


def _demo_point(report: dict, args) -> dict:
    """The point of a demo run's first seed, after checking that it ran with this script's settings."""
    settings = report["settings"]
    for key in ("steps", "seq_len", "eval_tokens", "max_span", "ramp", "seed"):
        if settings[key] != getattr(args, key):
            raise SystemExit(f"the demo report ran with {key}={settings[key]}, this run with {getattr(args, key)}")
    names = {"hamlet": "hamlet (held-out play)", "Lee news corpus": "Lee news corpus"}
    return {
        "span_loss_coef": settings["span_loss_coef"],
        "mean_span": report["spans"]["mean_learned"],
        **{f"perplexity, {name}": report["ab"][key]["per_seed"]["hybrid"][0] for name, key in names.items()},
        "from": "the demo report's first seed",
    }


if __name__ == "__main__":
    main()
