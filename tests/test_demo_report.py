"""The demo's seeded A/B report: `report.json` holds every number `report.md` shows, the interval is the paired t
interval recomputed by hand, and the adaptive-compute timing replays the kernel inputs the model really used.

Tiny random Llama models and a word-level tokenizer (from `test_training`); no hub.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from test_first_hour import host_folder, run_demo  # noqa: F401 (a fixture)
from test_training import make_hybrid, make_text

from hybrid_hf.benchmarks.harness import BenchContext
from hybrid_hf.examples.adaptive_timing import recording_local_calls, time_local_branch
from hybrid_hf.examples.demo_report import number
from hybrid_hf.model.hybrid_attention import adaptive_local_attention, reference_local_attention
from hybrid_hf.model.modeling_hybrid import hybrid_layers
from hybrid_hf.spans import collect_spans

pytestmark = pytest.mark.usefixtures("one_thread")

T_975_DF1 = 12.706205  # Student's t, two-sided 95%, one degree of freedom (printed tables)


def numbers(value, path: tuple = ()):
    """`(path, value)` for every int or float leaf of a JSON value."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from numbers(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from numbers(item, (*path, index))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path, value


def test_report_json_holds_every_number_of_the_markdown_report(host_folder, tmp_path):  # noqa: F811
    text, news = tmp_path / "plays.txt", tmp_path / "news.txt"
    text.write_text(make_text(300, seed=3))
    news.write_text(make_text(200, seed=7))
    out = tmp_path / "demo_output"
    run_demo(
        host_folder, text, out, "--seeds", "2", "--seed", "5", "--second-text", str(news), "--timing-tokens", "64"
    )
    report = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()

    assert report["seeds"] == [5, 6]
    assert set(report["ab"]) == {"held-out text", "news.txt"}
    leaves = list(numbers({key: value for key, value in report.items() if key != "settings"}))
    assert len(leaves) > 40
    for path, value in leaves:
        assert (f"{value:.0%} t interval" if path[-1] == "level" else number(value)) in md, path
    settings_block = re.search(r"## Settings\n\n```json\n(.*?)```", md, re.DOTALL).group(1)
    assert json.loads(settings_block) == report["settings"]
    assert report["settings"]["seeds"] == 2 and report["settings"]["second_text"] == "news.txt"

    for name, entry in report["ab"].items():
        per_seed, summary = entry["per_seed"], entry["summary"]
        hybrid, baseline = per_seed["hybrid"], per_seed["baseline"]
        assert len(hybrid) == len(baseline) == 2 and hybrid != baseline
        differences = [h - b for h, b in zip(hybrid, baseline, strict=True)]
        assert per_seed["difference"] == pytest.approx(differences)
        mean, sd = sum(differences) / 2, abs(differences[0] - differences[1]) / math.sqrt(2)
        half = T_975_DF1 * sd / math.sqrt(2)
        difference = summary["difference"]
        assert (difference["low"], difference["high"]) == pytest.approx((mean - half, mean + half), rel=1e-5)
        assert summary["hybrid"]["mean"] == pytest.approx(sum(hybrid) / 2)
        assert entry["original"] == pytest.approx(entry["converted"], rel=1e-4)  # conversion changes nothing
        rows = re.findall(rf"### {re.escape(name)}:.*?\n\| mean", md, re.DOTALL)[0]
        for seed, h, b in zip(report["seeds"], hybrid, baseline, strict=True):
            assert f"| {seed} | {number(h)} | {number(b)} |" in rows

    local = report["timing"]["local_branch"]
    assert local["layers"] == 8 and local["reach_full"] == 8 + 4  # the host's 8 layers; max_span 8 + ramp 4
    assert local["ramp"] <= local["mean_reach_learned"] <= local["reach_full"]
    assert set(report["timing"]["models"]["forward_ms"]) == {"original", "hybrid"}


def test_the_timing_replays_the_spans_the_model_used():
    model = make_hybrid(max_span=8, ramp=4).eval()
    with torch.no_grad():  # a span predictor that gives every token and head its own span
        for layer in hybrid_layers(model):
            torch.nn.init.normal_(layer.span_predictor.proj.weight, std=2.0)
    ids = torch.randint(4, 99, (1, 40), generator=torch.Generator().manual_seed(0))

    with torch.no_grad(), recording_local_calls() as calls:
        expected = model(input_ids=ids).logits
    assert len(calls) == len(hybrid_layers(model))
    with torch.no_grad():  # the recorded inputs replay through the kernel as through the dense reference
        for call in calls:
            assert call.arguments["span"].std() > 0  # learned spans, not one shared value
            torch.testing.assert_close(
                adaptive_local_attention(**call.arguments), reference_local_attention(**call.arguments)
            )
        assert torch.equal(model(input_ids=ids).logits, expected)  # the wrapper was removed, nothing changed

    timing = time_local_branch(model, ids, BenchContext(device=torch.device("cpu"), repeats=1, memory=False))
    record = collect_spans(model, ids)  # the inspection's own record of the same forward
    assert timing["mean_span"] == pytest.approx(float(np.mean([span.mean() for span in record.spans])), rel=1e-5)
    reaches = [min(8, math.ceil(span.max())) + 4 for span in record.spans]
    assert timing["mean_reach_learned"] == pytest.approx(sum(reaches) / len(reaches))
    assert timing["reach_full"] == 12 and timing["layers"] == 2
    assert timing["full/learned"] == pytest.approx(timing["full_ms"] / timing["learned_ms"])
