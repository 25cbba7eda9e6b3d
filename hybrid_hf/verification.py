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


def verification_batch(config, tokenizer=None, main_input_name: str = "input_ids") -> dict:
    """A fixed batch of two rows: the tokenized `VERIFY_TEXT` (or fixed ids), and its first half, right-padded; an
    encoder-decoder reads them in its encoder and its decoder, a speech encoder-decoder (`main_input_name`
    `"input_features"`) reads `speech_features` in its encoder."""
    text_config = config.get_text_config(decoder=True)  # a composite model's text model reads the tokens
    vocab = int(text_config.vocab_size)
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
    for field in ("max_position_embeddings", "max_target_positions"):
        max_positions = getattr(text_config, field, None)
        if isinstance(max_positions, int) and max_positions > 0:
            ids = ids[:max_positions]
    pad = getattr(text_config, "pad_token_id", None)
    if not isinstance(pad, int) or not 0 <= pad < vocab:
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        pad = pad if isinstance(pad, int) and 0 <= pad < vocab else 0
    half = max(len(ids) // 2, 1)
    input_ids = torch.tensor([ids, ids[:half] + [pad] * (len(ids) - half)])
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, half:] = 0
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if getattr(config, "is_encoder_decoder", False):
        batch.update(decoder_input_ids=input_ids, decoder_attention_mask=attention_mask)
    if main_input_name == "input_features":
        batch.update(input_features=speech_features(config, batch=2))
        del batch["input_ids"], batch["attention_mask"]
    return batch


def speech_features(config, batch: int = 1) -> torch.Tensor:
    """A fixed log-mel input `(batch, num_mel_bins, 2 * max_source_positions)` (the frames Whisper's encoder takes):
    slow waves across bins and frames, in the [-1, 1] range of Whisper's features."""
    frames = 2 * config.max_source_positions
    bins = torch.arange(config.num_mel_bins, dtype=torch.float32)[:, None]
    time = torch.arange(frames, dtype=torch.float32)
    waves = torch.stack([torch.sin(bins / 7 + time / (11 + row)) * torch.cos(time / 29) for row in range(batch)])
    return waves * 0.8


def output_mask(batch: dict) -> torch.Tensor:
    """`(B, N)` 1 at the real tokens whose outputs a batch compares: the decoder's, for an encoder-decoder."""
    return batch.get("decoder_attention_mask", batch.get("attention_mask"))


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
    mask = output_mask(batch)
    if difference.dim() == 3 and difference.shape[:2] == mask.shape:
        difference = difference[mask.bool()]  # per-token outputs: padded positions are not outputs of the model
    if difference.numel() == 0:
        return 0.0
    # nan (from either model) counts as a failure
    return float("nan") if torch.isnan(difference).any() else float(difference.max())
