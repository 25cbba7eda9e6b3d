"""FSDP2 through accelerate on 2 CPU processes (gloo), with the accelerate config shipped in `configs/fsdp2.yaml`:
the hybrid parameters shard with their decoder layer, and `hybrid-hf finetune` under it trains as one process with
the same global batch does (full fine-tuning; LoRA with activation checkpointing), saving a folder that loads with
`trust_remote_code` where `hybrid_hf` cannot be imported."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_training import TEXT, make_tokenizer, run_cli
from tiny_models import tiny_llama

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
CONFIG = TESTS.parent / "configs" / "fsdp2.yaml"
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG), "--num_processes", "2"]
ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "CUDA_VISIBLE_DEVICES": "",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

# Runs where `import hybrid_hf` fails: loads two saved folders and prints how far apart their weights and logits are.
COMPARE = textwrap.dedent(
    """
    import json, sys, torch
    sys.modules["hybrid_hf"] = None
    from transformers import AutoModelForCausalLM
    a, b = (AutoModelForCausalLM.from_pretrained(f, trust_remote_code=True).eval() for f in sys.argv[1:3])
    ids = torch.tensor([[2, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        logits = float((a(ids).logits - b(ids).logits).abs().max())
    sa, sb = a.state_dict(), b.state_dict()
    weights = max(float((sa[k] - sb[k]).abs().max()) for k in sa) if sa.keys() == sb.keys() else None
    print(json.dumps({"class": type(b).__module__, "weights": weights, "logits": logits}))
    """
)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    tiny_llama().save_pretrained(root / "host")
    make_tokenizer().save_pretrained(root / "host")
    (root / "train.txt").write_text(TEXT)
    return root


def test_hybrid_parameters_shard_with_their_layer(tmp_path):
    import os

    result = subprocess.run(
        [*LAUNCH, str(TESTS / "fsdp_shards.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=TESTS,
        env={**os.environ, **ENV},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["world"] == 2 and len(report["layers"]) == 2
        for layer in report["layers"]:
            assert layer["fsdp_unit"] and layer["dtensor"]
            for name, full in layer["full"].items():
                assert layer["sharded"][name] == [full[0] // 2, *full[1:]], name  # half of the rows on each process
                assert layer["unsharded"][name] == full, name  # gathered with its layer ...
                assert layer["other_meanwhile"][name] == layer["sharded"][name], name  # ... not with another one


def losses(stdout: str) -> list[str]:
    return re.findall(r"'loss': '([0-9.]+)'", stdout)


@pytest.mark.parametrize("variant", ["full", "lora with activation checkpointing"])
def test_finetune_under_fsdp2_matches_one_process(variant, source, tmp_path):
    """Two processes of 2 blocks a step under FSDP2 against one process of 4: the same losses, step by step, and
    the same saved weights to float32 rounding."""
    common = [
        "--data",
        source / "train.txt",
        "--steps",
        "4",
        "--seq-len",
        "16",
        "--lr",
        "1e-2",
        "--max-span",
        "8",
        "--ramp",
        "4",
        "--span-loss-coef",
        "0.1",
        "--logging-steps",
        "1",
        "--cpu",
    ]
    launcher = LAUNCH
    if variant != "full":
        common += ["--lora", "--lora-r", "4"]
        launcher = [*LAUNCH, "--fsdp_activation_checkpointing", "true"]
    one = run_cli(source / "host", tmp_path / "one", *common, "--batch-size", "4")
    assert one.returncode == 0, one.stderr[-4000:]
    sharded = run_cli(source / "host", tmp_path / "fsdp", *common, "--batch-size", "2", launcher=launcher, timeout=600)
    assert sharded.returncode == 0, sharded.stdout[-3000:] + sharded.stderr[-5000:]
    assert "on 2 process(es) (FSDP2)" in sharded.stdout
    assert len(losses(one.stdout)) == 4 and losses(sharded.stdout) == losses(one.stdout)
    assert "| processes | 2 (FSDP2) |" in (tmp_path / "fsdp" / "README.md").read_text()

    compared = subprocess.run(
        [sys.executable, "-c", COMPARE, tmp_path / "one", tmp_path / "fsdp"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert compared.returncode == 0, compared.stderr[-3000:]
    result = json.loads(compared.stdout.strip().splitlines()[-1])
    assert result["class"].startswith("transformers_modules.")
    assert result["weights"] is not None and result["weights"] < 1e-5 and result["logits"] < 1e-5, result
    config = json.loads((tmp_path / "fsdp" / "config.json").read_text())
    assert config["architectures"] == ["HybridLlamaForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_hybrid.HybridLlamaForCausalLM"
