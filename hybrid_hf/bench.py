"""Benchmarks of the adaptive local attention kernel: ``python -m hybrid_hf.bench`` (later ``hybrid-hf bench``).

Every comparison is measured in the same process run, on the same device, and reported as a ratio, so the
numbers are read against each other rather than against a number taken on another machine or another day.

Sections (``--only NAME``, repeatable or comma-separated; all by default):

- ``kernel``: `adaptive_local_attention` (causal, max_span=224, ramp=32, so a band of 256 keys) against full
  causal `torch.nn.functional.scaled_dot_product_attention` and against the dense `reference_local_attention`,
  forward and forward+backward, N = 1024 ... 16384, B=1, H=8, D=64, float32, spans random in [0, max_span],
  temperatures random in [0.5, 1]. Ratios: sdpa/kernel, kernel(N)/kernel(N/2) (about 2 for linear growth),
  reference(N)/reference(N/2) (about 4 for quadratic growth). The reference is O(N^2) in memory and time: it is
  run only up to ``--reference-max-n`` (default 4096); larger cells are reported as skipped.
- ``seed``: the kernel against the seed's `slide_win` loop (a Python loop over windows of the sequence, plain
  softmax attention on the slices ``[start:i + span_len]``, span and temperature fixed to constants), at the
  seed's default sizes (max_span=32, slid_win=32) and at span 256, N=4096, B=1, H=8, D=64, forward, no grad.
  Both read a ``(B, N, H*D)`` tensor and return one; our rows include the reshapes to ``(B, H, N, D)``.
  Spans are all at max_span, so our band is at its widest (no adaptive saving).
- ``longformer``: a bidirectional local layer (q/k/v/o projections, 4 x Linear(512, 512), around the kernel
  with causal=False, max_span=224, ramp=32, i.e. 255 keys on each side plus itself) against transformers'
  `LongformerSelfAttention` with attention_window=512 (256 keys on each side plus itself), local attention
  only, N = 4096 and 16384, B=1, forward, no grad. Longformer's self-attention module projects q/k/v but its
  output projection lives in another module (`LongformerSelfOutput.dense`), so the Longformer side is timed with
  one Linear(512, 512) after it: both sides do the same four projections.
- ``adaptive``: the kernel at inference (no grad) with every span at 20% of max_span against every span at 100%,
  N=8192, max_span=224, ramp=32: at inference the band only reaches ``max(span) + ramp``.
- ``compile`` and ``lengths`` (in `bench_costs`): the kernel under ``torch.compile`` beside the eager kernel, and
  a converted model's training memory and decoding speed beside its host's at N = 1K, 4K and 16K. The run ends
  with a table of the cost targets (`bench_costs.targets_table`).
- ``flops``: the kernel's achieved GFLOP/s (``4 * B * H * N_padded * width * D`` for its two matmuls,
  ``width = block + window - 1`` as the kernel computes it), beside this machine's float32 matmul GFLOP/s
  (2048 x 2048 @ 2048 x 2048) and a batched matmul of the kernel's own shapes, all in the same run.

Timing (`BenchContext.compare`, `BenchContext.measure`): one warm-up call (a second one when the first ran under
the memory profiler and was short), then the median of up to ``--repeats`` timed calls (default 5). A case whose
warm-up took longer than ``--case-budget`` / repeats seconds gets fewer timed calls (at least one), so that one
slow case does not take the whole run; each row reports how many calls its median is over. On CUDA the device
is synchronised around every call. The functions of one comparison are warmed up one after the other and then
timed round-robin, so that a change of load during the comparison touches them alike. On a small CPU virtual
machine, code that allocates large temporaries moves by up to 1.5x from run to run (their pages are fresh from
the operating system on every call and the first touch of each is a page fault, whose cost varies), compute-bound
code (SDPA, matmul) by a few percent; other processes sharing the cores make everything slower and noisier (the
run records the load average before it starts). Read the ratios within one run.

Peak memory ("peak MB"): the largest amount of tensor memory *allocated during one call* on top of what was
already allocated when it started (inputs, weights), i.e. the working set of the call.

- On CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
  ``memory_allocated()`` before the call.
- On CPU, PyTorch keeps no allocator statistics, so the warm-up call runs under
  ``torch.profiler.profile(profile_memory=True)``: the profiler records every allocation and free made through
  PyTorch's CPU allocator (tensor storages, including autograd's saved tensors and gradients), and the peak is
  the maximum of their running sum in time order. It does not see memory that libraries allocate outside
  PyTorch's allocator (oneDNN/MKL scratch buffers, Python objects) nor the process RSS; it is the same
  quantity as the CUDA number. The profiler only watches the warm-up call, never a timed one.

Each row of the JSON also has ``page_faults_per_call``: the process's minor page faults per timed call (on CPU,
every first touch of a freshly mapped 4 KiB page; large temporaries cost this on every call).

Output: ``--out DIR`` (default ``bench_output``) receives ``bench.json`` (metadata and every row), ``bench.md``
(the Markdown table, also printed) and ``bench.png`` (kernel time against N, and every speed-up).

Adding a section: write ``def bench_NAME(ctx: BenchContext) -> list[dict]`` that builds rows with `make_row`
(timing each comparison with ``ctx.compare({name: fn})``, or one function with ``ctx.measure``; a function may
carry a ``before`` hook, run untimed ahead of each call, as `_grad_step` does to drop old gradients; put
speed-ups in ``ratios`` and the headline one in ``speedup``), and add it to `SECTIONS`. The ``model`` section
(converted model against the original) goes there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .cli import ArgumentParser, UsageError, first_line, run
from .hybrid_attention import adaptive_local_attention, reference_local_attention

MB = 1024.0**2


# --------------------------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Measurement:
    """Times of the timed calls (ms), their median, and the peak memory of one call (bytes, None if not measured)."""

    times_ms: list[float]
    peak_bytes: int | None = None
    page_faults: float | None = None  # minor page faults per timed call (CPU; None where unavailable)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)


@contextlib.contextmanager
def _quiet_stderr_fd() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ start/stop log lines), restoring it afterwards."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (embedded interpreter): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _minor_faults() -> int:
    """Minor page faults of this process so far (first touches of fresh memory), or -1 where unavailable."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, OSError):  # not on Windows
        return -1


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Run `fn` once under the memory profiler; peak of the running sum of CPU allocations minus frees."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    with _quiet_stderr_fd(), profile(activities=activities, profile_memory=True, record_shapes=False) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        if str(event.device_type()).endswith("CPU"):  # DeviceType.CPU
            live += event.nbytes()
            peak = max(peak, live)
    return peak


@dataclass
class BenchContext:
    """What every section needs: the device, the sizes' mode, and the shared timing helper `measure`."""

    device: torch.device
    repeats: int = 5
    quick: bool = False
    memory: bool = True
    case_budget_s: float = 10.0
    reference_max_n: int = 4096
    seed: int = 0
    log: Callable[[str], None] = field(default=lambda message: tqdm.write(message, file=sys.stderr))

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _warm_up(self, fn: Callable[[], object]) -> tuple[float, int | None]:
        """One warm-up call, measuring its peak memory; returns (seconds, peak bytes or None)."""
        peak: int | None = None
        _before(fn)
        self.sync()
        start = time.perf_counter()
        if self.memory and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            fn()
            self.sync()
            peak = torch.cuda.max_memory_allocated(self.device) - before
        elif self.memory:
            peak = _cpu_peak_bytes(fn)
        else:
            fn()
            self.sync()
        seconds = time.perf_counter() - start
        if seconds < 0.5 and self.memory:  # it ran under the profiler: warm up once more without it
            _before(fn)
            fn()
            self.sync()
        return seconds, peak

    def compare(self, fns: dict[str, Callable[[], object]], repeats: int | None = None) -> dict[str, Measurement]:
        """Measure several functions side by side: warm each up, then interleave their timed calls.

        Each gets up to `repeats` timed calls (fewer when its warm-up shows it would overrun the case budget);
        the calls go round-robin, so a change of machine load during the case touches every function alike.
        """
        repeats = self.repeats if repeats is None else repeats
        warm = {name: self._warm_up(fn) for name, fn in fns.items()}
        budget = self.case_budget_s
        counts = {name: max(1, min(repeats, int(budget / max(seconds, 1e-9)))) for name, (seconds, _) in warm.items()}
        times: dict[str, list[float]] = {name: [] for name in fns}
        faults: dict[str, int] = {name: 0 for name in fns}
        for round_ in range(max(counts.values(), default=0)):
            for name, fn in fns.items():
                if round_ < counts[name]:
                    _before(fn)
                    self.sync()
                    faults_before = _minor_faults()
                    start = time.perf_counter()
                    fn()
                    self.sync()
                    times[name].append((time.perf_counter() - start) * 1e3)
                    faults[name] += _minor_faults() - faults_before
        per_call = {name: faults[name] / len(times[name]) if _minor_faults() >= 0 else None for name in fns}
        return {name: Measurement(times[name], warm[name][1], per_call[name]) for name in fns}

    def measure(self, fn: Callable[[], object], repeats: int | None = None) -> Measurement:
        """Warm up `fn` once (measuring its peak memory), then time the median of up to `repeats` calls."""
        return self.compare({"fn": fn}, repeats)["fn"]

    def progress(self, items: Iterable, desc: str) -> Iterable:
        items = list(items)
        return tqdm(items, desc=desc, total=len(items), leave=False, file=sys.stderr, dynamic_ncols=True)

    def generator(self) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(self.seed)

    def randn(self, *shape: int, generator: torch.Generator, requires_grad: bool = False) -> torch.Tensor:
        tensor = torch.randn(*shape, generator=generator).to(self.device)
        return tensor.requires_grad_(requires_grad)

    def rand(self, *shape: int, generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        return (low + (high - low) * torch.rand(*shape, generator=generator)).to(self.device)


def make_row(
    section: str,
    what: str,
    n: int | None,
    mode: str,
    measurement: Measurement | None,
    *,
    note: str = "",
    **extra: object,
) -> dict:
    """One result: `measurement` None means the cell was skipped (say why in `note`)."""
    row: dict = {"section": section, "what": what, "n": n, "mode": mode}
    if measurement is None:
        row.update(time_ms=None, times_ms=[], repeats=0, peak_mb=None, page_faults_per_call=None, skipped=True)
    else:
        row.update(
            time_ms=measurement.median_ms,
            times_ms=measurement.times_ms,
            repeats=len(measurement.times_ms),
            peak_mb=None if measurement.peak_bytes is None else measurement.peak_bytes / MB,
            page_faults_per_call=measurement.page_faults,
            skipped=False,
        )
    row["ratios"] = dict(extra.pop("ratios", {}) or {})
    row["note"] = note
    row.update(extra)
    return row


def _ratio(numerator: dict | None, denominator: dict | None) -> float | None:
    if not numerator or not denominator or numerator.get("time_ms") is None or denominator.get("time_ms") is None:
        return None
    return numerator["time_ms"] / denominator["time_ms"]


def _grad_step(fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor]) -> Callable[[], None]:
    """Forward + backward of `fn().sum()`. Its `before` hook, which `BenchContext` runs ahead of every call and
    outside the timing and the memory measurement, drops the gradients of `leaves` left by the previous call."""

    def step() -> None:
        fn().sum().backward()

    def before() -> None:
        for leaf in leaves:
            leaf.grad = None

    step.before = before  # type: ignore[attr-defined]
    return step


def _before(fn: Callable[[], object]) -> None:
    """Run `fn`'s `before` hook, if it has one (see `_grad_step`)."""
    hook = getattr(fn, "before", None)
    if hook is not None:
        hook()


def _no_grad(fn: Callable[[], object]) -> Callable[[], None]:
    def call() -> None:
        with torch.no_grad():
            fn()

    return call


# --------------------------------------------------------------------------------------------------------------
# Sections

HEADS, HEAD_DIM = 8, 64
MAX_SPAN, RAMP = 224, 32  # max_span + ramp = 256: the band of the kernel


def _kernel_width(n: int, reach: int, causal: bool, block_size: int = 32) -> tuple[int, int]:
    """`(padded N, width)` as `adaptive_local_attention` computes them at inference for a band reaching `reach` keys."""
    block = max(1, min(block_size, n))
    padded = -(-n // block) * block
    return padded, block + (reach - 1) * (1 if causal else 2)


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
        gen = ctx.generator()
        grad = mode == "forward+backward"
        q, k, v = (ctx.randn(1, HEADS, n, HEAD_DIM, generator=gen, requires_grad=grad) for _ in range(3))
        span = ctx.rand(1, HEADS, n, generator=gen, high=MAX_SPAN).requires_grad_(grad)
        temp = ctx.rand(1, HEADS, n, generator=gen, low=0.5, high=1.0).requires_grad_(grad)
        impls: dict[str, Callable[[], torch.Tensor]] = {
            "kernel": lambda: adaptive_local_attention(q, k, v, span, temp, **kwargs),
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        }
        if n <= ref_max:
            impls["reference"] = lambda: reference_local_attention(q, k, v, span, temp, **kwargs)
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


def bench_model(ctx: BenchContext) -> list[dict]:
    """A converted SmolLM2-135M-shaped Llama (random weights) vs the same model unconverted.

    Forward (prefill) at N=2048, a training step (forward, backward, AdamW) at N=1024 with its peak memory, and
    greedy decoding tokens/s after a 1024-token prompt (generation time minus the prompt's prefill).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from .conversion import convert

    sizes = dict(hidden_size=72, intermediate_size=128, num_hidden_layers=2) if ctx.quick else {}
    config = LlamaConfig(
        **{"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
           "tie_word_embeddings": True, **sizes}
    )
    n_forward, n_train, context, new_tokens = (128, 64, 64, 8) if ctx.quick else (2048, 1024, 1024, 32)
    torch.manual_seed(ctx.seed)
    models = {"original": LlamaForCausalLM(config).to(ctx.device).eval()}
    models["hybrid"] = convert(models["original"], max_span=MAX_SPAN, ramp=RAMP)
    gen = ctx.generator()
    ids = torch.randint(0, config.vocab_size, (1, n_forward), generator=gen).to(ctx.device)
    labels = {name: f"{name} (SmolLM2-135M config, max_span={MAX_SPAN} ramp={RAMP})" for name in models}
    rows: list[dict] = []

    def add(mode: str, n: int, measured: dict[str, Measurement], **extra: object) -> None:
        for name in models:
            rows.append(make_row("model", labels[name], n, mode, measured[name], impl=name, **extra.get(name, {})))
        ratio = _ratio(rows[-1], rows[-2])
        rows[-1]["ratios"]["hybrid/original"] = ratio

    forward = {name: _no_grad(lambda m=m: m(input_ids=ids, logits_to_keep=1)) for name, m in models.items()}
    add("forward (no grad)", n_forward, ctx.compare(forward))

    prompt = ids[:, :context]
    settings = dict(do_sample=False, pad_token_id=0)

    def decode(model, tokens: int) -> Callable[[], None]:
        return _no_grad(lambda: model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, **settings))

    prefill = ctx.compare({name: decode(m, 1) for name, m in models.items()})
    full = ctx.compare({name: decode(m, new_tokens + 1) for name, m in models.items()})
    rate = {
        name: new_tokens / max(1e-9, (full[name].median_ms - prefill[name].median_ms) * 1e-3) for name in models
    }
    add(f"greedy decoding of {new_tokens} tokens after the prompt", context, full,
        **{name: {"tokens_per_s": rate[name]} for name in models})
    rows[-1]["ratios"] = {"tokens/s hybrid/original": rate["hybrid"] / rate["original"]}
    for row in rows[-2:]:
        row["note"] = f"{rate[row['impl']]:.1f} tokens/s"

    train_ids = ids[:, :n_train]
    steps = {}
    for name, model in models.items():
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step(model=model, optimizer=optimizer) -> None:
            model.train()
            model(input_ids=train_ids, labels=train_ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[name] = step
    measured = ctx.compare(steps)
    add("training step (forward, backward, AdamW)", n_train, measured)
    if all(measured[name].peak_bytes for name in models):
        rows[-1]["ratios"]["peak memory hybrid/original"] = measured["hybrid"].peak_bytes / measured["original"].peak_bytes
    return rows


def _cost_section(name: str) -> Callable[[BenchContext], list[dict]]:
    """Section `name` of `bench_costs`, imported when it runs (it builds on this module's helpers)."""

    def section(ctx: BenchContext) -> list[dict]:
        from . import bench_costs

        return getattr(bench_costs, name)(ctx)

    return section


# Section name -> function returning rows. Add new sections here.
SECTIONS: dict[str, Callable[[BenchContext], list[dict]]] = {
    "kernel": bench_kernel,
    "seed": bench_seed,
    "compile": _cost_section("bench_compile"),
    "longformer": bench_longformer,
    "adaptive": bench_adaptive,
    "flops": bench_flops,
    "model": bench_model,
    "lengths": _cost_section("bench_lengths"),
}


# --------------------------------------------------------------------------------------------------------------
# Reporting


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "—"
    if value == 0 or not math.isfinite(value):
        return str(value)
    decimals = max(0, digits - 1 - int(math.floor(math.log10(abs(value)))))
    return f"{value:,.{decimals}f}"


def markdown_table(rows: list[dict]) -> str:
    """One Markdown table of every row: time is the median in ms, ratios are `name x value`."""
    lines = [
        "| section | what | N | mode | time (ms) | calls | peak MB | ratios | note |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | --- | --- |",
    ]
    for row in rows:
        ratios = ", ".join(f"{name} {_fmt(value)}" for name, value in row["ratios"].items() if value is not None)
        note = row.get("note", "")
        if "gflops" in row:
            note = f"{_fmt(row['gflops'])} GFLOP/s" + (f"; {note}" if note else "")
        time_ms = "skipped" if row.get("skipped") else _fmt(row["time_ms"])
        cells = [
            row["section"], row["what"], "" if row["n"] is None else str(row["n"]), row["mode"], time_ms,
            str(row["repeats"]), _fmt(row["peak_mb"]), ratios, note,
        ]
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Left: time against N for the `kernel` section (log-log). Right: every row's headline speed-up."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 7), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, width_ratios=[1, 1.3])

    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        if row["section"] == "kernel" and row["time_ms"] is not None:
            series.setdefault(f"{row['what']}, {row['mode']}", []).append((row["n"], row["time_ms"]))
    for label, points in series.items():
        points.sort()
        style = "--" if "backward" in label else "-"
        left.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=label)
    if series:
        left.set_xscale("log", base=2)
        left.set_yscale("log")
        left.legend(fontsize=8, loc="upper left")
    left.set_xlabel("sequence length N")
    left.set_ylabel("median time (ms)")
    left.set_title("kernel section: time vs N")
    left.grid(True, which="both", alpha=0.3)

    speedups = [row for row in rows if row.get("speedup") is not None]
    labels = [
        textwrap.fill(f"{r['section']}: {r['what']} vs {r['speedup_vs']} (N={r['n']}, {r['mode']})", 70)
        for r in speedups
    ]
    values = [r["speedup"] for r in speedups]
    positions = list(range(len(values)))[::-1]
    right.barh(positions, values, color=["tab:green" if value >= 1 else "tab:red" for value in values])
    right.set_yticks(positions, labels, fontsize=7)
    right.axvline(1.0, color="black", linewidth=0.8)
    right.set_xlabel("speed-up (baseline time / our time; > 1: ours faster)")
    right.set_title("speed-ups")
    for position, value in zip(positions, values):
        right.text(value, position, f" {value:.2f}x", va="center", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)


# --------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="hybrid-hf bench",
        description="Benchmark the adaptive local attention kernel against SDPA, the dense reference, the seed's "
        "loop and Longformer; writes bench.json, bench.md and bench.png.",
    )
    parser.add_argument("--out", default="bench_output", help="output folder (default: bench_output)")
    parser.add_argument(
        "--only", action="append", default=None, metavar="NAME",
        help=f"run only these sections (repeatable or comma-separated): {', '.join(SECTIONS)}",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed calls per case, median reported (default 5; 2 with --quick)"
    )
    parser.add_argument(
        "--case-budget", type=float, default=None, metavar="SECONDS",
        help="a case whose warm-up call takes longer than SECONDS / repeats gets fewer timed calls "
        "(default 10; 1 with --quick)",
    )
    parser.add_argument(
        "--device", default="auto", help="'auto' (CUDA when available, else CPU; default), 'cpu', 'cuda', 'cuda:1'..."
    )
    parser.add_argument(
        "--reference-max-n", type=int, default=4096, help="largest N for the dense O(N^2) reference (default 4096)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of a few seconds")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the inputs")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: torch's, usually one per core)"
    )
    return parser


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} requested but CUDA is not available")
    return device


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None


def main(argv: list[str] | None = None) -> int:
    """`hybrid-hf bench ...`. Bad input raises (`cli.run` turns it into one line and exit status 2)."""
    args = build_parser().parse_args(argv)
    names = list(SECTIONS) if not args.only else [n.strip() for item in args.only for n in item.split(",") if n.strip()]
    unknown = [name for name in names if name not in SECTIONS]
    if unknown:
        raise UsageError(f"--only: unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.case_budget is None:
        args.case_budget = 1.0 if args.quick else 10.0
    for flag, value in (("repeats", args.repeats), ("threads", args.threads), ("reference-max-n", args.reference_max_n)):
        if value is not None and value < 1:
            raise UsageError(f"--{flag} must be >= 1, got {value}")
    if not 0 < args.case_budget < math.inf:
        raise UsageError(f"--case-budget must be a positive number of seconds, got {args.case_budget}")
    if not 0 <= args.seed < 2**32:
        raise UsageError(f"--seed must be in [0, 2**32), got {args.seed}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out must be a folder, but {args.out} is a file")
    try:
        device = _resolve_device(args.device)
    except (ValueError, RuntimeError) as error:  # RuntimeError: torch.device() of an unknown name
        raise UsageError(f"--device: {first_line(error)}") from None
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, names, device)
    finally:
        torch.set_num_threads(threads)  # main() may run inside another program (tests): leave it as it was


def _run(args: argparse.Namespace, names: list[str], device: torch.device) -> int:
    ctx = BenchContext(
        device=device,
        repeats=args.repeats,
        quick=args.quick,
        memory=not args.no_memory,
        case_budget_s=args.case_budget,
        reference_max_n=args.reference_max_n,
        seed=args.seed,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    load_start = _loadavg()
    if load_start is not None and load_start > 0.5:
        ctx.log(
            f"[bench] warning: load average {load_start:.2f} before starting: other processes use the CPU, "
            "timings will be noisy (the ratios, measured interleaved, less so)"
        )
    started = time.perf_counter()
    rows: list[dict] = []
    section_seconds: dict[str, float] = {}
    for name in tqdm(names, desc="bench", file=sys.stderr, dynamic_ncols=True):
        section_start = time.perf_counter()
        rows.extend(SECTIONS[name](ctx))
        section_seconds[name] = time.perf_counter() - section_start
        ctx.log(f"[bench] {name}: {section_seconds[name]:.1f} s")
    total = time.perf_counter() - started

    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
    meta = {
        "device": str(device),
        "device_name": device_name,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "dtype": "float32",
        "sections": names,
        "repeats": args.repeats,
        "case_budget_s": args.case_budget,
        "quick": args.quick,
        "memory": "none" if args.no_memory else (
            "torch.cuda.max_memory_allocated - memory_allocated before the call" if device.type == "cuda"
            else "peak running sum of CPU allocator events under torch.profiler(profile_memory=True), warm-up call"
        ),
        "loadavg_1min_start": load_start,
        "loadavg_1min_end": _loadavg(),
        "section_seconds": section_seconds,
        "total_seconds": total,
    }
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass

    from .bench_costs import targets_table

    table = markdown_table(rows)
    targets = targets_table(rows)
    if targets:
        table += "\nCost targets (converted model / original, and the kernel):\n\n" + targets
    header = (
        f"Benchmark on {meta['device']} ({device_name}, {meta['threads']} threads), torch {meta['torch']}, float32; "
        f"time = median of `calls` timed calls after a warm-up; peak MB = tensor memory allocated during one call; "
        f"total {total:.0f} s"
        + (f"; 1-min load average before the run {load_start:.2f}" if load_start is not None else "")
        + ".\n\n"
    )
    (out / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=float) + "\n")
    (out / "bench.md").write_text(header + table)
    title = f"hybrid_hf bench: {device_name}, {meta['threads']} threads, torch {meta['torch']}"
    plot(rows, out / "bench.png", title=title)
    print(header + table)
    print(f"wrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'bench.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
