"""The FlexAttention local branch (`adaptive_local_attention(..., implementation="flex")`) against the float64
reference. PyTorch runs flex attention on the CPU forward only (its backward raises there), so the CPU tests compare
outputs; the gradient test needs CUDA and is skipped without it."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_hybrid_attention import LEAVES, MAX_SPAN, RAMP, _assert_close, make_case, make_key_mask, packed_segments

from hybrid_hf.model.hybrid_attention import adaptive_local_attention, reference_local_attention

CUDA = torch.cuda.is_available()


def flex(*case, **kwargs):
    with warnings.catch_warnings():  # flex attention run eagerly (the CPU) warns that it is not fused
        warnings.simplefilter("ignore", UserWarning)
        return adaptive_local_attention(*case, implementation="flex", **kwargs)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "extra",
    [
        dict(),
        dict(padding="mixed"),
        dict(max_distance=4),
        dict(sinks=2, padding="right"),
        dict(segments=(5, 20, 16)),
        dict(length=9, query_offset=20),
    ],
    ids=["plain", "padding", "max_distance", "sinks", "packed", "offset"],
)
def test_flex_forward_matches_reference(causal, extra):
    extra = dict(extra)
    length, keys = extra.pop("length", 41), 41
    case = make_case(length=length, keys=keys, heads=4, kv_heads=2, dtype=torch.float64, seed=len(extra))
    key_mask = make_key_mask(2, keys, extra.pop("padding", "none"))
    kwargs = dict(max_span=MAX_SPAN, ramp=RAMP, causal=causal, key_mask=key_mask, **extra)
    if "sinks" in kwargs:
        sinks = kwargs.pop("sinks")
        kwargs["sink_mask"] = torch.ones(2, sinks, dtype=torch.bool) & key_mask[:, :sinks].bool()
    if "segments" in kwargs:
        kwargs["segment_ids"] = packed_segments(2, keys, kwargs.pop("segments"))
    expected = reference_local_attention(*case, **kwargs)
    with torch.no_grad():
        out = flex(*case, **kwargs)
    assert out.shape == expected.shape and out.dtype == torch.float64
    _assert_close(out, expected, 1e-10, "flex output")
    with torch.no_grad():  # and the banded kernel agrees
        _assert_close(adaptive_local_attention(*case, **kwargs), out, 1e-10, "banded output")


def test_unknown_implementation_is_named():
    with pytest.raises(ValueError, match=r"`implementation` must be one of \('banded', 'flex'\), got 'dense'"):
        adaptive_local_attention(*make_case(length=5), max_span=MAX_SPAN, ramp=RAMP, implementation="dense")


@pytest.mark.skipif(not CUDA, reason="flex attention's backward needs CUDA (PyTorch has none on the CPU)")
@pytest.mark.parametrize("causal", [True, False])
def test_flex_gradients_match_reference_on_cuda(causal):
    case = make_case(length=41, heads=4, kv_heads=2, seed=3)
    kwargs = dict(max_span=MAX_SPAN, ramp=RAMP, causal=causal, key_mask=make_key_mask(2, 41, "mixed"))
    leaves = [t.to("cuda", copy=True).requires_grad_() for t in case]
    ref_leaves = [t.double().requires_grad_() for t in case]
    out = flex(*leaves, **{**kwargs, "key_mask": kwargs["key_mask"].cuda()})
    ref = reference_local_attention(*ref_leaves, **kwargs)
    _assert_close(out.double().cpu(), ref, 1e-4, "output")
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * weights.cuda()).sum(), leaves)
    ref_grads = torch.autograd.grad((ref * weights).sum(), ref_leaves)
    for name, grad, ref_grad in zip(LEAVES, grads, ref_grads, strict=True):
        assert grad is not None and torch.isfinite(grad).all(), name
        _assert_close(grad.double().cpu(), ref_grad, 1e-3, f"d/d{name}")
