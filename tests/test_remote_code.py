"""Saved hybrid checkpoints load with `trust_remote_code=True` where `hybrid_hf` cannot be imported."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import ALL_CLASSES, DECODERS, batch, outputs_of, perturb, tiny_host

from hybrid_hf import convert

AUTO_CLASS = {
    "base": "AutoModel",
    "causal_lm": "AutoModelForCausalLM",
    "masked_lm": "AutoModelForMaskedLM",
    "sequence_classification": "AutoModelForSequenceClassification",
}

# Runs in a fresh interpreter where `import hybrid_hf` fails.
REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["hybrid_hf"] = None  # the package is not importable here
    import torch, transformers
    cases = json.loads(sys.argv[1])
    for case in cases:
        cls = getattr(transformers, case["auto"])
        model = cls.from_pretrained(case["folder"], trust_remote_code=True).eval()
        inputs = torch.load(case["folder"] + "/inputs.pt")
        with torch.no_grad():
            out = model(**inputs)
        result = {
            "class": type(model).__module__ + "." + type(model).__name__,
            "output": out.logits if "logits" in out else out.last_hidden_state,
            "state": {k: v.clone() for k, v in model.state_dict().items()},
        }
        if case["generate"]:
            result["generated"] = model.generate(inputs["input_ids"][:1, :8], max_new_tokens=16, min_new_tokens=16,
                                                 do_sample=False, pad_token_id=0)
        torch.save(result, case["folder"] + "/remote.pt")
    """
)


def run_remote(cases: list[dict], tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, json.dumps(cases)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )


REMOTE_CLASSES = ALL_CLASSES + [("gemma3_text", "causal_lm")]


def test_saved_models_load_with_remote_code_without_the_package(tmp_path):
    cases, expected = [], {}
    for model_type, task in REMOTE_CLASSES:
        folder = tmp_path / f"{model_type}-{task}"
        hybrid = convert(tiny_host(model_type, task), max_span=8, ramp=4)
        perturb(hybrid)
        hybrid.save_pretrained(folder)
        input_ids, mask = batch(model_type, padding="left" if model_type in DECODERS else "right")
        torch.save({"input_ids": input_ids, "attention_mask": mask}, folder / "inputs.pt")
        is_generator = task == "causal_lm"
        with torch.no_grad():
            expected[folder] = {"output": outputs_of(hybrid, input_ids, mask), "state": hybrid.state_dict()}
        if is_generator:
            expected[folder]["generated"] = hybrid.generate(
                input_ids[:1, :8], max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0
            )
        assert {p.name for p in folder.glob("*.py")} == {
            "modeling_hybrid.py",
            "configuration_hybrid.py",
            "hybrid_attention.py",
        }
        config = json.loads((folder / "config.json").read_text())
        assert config["auto_map"][AUTO_CLASS[task]] == f"modeling_hybrid.{type(hybrid).__name__}"
        assert config["max_span"] == 8 and config["auto_map"]["AutoConfig"].startswith("configuration_hybrid.Hybrid")
        cases.append({"folder": str(folder), "auto": AUTO_CLASS[task], "generate": is_generator})

    result = run_remote(cases, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for folder, want in expected.items():
        remote = torch.load(folder / "remote.pt")
        assert remote["class"].startswith("transformers_modules.")
        assert remote["state"].keys() == want["state"].keys()
        for name, tensor in want["state"].items():
            assert torch.equal(remote["state"][name], tensor), (folder.name, name)
        torch.testing.assert_close(remote["output"], want["output"], atol=1e-6, rtol=0)
        if "generated" in want:
            assert torch.equal(remote["generated"], want["generated"])


@pytest.mark.parametrize("model_type,task", ALL_CLASSES)
def test_every_host_weight_is_saved_bit_identical_under_its_name(tmp_path, model_type, task):
    host = tiny_host(model_type, task)
    host.save_pretrained(tmp_path / "host")
    convert(host, max_span=8, ramp=4).save_pretrained(tmp_path / "hybrid")
    original = load_file(tmp_path / "host" / "model.safetensors")
    converted = load_file(tmp_path / "hybrid" / "model.safetensors")
    for name, tensor in original.items():
        assert name in converted, name
        assert converted[name].dtype == tensor.dtype and torch.equal(converted[name], tensor), name


def test_missing_modeling_code_is_named_in_the_error(tmp_path):
    hybrid = convert(tiny_host("llama"), max_span=8, ramp=4)
    hybrid.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "modeling_hybrid.py").unlink()
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hybrid_hf"] = None
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode != 0
    assert "modeling_hybrid.py" in result.stderr.strip().splitlines()[-1]


def test_loading_without_trust_remote_code_says_so(tmp_path):
    convert(tiny_host("llama"), max_span=8, ramp=4).save_pretrained(tmp_path / "model")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hybrid_hf"] = None
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode != 0 and "trust_remote_code" in result.stderr


def test_registered_hybrid_types_load_without_remote_code(tmp_path):
    hybrid = convert(tiny_host("gemma3_text"), max_span=8, ramp=4)
    perturb(hybrid)
    hybrid.save_pretrained(tmp_path / "model")
    input_ids, mask = batch("gemma3_text", padding="left")
    torch.save({"input_ids": input_ids, "attention_mask": mask}, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = outputs_of(hybrid, input_ids, mask)
    script = textwrap.dedent(
        f"""
        import torch, hybrid_hf
        from transformers import AutoModelForCausalLM
        hybrid_hf.register_model_type("hybrid_gemma3_text")
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r}).eval()  # no trust_remote_code
        assert type(model).__module__ == "hybrid_hf.model.modeling_hybrid", type(model)
        with torch.no_grad():
            torch.save(model(**torch.load({str(tmp_path / "inputs.pt")!r})).logits, {str(tmp_path / "out.pt")!r})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, atol=1e-6, rtol=0)
