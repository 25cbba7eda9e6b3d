"""Fine-tuning data through `datasets`: text, JSON Lines, JSON, CSV, Parquet and saved datasets, the text column,
conversations rendered with the chat template (loss on the assistant turns only), and one-line errors."""

from __future__ import annotations

import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import TEXT, tiny_llama, word_tokenizer

from hybrid_hf import commands
from hybrid_hf.data import chat_dataset, read_records
from hybrid_hf.errors import UsageError
from hybrid_hf.finetuning import finetune

datasets = pytest.importorskip("datasets")

LINES = [line for line in TEXT.splitlines() if line.strip()]
#: a chat template over the words of the tiny tokenizer: "ROLE CONTENT ." per message, "assistant" as prompt
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} . {% endfor %}"
    "{% if add_generation_prompt %}assistant {% endif %}"
)
CONVERSATION = [
    {"role": "user", "content": "the cat sat"},
    {"role": "assistant", "content": "on a mat"},
    {"role": "user", "content": "and the dog"},
    {"role": "assistant", "content": "ran in park"},
]


@pytest.fixture
def chat_tokenizer():
    tokenizer = word_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _write(tmp_path, kind: str, column: str = "text"):
    """The `LINES` as a data file (or saved dataset folder) of `kind`, in `column`."""
    table = datasets.Dataset.from_dict({column: LINES, "id": list(range(len(LINES)))})
    path = tmp_path / f"data.{kind}"
    if kind == "txt":
        path.write_text("\n".join(LINES))
    elif kind == "jsonl":
        path.write_text("".join(json.dumps({column: line}) + "\n" for line in LINES))
    elif kind == "json":
        path.write_text(json.dumps([{column: line} for line in LINES]))
    elif kind == "csv":
        table.to_csv(str(path))
    elif kind == "parquet":
        table.to_parquet(str(path))
    elif kind == "saved":
        datasets.DatasetDict({"train": table, "test": table.select(range(3))}).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "saved"])
def test_each_format_gives_its_rows(tmp_path, kind):
    path = _write(tmp_path, kind)
    assert read_records([path], "data") == (LINES, [])
    if kind == "saved":
        assert read_records([path], "data", split="test") == (LINES[:3], [])


def test_plain_text_is_one_text_per_file(tmp_path):
    assert read_records([_write(tmp_path, "txt")], "data") == (["\n".join(LINES)], [])


def test_text_column(tmp_path):
    path = _write(tmp_path, "jsonl", column="body")
    assert read_records([path], "data", text_column="body") == (LINES, [])
    with pytest.raises(UsageError, match=r"data\.jsonl has no column 'text' .*its columns: body"):
        read_records([path], "data")


def test_chat_labels_are_the_assistant_turns(chat_tokenizer):
    dataset = chat_dataset(chat_tokenizer, [CONVERSATION], seq_len=64)
    words = "user the cat sat . assistant on a mat . user and the dog . assistant ran in park .".split()
    ids = chat_tokenizer.convert_tokens_to_ids(words)
    assistant = [False] * 5 + [False] + [True] * 4 + [False] * 5 + [False] + [True] * 4  # by hand
    assert dataset["input_ids"] == [ids]
    assert dataset["labels"] == [[token if keep else -100 for token, keep in zip(ids, assistant, strict=True)]]
    assert chat_dataset(chat_tokenizer, [CONVERSATION], seq_len=8)["input_ids"] == [ids[:8]]  # cut to seq_len


def test_chat_needs_a_template():
    with pytest.raises(UsageError, match="no chat template"):
        chat_dataset(word_tokenizer(), [CONVERSATION], seq_len=32)


def test_finetune_on_conversations(tmp_path, chat_tokenizer):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": CONVERSATION}) + "\n" for _ in range(6)))
    assert read_records([path], "data") == ([], [CONVERSATION] * 6)
    result = finetune(tiny_llama(), None, tokenizer=chat_tokenizer, train_file=[path], steps=2, batch_size=2,
                      seq_len=32, lr=1e-2, use_cpu=True, quiet=True, settings={"max_span": 8, "ramp": 4})  # fmt: skip
    assert result.steps == 2 and result.eval_tokens == 20 and torch.isfinite(torch.tensor(result.perplexity_after))


@pytest.fixture(scope="module")
def host_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("host") / "tiny"
    tiny_llama().save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def test_cli_trains_on_a_jsonl_file(tmp_path, host_folder):
    path = _write(tmp_path, "jsonl", column="body")
    output = tmp_path / "out"
    argv = [str(host_folder), str(output), "--train-file", str(path), "--text-column", "body", "--steps", "1",
            "--seq-len", "16", "--cpu", "--max-span", "8", "--ramp", "4"]  # fmt: skip
    assert commands.main(["finetune", *argv]) == 0
    assert (output / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "kind, content, fragments",
    [
        ("jsonl", '{"body": "the cat"}\n', ["data.jsonl", "no column 'text'", "body"]),
        ("jsonl", '{"text": "the cat"\n', ["data.jsonl", "not readable as JSON"]),
        ("csv", None, ["data.csv", "no column 'text'"]),
        ("jsonl", '{"text": 3}\n', ["data.jsonl", "column 'text'", "row 0", "int"]),
        ("saved", None, ["data.saved", "no split 'train'"]),
    ],
)
def test_cli_bad_data_is_one_line(tmp_path, host_folder, capsys, kind, content, fragments):
    path = tmp_path / f"data.{kind}"
    if kind == "csv":
        path.write_text("body\nthe cat\n")
    elif kind == "saved":
        datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": LINES})}).save_to_disk(str(path))
    else:
        path.write_text(content)
    capsys.readouterr()
    status = commands.main(["finetune", str(host_folder), str(tmp_path / "out"), "--data", str(path), "--cpu"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert all(fragment in lines[0] for fragment in fragments), lines[0]
    assert not (tmp_path / "out").exists()


def test_cli_trains_on_conversations_with_the_trainers_flags(tmp_path, host_folder):
    """The example scripts' command line, verbatim, on conversations in JSON Lines: bf16 on the CPU, gradient
    accumulation and checkpointing, a warm-up ratio, a cosine schedule and evaluation every few steps."""
    folder = tmp_path / "chat_host"
    shutil.copytree(host_folder, folder)
    tokenizer = word_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": CONVERSATION}) + "\n" for _ in range(8)))
    argv = [
        str(folder),
        str(tmp_path / "out"),
        "--train_file",
        str(path),
        "--validation_file",
        str(path),
        "--bf16",
        "--gradient_accumulation_steps",
        "4",
        "--gradient_checkpointing",
        "--warmup_ratio",
        "0.1",
        "--lr_scheduler_type",
        "cosine",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "2",
        "--max_steps",
        "4",
        "--per_device_train_batch_size",
        "1",
        "--seq_len",
        "32",
        "--use_cpu",
        "--max_span",
        "8",
        "--ramp",
        "4",
    ]
    assert commands.main(["finetune", *argv]) == 0
    written, host = load_file(tmp_path / "out" / "model.safetensors"), load_file(folder / "model.safetensors")
    assert not torch.equal(written["model.embed_tokens.weight"], host["model.embed_tokens.weight"])  # it trained
