"""Converted models on each available device (the `device` fixture: the CPU, and CUDA where there is one): the forward
equals the host's, and cached generation equals uncached. Results are compared on the CPU."""

from __future__ import annotations

import pytest
import torch
from test_models import assert_close_on_real_tokens
from tiny_models import batch, outputs_of, perturb, tiny_host

from hybrid_hf import convert, hybrid_layers

SETTINGS = dict(max_span=8, ramp=4)


@pytest.mark.parametrize("model_type,padding", [("llama", "left"), ("bert", "right")])
def test_converted_forward_equals_the_host_on_the_device(model_type, padding, device):
    host = tiny_host(model_type).to(device)
    hybrid = convert(host, **SETTINGS)
    assert all(p.device.type == torch.device(device).type for p in hybrid.parameters())
    input_ids, mask = batch(model_type, padding=padding)
    with torch.no_grad():
        expected = outputs_of(host, input_ids.to(device), mask.to(device)).cpu()
        actual = outputs_of(hybrid, input_ids.to(device), mask.to(device)).cpu()
    assert_close_on_real_tokens(actual, expected, mask)


@pytest.mark.parametrize("local_layers", [[], [1]], ids=["hybrid", "local-only"])
def test_cached_generation_equals_uncached_on_the_device(local_layers, device):
    """Greedy decoding past the band, with and without the cache (and a local-only layer's bounded cache)."""
    settings = dict(SETTINGS, sink_tokens=2) if local_layers else SETTINGS
    hybrid = convert(tiny_host("llama"), local_layers=local_layers, **settings)
    perturb(hybrid)  # on the CPU (its generator), then moved
    hybrid.to(device)
    assert len(hybrid_layers(hybrid)) == 2
    prompt, mask = batch("llama", length=10, padding="left")
    kwargs = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    prompt, mask = prompt.to(device), mask.to(device)
    cached = hybrid.generate(prompt, attention_mask=mask, **kwargs)
    uncached = hybrid.generate(prompt, attention_mask=mask, use_cache=False, **kwargs)
    assert cached.device.type == torch.device(device).type
    assert cached.shape[1] == 10 + 32 > SETTINGS["max_span"] + SETTINGS["ramp"]
    assert torch.equal(cached.cpu(), uncached.cpu())
