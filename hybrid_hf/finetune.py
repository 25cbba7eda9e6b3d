"""`hybrid-hf finetune`: fine-tune a hybrid causal LM on text files with `transformers.Trainer`, optionally with LoRA.

    hybrid-hf finetune MODEL OUTPUT --data FILE [FILE ...] [--eval-data FILE ...] [--lora] [--lora-r 8]
                       [--steps 50] [--seq-len 256] [--batch-size 4] [--lr 1e-4] [--span-loss-coef X]
                       [--max-span N --ramp N ...] [--seed 0] [--force] [--save-steps N] [--resume]
                       [--trust-remote-code] [--allow-pickle]

MODEL is a folder or Hub id of a hybrid model or of a supported host causal LM (Llama, Mistral, Qwen2/3, GPT-2),
converted with `hybrid_hf.convert` and the settings given by the flags. No code shipped with MODEL runs (the hybrid
classes are registered by importing `hybrid_hf`) unless `--trust-remote-code`; pickled weights load only with
`--allow-pickle`. The
text files are tokenised, concatenated and cut into blocks of `--seq-len` tokens (`training.text_dataset`); the
`--eval-data` files, or else the last 10% of the text, are held out to measure perplexity (LM loss only) before and
after. Training is `Trainer` with its progress bar and `SpanLoggingCallback` (spans and temperatures per layer in
every log). With `--lora`, LoRA adapters go on the host family's projections and the hybrid modules are trained in
full (`training.lora_config`); they are merged (`merge_and_unload`) before saving, so OUTPUT is a plain hybrid
model. OUTPUT is a Hub-ready folder: safetensors weights, `config.json` with `auto_map`, the modeling code, the
tokenizer and a model card (README.md). It is written to a temporary folder beside OUTPUT and renamed into place;
an existing OUTPUT is refused unless `--force` (and a folder that is not a model folder even then). With
`--save-steps N` the Trainer writes a checkpoint every N steps into `OUTPUT.checkpoints`; after a crash or a kill
the same command with `--resume` continues from the last one, to the same final weights. A NaN or infinite loss
stops the run with the step and the loss. In Python, `finetune(...)` does the same and returns a
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
import contextlib
import hashlib
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from .checkpoint import layer_list, write_atomically
from .cli import ArgumentParser, first_line

#: hybrid settings that only apply when converting a host model
CONVERSION_SETTINGS = ("max_span", "ramp", "tau_min", "tau_max", "span_per_head",
                       "hybrid_layers", "initial_span")
#: every hybrid setting shown in the model card
SETTING_NAMES = CONVERSION_SETTINGS + ("span_loss_coef",)
#: the Trainer checkpoints of OUTPUT (`--save-steps`) go into the folder OUTPUT + this suffix, beside it
CHECKPOINTS_SUFFIX = ".checkpoints"
#: the arguments of the run that wrote the checkpoints, in that folder (a resumed run must match them)
RUN_FILE = "finetune_run.json"


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
    sharding: str | None = None  # "FSDP2" when the model was sharded across the processes
    model: Any = field(default=None, repr=False, compare=False)  # the trained (merged; under FSDP sharded) model

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


def prepare_model(model, settings: dict[str, Any], span_loss_coef: float | None = None, hybrid: bool = True,
                  what: str = "the model"):
    """The model to train from a loaded one: a host model is converted (`hybrid=True`) or kept as is (`hybrid=False`,
    a baseline); a hybrid model is kept, with `span_loss_coef` set. Returns (model, converted).

    Raises `ValueError` for conversion `settings` given with a hybrid model, or any hybrid setting with `hybrid=False`.
    """
    from .configuration_hybrid import HYBRID_PREFIX
    from .conversion import convert

    is_hybrid = model.config.model_type.startswith(HYBRID_PREFIX)
    _check_span_loss_coef(span_loss_coef)
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


def _check_span_loss_coef(value: float | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf):
        raise ValueError(f"span-loss-coef must be a finite number >= 0, got {value!r}")


def load_model(name: str, settings: dict[str, Any], span_loss_coef: float | None = None, dtype=torch.float32,
               hybrid: bool = True, seq_len: int | None = None, trust_remote_code: bool = False,
               allow_pickle: bool = False):
    """Load MODEL (folder or Hub id) and its tokenizer and `prepare_model` it. Returns (model, tokenizer, converted).

    The hybrid classes are registered by importing `hybrid_hf`, so no code shipped with MODEL runs unless
    `trust_remote_code`; pickled weights load only with `allow_pickle`. Bad settings, a `seq_len` beyond the model's
    positions and a bad config are refused before the weights are loaded; damaged weights get one-line errors
    (`checkpoint.load_weights`).
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .architectures import is_encoder, model_classes
    from .checkpoint import load_source_config, load_weights, source_location
    from .configuration_hybrid import HYBRID_PREFIX
    from .conversion import check_host_class, hybrid_config_from

    config = load_source_config(name, trust_remote_code)
    classes = model_classes(config.model_type)  # ValueError for types transformers does not know
    if "causal_lm" not in classes or is_encoder(config):
        raise ValueError(f"finetune trains causal LMs; {config.model_type!r} models are encoders")
    if hybrid and not config.model_type.startswith(HYBRID_PREFIX):
        check_host_class(getattr(transformers, classes["causal_lm"]))  # UnsupportedHostError saying why
    # Bad settings raise here, before any weight is loaded.
    if config.model_type.startswith(HYBRID_PREFIX) and (settings or not hybrid):
        prepare_model(SimpleNamespace(config=config), settings, span_loss_coef, hybrid, name)
    elif hybrid and not config.model_type.startswith(HYBRID_PREFIX):
        hybrid_config_from(config, **settings)
    _check_positions(config, seq_len)
    source = source_location(name)
    model = load_weights(AutoModelForCausalLM, source, name, allow_pickle, dtype=dtype, trust_remote_code=trust_remote_code)
    model, converted = prepare_model(model, settings, span_loss_coef, hybrid, name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"could not load the tokenizer of {name} ({first_line(error)})") from None
    return model, tokenizer, converted


def _default_use_cpu() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return not accelerator.is_available()
    return not torch.cuda.is_available()


#: smallest value of the integer arguments of `finetune` (None: the argument may be None)
_INTEGER_ARGUMENTS = {"steps": 1, "seq_len": 2, "batch_size": 1, "lora_r": 1, "seed": 0}
_OPTIONAL_INTEGER_ARGUMENTS = {"lora_alpha": 1, "logging_steps": 1, "save_steps": 1}


def check_arguments(**values: Any) -> None:
    """One-line `ValueError`s naming the argument (as its command-line flag) for the numbers `finetune` takes:
    `steps`, `seq_len`, `batch_size`, `lora_r`, `seed`, `lora_alpha`, `logging_steps`, `save_steps` (integers),
    `lr`, `eval_fraction`, `span_loss_coef`; check those given."""
    for name, value in values.items():
        flag = name.replace("_", "-")
        low = _INTEGER_ARGUMENTS.get(name, _OPTIONAL_INTEGER_ARGUMENTS.get(name))
        if name == "span_loss_coef":
            _check_span_loss_coef(value)
        elif low is not None:
            if value is None and name in _OPTIONAL_INTEGER_ARGUMENTS:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value < 2**32:
                raise ValueError(f"{flag} must be an integer >= {low}, got {value!r}")
        elif name in ("lr", "eval_fraction"):
            high = math.inf if name == "lr" else 1
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < high:
                accepted = "a positive finite number" if name == "lr" else "in (0, 1)"
                raise ValueError(f"{flag} must be {accepted}, got {value!r}")
        else:
            raise TypeError(f"unknown argument {name!r}")


def _last_checkpoint(folder: Path) -> Path | None:
    """The complete Trainer checkpoint of the highest step in `folder` (one being written when the run was killed
    has no `trainer_state.json` yet: the Trainer writes it last)."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    steps = []
    for path in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if folder.is_dir() else []:
        step = path.name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-")
        if step.isdigit() and (path / "trainer_state.json").is_file():
            steps.append((int(step), path))
    return max(steps)[1] if steps else None


def _resume_point(checkpoints: Path, run: dict[str, Any], resume: bool) -> Path | None:
    """The checkpoint to resume from (`resume`), after checking it was written by the same run; refuses to start
    over on top of the checkpoints of an interrupted run (`resume=False`)."""
    last = _last_checkpoint(checkpoints)
    if not resume:
        if last is not None:
            raise FileExistsError(
                f"{checkpoints} holds the checkpoints of an interrupted run (last: {last.name}); pass --resume to "
                "continue it, or remove that folder to start over"
            )
        return None
    if last is None:
        raise FileNotFoundError(f"nothing to resume: no complete checkpoint in {checkpoints} (written with --save-steps)")
    try:
        before = json.loads((checkpoints / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ValueError(f"cannot resume from {checkpoints}: its {RUN_FILE} is missing or unreadable") from None
    changed = [f"{key} {before.get(key)!r} then, {value!r} now" for key, value in run.items() if before.get(key) != value]
    if changed:
        raise ValueError(
            f"cannot resume from {checkpoints}: it was written with other arguments ({'; '.join(changed)}); "
            "rerun with the same ones, or remove that folder to start over"
        )
    return last


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
    save_steps: int | None = None,
    resume: bool = False,
    report_to: str | list[str] = "none",
    use_cpu: bool | None = None,
    ddp_find_unused_parameters: bool = False,
    base_model: str | None = None,
    base_model_note: str | None = None,
    hybrid: bool = True,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    quiet: bool = False,
) -> FinetuneResult:
    """Fine-tune a hybrid causal LM with `Trainer` and save it, Hub-ready, to `output` (see the module docstring).

    Args:
        model: folder or Hub id of a hybrid or host causal LM, or a loaded (hybrid or host) model with `tokenizer`
            (a loaded host model is converted and left untouched; a loaded hybrid model is trained in place).
        output: the folder to write; refused if it exists, unless `force` (and even then if it is not a model
            folder); None: save nothing (the trained model is `result.model`).
        data_files, texts: training text (files, or strings); `eval_files`, `eval_texts`: held-out text (default:
            the last `eval_fraction` of the training text).
        tokenizer: required when `model` is a loaded model.
        lora, lora_r, lora_alpha: train LoRA adapters (rank, alpha = 2 r by default) + the hybrid modules; merged
            before saving.
        steps, seq_len, batch_size, lr, seed: `max_steps`, block length, per-process batch, learning rate, seed.
        span_loss_coef: the span penalty weight (kept in the saved config); None keeps the model's.
        settings: hybrid settings for converting a host model (`max_span`, `ramp`...); refused for hybrid models.
        logging_steps: Trainer log interval (default: steps // 10); report_to: Trainer integrations.
        save_steps: write a Trainer checkpoint every `save_steps` steps into the folder `OUTPUT.checkpoints` beside
            `output` (the last one is kept; the folder is removed once `output` is written).
        resume: continue from the last checkpoint there (after a crash or a kill) with the same arguments; the
            final weights equal those of an uninterrupted run.
        use_cpu: train on CPU (default: when no accelerator is available; needed for gloo under a launcher).
        ddp_find_unused_parameters: see the module docstring.
        base_model: the model card's base model, a Hub id or a local folder (default: `model` when it is a name);
            base_model_note: how the weights came from it, for the card.
        hybrid: False trains a host model as it is, without converting it (a baseline with the same data, budget
            and LoRA targets); saved without a hybrid model card.
        trust_remote_code: let a model folder's `auto_map` run the code it ships (never needed for hybrid models).
        allow_pickle: load pickled `pytorch_model.bin` weights when a folder has no safetensors.
        quiet: no summary printed.

    Raises:
        ValueError, OSError: bad input (one-line messages); ValueError also when the loss becomes NaN or infinite
            (the step, the loss and the likely cause are named; nothing is written).
    """
    from accelerate import PartialState
    from transformers import PreTrainedModel, Trainer, TrainingArguments, default_data_collator, set_seed

    from .checkpoint import check_output, output_lock
    from .distributed import gathered_state_dict, shard_on_cpu, sharding, unsharded_copy
    from .training import StopOnNonFiniteLoss, add_span_logging, get_lora_model, perplexity, text_dataset

    started = time.perf_counter()
    settings = {key: value for key, value in (settings or {}).items() if value is not None}
    check_arguments(
        steps=steps, seq_len=seq_len, batch_size=batch_size, lora_r=lora_r, lora_alpha=lora_alpha,
        logging_steps=logging_steps, save_steps=save_steps, seed=seed, lr=lr, eval_fraction=eval_fraction,
        span_loss_coef=span_loss_coef,
    )  # fmt: skip
    output = Path(output).expanduser().absolute() if output is not None else None
    if output is None and (save_steps is not None or resume):
        raise ValueError("save-steps and resume need an output folder (the checkpoints are kept beside it)")
    if output is not None:
        check_output(output, force)

    train_texts = list(texts or []) + _read_texts(data_files, "data")
    held_out = list(eval_texts or []) + _read_texts(eval_files, "eval data")
    if not any(text.strip() for text in train_texts):
        raise ValueError("the training data is empty (no text)" if train_texts or data_files else "no training data given")
    if (eval_files or eval_texts) and not any(text.strip() for text in held_out):
        raise ValueError("the eval data is empty (no text)")
    # What a resumed run must share with the interrupted one for the same result.
    run = {
        "model": str(model) if not isinstance(model, PreTrainedModel) else model.config._name_or_path,
        "text_sha256": hashlib.sha256("\0".join(train_texts + ["\1"] + held_out).encode()).hexdigest(),
        "steps": steps, "seq_len": seq_len, "batch_size": batch_size, "lr": lr, "seed": seed, "lora": lora,
        "lora_r": lora_r, "lora_alpha": lora_alpha, "span_loss_coef": span_loss_coef, "settings": settings,
        "hybrid": hybrid, "eval_fraction": eval_fraction,
    }  # fmt: skip
    checkpoints = output.with_name(f"{output.name}{CHECKPOINTS_SUFFIX}") if output is not None else None
    resume_from = _resume_point(checkpoints, run, resume) if checkpoints is not None else None
    if resume_from is not None and save_steps is None:
        save_steps = json.loads((checkpoints / RUN_FILE).read_text(encoding="utf-8")).get("save_steps")

    use_cpu = _default_use_cpu() if use_cpu is None else use_cpu
    state = PartialState(cpu=use_cpu)
    # Under `accelerate launch` with FSDP on the CPU: shard there too (the Trainer then keeps that state).
    configured = use_cpu and shard_on_cpu()
    with contextlib.ExitStack() as stack:
        if output is not None and state.is_main_process:
            stack.enter_context(output_lock(output))  # a busy or unwritable output fails here, before loading
            check_output(output, force)  # again: another run may have written it meanwhile
        set_seed(seed)
        with state.main_process_first():  # one process fills the caches (remote code, hub files) at a time
            if isinstance(model, PreTrainedModel):
                if tokenizer is None:
                    raise ValueError("a loaded model needs its tokenizer")
                base_model = base_model or model.config._name_or_path or None
                model, converted = prepare_model(model, settings, span_loss_coef, hybrid)
            else:
                name = str(model)
                model, tokenizer, converted = load_model(
                    name, settings, span_loss_coef, hybrid=hybrid, seq_len=seq_len,
                    trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                )  # fmt: skip
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

        if save_steps is not None:
            trainer_dir = checkpoints
            if state.is_main_process:
                checkpoints.mkdir(exist_ok=True)
                (checkpoints / RUN_FILE).write_text(json.dumps({**run, "save_steps": save_steps}, indent=1) + "\n")
        else:
            trainer_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hybrid-hf-trainer-")))
        args = TrainingArguments(
            output_dir=str(trainer_dir),
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=1,
            learning_rate=lr,
            logging_steps=logging_steps or max(1, steps // 10),
            logging_nan_inf_filter=False,  # a NaN loss is shown as NaN
            save_strategy="steps" if save_steps is not None else "no",
            save_steps=save_steps or 500,
            save_total_limit=1,
            eval_strategy="no",
            report_to=report_to,
            seed=seed,
            data_seed=seed,
            use_cpu=use_cpu,
            ddp_find_unused_parameters=ddp_find_unused_parameters,
            average_tokens_across_devices=False,
            remove_unused_columns=False,
            dataloader_num_workers=0,
            accelerator_config={"use_configured_state": True} if configured else None,
        )
        trainer = Trainer(model=model, args=args, train_dataset=train_dataset, data_collator=default_data_collator)
        add_span_logging(trainer)
        guard = StopOnNonFiniteLoss()
        trainer.add_callback(guard)
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
        if guard.step is not None:
            raise ValueError(
                f"training diverged at step {guard.step}: the loss is {guard.loss}; the learning rate (lr {lr:g}) "
                "is likely too high, try a lower one; nothing was written"
            )
        trained = trainer.model
        if lora and sharding(trainer) is None:  # sharded adapters are merged in the unsharded copy that is saved
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
            sharding=sharding(trainer),
            model=trained,
        )

        to_save = trained
        if output is not None and result.sharding is not None:  # every process takes part in gathering the weights
            state_dict = gathered_state_dict(trainer, trained)
            to_save = unsharded_copy(trained, state_dict) if trainer.is_world_process_zero() else None
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
                    "processes": num_processes if result.sharding is None else f"{num_processes} ({result.sharding})",
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
            write_atomically(output, to_save, tokenizer, force=force, card=card)
            shutil.rmtree(checkpoints, ignore_errors=True)  # the run is complete: nothing left to resume
        state.wait_for_everyone()
    result.wall_time_s = time.perf_counter() - started
    if not quiet and state.is_main_process:
        span = f", mean span {result.final_span:.2f} tokens" if result.final_span is not None else ""
        print(
            f"perplexity {ppl_before:.3f} -> {ppl_after:.3f} on {eval_tokens} held-out tokens after {result.steps} "
            f"steps on {num_processes} process(es){f' ({result.sharding})' if result.sharding else ''}{span}; "
            f"{result.wall_time_s:.1f} s"
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
    parser.add_argument("--save-steps", type=int, default=None, metavar="N",
                        help=f"write a checkpoint every N steps into OUTPUT{CHECKPOINTS_SUFFIX} (removed at the end)")
    parser.add_argument("--resume", action="store_true",
                        help=f"continue an interrupted run from its last checkpoint in OUTPUT{CHECKPOINTS_SUFFIX} "
                        "(same arguments)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the modeling code a model folder ships (auto_map); never needed for hybrid models")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="load pickled pytorch_model.bin weights (they can run code) when there are no safetensors")
    conversion = parser.add_argument_group("conversion settings (host models only)")
    conversion.add_argument("--max-span", type=int, default=None, help="longest local span in tokens")
    conversion.add_argument("--ramp", type=int, default=None, help="soft edge of the span mask in tokens")
    conversion.add_argument("--tau-min", type=float, default=None, help="temperature at the shortest span")
    conversion.add_argument("--tau-max", type=float, default=None, help="temperature at the longest span")
    conversion.add_argument("--initial-span", type=float, default=None, help="initial span as a fraction of max-span")
    conversion.add_argument("--hybrid-layers", type=layer_list, default=None, metavar="I,J,...",
                            help="comma-separated layer indices to make hybrid (default: all)")
    conversion.add_argument("--shared-span", action="store_true", help="one span per token shared by its heads")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    settings = {
        "max_span": args.max_span,
        "ramp": args.ramp,
        "tau_min": args.tau_min,
        "tau_max": args.tau_max,
        "initial_span": args.initial_span,
        "hybrid_layers": args.hybrid_layers,
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
        save_steps=args.save_steps,
        resume=args.resume,
        report_to=args.report_to,
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
        use_cpu=True if args.cpu else None,
    )
    return 0


if __name__ == "__main__":
    from .cli import run

    sys.exit(run(main))
