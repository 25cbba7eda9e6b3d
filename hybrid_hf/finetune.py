"""`hybrid-hf finetune`: fine-tune a hybrid causal LM on text files with `transformers.Trainer`, optionally with LoRA.

    hybrid-hf finetune MODEL OUTPUT --data FILE [FILE ...] [--eval-data FILE ...] [--lora] [--lora-r 8]
                       [--steps 50] [--seq-len 256] [--batch-size 4] [--lr 1e-4] [--span-loss-coef X]
                       [--max-span N --ramp N ...] [--seed 0] [--force]

MODEL is a folder or Hub id of a hybrid model (loaded with `trust_remote_code=True`) or of a supported host causal
LM (Llama, Mistral, Qwen2/3, GPT-2), converted with `hybrid_hf.convert` and the settings given by the flags. The
text files are tokenised, concatenated and cut into blocks of `--seq-len` tokens (`training.text_dataset`); the
`--eval-data` files, or else the last 10% of the text, are held out to measure perplexity (LM loss only) before and
after. Training is `Trainer` with its progress bar and `SpanLoggingCallback` (spans and temperatures per layer in
every log). With `--lora`, LoRA adapters go on the host family's projections and the hybrid modules are trained in
full (`training.lora_config`); they are merged (`merge_and_unload`) before saving, so OUTPUT is a plain hybrid
model. OUTPUT is a Hub-ready folder: safetensors weights, `config.json` with `auto_map`, the modeling code, the
tokenizer and a model card (README.md). It is written to a temporary folder beside OUTPUT and renamed into place;
an existing OUTPUT is refused unless `--force`. In Python, `finetune(...)` does the same and returns a
`FinetuneResult`.

Several processes (data parallel, DDP; the Trainer does the distribution, only the main process writes OUTPUT):

    # one machine, 8 GPUs
    accelerate launch --num_processes 8 -m hybrid_hf.cli finetune MODEL OUTPUT --data train.txt
    # two machines with 8 GPUs each: run on each machine with its --machine_rank (0 and 1)
    accelerate launch --multi_gpu --num_machines 2 --num_processes 16 --machine_rank 0 \\
        --main_process_ip 10.0.0.1 --main_process_port 29500 -m hybrid_hf.cli finetune MODEL OUTPUT --data train.txt
    # CPU only (gloo), e.g. 2 processes; `torchrun --nproc_per_node 2 -m hybrid_hf.cli finetune ...` works too
    accelerate launch --multi_gpu --num_processes 2 -m hybrid_hf.cli finetune MODEL OUTPUT --data train.txt

On a machine without an accelerator this module asks for CPU training (`TrainingArguments(use_cpu=True)`), so
the processes started by `--multi_gpu` (torchrun) form a gloo group. Beware `accelerate launch --cpu
--num_processes 2`: without `--mpirun_hostfile` accelerate starts a single process (its multi-CPU mode is MPI).
The summary printed at the end gives the number of processes that took part.
`--batch-size` is per process: the global batch is `batch size x processes`.

DDP settings:

- `ddp_find_unused_parameters=False`. Every trainable parameter is reached in every forward: the local branch and
  the span predictor are always computed (while `mix = [0 | I]` their gradients are zero, but they exist, and DDP
  only cares whether a parameter is in the graph); layers left out by `hybrid_layers` have no new parameters; with
  LoRA the frozen host weights and the frozen originals of `modules_to_save` do not require gradients. `True`
  would cost a graph traversal per step for nothing. (A custom setup that does leave a parameter out of the graph
  fails loudly at the second step; `finetune(..., ddp_find_unused_parameters=True)` is the escape hatch.)
- `average_tokens_across_devices=False` and no gradient accumulation: with token averaging the Trainer multiplies
  the model's loss by the number of processes (and sums micro-batches unscaled), which is right for a token-summed
  LM loss but would multiply the span penalty, a per-batch mean added to it, by the number of processes (and of
  accumulation steps). Without it each process's loss is its batch's LM mean + span loss, and DDP averages them.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from .checkpoint import write_atomically
from .cli import ArgumentParser, UsageError, first_line

#: hybrid settings that only apply when converting a host model
CONVERSION_SETTINGS = ("max_span", "ramp", "tau_min", "tau_max", "span_per_head", "local_projections",
                       "hybrid_layers", "initial_span")
#: every hybrid setting shown in the model card
SETTING_NAMES = CONVERSION_SETTINGS + ("span_loss_coef",)


@dataclass
class FinetuneResult:
    """What `finetune` did. `log_history` is the Trainer's (with the span logging entries)."""

    output: Path | None
    perplexity_before: float
    perplexity_after: float
    steps: int
    wall_time_s: float
    log_history: list[dict[str, Any]] = field(default_factory=list)
    train_tokens: int = 0
    eval_tokens: int = 0
    converted: bool = False
    lora: bool = False
    num_processes: int = 1
    model: Any = field(default=None, repr=False, compare=False)  # the trained (merged) model

    @property
    def final_span(self) -> float | None:
        """The last logged `span/mean` (tokens), if any."""
        for entry in reversed(self.log_history):
            if "span/mean" in entry:
                return entry["span/mean"]
        return None


def _read_texts(files, what: str) -> list[str]:
    texts = []
    for name in files:
        path = Path(name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{what} file not found: {name}")
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as error:
            raise ValueError(f"{what} file {name} is not UTF-8 text ({error.reason})") from None
    return texts


def _split_tail(texts: list[str], fraction: float) -> tuple[str, str]:
    """Split the joined texts into (head, tail) with `fraction` of the characters in the tail, at whitespace."""
    text = "\n\n".join(texts)
    cut = int(len(text) * (1.0 - fraction))
    while 0 < cut < len(text) and not text[cut].isspace():
        cut += 1
    return text[:cut], text[cut:]


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def prepare_model(model, settings: dict[str, Any], span_loss_coef: float | None = None, hybrid: bool = True,
                  what: str = "the model"):
    """The model to train from a loaded one: a host model is converted (`hybrid=True`) or kept as is (`hybrid=False`,
    a baseline); a hybrid model is kept, with `span_loss_coef` set. Returns (model, converted).

    Raises `ValueError` for conversion `settings` given with a hybrid model, or any hybrid setting with `hybrid=False`.
    """
    from .architectures import HYBRID_PREFIX
    from .conversion import convert

    is_hybrid = model.config.model_type.startswith(HYBRID_PREFIX)
    if span_loss_coef is not None and not span_loss_coef >= 0:
        raise ValueError(f"span-loss-coef must be >= 0, got {span_loss_coef!r}")
    if not hybrid:
        if is_hybrid:
            raise ValueError(f"{what} is already hybrid; hybrid=False trains a host model as it is")
        if settings or span_loss_coef is not None:
            raise ValueError("hybrid settings and span-loss-coef need hybrid=True (a converted model)")
        return model, False
    if not is_hybrid:
        coef = {} if span_loss_coef is None else {"span_loss_coef": float(span_loss_coef)}
        return convert(model, **settings, **coef), True
    if settings:
        flags = ", ".join("--" + key.replace("_", "-") for key in settings)
        raise ValueError(f"{what} is already hybrid; {flags} only apply when converting a host model")
    if span_loss_coef is not None:
        model.config.span_loss_coef = float(span_loss_coef)
    return model, False


def _check_positions(config, seq_len: int | None) -> None:
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if seq_len is not None and positions and seq_len > positions:
        raise ValueError(f"seq-len {seq_len} exceeds the model's maximum of {positions} positions")


def load_model(name: str, settings: dict[str, Any], span_loss_coef: float | None = None, dtype=torch.float32,
               hybrid: bool = True, seq_len: int | None = None):
    """Load MODEL (folder or Hub id) and its tokenizer and `prepare_model` it. Returns (model, tokenizer, converted).

    Models are loaded with `trust_remote_code=True` (a hybrid checkpoint carries its modeling code), in `dtype`.
    Bad settings and a `seq_len` beyond the model's positions are refused before the weights are loaded.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .architectures import HYBRID_PREFIX, get_architecture

    path = Path(name).expanduser()
    if not path.is_dir() and (path.exists() or _looks_like_path(name)):
        raise FileNotFoundError(f"model folder not found: {name}")
    source = str(path) if path.is_dir() else name
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=True)
    except (OSError, ValueError) as error:
        if path.is_dir():
            raise ValueError(f"{name} is not a model folder ({first_line(error)})") from None
        raise OSError(
            f"unknown model {name!r}: not a local folder, and not found on the Hugging Face Hub or in its cache"
        ) from None
    arch = get_architecture(config.model_type)  # ValueError listing the supported architectures
    if "causal_lm" not in arch.model_classes:
        raise ValueError(f"finetune trains causal LMs; {config.model_type!r} models are encoders")
    if config.model_type.startswith(HYBRID_PREFIX) and (settings or not hybrid):  # raises, before loading weights
        prepare_model(SimpleNamespace(config=config), settings, span_loss_coef, hybrid, name)
    _check_positions(config, seq_len)
    model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=True, dtype=dtype)
    model, converted = prepare_model(model, settings, span_loss_coef, hybrid, name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"could not load the tokenizer of {name} ({first_line(error)})") from None
    return model, tokenizer, converted


def _default_use_cpu() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return not accelerator.is_available()
    return not torch.cuda.is_available()


def finetune(
    model,
    output,
    *,
    data_files=(),
    eval_files=(),
    texts: list[str] | None = None,
    eval_texts: list[str] | None = None,
    tokenizer=None,
    lora: bool = False,
    lora_r: int = 8,
    lora_alpha: int | None = None,
    steps: int = 50,
    seq_len: int = 256,
    batch_size: int = 4,
    lr: float = 1e-4,
    span_loss_coef: float | None = None,
    settings: dict[str, Any] | None = None,
    seed: int = 0,
    force: bool = False,
    eval_fraction: float = 0.1,
    logging_steps: int | None = None,
    report_to: str | list[str] = "none",
    use_cpu: bool | None = None,
    ddp_find_unused_parameters: bool = False,
    base_model: str | None = None,
    base_model_note: str | None = None,
    hybrid: bool = True,
    quiet: bool = False,
) -> FinetuneResult:
    """Fine-tune a hybrid causal LM with `Trainer` and save it, Hub-ready, to `output` (see the module docstring).

    Args:
        model: folder or Hub id of a hybrid or host causal LM, or a loaded (hybrid or host) model with `tokenizer`
            (a loaded host model is converted and left untouched; a loaded hybrid model is trained in place).
        output: the folder to write; refused if it exists, unless `force`; None: save nothing (the trained model is
            `result.model`).
        data_files, texts: training text (files, or strings); `eval_files`, `eval_texts`: held-out text (default:
            the last `eval_fraction` of the training text).
        tokenizer: required when `model` is a loaded model.
        lora, lora_r, lora_alpha: train LoRA adapters (rank, alpha = 2 r by default) + the hybrid modules; merged
            before saving.
        steps, seq_len, batch_size, lr, seed: `max_steps`, block length, per-process batch, learning rate, seed.
        span_loss_coef: the span penalty weight (kept in the saved config); None keeps the model's.
        settings: hybrid settings for converting a host model (`max_span`, `ramp`...); refused for hybrid models.
        logging_steps: Trainer log interval (default: steps // 10); report_to: Trainer integrations.
        use_cpu: train on CPU (default: when no accelerator is available; needed for gloo under a launcher).
        ddp_find_unused_parameters: see the module docstring.
        base_model: the model card's base model, a Hub id or a local folder (default: `model` when it is a name);
            base_model_note: how the weights came from it, for the card.
        hybrid: False trains a host model as it is, without converting it (a baseline with the same data, budget
            and LoRA targets); saved without a hybrid model card.
        quiet: no summary printed.
    """
    from accelerate import PartialState
    from transformers import PreTrainedModel, Trainer, TrainingArguments, default_data_collator, set_seed

    from .training import add_span_logging, get_lora_model, perplexity, text_dataset

    started = time.perf_counter()
    settings = {key: value for key, value in (settings or {}).items() if value is not None}
    for name, value, low in (("steps", steps, 1), ("seq_len", seq_len, 2), ("batch_size", batch_size, 1),
                             ("lora_r", lora_r, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
    if not lr > 0 or not math.isfinite(lr):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")
    if span_loss_coef is not None and not span_loss_coef >= 0:
        raise ValueError(f"span-loss-coef must be >= 0, got {span_loss_coef!r}")
    output = Path(output).expanduser().absolute() if output is not None else None
    if output is not None and (output.exists() or output.is_symlink()):
        if not force:
            raise FileExistsError(f"{output} exists; pass --force to replace it")
        if not (output.is_dir() and ((output / "config.json").is_file() or not any(output.iterdir()))):
            raise FileExistsError(f"refusing to replace {output}: it is not a model folder (no config.json)")

    train_texts = list(texts or []) + _read_texts(data_files, "data")
    held_out = list(eval_texts or []) + _read_texts(eval_files, "eval data")
    if not any(text.strip() for text in train_texts):
        raise ValueError("the training data is empty (no text)" if train_texts or data_files else "no training data given")
    if (eval_files or eval_texts) and not any(text.strip() for text in held_out):
        raise ValueError("the eval data is empty (no text)")

    use_cpu = _default_use_cpu() if use_cpu is None else use_cpu
    state = PartialState(cpu=use_cpu)
    set_seed(seed)
    with state.main_process_first():  # one process fills the caches (remote code, hub files) at a time
        if isinstance(model, PreTrainedModel):
            if tokenizer is None:
                raise ValueError("a loaded model needs its tokenizer")
            base_model = base_model or model.config._name_or_path or None
            model, converted = prepare_model(model, settings, span_loss_coef, hybrid)
        else:
            name = str(model)
            model, tokenizer, converted = load_model(name, settings, span_loss_coef, hybrid=hybrid, seq_len=seq_len)
            base_model = base_model or name
        _check_positions(model.config, seq_len)
        if held_out:
            train_part, eval_part = train_texts, held_out
        else:
            head, tail = _split_tail(train_texts, eval_fraction)
            train_part, eval_part = [head], [tail]
        try:
            train_dataset = text_dataset(tokenizer, train_part, seq_len)
        except ValueError as error:
            raise ValueError(f"training data: {error}") from None
        try:
            eval_dataset = text_dataset(tokenizer, eval_part, seq_len)
        except ValueError as error:
            hint = "" if held_out else f" (the last {eval_fraction:.0%} of the text; pass --eval-data)"
            raise ValueError(f"eval data{hint}: {error}") from None
    train_tokens = sum(len(ids) for ids in train_dataset["input_ids"])
    eval_tokens = sum(len(ids) for ids in eval_dataset["input_ids"])

    model.to(state.device)
    bars = state.is_main_process  # progress bars on the main process only, like the Trainer's
    ppl_before = perplexity(model, eval_dataset, batch_size, progress="perplexity before training" if bars else None)
    use_cache = getattr(model.config, "use_cache", True)  # the Trainer turns the KV cache off for training
    lora_alpha = lora_alpha if lora_alpha is not None else 2 * lora_r
    if lora:
        set_seed(seed)
        model = get_lora_model(model, r=lora_r, alpha=lora_alpha)

    with tempfile.TemporaryDirectory(prefix="hybrid-hf-trainer-") as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=1,
            learning_rate=lr,
            logging_steps=logging_steps or max(1, steps // 10),
            save_strategy="no",
            eval_strategy="no",
            report_to=report_to,
            seed=seed,
            data_seed=seed,
            use_cpu=use_cpu,
            ddp_find_unused_parameters=ddp_find_unused_parameters,
            average_tokens_across_devices=False,
            remove_unused_columns=False,
            dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=train_dataset, data_collator=default_data_collator)
        add_span_logging(trainer)
        trainer.train()
    trained = trainer.model
    if lora:
        trained = trained.merge_and_unload()
    trained.eval()
    trained.config.use_cache = use_cache
    ppl_after = perplexity(trained, eval_dataset, batch_size, progress="perplexity after training" if bars else None)
    num_processes = trainer.args.world_size
    result = FinetuneResult(
        output=output,
        perplexity_before=ppl_before,
        perplexity_after=ppl_after,
        steps=trainer.state.global_step,
        wall_time_s=0.0,
        log_history=list(trainer.state.log_history),
        train_tokens=train_tokens,
        eval_tokens=eval_tokens,
        converted=converted,
        lora=lora,
        num_processes=num_processes,
        model=trained,
    )

    if output is not None and trainer.is_world_process_zero():
        card = None
        if hybrid:
            summary: dict[str, Any] = {
                "converted from the host model here": converted,
                "training text": ", ".join(Path(f).name for f in data_files) or f"{len(texts or [])} text(s)",
                "held-out text": ", ".join(Path(f).name for f in eval_files)
                or (f"{len(eval_texts)} text(s)" if eval_texts else f"last {eval_fraction:.0%} of the training text"),
                "training tokens": train_tokens,
                "held-out tokens": eval_tokens,
                "steps": result.steps,
                "sequence length": seq_len,
                "batch size (per process)": batch_size,
                "processes": num_processes,
                "learning rate": lr,
                "method": f"LoRA r={lora_r} alpha={lora_alpha} + hybrid modules, merged" if lora else "full fine-tuning",
                "perplexity before (held-out, LM loss only)": ppl_before,
                "perplexity after": ppl_after,
            }
            if result.final_span is not None:
                summary["mean span at the last log (tokens)"] = result.final_span
            summary["wall time (s)"] = round(time.perf_counter() - started, 1)
            card = dict(
                base_model=base_model,
                base_model_note=base_model_note,
                settings={key: getattr(trained.config, key) for key in SETTING_NAMES if hasattr(trained.config, key)},
                training_summary=summary,
                model_id=output.name,
            )
        write_atomically(output, trained, tokenizer, force=force, card=card)
    state.wait_for_everyone()
    result.wall_time_s = time.perf_counter() - started
    if not quiet and state.is_main_process:
        span = f", mean span {result.final_span:.2f} tokens" if result.final_span is not None else ""
        print(
            f"perplexity {ppl_before:.3f} -> {ppl_after:.3f} on {eval_tokens} held-out tokens after {result.steps} "
            f"steps on {num_processes} process(es){span}; {result.wall_time_s:.1f} s"
            + (f"; saved to {output}" if output is not None else "")
        )
    return result


# --------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="hybrid-hf finetune",
        description="Fine-tune a hybrid (or host, converted on the fly) causal LM on text files with Trainer and "
        "save a Hub-ready folder.",
    )
    parser.add_argument("model", metavar="MODEL", help="folder or hub id of a hybrid or supported host causal LM")
    parser.add_argument("output", metavar="OUTPUT", help="folder to write (refused if it exists, unless --force)")
    parser.add_argument("--data", nargs="+", required=True, metavar="FILE", help="training text files (UTF-8)")
    parser.add_argument("--eval-data", nargs="+", default=[], metavar="FILE",
                        help="held-out text files for perplexity (default: the last 10%% of the training text)")
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters + the hybrid modules, merged at the end")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default 8; alpha = 2 r)")
    parser.add_argument("--steps", type=int, default=50, help="training steps (default 50)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per training block (default 256)")
    parser.add_argument("--batch-size", type=int, default=4, help="blocks per step and process (default 4)")
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4)")
    parser.add_argument("--span-loss-coef", type=float, default=None,
                        help="weight of the span penalty mean(span)/max_span (default: the model's, 0 when converting)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    parser.add_argument("--logging-steps", type=int, default=None, help="log every N steps (default: steps / 10)")
    parser.add_argument("--report-to", default="none", help="Trainer integrations, e.g. tensorboard (default none)")
    parser.add_argument("--cpu", action="store_true", help="train on CPU even when an accelerator is available")
    conversion = parser.add_argument_group("conversion settings (host models only)")
    conversion.add_argument("--max-span", type=int, default=None, help="longest local span in tokens")
    conversion.add_argument("--ramp", type=int, default=None, help="soft edge of the span mask in tokens")
    conversion.add_argument("--tau-min", type=float, default=None, help="temperature at the shortest span")
    conversion.add_argument("--tau-max", type=float, default=None, help="temperature at the longest span")
    conversion.add_argument("--initial-span", type=float, default=None, help="initial span as a fraction of max-span")
    conversion.add_argument("--local-projections", choices=("shared", "separate"), default=None,
                            help="local branch reuses the host's q/k/v/o (shared) or gets copies (separate)")
    conversion.add_argument("--hybrid-layers", default=None, metavar="I,J,...",
                            help="comma-separated layer indices to make hybrid (default: all)")
    conversion.add_argument("--shared-span", action="store_true", help="one span per token shared by its heads")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.seq_len < 2:
        raise UsageError(f"--seq-len must be at least 2, got {args.seq_len}")
    for flag in ("steps", "batch_size", "lora_r"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.logging_steps is not None and args.logging_steps < 1:
        raise UsageError(f"--logging-steps must be at least 1, got {args.logging_steps}")
    hybrid_layers = None
    if args.hybrid_layers is not None:
        try:
            hybrid_layers = [int(item) for item in args.hybrid_layers.split(",") if item.strip()]
        except ValueError:
            raise UsageError(f"--hybrid-layers must be comma-separated integers, got {args.hybrid_layers!r}") from None
    settings = {
        "max_span": args.max_span,
        "ramp": args.ramp,
        "tau_min": args.tau_min,
        "tau_max": args.tau_max,
        "initial_span": args.initial_span,
        "local_projections": args.local_projections,
        "hybrid_layers": hybrid_layers,
        "span_per_head": False if args.shared_span else None,
    }
    finetune(
        args.model,
        args.output,
        data_files=args.data,
        eval_files=args.eval_data,
        lora=args.lora,
        lora_r=args.lora_r,
        steps=args.steps,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        lr=args.lr,
        span_loss_coef=args.span_loss_coef,
        settings=settings,
        seed=args.seed,
        force=args.force,
        logging_steps=args.logging_steps,
        report_to=args.report_to,
        use_cpu=True if args.cpu else None,
    )
    return 0


if __name__ == "__main__":
    from .cli import run

    sys.exit(run(main))
