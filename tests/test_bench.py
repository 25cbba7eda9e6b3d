"""Smoke test of the benchmark module: `--quick` writes the JSON, the Markdown table and the plot."""

from __future__ import annotations

import json

from hybrid_hf import commands
from hybrid_hf.benchmarks import bench


def test_quick_run_writes_json_markdown_and_plot(tmp_path, capsys):
    out = tmp_path / "bench"
    assert bench.main(["--quick", "--out", str(out), "--repeats", "1", "--threads", "1"]) == 0

    data = json.loads((out / "bench.json").read_text())
    rows = data["rows"]
    assert set(data["meta"]["sections"]) == set(bench.SECTIONS)
    for section in bench.SECTIONS:
        measured = [row for row in rows if row["section"] == section and not row["skipped"]]
        assert measured, f"no measured row for section {section!r}"
        for row in measured:
            assert row["time_ms"] > 0 and all(t > 0 for t in row["times_ms"]), row
            assert row["peak_mb"] is None or row["peak_mb"] >= 0, row
    speedups = [row for row in rows if row.get("speedup") is not None]
    assert {row["section"] for row in speedups} >= {"kernel", "seed", "longformer", "adaptive"}
    assert all(value > 0 for row in rows for value in row["ratios"].values() if value is not None)

    table = (out / "bench.md").read_text()
    assert "| section | what | N | mode | time (ms) |" in table
    assert table.count("\n| kernel |") == sum(row["section"] == "kernel" for row in rows)
    assert "| section | what |" in capsys.readouterr().out  # the table is printed too
    # The cost targets, read from the rows of this run: the model's training memory at every length of `lengths`.
    lengths = sorted({row["n"] for row in rows if row["section"] == "lengths"})
    assert len(lengths) == 3
    assert "| measure | this run | target | |" in table
    for n in lengths:
        assert f"| training peak memory, N={n}, converted / original (2-layer model) |" in table

    png = (out / "bench.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_unknown_section_is_an_error(tmp_path, capsys):
    assert commands.main(["bench", "--only", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown section" in capsys.readouterr().err
