"""Adaptive compute on a trained hybrid model: what its learned spans save, measured side by side in one run.

- `time_local_branch`: every hybrid layer's local attention, called with the inputs one forward of the model gave
  it (queries, keys, values, the learned spans and temperatures), timed with those spans against the same inputs
  with every span at `max_span`. At inference the band reaches only `max(span) + ramp` keys back, the maximum over
  every token and head of the call, so one long span in a layer costs as much as all of them.
- `time_models`: the whole hybrid model against the original, a forward (prefill) and greedy decoding.

Each comparison warms every function up, then interleaves their timed calls (`bench.BenchContext.compare`) and
reports medians, so a change of machine load touches both sides alike.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from collections.abc import Iterator

import torch

from ..benchmarks.decoding import decoding_rates
from ..benchmarks.harness import BenchContext
from ..model.hybrid_attention import adaptive_local_attention


@contextlib.contextmanager
def recording_local_calls() -> Iterator[list[inspect.BoundArguments]]:
    """Within the block, record the arguments of every local-attention call the hybrid layers make (in order).

    Wraps the kernel where the hybrid attention function looks it up, and restores it on exit.
    """
    from ..model import modeling_hybrid

    kernel = modeling_hybrid.adaptive_local_attention
    signature = inspect.signature(adaptive_local_attention)
    calls: list[inspect.BoundArguments] = []

    def record(*args, **kwargs):
        calls.append(signature.bind(*args, **kwargs))
        return kernel(*args, **kwargs)

    modeling_hybrid.adaptive_local_attention = record
    try:
        yield calls
    finally:
        modeling_hybrid.adaptive_local_attention = kernel


def _kernel_calls(calls: list[inspect.BoundArguments], span: float | None = None):
    """One function running every recorded kernel call, with its own spans or (`span`) every span at that value."""
    bound_calls = []
    for call in calls:
        arguments = dict(call.arguments)
        if span is not None:
            arguments["span"] = torch.full_like(arguments["span"].expand(arguments["temperature"].shape), span)
        bound_calls.append(functools.partial(adaptive_local_attention, **arguments))

    def run() -> None:
        with torch.no_grad():
            for call in bound_calls:
                call()

    return run


def time_local_branch(model, input_ids: torch.Tensor, ctx: BenchContext) -> dict:
    """The local branch of every hybrid layer with the learned spans against all spans at `max_span`.

    Args:
        model: a hybrid model (eval mode).
        input_ids: `(B, N)` the tokens of one forward whose kernel inputs are replayed.
        ctx: the timing context (device, repeats).

    Returns:
        `{"tokens", "layers", "max_span", "ramp", "mean_span", "mean_reach_learned", "reach_full", "learned_ms",
        "full_ms", "full/learned"}`: the mean learned span (tokens, over layers, heads and tokens), the band's reach
        per layer (`ceil(max span of the layer) + ramp`, averaged over layers) against `max_span + ramp`, and the
        median time of all layers' local attention together.
    """
    with torch.no_grad(), recording_local_calls() as calls:
        model(input_ids=input_ids.to(model.device))
    if not calls:
        raise ValueError("the model made no local-attention call: is it a hybrid model?")
    config = model.config
    spans = [call.arguments["span"].clamp(0, config.max_span) for call in calls]  # (B, H or 1, N) per layer
    reaches = [min(config.max_span, math.ceil(span.max().item())) + config.ramp for span in spans]
    measured = ctx.compare({"learned": _kernel_calls(calls), "full": _kernel_calls(calls, float(config.max_span))})
    learned, full = measured["learned"].median_ms, measured["full"].median_ms
    return {
        "tokens": input_ids.shape[-1],
        "layers": len(calls),
        "max_span": config.max_span,
        "ramp": config.ramp,
        "mean_span": float(torch.stack([span.mean() for span in spans]).mean()),
        "mean_reach_learned": sum(reaches) / len(reaches),
        "reach_full": config.max_span + config.ramp,
        "learned_ms": learned,
        "full_ms": full,
        "full/learned": full / learned,
    }


def time_models(hybrid, original, input_ids: torch.Tensor, ctx: BenchContext, new_tokens: int = 32) -> dict:
    """The whole hybrid model against the original: a forward over `input_ids` and greedy decoding after it.

    Returns:
        `{"tokens", "new_tokens", "forward_ms": {model: ms}, "forward hybrid/original", "decode_tokens_per_s":
        {model: tokens/s}, "decoding tokens/s hybrid/original"}`. Decoding speed is timed inside `generate`, over the
        steps after the prompt and two warm-up steps (`benchmarks.decoding.decoding_rates`).
    """
    models = {"hybrid": hybrid, "original": original}
    ids = input_ids.to(hybrid.device)
    forward = {name: functools.partial(_forward, model, ids) for name, model in models.items()}
    measured = ctx.compare(forward)
    forward_ms = {name: measured[name].median_ms for name in models}
    _, rate = decoding_rates(ctx, models, ids, new_tokens)
    return {
        "tokens": ids.shape[-1],
        "new_tokens": new_tokens,
        "forward_ms": forward_ms,
        "forward hybrid/original": forward_ms["hybrid"] / forward_ms["original"],
        "decode_tokens_per_s": rate,
        "decoding tokens/s hybrid/original": rate["hybrid"] / rate["original"],
    }


def _forward(model, ids: torch.Tensor) -> None:
    with torch.no_grad():
        model(input_ids=ids, logits_to_keep=1)
