"""Greedy decoding speed, timed inside `generate` over the steps after the prompt.

Timing a whole `generate` call and subtracting a separate prompt-only call leaves the difference of two long,
noisy numbers: at a 16K-token prompt the prompt takes seconds and 16 steps a fraction of that, so the difference
can even come out negative. Here a logits processor, which `generate` calls once per new token, marks when the
prompt and a few warm-up steps are done; the steps from there to the end of the call are the ones timed.
"""

from __future__ import annotations

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


def greedy(model, prompt: torch.Tensor, new_tokens: int, window: StepWindow) -> float:
    """Greedy decoding of exactly `new_tokens` tokens after `prompt` (`(1, N)`); returns the seconds from
    `window.started` to the end of the call."""
    with torch.no_grad():
        model.generate(
            prompt,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=model.config.pad_token_id or 0,
            logits_processor=LogitsProcessorList([window]),
        )
    return time.perf_counter() - window.started


def decoding_rates(
    ctx: BenchContext,
    models: dict[str, torch.nn.Module],
    prompt: torch.Tensor,
    new_tokens: int,
    warmup: int = 2,
    repeats: int | None = None,
) -> tuple[dict[str, Measurement], dict[str, float]]:
    """Greedy decoding of `new_tokens` tokens after `prompt` by each model, side by side (`ctx.compare`).

    Returns the whole calls' measurements (time, peak memory) and each model's decoding rate in tokens/s: the
    `new_tokens - 1 - warmup` forwards after the prompt's and `warmup` more steps, timed inside the same calls
    (median over the timed calls; the warm-up call's window is left out).
    """
    timed = new_tokens - 1 - warmup
    if timed < 1:
        raise ValueError(f"`new_tokens` must be at least warmup + 2 = {warmup + 2}, got {new_tokens}")
    windows: dict[str, list[float]] = {name: [] for name in models}

    def decode(name: str, model: torch.nn.Module) -> Callable[[], None]:
        return lambda: windows[name].append(greedy(model, prompt, new_tokens, StepWindow(warmup + 1)))

    measured = ctx.compare({name: decode(name, model) for name, model in models.items()}, repeats)
    rates = {
        name: timed / statistics.median(windows[name][-len(measured[name].times_ms) :]) for name in models
    }
    return measured, rates
