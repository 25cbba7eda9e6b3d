"""`hybrid-hf finetune MODEL OUTPUT --data FILE [FILE ...] [--lora] [--steps N] ... [settings]`, or
`hybrid-hf finetune ARGS.yaml` (or `.json`).

The arguments are those of transformers' example scripts (`run_clm.py`): `HfArgumentParser` over
`FinetuneArguments` (model, data, LoRA, distillation) and `HybridTrainingArguments` (every `TrainingArguments`
flag, e.g. `--gradient_accumulation_steps 4 --bf16 --lr_scheduler_type cosine --eval_strategy steps`), plus the
hybrid settings (`--max-span`...). MODEL and OUTPUT may be given as `--model_name_or_path` and `--output_dir`; a
YAML or JSON file holds the same names as keys (the settings too, e.g. `max_span: 64`).

Fine-tunes a hybrid causal LM, or a host causal LM converted on the fly, with `finetuning.finetune` and saves a
Hub-ready folder. Several processes (data parallel; the Trainer distributes, only the main process writes OUTPUT):

    # one machine, 8 GPUs
    accelerate launch --num_processes 8 -m hybrid_hf finetune MODEL OUTPUT --data train.txt
    # two machines with 8 GPUs each: run on each machine with its --machine_rank (0 and 1)
    accelerate launch --multi_gpu --num_machines 2 --num_processes 16 --machine_rank 0 \\
        --main_process_ip 10.0.0.1 --main_process_port 29500 -m hybrid_hf finetune MODEL OUTPUT --data train.txt
    # CPU only (gloo), e.g. 2 processes; `torchrun --nproc_per_node 2 -m hybrid_hf finetune ...` works too
    accelerate launch --multi_gpu --num_processes 2 -m hybrid_hf finetune MODEL OUTPUT --data train.txt

On a machine without an accelerator the command asks for CPU training (`TrainingArguments(use_cpu=True)`), so
the processes started by `--multi_gpu` (torchrun) form a gloo group. Beware `accelerate launch --cpu
--num_processes 2`: without `--mpirun_hostfile` accelerate starts a single process (its multi-CPU mode is MPI).
`--batch-size` is per process: the global batch is `batch size x processes`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

from ..errors import MissingInputError, UsageError, first_line
from ..finetuning import TRAINER_FIELDS, FinetuneArguments, HybridTrainingArguments, finetune
from ..resuming import CHECKPOINTS_SUFFIX
from ..settings import CONVERSION_SETTINGS, SETTINGS, add_setting_arguments, settings_from_args
from . import ArgumentParser

#: `FinetuneArguments` fields that are not flags: Python objects, the Trainer's (`TRAINER_FIELDS`), the settings
NOT_FLAGS = {"texts", "eval_texts", "tokenizer", "settings", "span_loss_coef", *TRAINER_FIELDS}
#: help and former names of the `FinetuneArguments` flags
FLAGS: dict[str, tuple[str, list[str]]] = {
    "model_name_or_path": ("folder or hub id of a hybrid or supported host causal LM (or MODEL)", []),
    "train_file": (
        "training data: text files (UTF-8, one text each), JSON Lines (.jsonl/.json), CSV or Parquet files, or "
        "folders written by save_to_disk",
        ["--data"],
    ),
    "validation_file": (
        "held-out data for perplexity (and --eval_strategy), in the same formats (none: the last --eval_fraction of "
        "the training data)",
        ["--eval-data"],
    ),
    "text_column": (
        "column of the texts in tabular data; without it, a 'messages' column of conversations is rendered with the "
        "tokenizer's chat template and trained on the assistant turns only (texts are packed into --seq-len blocks)",
        [],
    ),
    "train_split": ("split of a saved DatasetDict to train on", []),
    "validation_split": ("split of a saved DatasetDict held out", []),
    "lora": ("train LoRA adapters + the hybrid modules, merged at the end", []),
    "lora_r": ("LoRA rank", []),
    "lora_alpha": ("LoRA alpha (None: 2 x rank)", []),
    "seq_len": ("tokens per training block (rows of conversations are cut there)", ["--block_size"]),
    "force": ("replace OUTPUT if it exists", []),
    "eval_fraction": ("share of the training data held out when no validation file is given", []),
    "resume": (f"continue an interrupted run from its last checkpoint in OUTPUT{CHECKPOINTS_SUFFIX}", []),
    "base_model": ("the model card's base model (None: MODEL)", []),
    "base_model_note": ("how the weights came from the base model, for the card", []),
    "hybrid": ("--no_hybrid trains a host model as it is (a baseline)", []),
    "trust_remote_code": ("run the modeling code a model folder ships (auto_map); never needed for hybrid models", []),
    "allow_pickle": ("load pickled pytorch_model.bin weights (they can run code) when there are no safetensors", []),
    "quiet": ("print no summary", []),
    "distill_from": (
        "a teacher causal LM (usually the model MODEL was converted from): the loss adds the KL divergence from its "
        "next-token distribution, a recovery fine-tune for local-only layers",
        [],
    ),
    "distill_weight": ("weight of that KL term", []),
}


#: the former flags' names, accepted as keys of an arguments file
FORMER_KEYS = {
    "steps": "max_steps",
    "lr": "learning_rate",
    "batch_size": "per_device_train_batch_size",
    "cpu": "use_cpu",
    "data": "train_file",
    "eval_data": "validation_file",
}


class FinetuneParser(HfArgumentParser, ArgumentParser):
    """`HfArgumentParser` whose errors are `UsageError`s (one line), for `FinetuneArguments` (the fields of `FLAGS`,
    with their help and former names) and `HybridTrainingArguments`."""

    @staticmethod
    def _parse_dataclass_field(parser, field: dataclasses.Field):
        ours = field.name in {item.name for item in dataclasses.fields(FinetuneArguments)} and not any(
            item is field for item in dataclasses.fields(HybridTrainingArguments)
        )
        if ours and field.name in NOT_FLAGS:
            return
        if ours and field.name in FLAGS:
            field = copy.copy(field)
            help_text, aliases = FLAGS[field.name]
            field.metadata = {**field.metadata, "help": help_text, "aliases": aliases}
            if field.name == "distill_from":  # a loaded model is for Python callers
                field.type = str | None
        HfArgumentParser._parse_dataclass_field(parser, field)

    def error(self, message: str):
        ArgumentParser.error(self, message)


def build_parser() -> FinetuneParser:
    parser = FinetuneParser(
        (FinetuneArguments, HybridTrainingArguments),
        prog="hybrid-hf finetune",
        description="Fine-tune a hybrid (or host, converted on the fly) causal LM with Trainer and save a Hub-ready "
        "folder. Every TrainingArguments flag is accepted; the defaults that differ from transformers' say why. "
        "`hybrid-hf finetune ARGS.yaml` (or .json) reads the same names from a file.",
    )
    parser.add_argument("model", nargs="?", metavar="MODEL", help="folder or hub id (or --model_name_or_path)")
    parser.add_argument("output", nargs="?", metavar="OUTPUT", help="folder to write (or --output_dir); refused if it "
                        "exists, unless --force")  # fmt: skip
    add_setting_arguments(parser, "hybrid settings (all but --span-loss-coef apply when converting a host model)")
    return parser


def _from_namespace(parser: FinetuneParser, namespace) -> tuple[Any, ...]:
    """The dataclasses of `parser` from parsed flags, as `HfArgumentParser.parse_args_into_dataclasses` builds them."""
    values = vars(namespace)
    names = [[item.name for item in dataclasses.fields(dtype) if item.init] for dtype in parser.dataclass_types]
    return tuple(
        dtype(**{name: values[name] for name in fields if name in values})
        for dtype, fields in zip(parser.dataclass_types, names, strict=True)
    )


def _from_file(parser: FinetuneParser, path: Path) -> tuple[FinetuneArguments, HybridTrainingArguments, dict]:
    """The arguments in a YAML or JSON file: `(ours, the Trainer's, the settings)`."""
    import yaml

    if not path.is_file():
        raise MissingInputError(f"arguments file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError, UnicodeDecodeError) as error:
        kind = path.suffix[1:].upper()
        raise UsageError(f"arguments file {path} is not valid {kind}: {first_line(error)}") from None
    if not isinstance(values, dict):
        raise UsageError(f"arguments file {path} must hold a mapping of argument names to values")
    settings = {name: values.pop(name) for name in list(values) if name in SETTINGS}
    for former, name in FORMER_KEYS.items():
        if former in values:
            values[name] = values.pop(former)
    trainer_fields = HybridTrainingArguments.__dataclass_fields__
    unknown = {name for name in values if name in NOT_FLAGS and name not in trainer_fields}
    if unknown:
        raise UsageError(f"arguments file {path}: unknown keys {sorted(unknown)}")
    for name in ("train_file", "validation_file"):
        if isinstance(values.get(name), str):
            values[name] = [values[name]]
    try:
        ours, training = parser.parse_dict(values)
    except (TypeError, ValueError) as error:
        raise UsageError(f"arguments file {path}: {first_line(error)}") from None
    return ours, training, settings


def parse_arguments(argv: list[str]) -> tuple[FinetuneArguments, HybridTrainingArguments, dict[str, Any]]:
    """`(FinetuneArguments, HybridTrainingArguments, hybrid settings)` from the command line or an arguments file;
    MODEL and OUTPUT fill `model_name_or_path` and `output_dir`."""
    parser = build_parser()
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")):
        return _from_file(parser, Path(argv[0]).expanduser())
    namespace = parser.parse_args(argv)
    for positional, name in (("model", "model_name_or_path"), ("output", "output_dir")):
        given, named = getattr(namespace, positional), getattr(namespace, name)
        if given is not None and named is not None and given != named:
            raise UsageError(f"{positional.upper()} {given} and --{name} {named} differ; give one")
        setattr(namespace, name, given if given is not None else named)
    try:
        ours, training = _from_namespace(parser, namespace)
    except (TypeError, ValueError) as error:
        if isinstance(error, UsageError):
            raise
        raise UsageError(f"training arguments: {first_line(error)}") from None
    return ours, training, settings_from_args(namespace)


def main(argv: list[str] | None = None) -> int:
    ours, training, settings = parse_arguments(list(argv or []))
    if ours.model_name_or_path is None:
        raise UsageError("no model given (MODEL or --model_name_or_path)")
    if training.output_dir is None:
        raise UsageError("no output folder given (OUTPUT or --output_dir)")
    if not (ours.train_file or ours.texts):
        raise UsageError("no training data given (--data / --train_file)")
    finetune(
        None,
        None,
        ours,
        training,
        span_loss_coef=settings.pop("span_loss_coef", None),
        settings={name: value for name, value in settings.items() if name in CONVERSION_SETTINGS},
    )
    return 0
