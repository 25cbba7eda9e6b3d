"""`hybrid-hf finetune MODEL OUTPUT --data FILE [FILE ...] [--lora] [--steps N] ... [settings]`.

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

from ..finetuning import finetune
from ..resuming import CHECKPOINTS_SUFFIX
from ..settings import CONVERSION_SETTINGS, add_setting_arguments, settings_from_args
from . import ArgumentParser


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="hybrid-hf finetune",
        description="Fine-tune a hybrid (or host, converted on the fly) causal LM on text files with Trainer and "
        "save a Hub-ready folder.",
    )
    parser.add_argument("model", metavar="MODEL", help="folder or hub id of a hybrid or supported host causal LM")
    parser.add_argument("output", metavar="OUTPUT", help="folder to write (refused if it exists, unless --force)")
    parser.add_argument(
        "--data",
        "--train-file",
        "--train_file",
        dest="data",
        nargs="+",
        required=True,
        metavar="FILE",
        help="training data: text files (UTF-8, one text each), JSON Lines (.jsonl/.json), CSV or Parquet files, or "
        "folders written by save_to_disk",
    )
    parser.add_argument(
        "--eval-data",
        "--validation-file",
        "--validation_file",
        dest="eval_data",
        nargs="+",
        default=[],
        metavar="FILE",
        help="held-out data for perplexity, in the same formats (default: the last 10%% of the training data)",
    )
    parser.add_argument(
        "--text-column",
        "--text_column",
        default="text",
        metavar="NAME",
        help="column of the texts in tabular data (default text); without it, a 'messages' column of conversations "
        "is rendered with the tokenizer's chat template and trained on the assistant turns only",
    )
    parser.add_argument("--train-split", "--train_split", default="train", help="split of a saved DatasetDict")
    parser.add_argument(
        "--validation-split", "--validation_split", default="validation", help="held-out split of a saved DatasetDict"
    )
    parser.add_argument(
        "--lora", action="store_true", help="train LoRA adapters + the hybrid modules, merged at the end"
    )
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default 8; alpha = 2 r)")
    parser.add_argument("--steps", type=int, default=50, help="training steps (default 50)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per training block (default 256)")
    parser.add_argument("--batch-size", type=int, default=4, help="blocks per step and process (default 4)")
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    parser.add_argument("--logging-steps", type=int, default=None, help="log every N steps (default: steps / 10)")
    parser.add_argument("--report-to", default="none", help="Trainer integrations, e.g. tensorboard (default none)")
    parser.add_argument("--cpu", action="store_true", help="train on CPU even when an accelerator is available")
    parser.add_argument(
        "--save-steps",
        type=int,
        default=None,
        metavar="N",
        help=f"write a checkpoint every N steps into OUTPUT{CHECKPOINTS_SUFFIX} (removed at the end)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help=f"continue an interrupted run from its last checkpoint in OUTPUT{CHECKPOINTS_SUFFIX} (same arguments)",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the modeling code a model folder ships (auto_map); never needed for hybrid models",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load pickled pytorch_model.bin weights (they can run code) when there are no safetensors",
    )
    parser.add_argument(
        "--distill-from",
        metavar="MODEL",
        help="a teacher causal LM (usually the model OUTPUT's model was converted from): the loss adds the KL "
        "divergence from its next-token distribution, a recovery fine-tune for local-only layers",
    )
    parser.add_argument(
        "--distill-weight", type=float, default=1.0, metavar="W", help="weight of that KL term (default 1)"
    )
    add_setting_arguments(parser, "hybrid settings (all but --span-loss-coef apply when converting a host model)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    finetune(
        args.model,
        args.output,
        train_file=args.data,
        validation_file=args.eval_data,
        text_column=args.text_column,
        train_split=args.train_split,
        validation_split=args.validation_split,
        lora=args.lora,
        lora_r=args.lora_r,
        steps=args.steps,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        lr=args.lr,
        span_loss_coef=settings.pop("span_loss_coef", None),
        settings={name: value for name, value in settings.items() if name in CONVERSION_SETTINGS},
        seed=args.seed,
        force=args.force,
        logging_steps=args.logging_steps,
        save_steps=args.save_steps,
        resume=args.resume,
        report_to=args.report_to,
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
        use_cpu=True if args.cpu else None,
        distill_from=args.distill_from,
        distill_weight=args.distill_weight,
    )
    return 0
