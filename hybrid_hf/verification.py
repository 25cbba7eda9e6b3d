"""Checks that a converted model computes what its host did: a fixed batch, and the largest output difference."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

#: Largest max abs difference between host and converted outputs that verification accepts.
VERIFY_TOLERANCE = 1e-4
#: Text tokenized for verification when the source has a tokenizer.
VERIFY_TEXT = (
    "The hybrid layer keeps the pretrained attention as its global branch and adds a local branch whose span "
    "each token learns. At conversion the mix is the identity on the global branch, so the converted model "
    "computes exactly what the original did."
)
#: Number of token ids used for verification when there is no tokenizer.
VERIFY_LENGTH = 48


class VerificationError(RuntimeError):
    """The converted model's outputs differ from the host's by more than the tolerance."""


def verification_batch(config, tokenizer=None) -> dict:
    """A fixed batch of two rows: the tokenized `VERIFY_TEXT` (or fixed ids), and its first half, right-padded."""
    vocab = int(config.vocab_size)
    ids: list[int] = []
    if tokenizer is not None:
        try:
            ids = list(tokenizer(VERIFY_TEXT)["input_ids"])
        except Exception as error:  # noqa: BLE001 - fall back to fixed ids
            logger.warning("Tokenizing the verification text failed (%s); using fixed ids", error)
            ids = []
        if ids and not all(0 <= i < vocab for i in ids):
            logger.warning("The tokenizer gives ids outside the model's vocabulary (%d); using fixed ids", vocab)
            ids = []
    if len(ids) < 4:
        ids = [(5 + 37 * i) % vocab for i in range(VERIFY_LENGTH)]
    max_positions = getattr(config, "max_position_embeddings", None)
    if isinstance(max_positions, int) and max_positions > 0:
        ids = ids[:max_positions]
    pad = getattr(config, "pad_token_id", None)
    if not isinstance(pad, int) or not 0 <= pad < vocab:
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        pad = pad if isinstance(pad, int) and 0 <= pad < vocab else 0
    half = max(len(ids) // 2, 1)
    input_ids = torch.tensor([ids, ids[:half] + [pad] * (len(ids) - half)])
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, half:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _main_output(outputs):
    logits = getattr(outputs, "logits", None)
    return logits if logits is not None else outputs.last_hidden_state


def max_output_difference(host, hybrid, batch: dict) -> float:
    """Max abs difference of the two models' logits (or last hidden states) over the batch's real tokens."""
    with torch.inference_mode():
        expected = _main_output(host(**batch)).float()
        actual = _main_output(hybrid(**batch)).float()
    if expected.shape != actual.shape:
        raise VerificationError(f"output shapes differ: {tuple(expected.shape)} vs {tuple(actual.shape)}")
    difference = (actual - expected).abs()
    mask = batch["attention_mask"]
    if difference.dim() == 3 and difference.shape[:2] == mask.shape:
        difference = difference[mask.bool()]  # per-token outputs: padded positions are not outputs of the model
    if difference.numel() == 0:
        return 0.0
    # nan (from either model) counts as a failure
    return float("nan") if torch.isnan(difference).any() else float(difference.max())
