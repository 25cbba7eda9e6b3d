"""Loading never initialises a weight silently, and the hybrid classes behave as transformers expects of any class:
Auto classes, GenerationMixin, the caches hosts make, attention implementation switches."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import FAMILIES, VOCAB, tiny_host
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertLMHeadModel,
    GenerationMixin,
    GPT2Config,
    GPT2LMHeadModel,
)

import hybrid_hf
from hybrid_hf import convert, hybrid_layers
from hybrid_hf.loading import parameter_count
from hybrid_hf.model.modeling_hybrid import CheckpointMismatchError

SETTINGS = dict(max_span=8, ramp=4)


def _trained(model):
    """A hybrid model whose mix is no longer the conversion's identity (so a reset would show)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in hybrid_layers(model):
            layer.mix.weight.add_(0.1 * torch.randn(layer.mix.weight.shape, generator=generator))
    return model


def _drop(folder, word: str) -> None:
    tensors = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if word not in k}, folder / "model.safetensors", {"format": "pt"})


@pytest.mark.parametrize("word", ["mix", "span_predictor"])
def test_a_hybrid_folder_missing_its_own_parameters_is_refused_by_the_class_itself(tmp_path, word):
    _trained(convert(tiny_host("llama"), **SETTINGS)).save_pretrained(tmp_path)
    _drop(tmp_path, f".{word}.")
    with pytest.raises(CheckpointMismatchError, match=rf"self_attn\.{word}\."):
        AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)


def test_shipped_code_refuses_a_hybrid_folder_missing_the_mix(tmp_path):
    _trained(convert(tiny_host("llama"), **SETTINGS)).save_pretrained(tmp_path)
    _drop(tmp_path, ".mix.")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hybrid_hf"] = None
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "CheckpointMismatchError" in result.stderr and "self_attn.mix.weight" in result.stderr


def test_a_host_folder_loads_into_a_hybrid_class_at_conversion_values(tmp_path):
    host = tiny_host("llama")
    host.save_pretrained(tmp_path)
    loaded = hybrid_hf.HybridLlamaForCausalLM.from_pretrained(tmp_path, **SETTINGS).eval()
    converted = convert(host, **SETTINGS)
    for name, tensor in converted.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, atol=0, rtol=0, msg=name)


def test_a_host_with_a_missing_tensor_is_refused_by_a_hybrid_class(tmp_path):
    tiny_host("llama").save_pretrained(tmp_path)
    _drop(tmp_path, "layers.1.self_attn.o_proj")
    with pytest.raises(CheckpointMismatchError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight"):
        hybrid_hf.HybridLlamaForCausalLM.from_pretrained(tmp_path, **SETTINGS)


def test_asking_for_the_load_report_hands_it_over_instead_of_refusing(tmp_path):
    """`output_loading_info=True` is transformers' way to inspect a load: the report names what was initialised."""
    tiny_host("llama").save_pretrained(tmp_path)
    _drop(tmp_path, "layers.1.self_attn.o_proj")
    _, info = hybrid_hf.HybridLlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True, **SETTINGS)
    assert "model.layers.1.self_attn.o_proj.weight" in info["missing_keys"]


def test_ignore_mismatched_sizes_initialises_a_new_head_and_nothing_else(tmp_path):
    """A classifier saved with 3 labels loads with 5 only when asked (`ignore_mismatched_sizes=True`, transformers'
    flag): the head is new, every other weight is the checkpoint's; a missing tensor is still refused."""
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(**{**tiny_host("llama").config.to_dict(), "num_labels": 3, "pad_token_id": 0})
    saved = convert(LlamaForSequenceClassification(config), **SETTINGS)
    saved.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # transformers' own refusal
        AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=5)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=5, ignore_mismatched_sizes=True)
    assert loaded.score.weight.shape == (5, config.hidden_size)
    for name, tensor in saved.state_dict().items():
        if not name.startswith("score."):
            torch.testing.assert_close(loaded.state_dict()[name], tensor, atol=0, rtol=0, msg=name)
    _drop(tmp_path, "layers.1.self_attn.o_proj")
    with pytest.raises(CheckpointMismatchError, match=r"o_proj"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=5, ignore_mismatched_sizes=True)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_a_failed_attention_switch_leaves_the_model_as_it_was():
    model = _trained(convert(tiny_host("llama"), **SETTINGS)).eval()
    ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    with pytest.raises(ImportError):
        model.set_attn_implementation("flash_attention_2")
    assert model.config.global_attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=0, rtol=0)


def test_writing_attn_implementation_chooses_the_global_branch_and_assisted_decoding_is_greedy():
    host = tiny_host("llama")
    model = _trained(convert(host, **SETTINGS)).eval()
    assistant = convert(host, **SETTINGS).eval()
    assistant.load_state_dict(model.state_dict())
    assistant.config._attn_implementation = "eager"  # as transformers' assisted-decoding test does
    assert assistant.config._attn_implementation == "hybrid"
    assert assistant.config.global_attn_implementation == "eager"
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(assistant(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
        greedy = model.generate(ids, max_new_tokens=12, do_sample=False)
        assisted = model.generate(ids, max_new_tokens=12, do_sample=False, assistant_model=assistant)
    assert torch.equal(greedy, assisted)
    with pytest.raises(ValueError, match="global_attn_implementation"):
        assistant.config._attn_implementation = "bogus"


def _cross_attention_decoders():
    bert = BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, is_decoder=True, add_cross_attention=True)  # fmt: skip
    gpt2 = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, add_cross_attention=True,
                      bos_token_id=0, eos_token_id=0)  # fmt: skip
    return {"bert": (BertLMHeadModel, bert), "gpt2": (GPT2LMHeadModel, gpt2)}


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_decoders_with_cross_attention_decode_with_the_hosts_cache(family):
    host_class, config = _cross_attention_decoders()[family]
    torch.manual_seed(0)
    model = _trained(convert(host_class(config).eval(), **SETTINGS)).eval()
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    encoder = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(input_ids=ids, encoder_hidden_states=encoder, use_cache=True).logits
        first = model(input_ids=ids[:, :6], encoder_hidden_states=encoder, use_cache=True)
        rest = model(input_ids=ids[:, 6:], encoder_hidden_states=encoder, past_key_values=first.past_key_values,
                     use_cache=True).logits  # fmt: skip
    torch.testing.assert_close(torch.cat([first.logits, rest], dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", [name for name, tasks in FAMILIES.items() if "causal_lm" in tasks])
def test_generative_hybrid_classes_list_generation_mixin_as_their_hosts_do(model_type):
    host = type(tiny_host(model_type, "causal_lm"))
    hybrid = hybrid_hf.hybrid_model_class(host)
    assert (GenerationMixin in hybrid.__bases__) == (GenerationMixin in host.__bases__)
    assert hybrid.can_generate()


def _fresh_process(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_importing_hybrid_hf_is_enough_for_the_auto_classes(tmp_path):
    convert(tiny_host("llama"), **SETTINGS).save_pretrained(tmp_path / "model")
    out = _fresh_process(
        f"""
        import hybrid_hf
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r})  # no trust_remote_code
        print(type(model).__module__, type(model).__name__)
        """
    )
    assert out.split() == ["hybrid_hf.model.modeling_hybrid", "HybridLlamaForCausalLM"]


def test_from_config_builds_a_hybrid_model_in_a_fresh_process():
    out = _fresh_process(
        """
        import hybrid_hf
        from transformers import AutoModelForCausalLM
        config = hybrid_hf.HybridLlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, max_span=8, ramp=4)
        model = AutoModelForCausalLM.from_config(config)
        print(type(model).__name__, len(hybrid_hf.hybrid_layers(model)))
        """
    )
    assert out.split() == ["HybridLlamaForCausalLM", "2"]


@pytest.mark.parametrize("model_type, task", [("llama", "causal_lm"), ("gpt2", "causal_lm"), ("bert", "base")])
@pytest.mark.parametrize("hybrid", [False, True])
def test_parameter_count_from_the_config_is_exact(model_type, task, hybrid):
    model = tiny_host(model_type, task)
    model = convert(model, **SETTINGS) if hybrid else model
    config = model.config
    config.num_hidden_layers = 5
    expected = type(model)(config)
    assert parameter_count(config, type(model)) == sum(p.numel() for p in expected.parameters())


def test_a_model_beyond_the_memory_available_is_refused_before_loading_naming_the_field():
    from hybrid_hf.errors import UsageError
    from hybrid_hf.loading import check_size

    host = tiny_host("llama")
    config = host.config
    config.vocab_size = 2**31 - 1
    with pytest.raises(UsageError, match=r"memory available; check `vocab_size` \(2147483647\)"):
        check_size(config, type(host), "src", stored=None, memory=2**30)
    config.vocab_size = VOCAB
    check_size(config, type(host), "src", stored=None, memory=2**30)  # a model that fits passes
