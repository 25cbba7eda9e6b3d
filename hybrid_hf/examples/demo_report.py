"""The demo's report: one dict of every number and setting (`report.json`) and its Markdown form (`report.md`).

Every number the Markdown shows is written by `number`, so each value of `report.json` can be found in it.
"""

from __future__ import annotations

import json
from typing import Any

REPORT_TITLE = "# hybrid_hf demo report"


def number(value: float | int | None) -> str:
    """How the report writes a number: integers as they are, other values with three decimals (below 0.01: three
    significant digits, `1.23e-05`), None as `—`."""
    if value is None:
        return "—"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{value:.2e}" if 0 < abs(value) < 0.01 else f"{value:.3f}"


def _ab_table(name: str, text: dict[str, Any], seeds: list[int]) -> list[str]:
    per_seed, summary = text["per_seed"], text["summary"]
    difference = summary["difference"]
    interval = (
        f"{difference['level']:.0%} t interval [{number(difference['low'])}, {number(difference['high'])}]"
        if difference["low"] is not None
        else "no interval (one seed)"
    )

    def spread(arm: dict) -> str:
        return number(arm["mean"]) + ("" if arm["sd"] is None else f" ± {number(arm['sd'])}")

    return [
        f"### {name}: {text['tokens']} held-out tokens",
        "",
        f"Before fine-tuning: original {number(text['original'])}, converted {number(text['converted'])}.",
        "",
        "| seed | hybrid, fine-tuned | baseline, fine-tuned | hybrid - baseline |",
        "| --- | ---: | ---: | ---: |",
        *[
            f"| {seed} | {number(h)} | {number(b)} | {number(d)} |"
            for seed, h, b, d in zip(
                seeds, per_seed["hybrid"], per_seed["baseline"], per_seed["difference"], strict=True
            )
        ],
        f"| mean ± sd | {spread(summary['hybrid'])} | {spread(summary['baseline'])} | "
        f"{spread(difference)}; {interval} |",
        "",
        f"Verdict: {text['verdict']}.",
        "",
    ]


def _timing_lines(timing: dict[str, Any]) -> list[str]:
    local, models = timing["local_branch"], timing["models"]
    return [
        "## Adaptive compute on the fine-tuned hybrid",
        "",
        f"Side by side in one run, median of up to {timing['repeats']} interleaved calls each, "
        f"on {local['tokens']} held-out tokens.",
        "",
        f"Local branch of all {local['layers']} hybrid layers (the inputs of one forward replayed): with the learned "
        f"spans (mean {number(local['mean_span'])} tokens; band reach {number(local['mean_reach_learned'])} keys, "
        f"the mean over layers of the largest span + ramp) {number(local['learned_ms'])} ms; with every span at "
        f"max_span (reach {number(local['reach_full'])} keys) {number(local['full_ms'])} ms; "
        f"full/learned {number(local['full/learned'])}.",
        "",
        "| model | forward (ms) | decoding (tokens/s) |",
        "| --- | ---: | ---: |",
        *[
            f"| {name} | {number(models['forward_ms'][name])} | {number(models['decode_tokens_per_s'][name])} |"
            for name in ("original", "hybrid")
        ],
        f"| hybrid/original | {number(models['forward hybrid/original'])} | "
        f"{number(models['decoding tokens/s hybrid/original'])} |",
        "",
        f"Decoding: greedy, {models['new_tokens']} new tokens after a {models['tokens']}-token prompt (time of "
        f"{models['new_tokens'] + 1} tokens minus the time of one).",
        "",
    ]


def markdown(report: dict[str, Any], plots: list[str], prompt: str, samples: dict[str, str]) -> str:
    """`report.md` from the report dict, the span plots' file names, the samples' prompt and the samples."""
    ab, spans = report["ab"], report["spans"]
    lines = [
        REPORT_TITLE,
        "",
        f"Model: {report['model']}. Training text: {report['text']}.",
        f"Held-out perplexity (sequence length {report['settings']['seq_len']}, LM loss only), for "
        f"{len(report['seeds'])} seed(s) ({', '.join(map(str, report['seeds']))}): for each seed the hybrid and the "
        "original fine-tuned with the same LoRA budget (the baseline) see the same batches in the same order, and "
        "are evaluated on the same tokens.",
        "",
        f"Conversion check: max |logit difference| = {number(report['conversion']['max_logit_difference'])}.",
        "",
    ]
    for name, text in ab.items():
        lines += _ab_table(name, text, report["seeds"])
    lines += [
        "## Learned spans (first seed)",
        "",
        f"Mean span over layers and heads on a held-out passage: {number(spans['mean_learned'])} tokens "
        f"(initial {number(spans['initial'])}, max_span {report['settings']['max_span']}).",
        "",
        *[f"![{name.rsplit('.', 1)[0]}](plots/{name})" for name in plots],
        "",
    ]
    if report.get("timing"):
        lines += _timing_lines(report["timing"])
    lines += [
        "## Samples (greedy, 48 new tokens; first seed)",
        "",
        f"Prompt:\n\n```\n{prompt}\n```",
        "",
        *[f"**{name}:**\n\n```\n{text}\n```\n" for name, text in samples.items()],
        "## Settings",
        "",
        "```json",
        json.dumps(report["settings"], indent=2),
        "```",
        "",
        f"Wall time: {number(report['wall_time_min'])} min on {report['threads']} threads ({report['device']}).",
    ]
    return "\n".join(lines) + "\n"
