"""Figures of a `spans.SpanRecord`: the learned spans and temperatures per layer and head, and along the text."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .spans import SpanRecord, check_layers

SPAN_HEATMAP = "span_heatmap.png"
TEMPERATURE_HEATMAP = "temperature_heatmap.png"
SPAN_ALONG_SEQUENCE = "span_along_sequence.png"
#: the files `plot_spans` writes
FIGURES = (SPAN_HEATMAP, TEMPERATURE_HEATMAP, SPAN_ALONG_SEQUENCE)

#: above this many heads (or span values shared by all heads), the sequence plot draws the head mean and range
MAX_HEAD_LINES = 16


def _heatmap(fig, values: np.ndarray, record: SpanRecord, title: str, label: str, vmin: float, vmax: float, fmt: str):
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
    rows, cols = values.shape
    ax.set_title(title)
    ax.set_xlabel("head" if record.num_heads > 1 else "all heads (one shared span)")
    ax.set_ylabel("layer")
    ax.set_xticks(range(cols), [str(h) for h in range(cols)] if record.num_heads > 1 else ["shared"])
    step = max(1, rows // 32)
    ax.set_yticks(range(0, rows, step), [str(record.layers[r]) for r in range(0, rows, step)])
    if rows * cols <= 256:  # small grids get their numbers written in
        middle = (vmin + vmax) / 2
        for r in range(rows):
            for c in range(cols):
                ax.text(
                    c,
                    r,
                    format(values[r, c], fmt),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="black" if values[r, c] > middle else "white",
                )
    bar = fig.colorbar(image, ax=ax)
    bar.set_label(label)
    return ax, bar


def plot_spans(record: SpanRecord, out_dir, layers=None) -> list[Path]:
    """Draw the record as three PNGs in `out_dir` (created) and return their paths.

    1. `span_heatmap.png`: mean span per layer (rows) and head (columns); the colour scale runs 0 to `max_span`.
    2. `temperature_heatmap.png`: the same for the temperature, on `tau_min` to `tau_max`.
    3. `span_along_sequence.png`: span per token for the chosen `layers` (model layer indices; default: first,
       middle and last hybrid layer), one line per head (or the head mean and range when there are many), with
       `max_span` drawn as a dashed line.

    Uses matplotlib's Agg canvas directly: no pyplot, no change to the global backend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    plot_layers = check_layers(record, layers)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, cols = len(record.layers), record.num_heads
    size = (min(max(7.0, 4 + 0.6 * cols), 16), min(max(3.5, 2.5 + 0.4 * rows), 14))
    n = record.num_tokens
    paths = []

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    _heatmap(
        fig,
        record.mean_span_per_head(),
        record,
        f"Mean local span per layer and head ({n} tokens)",
        f"span (tokens); 0 to max_span = {record.max_span}",
        0.0,
        float(record.max_span),
        ".1f",
    )
    paths.append(out_dir / SPAN_HEATMAP)
    fig.savefig(paths[-1], dpi=120)

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    _heatmap(
        fig,
        record.mean_temperature_per_head(),
        record,
        f"Mean local-softmax temperature per layer and head ({n} tokens)",
        f"temperature ({record.tau_min:g} at span 0 to {record.tau_max:g} at max_span)",
        record.tau_min,
        record.tau_max,
        ".2f",
    )
    paths.append(out_dir / TEMPERATURE_HEATMAP)
    fig.savefig(paths[-1], dpi=120)

    fig = Figure(figsize=(min(6 + n / 40, 16), 2.6 * len(plot_layers) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(plot_layers), 1, sharex=True, squeeze=False)[:, 0]
    positions = np.arange(n)
    for ax, layer in zip(axes, plot_layers, strict=False):
        span = record.spans[record.layers.index(layer)]  # (H', N)
        if span.shape[0] == 1:
            ax.plot(positions, span[0], color="C0", label="all heads (shared)")
        elif span.shape[0] <= MAX_HEAD_LINES:
            for head, row in enumerate(span):
                ax.plot(
                    positions,
                    row,
                    color=f"C{head % 10}",
                    linewidth=1.2,
                    linestyle="-" if head < 10 else "--",
                    label=f"head {head}",
                )
        else:
            ax.fill_between(
                positions,
                span.min(axis=0),
                span.max(axis=0),
                color="C0",
                alpha=0.25,
                label=f"min-max over {span.shape[0]} heads",
            )
            ax.plot(positions, span.mean(axis=0), color="C0", label="head mean")
        ax.axhline(record.max_span, color="black", linestyle=":", linewidth=1, label=f"max_span = {record.max_span}")
        ax.set_ylim(0, record.max_span * 1.08)
        ax.set_xlim(-0.5, max(n - 0.5, 0.5))
        ax.set_title(f"layer {layer}")
        ax.set_ylabel("span (tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    axes[-1].set_xlabel("token position")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle("Local span along the sequence")
    paths.append(out_dir / SPAN_ALONG_SEQUENCE)
    fig.savefig(paths[-1], dpi=120)
    return paths
