"""`hybrid-hf bench`: the local attention kernel and hybrid models, measured beside the alternatives.

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
- ``compile`` and ``lengths`` (in `costs`): the kernel under ``torch.compile`` beside the eager kernel, and
  a converted model's training memory and decoding speed beside its host's at N = 1K, 4K and 16K. The run ends
  with a table of the cost targets (`costs.targets_table`).
- ``flops``: the kernel's achieved GFLOP/s (``4 * B * H * N_padded * width * D`` for its two matmuls,
  ``width = block + window - 1`` as the kernel computes it), beside this machine's float32 matmul GFLOP/s
  (2048 x 2048 @ 2048 x 2048) and a batched matmul of the kernel's own shapes, all in the same run.

Timing (`BenchContext.compare`, `BenchContext.measure`): one warm-up call (a second one when the first ran under
the memory profiler and was short), then the median of up to ``--repeats`` timed calls (default 5). A case whose
warm-up took longer than ``--case-budget`` / repeats seconds gets fewer timed calls (at least one), so that one
slow case does not take the whole run; each row reports how many calls its median is over. On CUDA the device
is synchronised around every call. The functions of one comparison are warmed up one after the other and then
timed round-robin, so that a change of load during the comparison touches them alike. On the CPU (glibc) the run
first asks the C allocator to keep freed memory for reuse (`harness.keep_freed_memory`; not with ``--quick``):
otherwise each large temporary comes fresh from the operating system on every call, with a page fault per 4 KiB
whose number depends on the allocator's history, and a training step's time moved by 20% from run to run.
Compute-bound code (SDPA, matmul) moves by a few percent; other processes sharing the cores make everything slower
and noisier (the run records the load average before it starts). Read the ratios within one run.

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
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..commands import ArgumentParser, run
from ..errors import UsageError, first_line
from . import costs
from .harness import BenchContext, keep_freed_memory
from .kernels import bench_adaptive, bench_flops, bench_kernel, bench_longformer, bench_seed
from .long import bench_long
from .models import bench_model
from .report import markdown_table, plot, plot_long

# Section name -> function returning rows. Add new sections here.
SECTIONS: dict[str, Callable[[BenchContext], list[dict]]] = {
    "kernel": bench_kernel,
    "seed": bench_seed,
    "compile": costs.bench_compile,
    "longformer": bench_longformer,
    "adaptive": bench_adaptive,
    "flops": bench_flops,
    "model": bench_model,
    "lengths": costs.bench_lengths,
    "long": bench_long,
}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="hybrid-hf bench",
        description="Benchmark the adaptive local attention kernel against SDPA, the dense reference, the seed's "
        "loop and Longformer; writes bench.json, bench.md and bench.png.",
    )
    parser.add_argument("--out", default="bench_output", help="output folder (default: bench_output)")
    parser.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="NAME",
        help=f"run only these sections (repeatable or comma-separated): {', '.join(SECTIONS)}",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed calls per case, median reported (default 5; 2 with --quick)"
    )
    parser.add_argument(
        "--case-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="a case whose warm-up call takes longer than SECONDS / repeats gets fewer timed calls "
        "(default 10; 1 with --quick)",
    )
    parser.add_argument(
        "--device", default="auto", help="'auto' (CUDA when available, else CPU; default), 'cpu', 'cuda', 'cuda:1'..."
    )
    parser.add_argument(
        "--reference-max-n", type=int, default=4096, help="largest N for the dense O(N^2) reference (default 4096)"
    )
    parser.add_argument(
        "--long-tokens", type=int, default=8192, metavar="N", help="context length of the long section (default 8192)"
    )
    parser.add_argument(
        "--long-fractions",
        default="0,0.25,0.5,0.75",
        metavar="F,G,...",
        help="shares of the layers made local-only in the long section (default 0,0.25,0.5,0.75)",
    )
    parser.add_argument(
        "--long-recovery-steps",
        type=int,
        default=0,
        metavar="S",
        help="recovery fine-tune steps (LoRA, distillation from the original) of each model with local-only layers "
        "in the long section, measured again after (default 0: none)",
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
    names = (
        list(SECTIONS) if not args.only else [n.strip() for item in args.only for n in item.split(",") if n.strip()]
    )
    unknown = [name for name in names if name not in SECTIONS]
    if unknown:
        raise UsageError(f"--only: unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.case_budget is None:
        args.case_budget = 1.0 if args.quick else 10.0
    fractions = [part.strip() for part in args.long_fractions.split(",") if part.strip()]
    if not fractions or not all(re.fullmatch(r"0(\.\d*)?|1(\.0*)?|\.\d+", part) for part in fractions):
        raise UsageError(f"--long-fractions must be comma-separated numbers in [0, 1], got {args.long_fractions!r}")
    args.long_fractions = tuple(float(part) for part in fractions)
    if args.long_recovery_steps < 0:
        raise UsageError(f"--long-recovery-steps must be >= 0, got {args.long_recovery_steps}")
    for flag, value in (
        ("long-tokens", args.long_tokens),
        ("repeats", args.repeats),
        ("threads", args.threads),
        ("reference-max-n", args.reference_max_n),
    ):
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
        long_tokens=args.long_tokens,
        long_fractions=args.long_fractions,
        long_recovery_steps=args.long_recovery_steps,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    freed_memory_kept = device.type == "cpu" and not args.quick and keep_freed_memory()

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
        "memory": "none"
        if args.no_memory
        else (
            "torch.cuda.max_memory_allocated - memory_allocated before the call"
            if device.type == "cuda"
            else "peak running sum of CPU allocator events under torch.profiler(profile_memory=True), warm-up call"
        ),
        "allocator": "glibc, freed memory kept for reuse (harness.keep_freed_memory)"
        if freed_memory_kept
        else "as configured",
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

    table = markdown_table(rows)
    targets = costs.targets_table(rows)
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
    written = [out / "bench.json", out / "bench.md", out / "bench.png"]
    if plot_long(rows, out / "long.png", title=f"long context: {title}"):
        written.append(out / "long.png")
    print(header + table)
    print(f"wrote {', '.join(map(str, written))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
