"""`torch.compile(adaptive_local_attention, fullgraph=True)`: the kernel traces whole (no value read, no graph break)
and the compiled kernel equals the dense reference, outputs and gradients."""

from __future__ import annotations

import pytest
import torch

from hybrid_hf.model.hybrid_attention import adaptive_local_attention, band_reach, reference_local_attention

MAX_SPAN, RAMP = 6, 3


def _case(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(2, 4, 21, 8, generator=gen)
    key, value = torch.randn(2, 2, 21, 8, generator=gen), torch.randn(2, 2, 21, 8, generator=gen)
    span = MAX_SPAN * torch.rand(2, 4, 21, generator=gen)
    temperature = 0.5 + torch.rand(2, 4, 21, generator=gen)
    key_mask = torch.ones(2, 21, dtype=torch.long)
    key_mask[1, :5] = 0  # left padding
    return (query, key, value, span, temperature), key_mask


@pytest.fixture
def compiled():
    torch._dynamo.reset()
    yield torch.compile(adaptive_local_attention, fullgraph=True)
    torch._dynamo.reset()


def test_compiled_kernel_matches_reference_with_gradients(compiled):
    inputs, key_mask = _case()
    kwargs = dict(max_span=MAX_SPAN, ramp=RAMP, key_mask=key_mask, block_size=8)
    leaves = [t.clone().requires_grad_() for t in inputs]
    ref_leaves = [t.clone().requires_grad_() for t in inputs]
    out = compiled(*leaves, **kwargs)
    ref = reference_local_attention(*ref_leaves, **kwargs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * weights).sum(), leaves)
    ref_grads = torch.autograd.grad((ref * weights).sum(), ref_leaves)
    for name, grad, ref_grad in zip(("query", "key", "value", "span", "temperature"), grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"d/d{name}: {m}")


def test_compiled_kernel_at_inference_with_a_bucketed_reach(compiled):
    """At inference the compiled kernel reads a band of `band_reach(span)` keys given from outside, a Python int."""
    inputs, key_mask = _case(seed=2)
    inputs[3].mul_(0.3)  # short spans: the band reaches fewer keys than max_span + ramp
    kwargs = dict(max_span=MAX_SPAN, ramp=RAMP, key_mask=key_mask, causal=False)
    reach = band_reach(inputs[3], max_span=MAX_SPAN, ramp=RAMP)
    assert reach < MAX_SPAN + RAMP
    with torch.no_grad():
        out = compiled(*inputs, reach=reach, **kwargs)
    torch.testing.assert_close(out, reference_local_attention(*inputs, **kwargs), atol=1e-5, rtol=1e-5)
