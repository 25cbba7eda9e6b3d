"""Benchmark sections for what a hybrid model costs beside its host, and the table of cost targets.

- ``compile``: `torch.compile(adaptive_local_attention, fullgraph=True)` (inductor) beside the eager kernel:
  forward (no grad) at N = 4096 and 16384 and forward+backward at N = 4096 (the `kernel` section's settings:
  max_span=224, ramp=32, B=1, H=8, D=64), and forward at the seed's defaults (max_span=32, ramp=32, N=4096) beside
  the seed's `slide_win` loop. At inference the compiled kernel gets `reach=band_reach(span, ...)` from outside, as
  the eager kernel computes it inside. The first call of each shape compiles, untimed.
- ``lengths``: a converted Llama of SmolLM2-135M's width (hidden 576, 9 heads, 3 key/value heads, MLP 1536) with
  2 layers and a vocabulary of 8192 (so that 16K-token logits fit in memory), against the same model unconverted:
  the peak memory and time of a training step (forward, backward) and greedy decoding tokens/s after a prompt, at
  N = 1024, 4096 and 16384. At 16384 the training step runs once, under the memory profiler (no timed call).

`targets_table` reads a run's rows and sets each measure beside its target; for the kernel rows it takes the faster
of eager and compiled, as measured in the same run.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..model.hybrid_attention import adaptive_local_attention, band_reach
from .decoding import decoding_rates
from .harness import BenchContext, Measurement, _grad_step, _no_grad, _ratio, make_row
from .kernels import HEAD_DIM, HEADS, MAX_SPAN, RAMP, _kernel_on_hidden, random_inputs, seed_slide_win
from .models import smollm2_pair


def bench_compile(ctx: BenchContext) -> list[dict]:
    """The compiled kernel beside the eager one, and both beside the seed's loop at its defaults."""
    sizes = [256, 512] if ctx.quick else [4096, 16384]
    compiled = torch.compile(adaptive_local_attention, fullgraph=True)
    kwargs = dict(max_span=MAX_SPAN, ramp=RAMP, causal=True)
    rows: list[dict] = []
    cases = [(n, "forward") for n in sizes] + [(sizes[0], "forward+backward")]
    for n, mode in ctx.progress(cases, "compile"):
        grad = mode == "forward+backward"
        q, k, v, span, temp = random_inputs(ctx, n, grad)
        reach = None if grad else band_reach(span, max_span=MAX_SPAN, ramp=RAMP)
        impls = {
            "eager": lambda: adaptive_local_attention(q, k, v, span, temp, **kwargs),
            "compiled": lambda: compiled(q, k, v, span, temp, reach=reach, **kwargs),
        }
        leaves = [q, k, v, span, temp]
        calls = {name: _grad_step(fn, leaves) if grad else _no_grad(fn) for name, fn in impls.items()}
        _compile_first(calls["compiled"])
        measured = ctx.compare(calls)
        rows += _pair("compile", f"kernel (ours) causal, max_span={MAX_SPAN} ramp={RAMP}", n, mode, measured)

    n = 512 if ctx.quick else 4096
    gen = ctx.generator()
    x = ctx.randn(1, n, HEADS * HEAD_DIM, generator=gen)
    temp = torch.full((1, HEADS, n), 0.51, device=ctx.device)
    span = torch.full((1, HEADS, n), 32.0, device=ctx.device)  # the seed's defaults: every span at max_span
    seed_kwargs = dict(max_span=32, ramp=32, causal=True)
    reach = band_reach(span, max_span=32, ramp=32)
    calls = {
        "seed": _no_grad(lambda: seed_slide_win(x, HEADS, win_size=32, span_len=32)),
        "eager": _no_grad(lambda: _kernel_on_hidden(x, span, temp, **seed_kwargs)),
        "compiled": _no_grad(lambda: _on_hidden(compiled, x, span, temp, reach=reach, **seed_kwargs)),
    }
    _compile_first(calls["compiled"])
    measured = ctx.compare(calls)
    seed_row = make_row("compile", "seed slide_win loop (span_len=32, slid_win=32)", n, "forward", measured["seed"])
    pair = _pair("compile", "kernel (ours) causal, max_span=32 ramp=32", n, "forward", measured)
    for row in pair:
        row["ratios"]["seed/kernel"] = _ratio(seed_row, row)
    pair[-1]["speedup"], pair[-1]["speedup_vs"] = pair[-1]["ratios"]["seed/kernel"], "seed loop span 32"
    return rows + [seed_row] + pair


def _on_hidden(kernel: Callable, x: torch.Tensor, span: torch.Tensor, temp: torch.Tensor, **kwargs) -> torch.Tensor:
    """`kernel` on a `(B, N, H*D)` tensor used as q, k and v, back to `(B, N, H*D)` (as `_kernel_on_hidden`)."""
    batch, length, dims = x.shape
    qkv = x.view(batch, length, span.shape[1], -1).transpose(1, 2)
    return kernel(qkv, qkv, qkv, span, temp, **kwargs).transpose(1, 2).reshape(batch, length, dims)


def _compile_first(fn: Callable[[], object]) -> None:
    """Run `fn` once before it is measured: its first call compiles (minutes on a small CPU)."""
    hook = getattr(fn, "before", None)
    if hook is not None:
        hook()
    fn()


def _pair(section: str, what: str, n: int, mode: str, measured: dict[str, Measurement]) -> list[dict]:
    eager = make_row(section, f"{what}, eager", n, mode, measured["eager"], impl="eager")
    compiled = make_row(section, f"{what}, torch.compile fullgraph", n, mode, measured["compiled"], impl="compiled")
    compiled["ratios"]["eager/compiled"] = _ratio(eager, compiled)
    return [eager, compiled]


def bench_lengths(ctx: BenchContext) -> list[dict]:
    """Training-step memory and decoding speed of a converted model beside its host, at N = 1K, 4K and 16K."""
    lengths = [64, 128, 256] if ctx.quick else [1024, 4096, 16384]
    new_tokens = 4 if ctx.quick else 32
    overrides = dict(vocab_size=8192, num_hidden_layers=2, max_position_embeddings=32768)
    models, config = smollm2_pair(ctx.quick, ctx.device, ctx.seed, **overrides)
    label = f"SmolLM2-135M width, 2 layers, vocab 8192 (max_span={MAX_SPAN} ramp={RAMP})"
    rows: list[dict] = []
    for n in ctx.progress(lengths, "lengths"):
        ids = torch.randint(0, config.vocab_size, (1, n), generator=ctx.generator()).to(ctx.device)

        def step(model: torch.nn.Module) -> Callable[[], None]:
            def call() -> None:
                model.train()
                model(input_ids=ids, labels=ids).loss.backward()

            call.before = lambda: model.zero_grad(set_to_none=True)  # type: ignore[attr-defined]
            return call

        steps = {name: step(model) for name, model in models.items()}
        if n == lengths[-1]:  # one call each, under the memory profiler
            measured = {name: _one_call(ctx, fn) for name, fn in steps.items()}
        else:
            measured = ctx.compare(steps, repeats=1)
        for model in models.values():
            model.zero_grad(set_to_none=True)
            model.eval()
        mode = "training step (forward, backward)"
        pair = [make_row("lengths", f"{name}: {label}", n, mode, measured[name], impl=name) for name in models]
        if n == lengths[-1]:
            for row in pair:
                row["note"] = "one call, timed under the memory profiler"
        pair[1]["ratios"]["hybrid/original"] = _ratio(pair[1], pair[0])
        if all(measured[name].peak_bytes for name in models):
            ratio = measured["hybrid"].peak_bytes / measured["original"].peak_bytes
            pair[1]["ratios"]["peak memory hybrid/original"] = ratio
        rows += pair

        full, rate = decoding_rates(ctx, models, ids, new_tokens)
        mode = f"greedy decoding of {new_tokens} tokens after the prompt"
        pair = [
            make_row(
                "lengths",
                f"{name}: {label}",
                n,
                mode,
                full[name],
                impl=name,
                tokens_per_s=rate[name],
                note=f"{rate[name]:.1f} tokens/s",
            )
            for name in models
        ]
        pair[1]["ratios"]["tokens/s hybrid/original"] = rate["hybrid"] / rate["original"]
        rows += pair
    return rows


def _one_call(ctx: BenchContext, fn: Callable[[], object]) -> Measurement:
    """One call of `fn`: its time and its peak memory (the warm-up call of `BenchContext`), no timed calls."""
    seconds, peak = ctx._warm_up(fn)
    return Measurement([seconds * 1e3], peak)


# --------------------------------------------------------------------------------------------------------------
# The table of targets


def _find(
    rows: list[dict],
    section: str,
    mode: str,
    n: int | None = None,
    impl: str | None = None,
    what: str = "",
    last: bool = False,
) -> dict | None:
    """The first (or `last`) row of `section` whose mode starts with `mode` (or equals it, for "forward"), at `n`, of
    `impl`, whose description starts with `what`."""
    for row in reversed(rows) if last else rows:
        mode_matches = row["mode"] == mode if mode == "forward" else row["mode"].startswith(mode)
        if (
            row["section"] == section
            and mode_matches
            and (n is None or row["n"] == n)
            and (impl is None or row.get("impl") == impl)
            and row["what"].startswith(what)
        ):
            return row
    return None


#: The ratios of the hybrid rows of a section set beside their targets: (measure, mode of the row, ratio, direction,
#: bound); `{n}` in the measure is the row's N. The `model` rows are those of the 30-layer model, the `lengths` rows
#: those of the 2-layer one at each N it was run at, the `long` rows those of `LONG_TARGET_MODEL`.
RATIO_TARGETS = {
    "model": (
        ("forward, N={n}, converted / original", "forward (no", "hybrid/original", "<=", "1.15"),
        ("training step, N={n}, converted / original", "training", "hybrid/original", "<=", "1.25"),
        (
            "greedy decoding tokens/s, {n}-token context, converted / original",
            "greedy",
            "tokens/s hybrid/original",
            ">=",
            "0.90",
        ),
        ("training peak memory, N={n}, converted / original", "training", "peak memory hybrid/original", "<=", "1.25"),
    ),
    "lengths": (
        (
            "training peak memory, N={n}, converted / original (2-layer model)",
            "training",
            "peak memory hybrid/original",
            "<=",
            "1.25",
        ),
        (
            "greedy decoding tokens/s, {n}-token context, converted / original (2-layer model)",
            "greedy",
            "tokens/s hybrid/original",
            ">=",
            "0.90",
        ),
    ),
    "long": (
        (
            "cache bytes, half the layers local-only / original, N={n}",
            "prefill",
            "cache converted/original",
            "<=",
            "0.55",
        ),
        (
            "prefill time, half the layers local-only / original, N={n}",
            "prefill",
            "time converted/original",
            "<=",
            "0.85",
        ),
        (
            "decoding tokens/s, half the layers local-only / original, {n}-token context",
            "greedy",
            "tokens/s converted/original",
            ">=",
            "1.25",
        ),
        (
            "perplexity on Hamlet, half the layers local-only / original, N={n}",
            "perplexity, hamlet",
            "perplexity converted/original",
            "<=",
            "1.03",
        ),
        (
            "perplexity on the Lee news corpus, half the layers local-only / original, N={n}",
            "perplexity, lee news",
            "perplexity converted/original",
            "<=",
            "1.03",
        ),
    ),
}


#: The model of the `long` section whose ratios are set beside the targets (`RATIO_TARGETS["long"]`); for perplexity,
#: the last row of the mode (after the recovery, when there was one).
LONG_TARGET_MODEL = "50% local-only"


def targets_table(rows: list[dict]) -> str:
    """Markdown: each cost measure of the run beside its target (an empty string when no row of it was run)."""
    lines = []

    def add(measure: str, value: float | None, direction: str, bound: str, how: str = "", note: str = "") -> None:
        if value is not None and math.isfinite(value):
            met = value <= float(bound) if direction == "<=" else value >= float(bound)
            verdict = "met" if met else "**missed**"
            lines.append(f"| {measure} | {value:.2f}{how} | {direction} {bound}{note} | {verdict} |")

    def add_ratios(section: str, n: int | None, impl: str = "hybrid", last: bool = False) -> None:
        for measure, mode, name, direction, bound in RATIO_TARGETS[section]:
            row = _find(rows, section, mode, n, impl, last=last)
            if row is not None:
                stage = f" ({row['stage']})" if row.get("stage") else ""
                add(measure.format(n=row["n"]) + stage, row["ratios"].get(name), direction, bound)

    add_ratios("model", None)

    growth, seed = {}, {}
    band = f"kernel (ours) causal, max_span={MAX_SPAN}"
    for impl, section, what, small_n in (
        ("eager", "kernel", "kernel (ours)", 4096),
        ("compiled", "compile", band, 4096),
    ):
        small = _find(rows, section, "forward", small_n, None if section == "kernel" else impl, what)
        large = _find(rows, section, "forward", 16384, None if section == "kernel" else impl, what)
        if small and large and small.get("time_ms") and large.get("time_ms"):
            growth[impl] = large["time_ms"] / small["time_ms"]
    for impl, section in (("eager", "seed"), ("compiled", "compile")):
        row = _find(
            rows, section, "forward", None, None if section == "seed" else impl, "kernel (ours) causal, max_span=32"
        )
        if row is not None and row["ratios"].get("seed/kernel") is not None:
            seed[impl], seed_n = row["ratios"]["seed/kernel"], row["n"]
    if growth:
        best = min(growth, key=growth.get)
        add(
            "kernel forward, time(16K) / time(4K)",
            growth[best],
            "<=",
            "4.4",
            f" ({best}; " + ", ".join(f"{k} {v:.2f}" for k, v in growth.items()) + ")",
            " (linear is 4.0)",
        )
    if seed:
        best = max(seed, key=seed.get)
        add(
            f"kernel vs the seed's loop at its defaults, N={seed_n} (x faster)",
            seed[best],
            ">=",
            "1.0",
            f" ({best}; " + ", ".join(f"{k} {v:.2f}" for k, v in seed.items()) + ")",
        )

    for n in sorted({row["n"] for row in rows if row["section"] == "lengths"}):
        add_ratios("lengths", n)
    add_ratios("long", None, LONG_TARGET_MODEL, last=True)  # perplexity: after the recovery when there was one
    state = next((row for row in rows if row["section"] == "long" and row.get("impl") == "hybrid layer state"), None)
    if state is not None:
        measure = f"decoding state of a hybrid layer / the host layer's KV cache, bfloat16, N={state['n']}"
        add(measure, state["ratios"].get("state hybrid/host KV"), "<=", "1.05")
    if not lines:
        return ""
    return "\n".join(["| measure | this run | target | |", "| --- | --- | --- | --- |", *lines]) + "\n"
