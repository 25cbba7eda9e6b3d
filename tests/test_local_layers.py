"""Local-only layers (no global branch, attention sinks, a bounded KV cache) and the bounded decoding state."""

import pytest
import torch
from test_remote_code import run_remote
from tiny_models import batch, perturb, tiny_host
from transformers import AttentionInterface, DynamicCache

from hybrid_hf import convert, hybrid_layers
from hybrid_hf.calibration import choose_local_layers, layer_scores
from hybrid_hf.model.hybrid_attention import reference_local_attention, span_temperature

SETTINGS = dict(max_span=8, ramp=4, sink_tokens=2, max_crop=4)
BAND = SETTINGS["max_span"] + SETTINGS["ramp"]
GREEDY = dict(max_new_tokens=30, min_new_tokens=30, do_sample=False, pad_token_id=0)


def local_model(model_type="llama", layers=3, local=(1,), seed=0, **settings):
    hybrid = convert(
        tiny_host(model_type, num_hidden_layers=layers, seed=seed),
        local_layers=list(local),
        **{**SETTINGS, **settings},
    )
    perturb(hybrid)
    return hybrid.eval()


def dense_local_layer(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """A local-only layer written out densely: the prefix mean of the values (real tokens only) as the context, the
    first `sink_tokens` real tokens of each row as sinks, `reference_local_attention`, then the mix."""
    config, mask = module.hybrid_settings, dense_local_layer.key_mask  # (B, S) of the whole batch
    batch_size, heads, length, head_dim = query.shape
    groups = heads // key.shape[1]
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    weights = mask.to(value.dtype)[:, None, :, None]  # (B, 1, S, 1)
    if causal:
        sums, counts = torch.cumsum(value * weights, dim=2), torch.cumsum(weights, dim=2)
    else:
        sums, counts = (value * weights).sum(2, keepdim=True), weights.sum(2, keepdim=True)
    context = (sums / counts.clamp_min(1)).repeat_interleave(groups, dim=1)  # (B, H, S or 1, D)
    context = context.transpose(1, 2).reshape(batch_size, context.shape[2], heads * head_dim)
    span_scale = module.span_predictor(context).expand(-1, -1, length)  # (B, H, S)
    rank = torch.cumsum(mask, dim=1)
    sinks = mask.bool() & (rank <= config.sink_tokens)  # (B, S)
    sinks = sinks[:, : int((sinks * torch.arange(1, sinks.shape[1] + 1)).max())]  # the leading slots that hold them
    out = reference_local_attention(
        query,
        key,
        value,
        span_scale * config.max_span,
        span_temperature(span_scale, config.tau_min, config.tau_max),
        max_span=config.max_span,
        ramp=config.ramp,
        causal=causal,
        scaling=scaling,
        key_mask=mask,
        sink_mask=sinks,
    )  # (B, H, S, D)
    out = out.transpose(1, 2).reshape(batch_size, length, heads * head_dim)
    return module.mix(out).view(batch_size, length, heads, head_dim), None


@pytest.mark.parametrize("model_type,padding", [("llama", "left"), ("qwen2", "right"), ("bert", "right")])
def test_local_only_layer_equals_its_dense_definition(model_type, padding):
    """Every layer local-only: the model equals the host whose attention is the dense local-only layer."""
    hybrid = local_model(model_type, layers=2, local=(0, 1))
    assert all(layer.local_only for layer in hybrid_layers(hybrid))
    input_ids, mask = batch(model_type, length=40, padding=padding)
    AttentionInterface.register("dense_local", dense_local_layer)
    dense = tiny_host(model_type, num_hidden_layers=2)
    dense.load_state_dict(hybrid.state_dict(), strict=False)
    for host_module, module in zip(
        [m for m in dense.modules() if type(m).__name__ == type(hybrid_layers(hybrid)[0]).__name__],
        hybrid_layers(hybrid),
        strict=True,
    ):
        host_module.span_predictor, host_module.mix = module.span_predictor, module.mix
        host_module.hybrid_settings = hybrid.config
    dense.config._attn_implementation = "dense_local"
    dense_local_layer.key_mask = mask
    with torch.no_grad():
        expected = dense(input_ids=input_ids, attention_mask=mask)
        actual = hybrid(input_ids=input_ids, attention_mask=mask)
    name = "logits" if "logits" in actual else "last_hidden_state"
    real = mask.bool()
    torch.testing.assert_close(actual[name][real], expected[name][real], atol=1e-5, rtol=1e-5)


def test_local_only_layers_start_as_a_window_and_no_local_layers_change_nothing():
    host = tiny_host("llama", num_hidden_layers=3)
    exact = convert(host, max_span=8, ramp=4, local_layers=[])
    input_ids, _ = batch("llama", length=40)
    with torch.no_grad():
        assert torch.equal(exact(input_ids).logits, host(input_ids).logits)
    local = convert(host, **SETTINGS, local_layers=[1])
    module = hybrid_layers(local)[1]
    assert module.local_only and module.mix.weight.shape == (32, 32)
    torch.testing.assert_close(module.mix.weight, torch.eye(32), rtol=0, atol=0)
    # the first tokens (within the window) see exactly what the host sees, up to the temperature near tau_max
    with torch.no_grad():
        near = (local(input_ids[:, :BAND]).logits - host(input_ids[:, :BAND]).logits).abs().max()
    assert near < 0.1


@pytest.mark.parametrize("padding", [None, "left"])
def test_cached_generation_equals_uncached_past_the_window_and_the_sinks(padding):
    hybrid = local_model()
    input_ids, mask = batch("llama", length=20, padding=padding)
    cached = hybrid.generate(input_ids, attention_mask=mask, **GREEDY)
    assert torch.equal(cached, hybrid.generate(input_ids, attention_mask=mask, use_cache=False, **GREEDY))
    # the local-only layer's cache holds the sinks, the band and `max_crop` more: not the 50 positions
    out = hybrid.generate(input_ids, attention_mask=mask, return_dict_in_generate=True, **GREEDY)
    sinks = 2 + (5 if padding == "left" else 0)  # the second row's sinks come after its 5 pads
    assert out.past_key_values.layers[1].keys.shape[2] == sinks + BAND - 1 + SETTINGS["max_crop"]
    assert out.past_key_values.layers[0].keys.shape[2] == 49


@pytest.mark.parametrize("model_type,overrides", [("gemma3_text", {}), ("mistral", {"sliding_window": 5}),
                                                  ("gpt2", {})])  # fmt: skip
def test_other_families_decode_local_layers_as_they_run_whole(model_type, overrides):
    """Gemma 3 (sliding and full layers), a Mistral whose every layer slides (no sinks then), GPT-2."""
    hybrid = convert(tiny_host(model_type, **overrides), local_layers=[0], **SETTINGS)
    perturb(hybrid)
    input_ids, mask = batch(model_type, length=20, padding="left")
    cached = hybrid.eval().generate(input_ids, attention_mask=mask, **GREEDY)
    assert torch.equal(cached, hybrid.generate(input_ids, attention_mask=mask, use_cache=False, **GREEDY))


def test_left_padded_row_generates_what_it_generates_alone():
    hybrid = local_model()
    input_ids, mask = batch("llama", length=20, padding="left")
    together = hybrid.generate(input_ids, attention_mask=mask, **GREEDY)
    alone = hybrid.generate(input_ids[1:, 5:], **GREEDY)
    assert torch.equal(together[1, 5:], alone[0])


def test_beam_search_and_sampling_with_local_layers():
    hybrid = local_model()
    input_ids, _ = batch("llama", length=10)
    beams = dict(GREEDY, num_beams=3, num_return_sequences=2)
    assert torch.equal(hybrid.generate(input_ids, **beams), hybrid.generate(input_ids, use_cache=False, **beams))
    sampled = {}
    for use_cache in (True, False):
        torch.manual_seed(0)
        sampled[use_cache] = hybrid.generate(input_ids, **dict(GREEDY, do_sample=True), use_cache=use_cache)
    assert torch.equal(sampled[True], sampled[False])


@pytest.mark.parametrize("mode", ["prompt_lookup", "assistant"])
def test_speculative_decoding_with_local_layers_gives_the_greedy_tokens(mode):
    hybrid = local_model(max_crop=8)
    prompt, _ = batch("llama", batch_size=1, length=10)
    prompt = torch.cat([prompt, prompt, prompt], dim=1)
    extra = {
        "prompt_lookup": dict(prompt_lookup_num_tokens=3),
        "assistant": dict(assistant_model=local_model(seed=3), num_assistant_tokens=4),
    }[mode]
    assert torch.equal(hybrid.generate(prompt, **GREEDY, **extra), hybrid.generate(prompt, **GREEDY))


def test_cropped_cache_continues_as_a_fresh_one_and_deeper_crops_are_refused():
    hybrid = local_model()
    ids, _ = batch("llama", length=40)
    with torch.no_grad():
        cache = DynamicCache(config=hybrid.config)
        hybrid(ids, past_key_values=cache)
        cache.crop(-4)  # back to 36 tokens: max_crop
        continued = hybrid(ids[:, 36:], past_key_values=cache).logits
        whole = hybrid(ids).logits[:, 36:]
        torch.testing.assert_close(continued, whole, atol=1e-5, rtol=0)
        hybrid(ids[:, 36:38], past_key_values=cache)
        with pytest.raises(ValueError, match="cannot crop 5 tokens.*max_crop"):
            cache.crop(-5)


def test_hybrid_layer_state_does_not_grow_with_the_context():
    """A hybrid layer keeps `max_crop + 1` running sums, whatever the length, and crops within them."""
    hybrid = convert(tiny_host("llama"), **SETTINGS)
    perturb(hybrid)
    hybrid.eval()
    ids, _ = batch("llama", length=60)
    with torch.no_grad():
        cache = DynamicCache(config=hybrid.config)
        hybrid(ids[:, :50], past_key_values=cache)
        for t in range(50, 60):
            hybrid(ids[:, t : t + 1], past_key_values=cache)
        assert {tuple(layer.context_sums.shape) for layer in cache.layers} == {(2, SETTINGS["max_crop"] + 1, 32)}
        cache.crop(-3)
        continued = hybrid(ids[:, 57:], past_key_values=cache).logits
        torch.testing.assert_close(continued, hybrid(ids).logits[:, 57:], atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="max_crop"):
            cache.crop(-5)


def test_packed_sequences_with_sinks_are_refused():
    hybrid = local_model()
    ids, _ = batch("llama", batch_size=1, length=20)
    position_ids = torch.cat([torch.arange(10), torch.arange(10)])[None]
    with pytest.raises(ValueError, match="sink_tokens"):
        hybrid(ids, position_ids=position_ids, use_cache=False)


def test_saved_local_layers_load_with_remote_code_without_the_package(tmp_path):
    hybrid = local_model()
    hybrid.save_pretrained(tmp_path / "model")
    input_ids, mask = batch("llama", length=30, padding="left")
    torch.save({"input_ids": input_ids, "attention_mask": mask}, tmp_path / "model" / "inputs.pt")
    result = run_remote(
        [{"folder": str(tmp_path / "model"), "auto": "AutoModelForCausalLM", "generate": True}], tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "model" / "remote.pt")
    with torch.no_grad():
        torch.testing.assert_close(remote["output"], hybrid(input_ids, attention_mask=mask).logits, atol=1e-6, rtol=0)
    expected = hybrid.generate(
        input_ids[:1, :8], max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0
    )
    assert torch.equal(remote["generated"], expected)


def test_calibration_scores_a_layer_whose_attention_is_unused_zero():
    """A layer whose output projection is zero computes the same whatever its attention: score 0, chosen first."""
    host = tiny_host("llama", num_hidden_layers=3)
    with torch.no_grad():
        host.model.layers[1].self_attn.o_proj.weight.zero_()
    input_ids, _ = batch("llama", batch_size=1, length=40)
    scores = layer_scores(host, input_ids, **SETTINGS)
    assert scores[1] == 0 and scores[0] > 0 and scores[2] > 0
    assert choose_local_layers(scores, 1 / 3) == [1]
    assert choose_local_layers(scores, 2 / 3) == sorted([1, min((0, 2), key=lambda i: scores[i])])
    assert layer_scores(host, input_ids, **SETTINGS) == scores  # deterministic
    # a window that covers the whole text at temperature 1 is the host's attention: nothing changes
    wide = layer_scores(host, input_ids, max_span=64, ramp=1, tau_min=1.0, tau_max=1.0)
    assert max(wide) < 1e-10


def test_choose_local_layers_breaks_ties_by_index_and_checks_the_fraction():
    assert choose_local_layers([0.5, 0.1, 0.1, 0.9], 0.5) == [1, 2]
    assert choose_local_layers([0.5, 0.1, 0.1, 0.9], 0.25) == [1]
    assert choose_local_layers([0.5, 0.1], 0.0) == []
    with pytest.raises(ValueError, match="local_fraction"):
        choose_local_layers([0.5], 1.5)
