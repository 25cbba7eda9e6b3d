"""Benchmark sections of the local-attention kernel: against SDPA and the dense reference, the seed's loop,
Longformer, adaptive spans, and its achieved GFLOP/s."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..model.hybrid_attention import adaptive_local_attention, reference_local_attention
from .harness import BenchContext, _grad_step, _no_grad, _ratio, make_row

HEADS, HEAD_DIM = 8, 64
MAX_SPAN, RAMP = 224, 32  # max_span + ramp = 256: the band of the kernel


def _kernel_width(n: int, reach: int, causal: bool, block_size: int = 32) -> tuple[int, int]:
    """`(padded N, width)` as `adaptive_local_attention` computes them at inference, for a band reaching `reach`
    keys."""
    block = max(1, min(block_size, n))
    padded = -(-n // block) * block
    return padded, block + (reach - 1) * (1 if causal else 2)


def random_inputs(ctx: BenchContext, n: int, grad: bool) -> tuple[torch.Tensor, ...]:
    """Query, key, value `(1, H, N, D)`, spans in [0, MAX_SPAN] and temperatures in [0.5, 1] `(1, H, N)`."""
    gen = ctx.generator()
    q, k, v = (ctx.randn(1, HEADS, n, HEAD_DIM, generator=gen, requires_grad=grad) for _ in range(3))
    span = ctx.rand(1, HEADS, n, generator=gen, high=MAX_SPAN).requires_grad_(grad)
    temp = ctx.rand(1, HEADS, n, generator=gen, low=0.5, high=1.0).requires_grad_(grad)
    return q, k, v, span, temp


def bench_kernel(ctx: BenchContext) -> list[dict]:
    """Kernel vs full causal SDPA vs dense reference, forward and forward+backward, over N."""
    sizes = [128, 256, 512] if ctx.quick else [1024, 2048, 4096, 8192, 16384]
    ref_max = min(ctx.reference_max_n, 256) if ctx.quick else ctx.reference_max_n
    kwargs = dict(max_span=MAX_SPAN, ramp=RAMP, causal=True)
    labels = {"kernel": "kernel (ours)", "sdpa": "SDPA full causal", "reference": "dense reference"}
    rows: list[dict] = []
    cells: dict[tuple[str, str, int], dict] = {}
    cases = [(n, mode) for n in sizes for mode in ("forward", "forward+backward")]
    for n, mode in ctx.progress(cases, "kernel"):
        grad = mode == "forward+backward"
        q, k, v, span, temp = random_inputs(ctx, n, grad)
        impls: dict[str, Callable[[], torch.Tensor]] = {
            "kernel": functools.partial(adaptive_local_attention, q, k, v, span, temp, **kwargs),
            "sdpa": functools.partial(F.scaled_dot_product_attention, q, k, v, is_causal=True),
        }
        if n <= ref_max:
            impls["reference"] = functools.partial(reference_local_attention, q, k, v, span, temp, **kwargs)
        leaves = [q, k, v, span, temp]
        calls = {name: _grad_step(fn, leaves) if grad else _no_grad(fn) for name, fn in impls.items()}
        measured = ctx.compare(calls)
        for name, label in labels.items():
            if name in measured:
                row = make_row("kernel", label, n, mode, measured[name], impl=name)
            else:
                note = f"skipped: O(N^2), above --reference-max-n={ref_max}"
                row = make_row("kernel", label, n, mode, None, impl=name, note=note)
            cells[(name, mode, n)] = row
            rows.append(row)
        del q, k, v, span, temp, impls, calls, leaves

    for (name, mode, n), row in cells.items():
        growth = _ratio(row, cells.get((name, mode, n // 2)))
        if name == "kernel":
            sdpa = _ratio(cells[("sdpa", mode, n)], row)
            row["ratios"]["sdpa/kernel"] = sdpa
            row["speedup"], row["speedup_vs"] = sdpa, "SDPA full causal"
            reference = _ratio(cells[("reference", mode, n)], row)
            if reference is not None:
                row["ratios"]["reference/kernel"] = reference
        if growth is not None:
            row["ratios"][f"{name}(N)/{name}(N/2)"] = growth
    return rows


def seed_slide_win(
    x: torch.Tensor, heads: int, win_size: int = 32, span_len: int = 32, temperature: float = 0.51
) -> torch.Tensor:
    """The seed's `HybridAttention.slide_win`, made to run: `(B, N, d)` -> `(B, N, d)`.

    A Python loop over windows of `win_size` queries, each attending (plain multi-head softmax attention, the
    seed's `softmax((scores / temperature) * (d / heads) ** -0.25)`, x itself as q, k and v as the seed passes it)
    to the slice `[max(0, i - span_len + win_size) : i + span_len]`, as the seed slices it. The span scale is
    the constant 1 (so `win_size = slid_win`, `span_len = max_span`) and the temperature the seed's
    `0.5 + 0.01 * 1`. The seed's extra, discarded `MultiheadAttention` call and its first-`eff_span`-tokens
    truncation are left out: this is the cost of the loop itself, a lower bound on the seed's.
    """
    batch, length, dims = x.shape
    head_dim = dims // heads
    scale = head_dim**-0.25
    out = torch.zeros_like(x)
    for i in range(0, length, win_size):
        end = min(i + win_size, length)
        start = max(0, i - span_len + win_size)
        query = x[:, i:end].reshape(batch, end - i, heads, head_dim).transpose(1, 2)
        window = x[:, start : i + span_len]
        key = window.reshape(batch, window.shape[1], heads, head_dim).transpose(1, 2)  # = value
        scores = torch.matmul(query, key.transpose(-2, -1))
        weights = torch.softmax((scores / temperature) * scale, dim=-1)
        out[:, i:end] = torch.matmul(weights, key).transpose(1, 2).reshape(batch, end - i, dims)
    return out


def _kernel_on_hidden(x: torch.Tensor, span: torch.Tensor, temp: torch.Tensor, **kwargs: object) -> torch.Tensor:
    """Our kernel on a `(B, N, H*D)` tensor used as q, k and v, back to `(B, N, H*D)`."""
    batch, length, dims = x.shape
    heads = span.shape[1]
    qkv = x.view(batch, length, heads, dims // heads).transpose(1, 2)
    out = adaptive_local_attention(qkv, qkv, qkv, span, temp, **kwargs)
    return out.transpose(1, 2).reshape(batch, length, dims)


def bench_seed(ctx: BenchContext) -> list[dict]:
    """Kernel vs the seed's windowed loop, at the seed's default sizes and at span 256, forward."""
    n = 512 if ctx.quick else 4096
    gen = ctx.generator()
    x = ctx.randn(1, n, HEADS * HEAD_DIM, generator=gen)
    temp = torch.full((1, HEADS, n), 0.51, device=ctx.device)
    rows: list[dict] = []
    for max_span, ramp in ctx.progress([(32, 32), (256, 32)], "seed"):  # the seed's slid_win stays 32
        # Every span at max_span: our band at its widest, no adaptive saving.
        span = torch.full((1, HEADS, n), float(max_span), device=ctx.device)
        calls = {"seed": _no_grad(lambda: seed_slide_win(x, HEADS, win_size=32, span_len=max_span))}
        for direction in ("causal", "bidirectional"):
            kw = dict(max_span=max_span, ramp=ramp, causal=direction == "causal")
            calls[direction] = _no_grad(lambda kw=kw: _kernel_on_hidden(x, span, temp, **kw))
        measured = ctx.compare(calls)
        what = f"seed slide_win loop (span_len={max_span}, slid_win=32)"
        seed_row = make_row("seed", what, n, "forward", measured["seed"])
        rows.append(seed_row)
        for direction in ("causal", "bidirectional"):
            _, width = _kernel_width(n, max_span + ramp, direction == "causal")
            what = f"kernel (ours) {direction}, max_span={max_span} ramp={ramp}"
            row = make_row("seed", what, n, "forward", measured[direction], width=width)
            speedup = _ratio(seed_row, row)
            row["ratios"]["seed/kernel"] = speedup
            row["speedup"], row["speedup_vs"] = speedup, f"seed loop span {max_span}"
            rows.append(row)
    return rows


class _LocalLayer(nn.Module):
    """q/k/v/o projections around the bidirectional kernel: our counterpart of Longformer's local attention."""

    def __init__(self, hidden: int, heads: int, max_span: int, ramp: int):
        super().__init__()
        self.heads, self.max_span, self.ramp = heads, max_span, ramp
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(hidden, hidden) for _ in range(4))

    def forward(self, x: torch.Tensor, span: torch.Tensor, temp: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        q, k, v = (
            proj(x).view(batch, length, self.heads, hidden // self.heads).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = adaptive_local_attention(q, k, v, span, temp, max_span=self.max_span, ramp=self.ramp, causal=False)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, hidden))


def bench_longformer(ctx: BenchContext) -> list[dict]:
    """Our bidirectional local layer vs transformers' LongformerSelfAttention (window 256 each side), forward."""
    from transformers import LongformerConfig
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

    hidden, window = HEADS * HEAD_DIM, 512
    config = LongformerConfig(
        hidden_size=hidden, num_attention_heads=HEADS, attention_window=[window], num_hidden_layers=1
    )
    torch.manual_seed(ctx.seed)
    longformer = LongformerSelfAttention(config, layer_id=0).to(ctx.device).eval()
    longformer_out = nn.Linear(hidden, hidden).to(ctx.device).eval()  # as LongformerSelfOutput.dense
    ours = _LocalLayer(hidden, HEADS, MAX_SPAN, RAMP).to(ctx.device).eval()

    rows: list[dict] = []
    for n in ctx.progress([512, 1024] if ctx.quick else [4096, 16384], "longformer"):
        gen = ctx.generator()
        x = ctx.randn(1, n, hidden, generator=gen)
        mask = torch.zeros(1, n, device=ctx.device)  # Longformer's convention: 0 = local attention
        masked, global_attn = mask < 0, mask > 0  # no padding, no global token
        span = torch.full((1, HEADS, n), float(MAX_SPAN), device=ctx.device)  # the full band: 255 each side
        temp = ctx.rand(1, HEADS, n, generator=gen, low=0.5, high=1.0)

        def run_longformer() -> torch.Tensor:
            out = longformer(
                x, attention_mask=mask, is_index_masked=masked, is_index_global_attn=global_attn, is_global_attn=False
            )[0]
            return longformer_out(out)

        measured = ctx.compare({"longformer": _no_grad(run_longformer), "ours": _no_grad(lambda: ours(x, span, temp))})
        what = f"LongformerSelfAttention window={window} (+ output Linear)"
        base = make_row("longformer", what, n, "forward", measured["longformer"], reach_each_side=window // 2)
        _, width = _kernel_width(n, MAX_SPAN + RAMP, causal=False)
        what = f"ours: q/k/v/o + kernel bidirectional max_span={MAX_SPAN} ramp={RAMP}"
        row = make_row(
            "longformer", what, n, "forward", measured["ours"], reach_each_side=MAX_SPAN + RAMP - 1, width=width
        )
        speedup = _ratio(base, row)
        row["ratios"]["longformer/ours"] = speedup
        row["speedup"], row["speedup_vs"] = speedup, "Longformer local"
        rows += [base, row]
    return rows


def bench_adaptive(ctx: BenchContext) -> list[dict]:
    """The kernel at inference with short (20%) spans vs full (100%) spans."""
    n = 512 if ctx.quick else 8192
    gen = ctx.generator()
    q, k, v = (ctx.randn(1, HEADS, n, HEAD_DIM, generator=gen) for _ in range(3))
    temp = ctx.rand(1, HEADS, n, generator=gen, low=0.5, high=1.0)
    fractions = {"full": 1.0, "short": 0.2}
    spans = {name: torch.full((1, HEADS, n), f * MAX_SPAN, device=ctx.device) for name, f in fractions.items()}
    calls = {
        name: _no_grad(lambda span=span: adaptive_local_attention(q, k, v, span, temp, max_span=MAX_SPAN, ramp=RAMP))
        for name, span in spans.items()
    }
    measured = ctx.compare(calls)
    rows: list[dict] = []
    for name, fraction in fractions.items():
        reach = min(MAX_SPAN + RAMP, math.ceil(fraction * MAX_SPAN) + RAMP)
        _, width = _kernel_width(n, reach, causal=True)
        what = f"kernel (ours), all spans {fraction:.0%} of max_span={MAX_SPAN}"
        rows.append(make_row("adaptive", what, n, "forward (no grad)", measured[name], width=width))
    speedup = _ratio(rows[0], rows[1])
    rows[1]["ratios"]["full/short"] = speedup
    rows[1]["speedup"], rows[1]["speedup_vs"] = speedup, "100% spans"
    return rows


def bench_flops(ctx: BenchContext) -> list[dict]:
    """Kernel GFLOP/s beside the machine's matmul GFLOP/s (large square, and the kernel's own batched shapes)."""
    n = 512 if ctx.quick else 8192
    size = 256 if ctx.quick else 2048
    gen = ctx.generator()
    padded, width = _kernel_width(n, MAX_SPAN + RAMP, causal=True)
    block = min(32, n)
    batch = HEADS * (padded // block)
    flops = 4 * HEADS * padded * width * HEAD_DIM  # the kernel's two matmuls

    a, b = ctx.randn(size, size, generator=gen), ctx.randn(size, size, generator=gen)
    qb, kt = ctx.randn(batch, block, HEAD_DIM, generator=gen), ctx.randn(batch, HEAD_DIM, width, generator=gen)
    pb, vb = ctx.randn(batch, block, width, generator=gen), ctx.randn(batch, width, HEAD_DIM, generator=gen)
    q, k, v = (ctx.randn(1, HEADS, n, HEAD_DIM, generator=gen) for _ in range(3))
    span = torch.full((1, HEADS, n), float(MAX_SPAN), device=ctx.device)
    temp = ctx.rand(1, HEADS, n, generator=gen, low=0.5, high=1.0)
    measured = ctx.compare(
        {
            "matmul": lambda: torch.matmul(a, b),
            "bmm": lambda: (torch.bmm(qb, kt), torch.bmm(pb, vb)),
            "kernel": _no_grad(lambda: adaptive_local_attention(q, k, v, span, temp, max_span=MAX_SPAN, ramp=RAMP)),
        }
    )
    peak = 2 * size**3 / (measured["matmul"].median_ms * 1e-3) / 1e9
    what = f"matmul {size}x{size} @ {size}x{size}"
    rows = [make_row("flops", what, None, "fp32 matmul", measured["matmul"], gflops=peak)]
    for name, what, mode in (
        ("bmm", f"the kernel's two bmm alone ({batch} x {block}x{HEAD_DIM} @ {HEAD_DIM}x{width}, ...)", "bmm"),
        ("kernel", f"kernel (ours) causal, max_span={MAX_SPAN} ramp={RAMP}, width={width}", "forward (no grad)"),
    ):
        gflops = flops / (measured[name].median_ms * 1e-3) / 1e9
        ratios = {"of matmul": gflops / peak}
        rows.append(make_row("flops", what, n, mode, measured[name], gflops=gflops, ratios=ratios))
    return rows
