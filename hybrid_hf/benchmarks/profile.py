"""Where a converted model's extra time goes: `torch.profiler` on a forward and on decoding steps, beside its host.

`python -m hybrid_hf.benchmarks.profile [--out DIR] [--quick]` converts the benchmark's SmolLM2-135M-shaped Llama
(random weights; `models.smollm2_pair`) and profiles the original and the hybrid model on

- one forward (prefill) of N=2048 tokens, without gradients;
- one training step of N=1024 tokens (forward with the LM loss, backward, AdamW);
- greedy decoding steps after a 1024-token prompt: the profiler starts after the prompt and a few warm-up steps
  (from `decoding.StepWindow`, a logits processor) and stops when `generate` returns.

It sums the ATen operators' own CPU time by kind (matrix multiplies, SDPA attention, every other operator) and counts
their calls. The same work is also timed without the profiler (median of 3 calls); that wall time minus the
operators' time is spent outside ATen's kernels: Python, the dispatcher, the profiler-free part of `generate`.
Writes `profile.json` and `profile.md` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from ..commands import ArgumentParser, run
from .decoding import StepWindow, greedy
from .harness import keep_freed_memory
from .models import smollm2_pair, training_step

#: Operator kinds, by the prefix of the ATen operator's name; the first match wins, "other" takes the rest.
KINDS = {
    "matrix multiplies": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "attention (SDPA)": ("aten::_scaled_dot_product", "aten::_flash_attention"),
}


def operator_times(prof: profile) -> dict[str, dict[str, float]]:
    """`{kind: {"ms": own CPU time, "calls": count}}` of the ATen operators of a finished profile, with "other" and
    "all ATen"."""
    totals = {kind: {"ms": 0.0, "calls": 0} for kind in (*KINDS, "other", "all ATen")}
    for event in prof.key_averages():
        if not event.key.startswith("aten::"):
            continue
        kind = next((kind for kind, prefixes in KINDS.items() if event.key.startswith(prefixes)), "other")
        for name in (kind, "all ATen"):
            totals[name]["ms"] += event.self_cpu_time_total / 1e3
            totals[name]["calls"] += event.count
    return totals


def profile_decoding(model, prompt: torch.Tensor, steps: int, warmup: int, profiled: bool) -> tuple[float, profile]:
    """Greedy decoding of `warmup + steps` tokens after `prompt`; returns the wall ms of the last `steps - 1`
    forwards (and `generate`'s own work around them) and the profile of the same window (None when not `profiled`).
    """
    prof = profile(activities=[ProfilerActivity.CPU]) if profiled else None
    seconds, _ = greedy(model, prompt, warmup + steps, StepWindow(warmup + 1, prof.start if profiled else None))
    if prof is not None:
        prof.stop()
    return seconds * 1e3, prof


def _timed(fn, profiled: bool) -> tuple[float, profile]:
    """One call of `fn`, timed, under the profiler when `profiled`: wall ms and the profile (None when not)."""
    prof = profile(activities=[ProfilerActivity.CPU]) if profiled else None
    start = time.perf_counter()
    if prof is not None:
        prof.start()
    fn()
    if prof is not None:
        prof.stop()
    return (time.perf_counter() - start) * 1e3, prof


def profile_forward(model, ids: torch.Tensor, profiled: bool) -> tuple[float, profile]:
    """One forward of `ids` without gradients (after one warm-up forward): wall ms and its profile."""
    with torch.no_grad():
        model(input_ids=ids, logits_to_keep=1)
        return _timed(lambda: model(input_ids=ids, logits_to_keep=1), profiled)


def profile_training_step(model, ids: torch.Tensor, profiled: bool) -> tuple[float, profile]:
    """One training step on `ids` (forward with the LM loss, backward, AdamW), after one warm-up step: wall ms and
    its profile. The model's weights change; it is put back in eval mode."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    training_step(model, ids, optimizer)
    measured = _timed(lambda: training_step(model, ids, optimizer), profiled)
    model.eval()
    return measured


def run_profiles(quick: bool = False, seed: int = 0) -> dict:
    """Profile both phases for the original and the hybrid model; returns the report's dict."""
    if not quick:
        keep_freed_memory()  # as `hybrid-hf bench` does: no page fault per 4 KiB of large temporaries
    models, config = smollm2_pair(quick, torch.device("cpu"), seed)
    n_forward, n_train, context, steps, warmup = (128, 64, 64, 4, 1) if quick else (2048, 1024, 1024, 16, 3)
    ids = torch.randint(0, config.vocab_size, (1, n_forward), generator=torch.Generator().manual_seed(seed))
    phases = {  # name: (profiled function, forwards it makes)
        f"forward, N={n_forward}": (lambda m, p: profile_forward(m, ids, p), 1),
        f"training step, N={n_train}": (lambda m, p: profile_training_step(m, ids[:, :n_train], p), 1),
        f"decoding, {steps - 1} steps after {context + warmup + 1} tokens": (
            lambda m, p: profile_decoding(m, ids[:, :context], steps, warmup, p),
            steps - 1,
        ),
    }
    report = {"layers": config.num_hidden_layers, "phases": {}, "forwards": {}}
    for phase, (fn, forwards) in phases.items():
        entry = report["phases"][phase] = {}
        report["forwards"][phase] = forwards
        for name, model in models.items():
            wall = statistics.median(fn(model, False)[0] for _ in range(1 if quick else 3))
            _, prof = fn(model, True)
            times = operator_times(prof)
            times["outside ATen"] = {"ms": wall - times["all ATen"]["ms"], "calls": None}
            times["wall (no profiler)"] = {"ms": wall, "calls": None}
            entry[name] = times
    return report


def markdown(report: dict) -> str:
    """The report as one Markdown table: per phase and kind, the original's and the hybrid's ms and calls."""
    lines = [
        "| phase | kind | original ms | hybrid ms | hybrid / original | extra calls per layer and forward |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for phase, entry in report["phases"].items():
        original, hybrid = entry["original"], entry["hybrid"]
        per = report["layers"] * report["forwards"][phase]
        for kind in original:
            a, b = original[kind], hybrid[kind]
            calls = "" if a["calls"] is None else f"{(b['calls'] - a['calls']) / per:.1f}"
            ratio = f"{b['ms'] / a['ms']:.2f}" if a["ms"] > 0 else ""
            lines.append(f"| {phase} | {kind} | {a['ms']:,.1f} | {b['ms']:,.1f} | {ratio} | {calls} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m hybrid_hf.benchmarks.profile",
        description="Profile a converted SmolLM2-shaped model beside its host: ATen time by kind, forward, decoding.",
    )
    parser.add_argument("--out", default="profile_output", help="output folder (default: profile_output)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of a few seconds")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights and inputs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = run_profiles(quick=args.quick, seed=args.seed)
    report["torch"] = torch.__version__
    report["threads"] = torch.get_num_threads()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(report)
    (out / "profile.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "profile.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
