"""Choosing the local-only layers: how much a model's output changes when one layer loses its global attention.

A local-only layer computes no global attention, so it is cheaper than its host layer, but it changes what the model
computes. `layer_scores` measures that change for each layer alone, on calibration text: the mean KL divergence of
the next-token distributions of the host and of the host with that one layer local-only (for models with logits), or
the mean squared change of the last hidden state relative to its mean square (for base models). `choose_local_layers`
takes the lowest-scoring fraction. Both are deterministic: same host, text and settings, same layers.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from .conversion import convert
from .errors import UsageError
from .model.modeling_hybrid import self_attention_modules

logger = logging.getLogger(__name__)


def _output(model: PreTrainedModel, input_ids: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """`(log-probabilities (B, N, V), True)` for a model with logits, else `(last hidden state (B, N, d), False)`,
    in float32."""
    out = model(input_ids=input_ids, use_cache=False)
    if "logits" in out:
        return F.log_softmax(out.logits.float(), dim=-1), True
    return out.last_hidden_state.float(), False


def _change(reference: torch.Tensor, output: torch.Tensor, log_probs: bool) -> float:
    """Mean KL(reference || output) per token for log-probabilities, else the relative mean squared change."""
    if log_probs:
        return float(F.kl_div(output, reference, log_target=True, reduction="none").sum(-1).mean())
    return float((output - reference).pow(2).mean() / reference.pow(2).mean().clamp_min(1e-12))


@torch.no_grad()
def layer_scores(host: PreTrainedModel, input_ids: torch.Tensor, **settings) -> list[float]:
    """For each self-attention layer of `host`, the change of its output (see the module docstring) on `input_ids`
    `(B, N)` when that layer alone is local-only, at its conversion values, with the hybrid `settings` (`max_span`,
    `ramp`, `sink_tokens`...); the other layers stay the host's own."""
    settings = {k: v for k, v in settings.items() if k not in ("local_layers", "hybrid_layers", "layer_scores")}
    was_training = host.training
    host.eval()
    reference, log_probs = _output(host, input_ids)
    scores = []
    layers = len(self_attention_modules(host))
    for index in range(layers):
        candidate = convert(host, local_layers=[index], hybrid_layers=[], **settings).eval()
        scores.append(_change(reference, _output(candidate, input_ids)[0], log_probs))
        del candidate
        logger.info("Calibration: layer %d of %d, score %.4g", index + 1, layers, scores[-1])
    host.train(was_training)
    return scores


def choose_local_layers(scores: list[float], fraction: float) -> list[int]:
    """The `round(fraction * len(scores))` layers of lowest score (ties: the lower index first), sorted."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise UsageError(f"`local_fraction` must be a number in [0, 1] (a share of the layers), got {fraction!r}")
    count = int(round(fraction * len(scores)))
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return sorted(order[:count])


def calibration_ids(text: str, tokenizer, tokens: int) -> torch.Tensor:
    """The first `tokens` tokens of `text` as one row `(1, N)`; a `UsageError` for a text of fewer than 2 tokens."""
    ids = tokenizer(text, add_special_tokens=True, return_tensors="pt")["input_ids"][:, :tokens]
    if ids.shape[1] < 2:
        raise UsageError("the calibration text has fewer than 2 tokens; give a longer --calibration file")
    return ids
