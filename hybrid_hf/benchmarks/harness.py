"""Measuring side by side: repeated timings, peak memory, and the rows every benchmark section returns."""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

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


def keep_freed_memory() -> bool:
    """Ask the C allocator (glibc's malloc) to keep freed memory for reuse: no `mmap` for blocks under 1 GiB and no
    returning of freed memory to the operating system. By default a block over its dynamic threshold (at most 32 MB)
    is mapped fresh on every allocation and unmapped when freed, so a call pays a page fault for every 4 KiB of
    such a temporary, a cost that depends on the allocator's history and moved a training step's time by 20% from
    run to run. Call once, before anything is measured (what the environment variables `MALLOC_MMAP_THRESHOLD_` and
    `MALLOC_TRIM_THRESHOLD_` set at start-up). Returns False where the C library is not glibc."""
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, -1))  # -1: never trim


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
    long_tokens: int = 8192
    long_fractions: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)
    long_recovery_steps: int = 0
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
