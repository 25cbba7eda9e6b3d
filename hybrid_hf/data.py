"""Causal-LM data and evaluation: text files cut into blocks of tokens, and held-out perplexity."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import MissingInputError, UsageError
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
