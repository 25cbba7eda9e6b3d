"""The benchmark's report: a Markdown table of the rows, and their plot."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path


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
            row["section"],
            row["what"],
            "" if row["n"] is None else str(row["n"]),
            row["mode"],
            time_ms,
            str(row["repeats"]),
            _fmt(row["peak_mb"]),
            ratios,
            note,
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
    for position, value in zip(positions, values, strict=False):
        right.text(value, position, f" {value:.2f}x", va="center", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)


def plot_long(rows: list[dict], path: Path, title: str) -> bool:
    """Quality against cache size for the `long` section: each model's perplexity ratio to the original (one
    marker per text, hollow before the recovery fine-tune, filled after) against its cache bytes ratio. False (and
    nothing written) when the run has no `long` rows."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cache = {row["impl"]: row["ratios"].get("cache converted/original") for row in rows
             if row["section"] == "long" and row["mode"].startswith("prefill")}  # fmt: skip
    points = [row for row in rows if row["section"] == "long" and row["mode"].startswith("perplexity")
              and row["impl"] != "original" and cache.get(row["impl"]) is not None]  # fmt: skip
    if not points:
        return False
    fig = Figure(figsize=(8, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots()
    for text, color in (("hamlet", "tab:blue"), ("lee news", "tab:orange")):
        for stage, fill in (("before recovery", "none"), ("after recovery", color)):
            chosen = [row for row in points if row["mode"].endswith(text) and row.get("stage") == stage]
            if chosen:
                axes.scatter([cache[row["impl"]] for row in chosen],
                             [row["ratios"]["perplexity converted/original"] for row in chosen],
                             facecolors=fill, edgecolors=color, s=60, label=f"{text}, {stage}")  # fmt: skip
                for row in chosen:
                    axes.annotate(row["impl"].replace(" local-only", ""), (cache[row["impl"]],
                                  row["ratios"]["perplexity converted/original"]), fontsize=7,
                                  xytext=(4, 4), textcoords="offset points")  # fmt: skip
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set_xlabel("cache bytes after the prompt, converted / original")
    axes.set_ylabel("perplexity, converted / original")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    return True
