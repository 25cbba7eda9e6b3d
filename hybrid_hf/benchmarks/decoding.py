"""Greedy decoding speed, timed inside `generate` over the steps after the prompt.

Timing a whole `generate` call and subtracting a separate prompt-only call leaves the difference of two long,
noisy numbers: at a 16K-token prompt the prompt takes seconds and 16 steps a fraction of that, so the difference
can even come out negative. Here a logits processor, which `generate` calls once per new token, marks when the
prompt and a few warm-up steps are done; the steps from there to the end of the call are the ones timed.

At long context even one prompt per call is too slow to repeat: with `decoding_rates(..., prefilled=...)` (each
model's `prefill` of the prompt, run once) every timed call starts from a copy of that cache, with the prompt's greedy
next token as its only new input.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .harness import BenchContext, Measurement


class StepWindow(LogitsProcessor):
    """Marks the moment `generate` has produced `after` tokens: `started` (`time.perf_counter()`), and calls
    `on_start` then (e.g. to start a profiler). The scores pass through unchanged."""

    def __init__(self, after: int, on_start: Callable[[], None] | None = None):
        self.after, self.on_start, self.calls = after, on_start, 0
        self.started: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.calls += 1
        if self.calls == self.after:
            if self.on_start is not None:
                self.on_start()
            self.started = time.perf_counter()
        return scores


def greedy(
    model, prompt: torch.Tensor, new_tokens: int, window: StepWindow, cache=None
) -> tuple[float, torch.Tensor]:
    """Greedy decoding of exactly `new_tokens` tokens after `prompt` (`(1, N)`); returns the seconds from
    `window.started` to the end of the call, and the tokens (`(1, N + new_tokens)`). With `cache` (the cache of all
    but the last prompt token), decoding starts from a copy of it."""
    with torch.no_grad():
        tokens = model.generate(
            prompt,
            past_key_values=copy.deepcopy(cache),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=model.config.pad_token_id or 0,
            logits_processor=LogitsProcessorList([window]),
        )
    return time.perf_counter() - window.started, tokens


def decoding_rates(
    ctx: BenchContext,
    models: dict[str, torch.nn.Module],
    prompt: torch.Tensor,
    new_tokens: int,
    warmup: int = 2,
    repeats: int | None = None,
    prefilled: dict[str, tuple[torch.Tensor, object]] | None = None,
) -> tuple[dict[str, Measurement], dict[str, float]]:
    """Greedy decoding of `new_tokens` tokens after `prompt` by each model, side by side (`ctx.compare`).

    Returns the whole calls' measurements (time, peak memory) and each model's decoding rate in tokens/s: the
    `new_tokens - 1 - warmup` forwards after the prompt's and `warmup` more steps, timed inside the same calls
    (median over the timed calls; the warm-up call's window is left out). With `prefilled` (each model's
    `prefill(model, prompt)`), the timed calls decode after `prompt` plus its greedy next token from a copy of that
    cache.
    """
    timed = new_tokens - 1 - warmup
    if timed < 1:
        raise ValueError(f"`new_tokens` must be at least warmup + 2 = {warmup + 2}, got {new_tokens}")
    windows: dict[str, list[float]] = {name: [] for name in models}
    starts = prefilled or {name: (prompt, None) for name in models}

    def decode(name: str, model: torch.nn.Module) -> Callable[[], None]:
        ids, cache = starts[name]
        return lambda: windows[name].append(greedy(model, ids, new_tokens, StepWindow(warmup + 1), cache)[0])

    measured = ctx.compare({name: decode(name, model) for name, model in models.items()}, repeats)
    rates = {
        name: timed / statistics.median(windows[name][-len(measured[name].times_ms) :]) for name in models
    }
    return measured, rates


def prefill(model: torch.nn.Module, prompt: torch.Tensor) -> tuple[torch.Tensor, object]:
    """`(prompt + its greedy next token, the cache of the prompt)`."""
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    return torch.cat([prompt, out.logits[:, -1:].argmax(-1)], dim=-1), out.past_key_values
