"""`make gpu-check`'s script: without CUDA it stops with one line and exit status 2; `--quick` runs its whole path
on the CPU at tiny sizes (the tests step, the kernel and model timings, the JSON report and the printed table)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from hybrid_hf.benchmarks import gpu_check
from hybrid_hf.commands import run


def test_without_cuda_it_exits_2_with_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu.json"
    assert run(gpu_check.main, ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA" in err and err.startswith("error: ")
    assert not out.exists()


def test_makefile_runs_the_script():
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    assert re.search(r"^gpu-check:.*\n\t.*-m hybrid_hf\.benchmarks\.gpu_check", makefile, re.M)


def test_quick_run_on_the_cpu_writes_the_report(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "docs" / "gpu.json"
    assert run(gpu_check.main, ["--quick", "--out", str(out), "--repeats", "1"]) == 0
    report = json.loads(out.read_text())
    assert report["meta"]["device"] == "cpu" and report["meta"]["quick"]
    assert report["tests"]["returncode"] == 0 and "passed" in report["tests"]["summary"]
    rows = report["rows"]
    assert all(not row["skipped"] and row["time_ms"] > 0 for row in rows)
    kernel = {(row["impl"], row["n"], row["mode"]) for row in rows if row["section"] == "kernel"}
    assert {impl for impl, _, _ in kernel} == {"banded eager", "banded compiled", "flex", "sdpa causal"}
    assert {mode for _, _, mode in kernel} == {"forward", "forward+backward"}
    assert len(kernel) == 14  # flex: forward only on the CPU (PyTorch has no flex backward there)
    assert not any(impl == "flex" and mode == "forward+backward" for impl, _, mode in kernel)
    model = [row for row in rows if row["section"] == "model"]
    assert [row["impl"] for row in model] == ["original", "hybrid"] * 2
    assert all(row["ratios"]["hybrid/original"] > 0 for row in model[1::2])
    printed = capsys.readouterr().out
    assert "| section | what | N | mode | time (ms) |" in printed and printed.count("\n| kernel |") == 14


def test_budget_spent_skips_the_timings(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check.Deadline, "left", lambda self: False)
    out = tmp_path / "gpu.json"
    assert run(gpu_check.main, ["--quick", "--skip-tests", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(row["skipped"] and row["note"] == "out of time budget" for row in rows)


def test_tests_step_stopped_past_its_time_is_a_failure(monkeypatch):
    def too_slow(command, **kwargs):
        raise gpu_check.subprocess.TimeoutExpired(command, kwargs["timeout"])

    monkeypatch.setattr(gpu_check.subprocess, "run", too_slow)
    root = Path(__file__).parents[1]
    outcome = gpu_check.run_tests(False, torch.device("cuda"), root, 12.0)
    assert outcome["returncode"] == -1 and outcome["summary"] == "stopped after 12 s"
    assert "-k cuda" in outcome["command"]
