"""Hybrid models on tiny random configs: conversion is exact, training moves them, generation and kernels agree."""

import pytest
import torch
from tiny_models import ALL_CLASSES, DECODERS, ENCODERS, batch, outputs_of, perturb, tiny_config, tiny_host
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, LlamaForCausalLM

import hybrid_hf
from hybrid_hf import convert, hybrid_layers
from hybrid_hf.model.configuration_hybrid import HybridLlamaConfig
from hybrid_hf.model.modeling_hybrid import HybridLlamaForCausalLM, self_attention_modules

SETTINGS = dict(max_span=8, ramp=4)


@pytest.mark.parametrize("model_type,task", ALL_CLASSES)
@pytest.mark.parametrize("layers", [None, [1]])
def test_converted_outputs_equal_original(model_type, task, layers):
    host = tiny_host(model_type, task)
    hybrid = convert(host, hybrid_layers=layers, **SETTINGS)
    assert len(hybrid_layers(hybrid)) == (2 if layers is None else 1)
    for padding in (None, "left" if model_type in DECODERS else "right"):
        input_ids, mask = batch(model_type, padding=padding)
        with torch.no_grad():
            expected = outputs_of(host, input_ids, mask)
            actual = outputs_of(hybrid, input_ids, mask)
        assert_close_on_real_tokens(actual, expected, mask)


def assert_close_on_real_tokens(actual, expected, mask, atol=1e-5, rtol=0.0):
    """Compare per-token outputs on real tokens only (outputs under padding are unspecified); others whole."""
    if actual.dim() >= 2 and actual.shape[:2] == mask.shape:
        actual, expected = actual[mask.bool()], expected[mask.bool()]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("model_type", DECODERS + ENCODERS)
def test_conversion_copies_weights_and_shares_no_storage(model_type):
    host = tiny_host(model_type)
    hybrid = convert(host, **SETTINGS)
    host_state = host.state_dict()
    hybrid_state = hybrid.state_dict()
    for name, tensor in host_state.items():
        assert torch.equal(hybrid_state[name], tensor), name
    host_pointers = {t.untyped_storage().data_ptr() for t in host_state.values()}
    assert not host_pointers & {t.untyped_storage().data_ptr() for t in hybrid_state.values()}
    new = set(hybrid_state) - set(host_state)
    assert new and all(any(f".{part}." in key for part in ("span_predictor", "mix")) for key in new)


def test_new_parameters_sit_on_the_host_attention_modules():
    hybrid = convert(tiny_host("llama"), **SETTINGS)
    layers = hybrid_layers(hybrid)
    assert layers == self_attention_modules(hybrid) == [block.self_attn for block in hybrid.model.layers]
    assert {name for name, _ in hybrid.model.layers[0].self_attn.named_children()} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "span_predictor",
        "mix",
    }


def test_mix_starts_as_identity_on_the_global_branch():
    layer = hybrid_layers(convert(tiny_host("qwen3", head_dim=16), **SETTINGS))[0]
    width = 4 * 16  # heads x head_dim: the mix lives in head space, before the output projection
    expected = torch.cat([torch.zeros(width, width), torch.eye(width)], dim=1)
    assert torch.equal(layer.mix.weight, expected)


def test_plain_checkpoint_loads_into_hybrid_class(tmp_path):
    host = tiny_host("llama")
    host.save_pretrained(tmp_path)
    loaded = HybridLlamaForCausalLM.from_pretrained(tmp_path, **SETTINGS).eval()
    converted = convert(host, **SETTINGS)
    assert loaded.config.model_type == "hybrid_llama" and loaded.config.max_span == 8
    for name, tensor in converted.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    input_ids, mask = batch("llama")
    with torch.no_grad():
        torch.testing.assert_close(
            outputs_of(loaded, input_ids, mask), outputs_of(host, input_ids, mask), atol=1e-5, rtol=0
        )


def test_auto_classes_resolve_hybrid_types():
    config = AutoConfig.for_model(
        "hybrid_llama", **{k: v for k, v in tiny_config("llama").to_dict().items() if k != "model_type"}
    )
    assert type(config) is HybridLlamaConfig
    model = AutoModelForCausalLM.from_config(config)
    assert type(model) is HybridLlamaForCausalLM and len(hybrid_layers(model)) == 2
    base = AutoModel.from_config(config)
    assert type(base).__name__ == "HybridLlamaModel"


def test_from_config_trains_from_scratch():
    config = HybridLlamaConfig(
        **{k: v for k, v in tiny_config("llama").to_dict().items() if k != "model_type"}, **SETTINGS
    )
    model = AutoModelForCausalLM.from_config(config)
    input_ids, _ = batch("llama")
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for n, p in model.named_parameters() if ".mix." in n)


def test_training_moves_the_converted_model():
    host = tiny_host("llama")
    hybrid = convert(host, span_loss_coef=0.1, **SETTINGS).train()
    input_ids, _ = batch("llama")
    optimizer = torch.optim.AdamW(hybrid.parameters(), lr=1e-2)
    layer = hybrid_layers(hybrid)[0]

    hybrid(input_ids=input_ids, labels=input_ids).loss.backward()
    # The first step: the mix gets a gradient; the span predictor through the span loss.
    assert layer.mix.weight.grad.abs().sum() > 0
    assert layer.span_predictor.proj.bias.grad.abs().sum() > 0
    optimizer.step()
    optimizer.zero_grad()

    # Once the mix reads the local branch, gradients reach the span and, through the local branch, the projections.
    hybrid.config.span_loss_coef = 0.0
    hybrid(input_ids=input_ids, labels=input_ids).loss.backward()
    assert layer.span_predictor.proj.weight.grad.abs().sum() > 0
    assert layer.q_proj.weight.grad.abs().sum() > 0
    optimizer.step()

    hybrid.eval()
    with torch.no_grad():
        assert not torch.allclose(outputs_of(hybrid, input_ids), outputs_of(host, input_ids), atol=1e-4)


def test_span_loss_is_added_to_the_loss_and_returned():
    hybrid = convert(tiny_host("llama"), span_loss_coef=0.5, **SETTINGS)
    perturb(hybrid)
    input_ids, _ = batch("llama")
    with torch.no_grad():
        with_penalty = hybrid(input_ids=input_ids, labels=input_ids)
        hybrid.config.span_loss_coef = 0.0
        without = hybrid(input_ids=input_ids, labels=input_ids)
    # Hand-computed penalty: the mean span scale over layers, tokens and heads.
    scales = []
    hooks = [
        layer.span_predictor.register_forward_hook(lambda m, i, o: scales.append(o)) for layer in hybrid_layers(hybrid)
    ]
    with torch.no_grad():
        hybrid(input_ids=input_ids)
    for hook in hooks:
        hook.remove()
    expected = 0.5 * torch.stack([s.mean() for s in scales]).mean()
    torch.testing.assert_close(with_penalty.span_loss, expected)
    torch.testing.assert_close(with_penalty.loss - without.loss, expected)
    assert without.span_loss == 0


@pytest.mark.parametrize("model_type", DECODERS)
def test_cached_greedy_generation_equals_uncached(model_type):
    hybrid = convert(tiny_host(model_type), **SETTINGS)
    perturb(hybrid)
    prompt, _ = batch(model_type, batch_size=1, length=10)
    kwargs = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0)
    cached = hybrid.generate(prompt, **kwargs)
    uncached = hybrid.generate(prompt, use_cache=False, **kwargs)
    assert cached.shape[1] == 10 + 64 > SETTINGS["max_span"] + SETTINGS["ramp"]
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("model_type", DECODERS)
def test_left_padded_batch_generates_what_each_row_generates_alone(model_type):
    hybrid = convert(tiny_host(model_type), **SETTINGS)
    perturb(hybrid)
    input_ids, mask = batch(model_type, length=12, padding="left")
    kwargs = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    together = hybrid.generate(input_ids, attention_mask=mask, **kwargs)
    for row in range(2):
        real = mask[row].bool()
        alone = hybrid.generate(input_ids[row : row + 1, real], **kwargs)
        assert torch.equal(together[row, 12:], alone[0, int(real.sum()) :])


def test_beam_search_and_sampling_with_cache():
    hybrid = convert(tiny_host("llama"), **SETTINGS)
    perturb(hybrid)
    prompt, _ = batch("llama", length=10)
    kwargs = dict(max_new_tokens=20, min_new_tokens=20, pad_token_id=0)
    beams = hybrid.generate(prompt, num_beams=3, do_sample=False, **kwargs)
    assert torch.equal(beams, hybrid.generate(prompt, num_beams=3, do_sample=False, use_cache=False, **kwargs))
    torch.manual_seed(0)
    sampled = hybrid.generate(prompt, do_sample=True, top_k=20, **kwargs)
    torch.manual_seed(0)
    assert torch.equal(sampled, hybrid.generate(prompt, do_sample=True, top_k=20, use_cache=False, **kwargs))


@pytest.mark.parametrize("model_type", DECODERS + ENCODERS)
def test_eager_and_sdpa_global_attention_agree(model_type):
    hybrid = convert(tiny_host(model_type), **SETTINGS)
    perturb(hybrid)
    input_ids, mask = batch(model_type, padding="left" if model_type in DECODERS else "right")
    results = {}
    for implementation in ("eager", "sdpa"):
        hybrid.set_attn_implementation(implementation)
        with torch.no_grad():
            results[implementation] = outputs_of(hybrid, input_ids, mask)
    assert_close_on_real_tokens(results["eager"], results["sdpa"], mask, atol=1e-5, rtol=1e-5)


def test_padding_is_honoured_by_both_branches():
    """Changing what sits under the padding changes nothing for real tokens."""
    hybrid = convert(tiny_host("llama"), **SETTINGS)
    perturb(hybrid)
    input_ids, mask = batch("llama", padding="left")
    other = input_ids.clone()
    other[-1, :5] = 7
    with torch.no_grad():
        a, b = outputs_of(hybrid, input_ids, mask), outputs_of(hybrid, other, mask)
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], atol=1e-5, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients():
    hybrid = convert(tiny_host("llama"), span_loss_coef=0.1, **SETTINGS)
    perturb(hybrid)
    hybrid.train()
    input_ids, _ = batch("llama")
    grads = []
    for checkpointing in (False, True):
        hybrid.zero_grad()
        if checkpointing:
            hybrid.gradient_checkpointing_enable()
        hybrid(input_ids=input_ids, labels=input_ids).loss.backward()  # the default use_cache, as Trainer runs it
        grads.append({n: p.grad.clone() for n, p in hybrid.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_span", 0),
        ("max_span", 2.5),
        ("ramp", -1),
        ("tau_min", 0.0),
        ("tau_max", -1.0),
        ("hybrid_layers", [0, 7]),
        ("span_loss_coef", -0.1),
        ("initial_span", 1.0),
        ("span_per_head", "yes"),
    ],
)
def test_invalid_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        convert(tiny_host("llama"), **{field: value})


def test_invalid_temperature_range_names_both_fields():
    with pytest.raises(ValueError, match="tau_min.*tau_max"):
        HybridLlamaConfig(tau_min=2.0, tau_max=1.0)


def test_converting_a_hybrid_model_is_refused():
    hybrid = convert(tiny_host("llama"), **SETTINGS)
    with pytest.raises(ValueError, match="already hybrid"):
        convert(hybrid)


def test_package_exports():
    assert callable(hybrid_hf.convert) and hybrid_hf.HybridLlamaForCausalLM is HybridLlamaForCausalLM
    assert hybrid_hf.HybridLlamaConfig is HybridLlamaConfig
    assert issubclass(HybridLlamaForCausalLM, LlamaForCausalLM)


def test_tied_embeddings_stay_tied():
    host = tiny_host("llama", tie_word_embeddings=True)
    hybrid = convert(host, **SETTINGS)
    assert hybrid.lm_head.weight is hybrid.model.embed_tokens.weight
    assert hybrid.lm_head.weight.data_ptr() != host.lm_head.weight.data_ptr()
