"""Hybrid linear-attention models (Qwen3-Next and kin): only the layers whose `layer_types` entry is softmax
attention become hybrid; the linear-attention layers and the cache that holds their recurrent state stay the host's."""

import pytest
import torch
from tiny_models import perturb, tiny_host

from hybrid_hf import convert, hybrid_layers

SETTINGS = dict(max_span=4, ramp=2)
NEW = SETTINGS["max_span"] + 24
GREEDY = dict(do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW, eos_token_id=None, pad_token_id=0)
LAYER_TYPES = ["linear_attention", "full_attention", "linear_attention", "full_attention"]


@pytest.mark.parametrize("model_type", ["qwen3_next", "qwen3_5_text"])
def test_only_the_attention_layers_become_hybrid_and_generate_equals_the_host(model_type):
    host = tiny_host(model_type, num_hidden_layers=4, layer_types=LAYER_TYPES)
    hybrid = convert(host, **SETTINGS)
    layers = hybrid.model.layers
    kinds = list(zip(layers, LAYER_TYPES, strict=True))
    assert hybrid_layers(hybrid) == [layer.self_attn for layer, kind in kinds if kind == "full_attention"]
    assert all(not hybrid_layers(layer) for layer, kind in kinds if kind == "linear_attention")
    prompt = torch.randint(3, 90, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hybrid(prompt).logits - host(prompt).logits).abs().max() <= 1e-5
    assert torch.equal(hybrid.generate(prompt, **GREEDY), host.generate(prompt, **GREEDY))


@pytest.mark.parametrize("model_type", ["qwen3_next", "qwen3_5_text"])
def test_cached_decoding_beside_linear_attention_equals_uncached(model_type):
    host = tiny_host(model_type, num_hidden_layers=4, layer_types=LAYER_TYPES)
    hybrid = convert(host, **SETTINGS)
    perturb(hybrid)
    prompt = torch.randint(3, 90, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hybrid(prompt).logits - host(prompt).logits).abs().max() > 1e-3
    cached = hybrid.generate(prompt, **GREEDY)
    assert torch.equal(cached, hybrid.generate(prompt, **GREEDY, use_cache=False))
