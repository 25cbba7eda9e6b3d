"""`make gpu-check` (`python -m hybrid_hf.benchmarks.gpu_check`): the checks and timings a CUDA machine is for,
in one run of under 10 minutes.

1. ``tests``: the device-parametrised tests (`tests/conftest.py`'s ``device`` fixture) on CUDA, in a pytest
   subprocess (``-k cuda``): the kernel against the float64 reference in float32 and bf16, outputs and gradients,
   a converted model's forward against its host's, cached against uncached generation, and the training step on a
   fake CUDA device.
2. ``kernel``: the local kernel (banded eager; banded under `torch.compile`; `flex_attention`) against causal
   `F.scaled_dot_product_attention`, N = 4K and 16K, B=1, H=8, D=64, band 256 (max_span=224, ramp=32), bf16,
   forward (no grad) and forward+backward.
3. ``model``: a SmolLM2-135M-shaped Llama (random weights: hidden 576, 30 layers, 9 heads, 3 key/value heads,
   intermediate 1536, vocabulary 49152), converted, against the original, bf16: a training step (forward,
   backward, AdamW) at N=2048 and a forward (no grad) at N=8192.

Writes ``--out`` (default ``docs/gpu.json``: metadata, the test outcome and every row) and prints the Markdown
table. Timings use the benchmark's harness (`BenchContext.compare`: warm-up, then the median of interleaved timed
calls, the device synchronised around each). A run that nears ``--budget`` seconds skips its remaining cells, each
reported as skipped: the tests may take 40% of it, the kernel timings 60% of the time left after them, and the
model timings keep the rest.

Without CUDA it stops at once with one line and exit status 2, unless ``--quick``: tiny sizes on the CPU (a smoke
test of the whole path in seconds: the tests step runs one small CPU test, `torch.compile` uses its ``eager``
backend), whose numbers mean nothing.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ..commands import ArgumentParser, run
from ..errors import UsageError
from ..model.hybrid_attention import adaptive_local_attention
from .harness import BenchContext, _before, _grad_step, _no_grad, _ratio, make_row
from .kernels import HEAD_DIM, HEADS, MAX_SPAN, RAMP
from .models import smollm2_pair, training_step
from .report import markdown_table

#: the tests of the device fixture run on CUDA, and the one small CPU test of `--quick`
TEST_FILES = ("tests/test_hybrid_attention.py", "tests/test_devices.py", "tests/test_no_sync.py")
QUICK_TEST = "test_bfloat16_close_to_reference_at_moderate_temperature and cpu and not causal"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m hybrid_hf.benchmarks.gpu_check",
        description="On a CUDA machine: the device tests on CUDA, the local kernel against SDPA and a converted "
        "SmolLM2-shaped model against the original; writes docs/gpu.json and prints a Markdown table.",
    )
    parser.add_argument("--out", default="docs/gpu.json", help="the JSON report (default: docs/gpu.json)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, on the CPU without CUDA: a smoke test")
    parser.add_argument("--skip-tests", action="store_true", help="skip the pytest step")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per case (default 5; 1 with --quick)")
    parser.add_argument(
        "--budget", type=float, default=540.0, metavar="SECONDS", help="skip what is left past this (default 540)"
    )
    return parser


class Deadline:
    """The run's time budget: `left()` is False once `seconds` have passed since it was made."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> bool:
        return time.perf_counter() < self.end

    def share(self, fraction: float) -> Deadline:
        """A deadline `fraction` of the time left from now, so that one section cannot spend another's time."""
        return Deadline(fraction * max(0.0, self.end - time.perf_counter()))


def run_tests(quick: bool, device: torch.device, root: Path, seconds: float) -> dict:
    """The device-parametrised tests on `device` in a pytest subprocess, stopped after `seconds`:
    `{"command", "returncode", "summary"}` (return code -1 when stopped)."""
    files = [str(root / name) for name in TEST_FILES if (root / name).exists()]
    if not files:
        return {"command": None, "returncode": None, "summary": f"skipped: no tests folder under {root}"}
    selection = QUICK_TEST if quick else device.type
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", selection, *files]
    try:
        done = subprocess.run(command, cwd=root, capture_output=True, text=True, check=False, timeout=seconds)
    except subprocess.TimeoutExpired:
        return {"command": " ".join(command), "returncode": -1, "summary": f"stopped after {seconds:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return {"command": " ".join(command), "returncode": done.returncode, "summary": lines[-1] if lines else ""}


def _kernel_impls(q, k, v, span, temp, compile_backend: str) -> dict[str, Callable[[], torch.Tensor]]:
    """The implementations timed against each other on `(1, H, N, D)` inputs: name -> call. Flex attention (compiled
    on CUDA) joins them where PyTorch runs it: on CUDA, and on the CPU without gradients (eager, unfused)."""
    kwargs = dict(max_span=MAX_SPAN, ramp=RAMP, causal=True)
    compiled = torch.compile(adaptive_local_attention, backend=compile_backend, dynamic=False)
    impls = {
        "banded eager": functools.partial(adaptive_local_attention, q, k, v, span, temp, **kwargs),
        "banded compiled": functools.partial(compiled, q, k, v, span, temp, **kwargs),
    }
    if q.device.type == "cuda" or not q.requires_grad:
        impls["flex"] = functools.partial(
            adaptive_local_attention, q, k, v, span, temp, implementation="flex", **kwargs
        )
    impls["sdpa causal"] = functools.partial(F.scaled_dot_product_attention, q, k, v, is_causal=True)
    return impls


def bench_kernels(ctx: BenchContext, deadline: Deadline, dtype: torch.dtype, compile_backend: str) -> list[dict]:
    """The local kernel (eager, compiled) against causal SDPA, forward and forward+backward, at 4K and 16K."""
    sizes = (64, 128) if ctx.quick else (4096, 16384)
    rows: list[dict] = []
    for n in sizes:
        for mode in ("forward", "forward+backward"):
            grad = mode == "forward+backward"
            gen = ctx.generator()
            q, k, v = (ctx.randn(1, HEADS, n, HEAD_DIM, generator=gen).to(dtype).requires_grad_(grad) for _ in "qkv")
            span = ctx.rand(1, HEADS, n, generator=gen, high=MAX_SPAN).requires_grad_(grad)  # (B, H, N)
            temp = ctx.rand(1, HEADS, n, generator=gen, low=0.5, high=1.0).requires_grad_(grad)  # (B, H, N)
            impls = _kernel_impls(q, k, v, span, temp, compile_backend)
            what = {name: f"{name}, band {MAX_SPAN + RAMP}, H={HEADS} D={HEAD_DIM} {dtype}" for name in impls}
            if not deadline.left():
                rows += [make_row("kernel", what[name], n, mode, None, note="out of time budget") for name in impls]
                continue
            leaves = [q, k, v, span, temp]
            calls = {name: _grad_step(fn, leaves) if grad else _no_grad(fn) for name, fn in impls.items()}
            _before(calls["banded compiled"])
            calls["banded compiled"]()  # compiled here, so that the compilation is not the timed warm-up
            measured = ctx.compare(calls)
            cells = {name: make_row("kernel", what[name], n, mode, measured[name], impl=name) for name in impls}
            for name in ("banded eager", "banded compiled", "flex")[: len(impls) - 1]:
                cells[name]["ratios"]["sdpa/this"] = _ratio(cells["sdpa causal"], cells[name])
            rows += list(cells.values())
    return rows


def bench_smollm2(ctx: BenchContext, deadline: Deadline, dtype: torch.dtype) -> list[dict]:
    """A converted SmolLM2-135M-shaped model against the original: a training step at N=2048, a forward at 8192."""
    models, config = smollm2_pair(ctx.quick, ctx.device, ctx.seed)
    models = {name: model.to(dtype) for name, model in models.items()}
    n_train, n_forward = (64, 128) if ctx.quick else (2048, 8192)
    ids = torch.randint(0, config.vocab_size, (1, n_forward), generator=ctx.generator()).to(ctx.device)
    label = f"SmolLM2-135M shape, random weights, {dtype}, max_span={MAX_SPAN} ramp={RAMP}"
    steps = {}
    for name, model in models.items():
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        steps[name] = functools.partial(training_step, model, ids[:, :n_train], optimizer)
    forward = {
        name: _no_grad(lambda m=m: m(input_ids=ids, logits_to_keep=1, use_cache=False)) for name, m in models.items()
    }
    rows: list[dict] = []
    for mode, n, calls in (("training step (AdamW)", n_train, steps), ("forward (no grad)", n_forward, forward)):
        if calls is forward:
            for model in models.values():
                model.eval()
        if deadline.left():
            measured, note = ctx.compare(calls), ""
        else:
            measured, note = dict.fromkeys(calls), "out of time budget"
        cells = [
            make_row("model", f"{name} ({label})", n, mode, measured[name], impl=name, note=note) for name in calls
        ]
        cells[-1]["ratios"]["hybrid/original"] = _ratio(cells[-1], cells[0])
        rows += cells
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the checks; exit status 2 with one line when CUDA is missing (without `--quick`)."""
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available() and not args.quick:
        raise UsageError("gpu-check needs a CUDA device and torch.cuda.is_available() is False here (--quick: CPU)")
    if args.repeats is not None and args.repeats < 1:
        raise UsageError(f"--repeats must be >= 1, got {args.repeats}")
    if not args.budget > 0:
        raise UsageError(f"--budget must be a positive number of seconds, got {args.budget}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    repeats = args.repeats or (1 if args.quick else 5)
    ctx = BenchContext(device=device, repeats=repeats, quick=args.quick, memory=device.type == "cuda")
    deadline, started = Deadline(args.budget), time.perf_counter()
    root = Path(__file__).resolve().parents[2]  # the checkout: tests/ beside hybrid_hf/
    tests = (
        {"summary": "skipped (--skip-tests)"}
        if args.skip_tests
        else run_tests(args.quick, device, root, 0.4 * args.budget)
    )
    ctx.log(f"[gpu-check] tests: {tests['summary']}")
    compile_backend = "eager" if args.quick and device.type == "cpu" else "inductor"
    rows = bench_kernels(ctx, deadline.share(0.6), torch.bfloat16, compile_backend)  # the model keeps 40%
    rows += bench_smollm2(ctx, deadline, torch.bfloat16)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    meta = {
        "device": str(device),
        "device_name": name,
        "torch": torch.__version__,
        "quick": args.quick,
        "compile_backend": compile_backend,
        "repeats": repeats,
        "total_seconds": time.perf_counter() - started,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "tests": tests, "rows": rows}, indent=2, default=float) + "\n")
    print(f"gpu-check on {name}, torch {torch.__version__}; tests: {tests['summary']}\n\n" + markdown_table(rows))
    return 0 if tests.get("returncode") in (None, 0) else 1


if __name__ == "__main__":
    sys.exit(run(main))
