"""Causal-LM data and evaluation: text, JSON Lines, CSV, Parquet and saved datasets read with `datasets`; texts cut
into blocks of tokens, conversations rendered with the chat template; and held-out perplexity."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import MissingInputError, UsageError, first_line
from .loading import quiet_transformers


def read_texts(files, what: str) -> list[str]:
    """The contents of the text `files` (UTF-8); `what` names them in errors (e.g. "training data")."""
    texts = []
    for name in files:
        path = Path(name).expanduser()
        if not path.is_file():
            raise MissingInputError(f"{what} file not found: {name}")
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as error:
            raise UsageError(f"{what} file {name} is not UTF-8 text ({error.reason})") from None
    return texts


#: file suffix -> the `datasets` builder that reads it; any other file is plain text (UTF-8), one text per file
DATA_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
#: the column of conversations (lists of `{"role", "content"}` messages), used when the text column is absent
MESSAGES_COLUMN = "messages"


def read_records(files, what: str, text_column: str = "text", split: str = "train") -> tuple[list[str], list[list]]:
    """`(texts, conversations)` from data `files`, read with the `datasets` library.

    A plain text file (any suffix but those of `DATA_BUILDERS`) is one text; a JSON Lines / JSON, CSV or Parquet
    file, or a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (its `split`), gives one record
    per row: the string in `text_column`, or, when the file has no such column, the conversation in `messages` (a
    list of `{"role", "content"}`). `what` names the files in errors (e.g. "data").

    Raises:
        UsageError: a missing or unreadable file, a missing column or split, or values of the wrong type; one line
            naming the file and the column.
    """
    texts: list[str] = []
    conversations: list[list] = []
    for name in files:
        path = Path(name).expanduser()
        if path.is_dir():
            table = _saved_dataset(path, what, split)
        elif not path.is_file():
            raise MissingInputError(f"{what} file not found: {name}")
        elif path.suffix.lower() in DATA_BUILDERS:
            table = _data_file(path, what)
        else:
            texts.extend(read_texts([name], what))
            continue
        column = text_column if text_column in table.column_names else MESSAGES_COLUMN
        if column not in table.column_names:
            raise UsageError(
                f"{what} file {name} has no column {text_column!r} (nor {MESSAGES_COLUMN!r}); its columns: "
                f"{', '.join(table.column_names)}; choose one with --text_column"
            )
        for row, value in enumerate(table[column]):
            if isinstance(value, str):
                texts.append(value)
            elif isinstance(value, list) and all(_is_message(message) for message in value):
                conversations.append([{"role": m["role"], "content": m["content"]} for m in value])
            elif value is not None:
                raise UsageError(
                    f"{what} file {name}, column {column!r}, row {row}: expected text or a list of "
                    f"{{'role', 'content'}} messages, got {type(value).__name__}"
                )
    return texts, conversations


def _is_message(message) -> bool:
    return isinstance(message, dict) and all(isinstance(message.get(key), str) for key in ("role", "content"))


def _root_message(error: BaseException) -> str:
    """The first line of the innermost cause of `error` (`datasets` wraps the reader's own error)."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    return first_line(error)


def _data_file(path: Path, what: str):
    """One `datasets.Dataset` of a JSON Lines / JSON, CSV or Parquet file."""
    from datasets import load_dataset

    builder = DATA_BUILDERS[path.suffix.lower()]
    with quiet_datasets():
        try:
            return load_dataset(builder, data_files=str(path), split="train")
        except Exception as error:  # the readers (pyarrow, pandas) raise their own types, wrapped by datasets
            raise UsageError(
                f"{what} file {path} is not readable as {builder.upper()}: {_root_message(error)}"
            ) from None


def _saved_dataset(path: Path, what: str, split: str):
    """The `split` of a folder written by `save_to_disk` (a `Dataset` folder is taken as it is)."""
    from datasets import DatasetDict, load_from_disk

    with quiet_datasets():
        try:
            dataset = load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as error:
            raise UsageError(
                f"{what} folder {path} is not a dataset saved with save_to_disk: {_root_message(error)}"
            ) from None
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise UsageError(f"{what} folder {path} has no split {split!r}; its splits: {', '.join(dataset)}")
        dataset = dataset[split]
    return dataset


@contextlib.contextmanager
def quiet_datasets():
    """No progress bars nor info logs from `datasets` (a failing command prints one line)."""
    from datasets.utils import logging as datasets_logging

    bars = datasets_logging.is_progress_bar_enabled()
    verbosity = datasets_logging.get_verbosity()
    datasets_logging.disable_progress_bar()
    datasets_logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets_logging.set_verbosity(verbosity)
        if bars:
            datasets_logging.enable_progress_bar()


def chat_dataset(tokenizer, conversations: list[list[dict[str, str]]], seq_len: int):
    """A causal-LM dataset of conversations: one row each, rendered with the tokenizer's chat template
    (`apply_chat_template`), cut to `seq_len` tokens, with `labels` the tokens of the assistant turns and `-100`
    elsewhere (the loss is on the assistant's answers only). Not packed: the rows have their own lengths.

    An assistant turn is the text that rendering the conversation through that turn adds to rendering the turns
    before it with the generation prompt (the turn's content and the template's end of turn, e.g. `<|im_end|>`);
    its tokens are found through the tokenizer's offsets. Rows with no assistant token left are dropped.

    Raises:
        UsageError: no chat template or a slow tokenizer (no offsets), a template that does not render turns as
            prefixes of the conversation, or no assistant token at all.
    """
    from datasets import Dataset

    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("the data holds conversations (messages) but the tokenizer has no chat template")
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError("conversations need a fast tokenizer (its offsets find the assistant turns)")
    rows: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    with quiet_transformers():
        for conversation in conversations:
            text, spans = _rendered(tokenizer, conversation)
            encoded = tokenizer(
                text, add_special_tokens=False, return_offsets_mapping=True, truncation=True, max_length=seq_len
            )
            ids = encoded["input_ids"]
            labels = [
                token if any(start <= offset[0] < end for start, end in spans) else -100
                for token, offset in zip(ids, encoded["offset_mapping"], strict=True)
            ]
            if any(label != -100 for label in labels[1:]):  # the first token is never predicted
                rows["input_ids"].append(ids)
                rows["attention_mask"].append([1] * len(ids))
                rows["labels"].append(labels)
    if not rows["input_ids"]:
        raise UsageError("the conversations hold no assistant turn to train on")
    return Dataset.from_dict(rows)


def _rendered(tokenizer, conversation: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """`(text, [(start, end) character span of each assistant turn])` of a conversation."""
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    spans = []
    for turn, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(conversation[:turn], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(conversation[: turn + 1], tokenize=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise UsageError(
                "the tokenizer's chat template does not render the first turns of a conversation as the start of "
                "it; the assistant turns cannot be told apart"
            )
        spans.append((len(before), len(through)))
    return text, spans


def split_tail(texts: list[str], fraction: float) -> tuple[str, str]:
    """Split the joined texts into (head, tail) with `fraction` of the characters in the tail, at whitespace."""
    text = "\n\n".join(texts)
    cut = int(len(text) * (1.0 - fraction))
    while 0 < cut < len(text) and not text[cut].isspace():
        cut += 1
    return text[:cut], text[cut:]


def text_dataset(tokenizer, texts: Iterable[str], seq_len: int):
    """A causal-LM dataset: the texts tokenised, concatenated and cut into blocks of `seq_len` tokens.

    Like transformers' `run_clm.py`: each text is tokenised with the tokenizer's default special tokens (e.g. a BOS
    at its start for Llama tokenizers), the token lists are concatenated, and the stream is cut into consecutive
    blocks of `seq_len` tokens; the incomplete last block is dropped, except when there is no full block, in which
    case the whole stream (at least 2 tokens) is the one, shorter, block. Columns: `input_ids`, `attention_mask`
    (all ones) and `labels` (= `input_ids`; the model shifts them).

    Raises:
        ValueError: `seq_len < 2`, no tokens at all, or a single token (nothing to predict).
    """
    from datasets import Dataset

    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise UsageError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    ids: list[int] = []
    with quiet_transformers():
        for text in texts:
            if text and text.strip():
                ids.extend(tokenizer(text)["input_ids"])
    if not ids:
        raise UsageError("the texts contain no tokens")
    if len(ids) < 2:
        raise UsageError("the texts contain a single token; at least 2 are needed to predict one")
    if len(ids) < seq_len:
        blocks = [ids]
    else:
        blocks = [ids[start : start + seq_len] for start in range(0, len(ids) - seq_len + 1, seq_len)]
    return Dataset.from_dict(
        {
            "input_ids": blocks,
            "attention_mask": [[1] * len(block) for block in blocks],
            "labels": [list(block) for block in blocks],
        }
    )


def model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def _right_padded(rows: list[list[int]], value: int, device: torch.device) -> torch.Tensor:
    """`(B, max length)`: the rows padded on the right with `value`."""
    width = max(len(row) for row in rows)
    return torch.tensor([list(row) + [value] * (width - len(row)) for row in rows], device=device)


@torch.no_grad()
def perplexity(model, dataset, batch_size: int = 8, progress: str | None = None) -> float:
    """Perplexity of a causal LM on a `text_dataset`: `exp` of the mean next-token cross-entropy over all tokens.

    The LM loss only: the model is called without labels (so no span loss is added) and the cross-entropy is
    computed here from the logits, with labels shifted by one and `-100` ignored, summed over every predicted
    token of the dataset and divided by their number (not a mean of per-batch means). Rows of different lengths are
    right-padded. Runs in eval mode under `no_grad`, restoring the model's mode afterwards. Works on PEFT-wrapped
    models. Returns `inf` if the mean loss overflows `exp`. With `progress`, a progress bar of that title counts the
    batches.
    """
    from tqdm.auto import tqdm

    if len(dataset) == 0:
        raise UsageError("the dataset is empty")
    device = model_device(model)
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64)
    total_tokens = 0
    try:
        starts = range(0, len(dataset), batch_size)
        for start in tqdm(starts, desc=progress, unit="batch", leave=False, disable=progress is None):
            rows = dataset[start : start + batch_size]
            input_ids = rows["input_ids"]
            labels = rows.get("labels", input_ids)
            masks = rows.get("attention_mask") or [[1] * len(ids) for ids in input_ids]
            ids_t, mask_t, labels_t = (
                _right_padded(rows, value, device) for rows, value in ((input_ids, 0), (masks, 0), (labels, -100))
            )
            labels_t = labels_t.masked_fill(mask_t == 0, -100)
            logits = model(input_ids=ids_t, attention_mask=mask_t).logits
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            shift_labels = labels_t[:, 1:].reshape(-1)
            loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
            total_loss += loss.double().cpu()
            total_tokens += int(shift_labels.ne(-100).sum())
    finally:
        model.train(was_training)
    if total_tokens == 0:
        raise UsageError("the dataset has no token to predict")
    mean = total_loss.item() / total_tokens
    try:
        return math.exp(mean)
    except OverflowError:
        return math.inf
