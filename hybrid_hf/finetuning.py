"""Fine-tune a hybrid causal LM on text with `transformers.Trainer`, optionally with LoRA: `finetune(...)`.

The model is a folder or Hub id of a hybrid model or of a host causal LM (converted with the given settings), or a
loaded model. The texts are tokenised, concatenated and cut into blocks of `seq_len` tokens (`data.text_dataset`);
held-out text (or else the last 10% of the text) measures perplexity (LM loss only) before and after. Training logs
the spans and temperatures per layer (`callbacks.SpanLoggingCallback`). With `lora=True`, LoRA adapters go on the
attention projections and the mix, the span predictor is trained in full (`lora.lora_config`), and the adapters
are merged before saving, so the output is a plain hybrid model: a Hub-ready folder (safetensors, `config.json`
with `auto_map`, the modeling code, the tokenizer and a model card), written atomically (`publishing`). With
`save_steps` the Trainer writes checkpoints into `OUTPUT.checkpoints`, and `resume=True` continues from the last
one to the same final weights. A NaN or infinite loss stops the run with the step and the loss.

Several processes (data parallel, DDP) are started by a launcher (`accelerate launch`, `torchrun`); the Trainer
does the distribution and only the main process writes the output. The DDP settings:

- `ddp_find_unused_parameters=False`. Every trainable parameter is reached in every forward: the local branch and
  the span predictor are always computed (while `mix = [0 | I]` their gradients are zero, but they exist, and DDP
  only cares whether a parameter is in the graph); layers left out by `hybrid_layers` have no new parameters; with
  LoRA the frozen host weights and the frozen originals of `modules_to_save` do not require gradients. `True`
  would cost a graph traversal per step for nothing. (A custom setup that does leave a parameter out of the graph
  fails loudly at the second step; `finetune(..., ddp_find_unused_parameters=True)` is the escape hatch.)
- `average_tokens_across_devices=False`: with token averaging the Trainer multiplies the model's loss by the
  number of processes, which is right for a token-summed LM loss but would multiply the span penalty, a per-batch
  mean added to it, by the number of processes. Without it each process's loss is its batch's LM mean + span loss,
  and DDP averages them. Gradient accumulation is right: the Trainer passes the token count of the accumulated
  batch, and the model weighs each micro-batch's span penalty by its share of those tokens.

Every other Trainer setting comes from `TrainingArguments` (`training_args`; on the command line all of its flags,
through `HfArgumentParser`, or a YAML/JSON file): `HybridTrainingArguments` holds this command's defaults.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import transformers
from transformers import PreTrainedModel, TrainingArguments

from .callbacks import StopOnNonFiniteLoss, add_span_logging
from .conversion import check_host_class, convert
from .data import chat_dataset, perplexity, read_records, split_tail, text_dataset
from .errors import UsageError, first_line
from .loading import load_model as load_source
from .loading import load_source_config
from .lora import get_lora_model
from .model.configuration_hybrid import HYBRID_PREFIX
from .publishing import check_output, output_lock, save_model
from .resuming import (
    CHECKPOINTS_SUFFIX,
    RUN_FILE,
    checkpoint_write_errors,
    first_non_finite,
    path_or_name,
    resume_point,
)
from .settings import SETTINGS, UPPER_BOUNDS, check_settings, flag
from .tasks import is_encoder, model_classes


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


def prepare_model(
    model, settings: dict[str, Any], span_loss_coef: float | None = None, hybrid: bool = True, what: str = "the model"
):
    """The model to train from a loaded one: a host model is converted (`hybrid=True`) or kept as is (`hybrid=False`,
    a baseline); a hybrid model is kept, with `span_loss_coef` set. Returns (model, converted).

    Raises `UsageError` for conversion `settings` given with a hybrid model, or any hybrid setting with `hybrid=False`.
    """
    is_hybrid = model.config.model_type.startswith(HYBRID_PREFIX)
    _check_span_loss_coef(span_loss_coef)
    if not hybrid:
        if is_hybrid:
            raise UsageError(f"{what} is already hybrid; hybrid=False trains a host model as it is")
        if settings or span_loss_coef is not None:
            raise UsageError("hybrid settings and span-loss-coef need hybrid=True (a converted model)")
        return model, False
    if not is_hybrid:
        check_settings(settings, model.config)
        coef = {} if span_loss_coef is None else {"span_loss_coef": float(span_loss_coef)}
        return convert(model, **settings, **coef), True
    if settings:
        flags = ", ".join(flag(key) for key in settings)
        raise UsageError(f"{what} is already hybrid; {flags} only apply when converting a host model")
    if span_loss_coef is not None:
        model.config.span_loss_coef = float(span_loss_coef)
    return model, False


def _check_positions(config, seq_len: int | None) -> None:
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if seq_len is not None and positions and seq_len > positions:
        raise UsageError(f"seq-len {seq_len} exceeds the model's maximum of {positions} positions")


def _check_finite(model, name: str | None) -> None:
    """Refuse a model whose weights hold NaN or inf before it is trained (training would report the NaN loss as a
    divergence)."""
    found = first_non_finite(dict(model.named_parameters()))
    if found is not None:
        raise UsageError(
            f"the weights of {name or 'the model'} hold NaN or infinite values ({found}) before training; "
            "a model with non-finite weights cannot be trained"
        )


def _check_span_loss_coef(value: float | None) -> None:
    bound = UPPER_BOUNDS["span_loss_coef"]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if value is not None and not (number and 0 <= value <= bound):
        raise UsageError(f"span-loss-coef must be a finite number >= 0 (at most {bound:g}), got {value!r}")


def load_model(
    name: str,
    settings: dict[str, Any],
    span_loss_coef: float | None = None,
    dtype=torch.float32,
    hybrid: bool = True,
    seq_len: int | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
):
    """Load MODEL (folder or Hub id) and its tokenizer (`loading.load_model`) and `prepare_model` it. Returns
    (model, tokenizer, converted). Bad settings, a `seq_len` beyond the model's positions and a bad config are
    refused before the weights are loaded."""
    config = load_source_config(name, trust_remote_code)
    classes = model_classes(config.model_type)
    if "causal_lm" not in classes or is_encoder(config):
        raise UsageError(f"finetune trains causal LMs; {config.model_type!r} models are encoders")
    is_hybrid = config.model_type.startswith(HYBRID_PREFIX)
    if hybrid and not is_hybrid:
        check_host_class(getattr(transformers, classes["causal_lm"]))  # UnsupportedHostError saying why
        check_settings(settings, config)
    elif settings or not hybrid:
        prepare_model(SimpleNamespace(config=config), settings, span_loss_coef, hybrid, name)
    _check_positions(config, seq_len)
    model, tokenizer = load_source(
        name, "causal_lm", config=config, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
    )
    model, converted = prepare_model(model, settings, span_loss_coef, hybrid, name)
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
                raise UsageError(f"{flag} must be an integer >= {low}, got {value!r}")
        elif name in ("lr", "eval_fraction"):
            high = math.inf if name == "lr" else 1
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < high:
                accepted = "a positive finite number" if name == "lr" else "in (0, 1)"
                raise UsageError(f"{flag} must be {accepted}, got {value!r}")
        else:
            raise TypeError(f"unknown argument {name!r}")


@dataclass
class FinetuneArguments:
    """How `finetune` trains and saves: the arguments of a run, passed as this dataclass or as its fields by keyword.

    Attributes:
        model_name_or_path: the model, when `finetune` is not given one.
        train_file, texts: training data (files, or strings); `validation_file`, `eval_texts`: held-out data
            (default: the last `eval_fraction` of the training data). A file is plain text (one text), JSON Lines /
            JSON, CSV or Parquet, or a folder written by `save_to_disk` (`data.read_records`); `data_files` and
            `eval_files` are accepted by `finetune` as the former names of `train_file` and `validation_file`.
        text_column: the column of the texts in tabular files (default `text`); a file without it may hold
            conversations in a `messages` column, rendered with the tokenizer's chat template, the loss on the
            assistant turns only (`data.chat_dataset`). Texts are packed into blocks of `seq_len` tokens.
        train_split, validation_split: the splits taken from a saved `DatasetDict` folder.
        tokenizer: required when the model is a loaded model.
        lora, lora_r, lora_alpha: train LoRA adapters (rank, alpha = 2 r by default) + the hybrid modules; merged
            before saving.
        steps, seq_len, batch_size, lr, seed: `max_steps`, block length, per-process batch, learning rate, seed.
        span_loss_coef: the span penalty weight (kept in the saved config); None keeps the model's.
        settings: hybrid settings for converting a host model (`max_span`, `ramp`...); refused for hybrid models.
        force: replace an existing output (only a model folder).
        logging_steps: Trainer log interval (default: steps // 10); report_to: Trainer integrations.
        save_steps: write a Trainer checkpoint every `save_steps` steps into the folder `OUTPUT.checkpoints` beside
            the output (the last one is kept; the folder is removed once the output is written).
        resume: continue from the last checkpoint there (after a crash or a kill) with the same arguments; the
            final weights equal those of an uninterrupted run.
        use_cpu: train on CPU (default: when no accelerator is available; needed for gloo under a launcher).
        ddp_find_unused_parameters: see the module docstring.
        base_model: the model card's base model, a Hub id or a local folder (default: the model when it is a name);
            base_model_note: how the weights came from it, for the card.
        hybrid: False trains a host model as it is, without converting it (a baseline with the same data, budget
            and LoRA targets); saved without a hybrid model card.
        trust_remote_code: let a model folder's `auto_map` run the code it ships (never needed for hybrid models).
        allow_pickle: load pickled `pytorch_model.bin` weights when a folder has no safetensors.
        quiet: no summary printed.
        distill_from: a teacher causal LM (folder, Hub id or loaded model; usually the host the model was converted
            from): the loss adds `distill_weight * KL(teacher || model)` of the next-token distributions
            (`distillation.DistillationTrainer`), a recovery fine-tune that keeps the teacher's predictions on
            other text while local-only layers adapt.
        distill_weight: weight of that KL term (> 0).
    """

    model_name_or_path: str | None = None
    train_file: list[str] = field(default_factory=list)
    validation_file: list[str] = field(default_factory=list)
    text_column: str = "text"
    train_split: str = "train"
    validation_split: str = "validation"
    texts: list[str] | None = None
    eval_texts: list[str] | None = None
    tokenizer: Any = None
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int | None = None
    steps: int = 50
    seq_len: int = 256
    batch_size: int = 4
    lr: float = 1e-4
    span_loss_coef: float | None = None
    settings: dict[str, Any] | None = None
    seed: int = 0
    force: bool = False
    eval_fraction: float = 0.1
    logging_steps: int | None = None
    save_steps: int | None = None
    resume: bool = False
    report_to: str | list[str] = "none"
    use_cpu: bool | None = None
    ddp_find_unused_parameters: bool = False
    base_model: str | None = None
    base_model_note: str | None = None
    hybrid: bool = True
    trust_remote_code: bool = False
    allow_pickle: bool = False
    quiet: bool = False
    distill_from: str | PreTrainedModel | None = None
    distill_weight: float = 1.0


def _steps_value(name: str, value: float | None) -> float | None:
    """`logging_steps` / `save_steps`: None, a whole number >= 1 (as an int) or a fraction of the steps in (0, 1)."""
    if value is None or (isinstance(value, float) and 0 < value < 1):
        return value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    check_arguments(**{name: value})
    return value


@dataclass
class HybridTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the defaults of `hybrid-hf finetune` (every other field is transformers'), for the
    command line (`HfArgumentParser`) and for `finetune(..., training_args=...)`.

    The fields below differ from transformers' defaults, each for the reason its help gives. The former flags
    `--steps`, `--batch-size`, `--lr` and `--cpu` are aliases of `--max_steps`, `--per_device_train_batch_size`,
    `--learning_rate` and `--use_cpu`.
    """

    output_dir: str | None = field(
        default=None,
        metadata={"help": "the folder of the fine-tuned model (or OUTPUT); unlike transformers' it holds the final "
                  "model only: the checkpoints go to OUTPUT.checkpoints"},
    )  # fmt: skip
    max_steps: int = field(
        default=50,
        metadata={"help": "training steps (transformers: -1, by epochs; runs here are counted in steps, as by the "
                  "former --steps; -1 trains --num_train_epochs epochs)", "aliases": ["--steps"]},
    )  # fmt: skip
    per_device_train_batch_size: int = field(
        default=4,
        metadata={"help": "blocks per step and process (transformers: 8; 4 as the former --batch-size)",
                  "aliases": ["--batch-size"]},
    )  # fmt: skip
    learning_rate: float = field(
        default=1e-4,
        metadata={"help": "learning rate (transformers: 5e-5; 1e-4 as the former --lr)", "aliases": ["--lr"]},
    )  # fmt: skip
    warmup_steps: float = field(
        default=0,
        metadata={"help": "warm-up steps, or below 1 the warm-up's share of the steps (as transformers'); "
                  "--warmup_ratio, the name transformers 4 and its example scripts use for the share, is an alias",
                  "aliases": ["--warmup_ratio"]},
    )  # fmt: skip
    seed: int = field(default=0, metadata={"help": "random seed (transformers: 42; 0 as before, so runs repeat)"})
    logging_steps: float | None = field(
        default=None,
        metadata={"help": "log every N steps (transformers: 500; here max_steps // 10, at least 1, for short runs; "
                  "10 by epochs)"},
    )
    logging_nan_inf_filter: bool = field(
        default=False, metadata={"help": "transformers: True; here a NaN or infinite loss is logged and stops the run"}
    )
    save_strategy: str = field(
        default="no",
        metadata={"help": "transformers: 'steps' (every 500); here 'no' unless --save_steps is given: checkpoints of "
                  "whole models cost disk"},
    )  # fmt: skip
    save_steps: float | None = field(
        default=None,
        metadata={"help": "write a checkpoint every N steps into OUTPUT.checkpoints (removed once OUTPUT is written)"},
    )
    use_cpu: bool = field(
        default=False,
        metadata={"help": "train on CPU (transformers: only when asked; here also when no accelerator is available, "
                  "so that --bf16 works there and launched processes form a gloo group)", "aliases": ["--cpu"]},
    )  # fmt: skip
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={"help": "transformers: None (True under DDP); here False: every trainable parameter is reached in "
                  "every forward, and the search costs a graph traversal a step"},
    )  # fmt: skip

    def __post_init__(self):
        by_epochs = self.max_steps == BY_EPOCHS
        check_arguments(steps=1 if by_epochs else self.max_steps, batch_size=self.per_device_train_batch_size,
                        lr=self.learning_rate, seed=self.seed)  # fmt: skip
        self.logging_steps = _steps_value("logging_steps", self.logging_steps)
        self.save_steps = _steps_value("save_steps", self.save_steps)
        if self.logging_steps is None:
            self.logging_steps = EPOCH_LOGGING_STEPS if by_epochs else max(1, self.max_steps // 10)
        if self.save_steps is None:
            self.save_steps = 500  # unused: save_strategy stays "no"
        elif self.save_strategy == "no":
            self.save_strategy = "steps"
        self.use_cpu = self.use_cpu or _default_use_cpu()
        output_dir = self.output_dir
        super().__post_init__()
        self.output_dir = output_dir  # None stays None (TrainingArguments would make it "trainer_output")


#: `max_steps` (and `FinetuneArguments.steps`) that trains `num_train_epochs` epochs, as in `TrainingArguments`
BY_EPOCHS = -1
#: the default log interval of a run by epochs
EPOCH_LOGGING_STEPS = 10

#: `FinetuneArguments` field -> the `TrainingArguments` field it mirrors (taken from `training_args` when given)
TRAINER_FIELDS = {
    "steps": "max_steps",
    "batch_size": "per_device_train_batch_size",
    "lr": "learning_rate",
    "seed": "seed",
    "logging_steps": "logging_steps",
    "save_steps": "save_steps",
    "report_to": "report_to",
    "use_cpu": "use_cpu",
    "ddp_find_unused_parameters": "ddp_find_unused_parameters",
}


def _from_training_args(training_args: TrainingArguments) -> dict[str, Any]:
    """The `FinetuneArguments` fields that `training_args` sets (`TRAINER_FIELDS`)."""
    values = {ours: getattr(training_args, theirs) for ours, theirs in TRAINER_FIELDS.items()}
    for name in ("logging_steps", "save_steps"):
        value = values[name]
        if isinstance(value, float) and 0 < value < 1 and values["steps"] > 0:  # a fraction of the steps
            value = math.ceil(value * values["steps"])
        values[name] = int(value) if isinstance(value, float) and value.is_integer() else value
    if training_args.save_strategy not in ("steps", "no"):
        raise UsageError(
            f"save_strategy {_plain(training_args.save_strategy)!r} is not supported: checkpoints are written every "
            "--save_steps steps into OUTPUT.checkpoints"
        )
    if training_args.save_strategy != "steps":
        values["save_steps"] = None
    values["use_cpu"] = True if values["use_cpu"] else None  # False: the default (CPU without an accelerator)
    values["ddp_find_unused_parameters"] = bool(values["ddp_find_unused_parameters"])
    return values


def finetune(
    model=None,
    output=None,
    arguments: FinetuneArguments | None = None,
    training_args: TrainingArguments | None = None,
    **kwargs: Any,
) -> FinetuneResult:
    """Fine-tune a hybrid causal LM with `Trainer` and save it, Hub-ready, to `output` (see the module docstring).

    Args:
        model: folder or Hub id of a hybrid or host causal LM, or a loaded (hybrid or host) model with `tokenizer`
            (a loaded host model is converted and left untouched; a loaded hybrid model is trained in place);
            None: `arguments.model_name_or_path`.
        output: the folder to write; refused if it exists, unless `force` (and even then if it is not a model
            folder); None: the `output_dir` of `HybridTrainingArguments`, else save nothing (see `result.model`).
        arguments, **kwargs: the run's `FinetuneArguments`, and fields of it by keyword (on top of `arguments`).
        training_args: `TrainingArguments` (e.g. `HybridTrainingArguments`), all used but `output_dir` (the Trainer
            writes into a temporary folder or `OUTPUT.checkpoints`); it sets the fields of `TRAINER_FIELDS` too.

    Raises:
        ValueError, OSError: bad input (one-line messages); ValueError also when the loss becomes NaN or infinite
            (the step, the loss and the likely cause are named; nothing is written).
    """
    from accelerate import PartialState
    from transformers import set_seed

    from .distributed import shard_on_cpu, sharding

    started = time.perf_counter()
    model, output, a = _resolve(model, output, arguments, training_args, kwargs)
    settings = {key: value for key, value in (a.settings or {}).items() if value is not None}
    output, sources, checkpoints = _check_run(model, output, a, training_args)
    train_texts, held_out = _records(a)
    run = _run_record(model, a, settings, train_texts, held_out, training_args)
    resume_from = resume_point(checkpoints, run, a.resume) if checkpoints is not None else None
    save_steps = a.save_steps
    if resume_from is not None and save_steps is None:
        save_steps = json.loads((checkpoints / RUN_FILE).read_text(encoding="utf-8")).get("save_steps")

    use_cpu = _default_use_cpu() if a.use_cpu is None else a.use_cpu
    state = PartialState(cpu=use_cpu)
    with contextlib.ExitStack() as stack:
        if output is not None and state.is_main_process:
            stack.enter_context(output_lock(output))  # a busy or unwritable output fails here, before loading
            check_output(output, a.force, *sources)  # again: another run may have written it meanwhile
        set_seed(a.seed)
        with state.main_process_first():  # one process fills the caches (remote code, hub files) at a time
            model, tokenizer, converted, base_model = _load(
                model, a.tokenizer, settings, a.span_loss_coef, a.hybrid, a.seq_len, a.base_model,
                a.trust_remote_code, a.allow_pickle,
            )  # fmt: skip
            train_dataset, eval_dataset = _datasets(tokenizer, train_texts, held_out, a.eval_fraction, a.seq_len)
            collator = _collator(tokenizer, train_dataset)

        model.to(state.device)
        bars = state.is_main_process  # progress bars on the main process only, like the Trainer's
        ppl_before = perplexity(
            model, eval_dataset, a.batch_size, progress="perplexity before training" if bars else None
        )
        use_cache = getattr(model.config, "use_cache", True)  # the Trainer turns the KV cache off for training
        lora_alpha = a.lora_alpha if a.lora_alpha is not None else 2 * a.lora_r
        if a.lora:
            set_seed(a.seed)
            model = get_lora_model(model, r=a.lora_r, alpha=lora_alpha)

        if save_steps is not None:
            trainer_dir = checkpoints
            if state.is_main_process:
                with checkpoint_write_errors(checkpoints):
                    checkpoints.mkdir(exist_ok=True)
                    (checkpoints / RUN_FILE).write_text(json.dumps({**run, "save_steps": save_steps}, indent=1) + "\n")
        else:
            trainer_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hybrid-hf-trainer-")))
        args = _training_arguments(
            trainer_dir, a, training_args, save_steps=save_steps, use_cpu=use_cpu,
            configured=use_cpu and shard_on_cpu(),  # under `accelerate launch` with FSDP on the CPU: shard there too
        )  # fmt: skip
        trainer = _trainer(model, args, (train_dataset, eval_dataset), collator, a.distill_from, a.distill_weight)
        guard = StopOnNonFiniteLoss()
        trainer.add_callback(guard)
        with checkpoint_write_errors(checkpoints) if save_steps is not None else contextlib.nullcontext():
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
        if guard.step is not None:
            raise UsageError(
                f"training diverged at step {guard.step}: the loss is {guard.loss}; the learning rate (lr {a.lr:g}) "
                "is likely too high, try a lower one; nothing was written"
            )
        trained = trainer.model
        if a.lora and sharding(trainer) is None:  # sharded adapters are merged in the unsharded copy that is saved
            trained = trained.merge_and_unload()
        trained.eval()
        trained.config.use_cache = use_cache
        ppl_after = perplexity(
            trained, eval_dataset, a.batch_size, progress="perplexity after training" if bars else None
        )
        result = FinetuneResult(
            output=output, perplexity_before=ppl_before, perplexity_after=ppl_after, steps=trainer.state.global_step,
            wall_time_s=0.0, log_history=list(trainer.state.log_history),
            train_tokens=sum(len(ids) for ids in train_dataset["input_ids"]),
            eval_tokens=sum(len(ids) for ids in eval_dataset["input_ids"]), converted=converted, lora=a.lora,
            num_processes=trainer.args.world_size, sharding=sharding(trainer), model=trained,
        )  # fmt: skip
        card = _card(result, a, base_model, lora_alpha, started) if a.hybrid and output is not None else None
        _save(trainer, result, tokenizer, card, a.force, checkpoints, hub=training_args)
        state.wait_for_everyone()
    result.wall_time_s = time.perf_counter() - started
    if not a.quiet and state.is_main_process:
        _print_result(result)
    return result


def _resolve(model, output, arguments, training_args, kwargs: dict) -> tuple[Any, Any, FinetuneArguments]:
    """`(model, output, arguments)` of a run: `arguments` with `kwargs` (former names renamed) and the fields that
    `training_args` mirrors (those not in `kwargs`); the model and output from them when not given."""
    for former, name in _FORMER_NAMES.items():
        if former in kwargs:
            kwargs[name] = kwargs.pop(former)
    a = dataclasses.replace(arguments or FinetuneArguments(), **kwargs)
    if training_args is not None:
        mirrored = {name: value for name, value in _from_training_args(training_args).items() if name not in kwargs}
        a = dataclasses.replace(a, **mirrored)
        if output is None and isinstance(training_args, HybridTrainingArguments):  # plain ones default to a folder
            output = training_args.output_dir
    model = model if model is not None else a.model_name_or_path
    if model is None:
        raise UsageError("no model given (MODEL or --model_name_or_path)")
    if training_args is not None and training_args.push_to_hub and output is None:
        raise UsageError("push_to_hub needs an output folder (OUTPUT or --output_dir), which is pushed once written")
    if isinstance(a.train_file, (str, Path)) or isinstance(a.validation_file, (str, Path)):  # one file
        a = dataclasses.replace(a, train_file=_file_list(a.train_file), validation_file=_file_list(a.validation_file))
    return model, output, a


def _file_list(files) -> list:
    return [files] if isinstance(files, (str, Path)) else list(files or [])


def _check_run(model, output, a: FinetuneArguments, training_args) -> tuple[Path | None, list, Path | None]:
    """`(output, the models it must not replace, the checkpoints folder)`, after checking the arguments (`steps`
    may be `BY_EPOCHS` with `training_args` that give `num_train_epochs`)."""
    by_epochs = a.steps == BY_EPOCHS and training_args is not None and training_args.num_train_epochs > 0
    check_arguments(
        steps=1 if by_epochs else a.steps, seq_len=a.seq_len, batch_size=a.batch_size, lora_r=a.lora_r,
        lora_alpha=a.lora_alpha, logging_steps=a.logging_steps, save_steps=a.save_steps, seed=a.seed, lr=a.lr,
        eval_fraction=a.eval_fraction, span_loss_coef=a.span_loss_coef,
    )  # fmt: skip
    weight_ok = isinstance(a.distill_weight, (int, float)) and not isinstance(a.distill_weight, bool)
    if a.distill_from is not None and not (weight_ok and 0 < a.distill_weight < 1e6):
        raise UsageError(f"distill-weight must be a number in (0, 1e6), got {a.distill_weight!r}")
    output = Path(output).expanduser().absolute() if output is not None else None
    if output is None and (a.save_steps is not None or a.resume):
        raise UsageError("save-steps and resume need an output folder (the checkpoints are kept beside it)")
    sources = [_model_name(model), _model_name(a.distill_from)]
    if output is not None:
        check_output(output, a.force, *sources)
    checkpoints = output.with_name(f"{output.name}{CHECKPOINTS_SUFFIX}") if output is not None else None
    return output, sources, checkpoints


def _run_record(model, a: FinetuneArguments, settings: dict, train: Records, held_out: Records, training_args) -> dict:
    """What a resumed run must share with the interrupted one for the same result (of the Trainer's settings, those
    of `RESULT_FIELDS`)."""
    texts = train[0] + ["\1"] + held_out[0]
    if train[1] or held_out[1]:  # conversations
        texts += ["\2", json.dumps([train[1], held_out[1]], sort_keys=True)]
    run = {
        "model": path_or_name(str(model)) if not isinstance(model, PreTrainedModel) else model.config._name_or_path,
        "text_sha256": hashlib.sha256("\0".join(texts).encode()).hexdigest(),
        "steps": a.steps, "seq_len": a.seq_len, "batch_size": a.batch_size, "lr": a.lr, "seed": a.seed,
        "lora": a.lora, "lora_r": a.lora_r, "lora_alpha": a.lora_alpha, "span_loss_coef": a.span_loss_coef,
        "settings": settings, "hybrid": a.hybrid, "eval_fraction": a.eval_fraction,
    }  # fmt: skip
    trainer = training_args if training_args is not None else HybridTrainingArguments()
    run["trainer"] = {name: _plain(getattr(trainer, name)) for name in RESULT_FIELDS}
    if a.distill_from is not None:
        run.update(distill_from=path_or_name(str(_model_name(a.distill_from))), distill_weight=a.distill_weight)
    return run


#: the `TrainingArguments` fields (beyond those of `TRAINER_FIELDS`) that change the trained weights
RESULT_FIELDS = (
    "num_train_epochs", "gradient_accumulation_steps", "optim", "lr_scheduler_type", "warmup_steps", "weight_decay",
    "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "label_smoothing_factor", "bf16", "fp16",
    "gradient_checkpointing",
)  # fmt: skip


def _plain(value):
    """A JSON value: an enum's value, numbers and strings as they are."""
    return getattr(value, "value", value)


def _card(result: FinetuneResult, a: FinetuneArguments, base_model, lora_alpha: int, started: float) -> dict:
    """The arguments of `cards.write_model_card` for the trained hybrid model."""
    method = f"LoRA r={a.lora_r} alpha={lora_alpha} + hybrid modules, merged" if a.lora else "full fine-tuning"
    if a.distill_from is not None:
        method += f", distilled from {_model_name(a.distill_from)} (weight {a.distill_weight:g})"
    config = result.model.config
    return dict(
        base_model=base_model,
        base_model_note=a.base_model_note,
        settings={key: getattr(config, key) for key in SETTINGS if hasattr(config, key)},
        training_summary=_training_summary(result, a, method, started),
        model_id=result.output.name,
    )


def _save(trainer, result: FinetuneResult, tokenizer, card: dict | None, force: bool, checkpoints, hub=None) -> None:
    """Write the trained model to `result.output` from the main process (sharded weights gathered by every process
    first), then remove the checkpoints: the run is complete, nothing is left to resume. With `hub.push_to_hub`
    (`TrainingArguments`), the written folder is then pushed (`push_folder`)."""
    from .distributed import gathered_state_dict, unsharded_copy

    if result.output is None:
        return
    to_save = result.model
    if result.sharding is not None:  # every process takes part in gathering the weights
        state_dict = gathered_state_dict(trainer, to_save)
        to_save = unsharded_copy(to_save, state_dict) if trainer.is_world_process_zero() else None
    if trainer.is_world_process_zero():
        save_model(result.output, to_save, tokenizer, force=force, card=card)
        shutil.rmtree(checkpoints, ignore_errors=True)
        if hub is not None and hub.push_to_hub:
            push_folder(result.output, hub)


def push_folder(folder: Path, hub: TrainingArguments) -> str:
    """Push a written model folder to the Hub as `Trainer.push_to_hub` does, and return the repository id: create
    the repository `hub.hub_model_id` (default: the folder's name; `hub_private_repo`, `hub_token`) if needed, then
    upload the folder in one commit "End of training" (`hub_revision`), leaving out `_*` and `checkpoint-*`.

    Raises:
        UsageError: the push failed (no network, no token, no rights); the folder stays written, and the message
            says so.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=hub.hub_token)
    repo_id = hub.hub_model_id or folder.name
    try:
        repo_id = api.create_repo(repo_id, private=hub.hub_private_repo, exist_ok=True).repo_id
        api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message="End of training", revision=hub.hub_revision,
            ignore_patterns=["_*", "checkpoint-*"],
        )  # fmt: skip
    except Exception as error:  # the hub client raises its own and its HTTP library's errors
        raise UsageError(f"the model is saved in {folder}, but pushing it to the hub as {repo_id} failed: "
                         f"{first_line(error)}") from None  # fmt: skip
    return repo_id


def _model_name(model: str | PreTrainedModel | None) -> str | None:
    """A model's name: the path or Hub id it was loaded from, for a loaded model."""
    return model.config._name_or_path if isinstance(model, PreTrainedModel) else model


#: Records: (texts, conversations), as `data.read_records` returns them
Records = tuple[list[str], list[list[dict[str, str]]]]
#: former names of `FinetuneArguments` fields, still accepted by `finetune`
_FORMER_NAMES = {"data_files": "train_file", "eval_files": "validation_file"}


def _records(a: FinetuneArguments) -> tuple[Records, Records]:
    """`(training records, held-out records)` from the strings and the files; refused when there is no training
    data, or held-out data was given and is empty."""
    texts, conversations = read_records(a.train_file, "data", a.text_column, a.train_split)
    train = (list(a.texts or []) + texts, conversations)
    texts, conversations = read_records(a.validation_file, "eval data", a.text_column, a.validation_split)
    held_out = (list(a.eval_texts or []) + texts, conversations)
    if not any(text.strip() for text in train[0]) and not train[1]:
        raise UsageError(
            "the training data is empty (no text)" if train[0] or a.train_file else "no training data given"
        )
    if (a.validation_file or a.eval_texts) and not any(text.strip() for text in held_out[0]) and not held_out[1]:
        raise UsageError("the eval data is empty (no text)")
    return train, held_out


def _load(model, tokenizer, settings, span_loss_coef, hybrid, seq_len, base_model, trust_remote_code, allow_pickle):
    """`(model, tokenizer, converted, base_model)`: the model to train, loaded (or `prepare_model` of a loaded one),
    its positions checked against `seq_len` and its weights finite."""
    if isinstance(model, PreTrainedModel):
        if tokenizer is None:
            raise UsageError("a loaded model needs its tokenizer")
        base_model = base_model or model.config._name_or_path or None
        model, converted = prepare_model(model, settings, span_loss_coef, hybrid)
    else:
        name = str(model)
        model, tokenizer, converted = load_model(
            name, settings, span_loss_coef, hybrid=hybrid, seq_len=seq_len, trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle,
        )  # fmt: skip
        base_model = base_model or name
    _check_positions(model.config, seq_len)
    _check_finite(model, base_model)
    return model, tokenizer, converted, base_model


def _datasets(tokenizer, train: Records, held_out: Records, eval_fraction: float, seq_len: int):
    """`(training dataset, held-out dataset)`: texts in blocks of `seq_len` tokens, conversations one a row (the
    loss on the assistant turns); without held-out data, the last `eval_fraction` of the training texts and of the
    conversations is held out."""
    given = bool(held_out[0] or held_out[1])
    if not given:
        head, tail = split_tail(train[0], eval_fraction) if train[0] else ("", "")
        cut = len(train[1]) - math.ceil(len(train[1]) * eval_fraction) if len(train[1]) > 1 else len(train[1])
        train, held_out = ([head], train[1][:cut]), ([tail], train[1][cut:] or train[1])
    try:
        train_dataset = _dataset(tokenizer, train, seq_len)
    except ValueError as error:
        raise UsageError(f"training data: {error}") from None
    try:
        eval_dataset = _dataset(tokenizer, held_out, seq_len)
    except ValueError as error:
        hint = "" if given else f" (the last {eval_fraction:.0%} of the text; pass --eval-data)"
        raise UsageError(f"eval data{hint}: {error}") from None
    return train_dataset, eval_dataset


def _dataset(tokenizer, records: Records, seq_len: int):
    """One dataset of the packed texts and the conversations."""
    from datasets import concatenate_datasets

    texts, conversations = records
    packed = any(text.strip() for text in texts) or not conversations
    parts = [text_dataset(tokenizer, texts, seq_len)] if packed else []
    if conversations:
        parts.append(chat_dataset(tokenizer, conversations, seq_len))
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def _collator(tokenizer, dataset):
    """`default_data_collator` for rows of one length (blocks of text), else `DataCollatorForSeq2Seq`, which pads
    the rows on the right (labels with -100)."""
    import copy

    from transformers import DataCollatorForSeq2Seq, default_data_collator

    if len({len(ids) for ids in dataset["input_ids"]}) <= 1:
        return default_data_collator
    if tokenizer.pad_token_id is None:  # padded positions are masked: any token will do (the tokenizer is saved as is)
        tokenizer = copy.copy(tokenizer)
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)


def _training_arguments(
    trainer_dir: Path,
    a: FinetuneArguments,
    training_args: TrainingArguments | None,
    *,
    save_steps: int | None,
    use_cpu: bool,
    configured: bool,
) -> TrainingArguments:
    """The run's `TrainingArguments`: those given (else `HybridTrainingArguments`' defaults) with the fields this
    run sets: the Trainer's folder, the `FinetuneArguments` it mirrors, the checkpoints (the last one kept), and the
    DDP settings of the module docstring; `configured`: use the state that `accelerate launch` configured (FSDP on
    the CPU)."""
    base = training_args if training_args is not None else HybridTrainingArguments()
    values = {item.name: getattr(base, item.name) for item in dataclasses.fields(TrainingArguments) if item.init}
    values.update(
        output_dir=str(trainer_dir),
        max_steps=a.steps,
        per_device_train_batch_size=a.batch_size,
        learning_rate=a.lr,
        logging_steps=a.logging_steps or max(1, a.steps // 10),  # by epochs (training_args given): set
        logging_nan_inf_filter=False,  # a NaN loss is shown as NaN
        save_strategy="steps" if save_steps is not None else "no",
        save_steps=save_steps or 500,
        save_total_limit=1,
        report_to=a.report_to,
        seed=a.seed,
        data_seed=a.seed if base.data_seed is None else base.data_seed,
        use_cpu=use_cpu,
        ddp_find_unused_parameters=a.ddp_find_unused_parameters,
        average_tokens_across_devices=False,
        remove_unused_columns=False,
        push_to_hub=False,  # the final folder is pushed once written (`push_folder`)
    )
    if configured:
        values["accelerator_config"] = {"use_configured_state": True}
    try:
        return TrainingArguments(**values)
    except ValueError as error:  # TrainingArguments' own checks (e.g. --bf16 where it is not supported)
        raise UsageError(f"training arguments: {error}") from None


def _trainer(model, args, datasets: tuple, collator, distill_from, distill_weight: float):
    """A `Trainer` (a `DistillationTrainer` with a teacher `distill_from`) on `(train, eval)` datasets (the eval
    set serves `--eval_strategy`) that logs the spans."""
    from transformers import Trainer

    trainer_kwargs = dict(
        model=model, args=args, train_dataset=datasets[0], eval_dataset=datasets[1], data_collator=collator
    )
    if distill_from is None:
        trainer = Trainer(**trainer_kwargs)
    else:
        from .distillation import DistillationTrainer

        teacher = distill_from
        if not isinstance(teacher, PreTrainedModel):
            teacher = load_source(str(teacher), "causal_lm", tokenizer_required=False)[0]
        trainer = DistillationTrainer(**trainer_kwargs, teacher=teacher, distill_weight=distill_weight)
    add_span_logging(trainer)
    return trainer


def _training_summary(result: FinetuneResult, a: FinetuneArguments, method: str, started: float) -> dict[str, Any]:
    """The model card's training summary of a finished run."""
    if a.validation_file:
        held_out = ", ".join(Path(f).name for f in a.validation_file)
    else:
        held_out = (
            f"{len(a.eval_texts)} text(s)" if a.eval_texts else f"last {a.eval_fraction:.0%} of the training text"
        )
    processes = result.num_processes
    summary: dict[str, Any] = {
        "converted from the host model here": result.converted,
        "training text": ", ".join(Path(f).name for f in a.train_file) or f"{len(a.texts or [])} text(s)",
        "held-out text": held_out,
        "training tokens": result.train_tokens,
        "held-out tokens": result.eval_tokens,
        "steps": result.steps,
        "sequence length": a.seq_len,
        "batch size (per process)": a.batch_size,
        "processes": processes if result.sharding is None else f"{processes} ({result.sharding})",
        "learning rate": a.lr,
        "method": method,
        "perplexity before (held-out, LM loss only)": result.perplexity_before,
        "perplexity after": result.perplexity_after,
    }
    if result.final_span is not None:
        summary["mean span at the last log (tokens)"] = result.final_span
    summary["wall time (s)"] = round(time.perf_counter() - started, 1)
    return summary


def _print_result(result: FinetuneResult) -> None:
    span = f", mean span {result.final_span:.2f} tokens" if result.final_span is not None else ""
    sharded = f" ({result.sharding})" if result.sharding else ""
    print(
        f"perplexity {result.perplexity_before:.3f} -> {result.perplexity_after:.3f} on {result.eval_tokens} held-out "
        f"tokens after {result.steps} steps on {result.num_processes} process(es){sharded}{span}; "
        f"{result.wall_time_s:.1f} s" + (f"; saved to {result.output}" if result.output is not None else "")
    )
