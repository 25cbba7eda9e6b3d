"""The profile of a converted model beside its host (`hybrid_hf.benchmarks.profile`), at tiny sizes."""

from __future__ import annotations

import json

from hybrid_hf.benchmarks import profile


def test_profile_counts_the_operators_a_hybrid_layer_adds(tmp_path, capsys):
    assert profile.main(["--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "profile.json").read_text())
    assert len(report["phases"]) == 3
    for phase, entry in report["phases"].items():
        per = report["layers"] * report["forwards"][phase]
        original, hybrid = entry["original"], entry["hybrid"]
        extra = {kind: (hybrid[kind]["calls"] - original[kind]["calls"]) / per for kind in profile.KINDS}
        if phase.startswith("training"):
            # The span predictor and the mix: a multiply each forward and two each backward (input and weight
            # gradients), 6; the band: scores and output forward, then the recomputed scores and the value, score,
            # query and key gradients backward, 7; no SDPA call when gradients are tracked.
            assert extra == {"matrix multiplies": 6 + 7, "attention (SDPA)": 0}, phase
        else:
            # Each hybrid layer adds two matrix multiplies per forward (its span predictor and its mix) and, at these
            # sizes, one SDPA call (the local band in one chunk); the host's own calls are unchanged.
            assert extra == {"matrix multiplies": 2, "attention (SDPA)": 1}, phase
        for times in (original, hybrid):
            kinds = sum(times[kind]["ms"] for kind in (*profile.KINDS, "other"))
            assert abs(kinds - times["all ATen"]["ms"]) < 1e-6 * max(1.0, kinds)
            assert times["all ATen"]["ms"] > 0 and times["wall (no profiler)"]["ms"] > 0
    table = (tmp_path / "profile.md").read_text()
    assert table.count("| matrix multiplies |") == 3 and "| 2.0 |" in table
    assert table in capsys.readouterr().out
