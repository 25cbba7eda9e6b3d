"""Tests of the hybrid-attention math in `hybrid_hf/hybrid_attention.py`.

The banded kernel (`adaptive_local_attention`) is checked against its dense twin (`reference_local_attention`),
against `torch.autograd.gradcheck`, and against values computed by hand from the definition in the kernel's
docstring (`m(delta) = clamp((z - delta) / ramp + 1, 0, 1)`, weights `m * exp(logit) / sum(m * exp(logit))`).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from hybrid_hf.model import hybrid_attention
from hybrid_hf.model.hybrid_attention import (
    SpanPredictor,
    adaptive_local_attention,
    causal_prefix_mean,
    masked_mean,
    reference_local_attention,
    span_temperature,
    validate_span_settings,
)

MAX_SPAN = 8
RAMP = 3
WINDOW = MAX_SPAN + RAMP  # keys at distance <= WINDOW - 1 may be read
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
LEAVES = ("query", "key", "value", "span", "temperature")


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


def _fill(shape, spec, gen, dtype):
    """A constant tensor for a number, a uniform draw in `[lo, hi]` for a `(lo, hi)` pair."""
    if isinstance(spec, tuple):
        lo, hi = spec
        return lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=dtype)
    return torch.full(shape, float(spec), dtype=dtype)


def _side_shape(kind, batch, heads, length):
    return {"position": (batch, 1, length), "head": (batch, heads, length), "scalar": (1, 1, 1)}[kind]


def make_case(
    *,
    batch=2,
    heads=4,
    kv_heads=2,
    length=16,
    keys=None,
    head_dim=8,
    span=(0.0, MAX_SPAN),
    temperature=(0.5, 1.5),
    span_shape="head",
    temperature_shape="head",
    dtype=torch.float32,
    seed=0,
):
    """Random `(query, key, value, span, temperature)` with the given shapes and span/temperature ranges."""
    keys = length if keys is None else keys
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, length, head_dim, generator=gen, dtype=dtype)
    key = torch.randn(batch, kv_heads, keys, head_dim, generator=gen, dtype=dtype)
    value = torch.randn(batch, kv_heads, keys, head_dim, generator=gen, dtype=dtype)
    span_t = _fill(_side_shape(span_shape, batch, heads, length), span, gen, dtype)
    temperature_t = _fill(_side_shape(temperature_shape, batch, heads, length), temperature, gen, dtype)
    return query, key, value, span_t, temperature_t


def make_key_mask(batch, keys, padding, gen=None):
    """`(B, S)` mask (1 real, 0 padding) with a different amount of padding per sequence."""
    mask = torch.ones(batch, keys, dtype=torch.long)
    if padding == "none":
        return None
    amounts = [min(keys - 1, 3 + 14 * b) for b in range(batch)]  # second sequence: more padding than a window
    for b, amount in enumerate(amounts):
        side = padding if padding in ("left", "right") else ("left" if b % 2 == 0 else "right")
        if padding == "holes":
            gen = gen or torch.Generator().manual_seed(123)
            mask[b] = (torch.rand(keys, generator=gen) > 0.3).long()
        elif side == "left":
            mask[b, :amount] = 0
        else:
            mask[b, keys - amount :] = 0
    return mask


def _assert_close(actual, expected, tol, what):
    """Equal to `tol`, relative to the larger of 1 and the tensor's scale (gradients at tau = 0.05 are ~1e2)."""
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def readable_rows(
    span, key_mask, *, batch, heads, length, keys, max_span, ramp, causal, query_offset=None, sink_mask=None
):
    """`(B, H, N)`: does the query have at least one key with `m > 0` (or a sink) that is not padding? From the
    definition.

    `m` is evaluated in the span's precision (at least float32), as the kernel does: a span of 1e-14 is 0 there.
    """
    offset = keys - length if query_offset is None else query_offset
    compute = torch.promote_types(span.dtype, torch.float32)
    delta = (offset + torch.arange(length))[:, None] - torch.arange(keys)[None, :]  # (N, S)
    distance = delta.abs().to(compute)
    z = span.detach().to(compute).clamp(0, max_span).expand(batch, heads, length)[..., None]
    readable = ((z - distance) / ramp + 1) > 0  # (B, H, N, S)
    if sink_mask is not None:
        readable = readable | F.pad(sink_mask.bool(), (0, keys - sink_mask.shape[1]))[:, None, None, :]
    if causal:
        readable = readable & (delta >= 0)
    if key_mask is not None:
        readable = readable & key_mask.bool()[:, None, None, :]
    return readable.any(-1)


def float32_tolerance(temperature):
    """1e-5, widened by 1 / tau_min: logits (and their float32 round-off) are amplified by 1 / tau.

    At tau = 0.05 the reference itself, evaluated in float32, is ~1e-5 relative off the float64 result, so the
    float32 comparison cannot be tighter; `assert_matches_reference` also checks float64 to 1e-10 for exactness.
    """
    return 1e-5 * max(1.0, 1.0 / temperature.min().item())


def on_device(kwargs, device):
    """The kernel's keyword arguments with their tensors (masks, segment ids) moved to `device`."""
    return {name: v.to(device) if isinstance(v, torch.Tensor) else v for name, v in kwargs.items()}


def assert_matches_reference(
    query, key, value, span, temperature, *, tol=None, check_grads=True, also_float64=True, device="cpu", **kwargs
):
    """Kernel == reference: the output, and the gradients of `(out * w).sum()` w.r.t. every tensor argument.

    float32 inputs are compared in float32 (to `float32_tolerance`) and again in float64 (to 1e-10). The kernel runs
    on `device`; the reference runs on the CPU, and the kernel's results are compared there.
    """
    if tol is None:
        tol = float32_tolerance(temperature) if query.dtype == torch.float32 else TOL[query.dtype]
    inputs = (query, key, value, span, temperature)
    leaves = [t.detach().to(device, copy=True).requires_grad_(check_grads) for t in inputs]
    ref_leaves = [t.detach().clone().requires_grad_(check_grads) for t in inputs]
    out = adaptive_local_attention(*leaves, **on_device(kwargs, device))
    assert out.device.type == torch.device(device).type
    ref = reference_local_attention(*ref_leaves, **kwargs)
    out_device, out = out, out.cpu()
    assert out.shape == ref.shape == (*query.shape[:3], value.shape[3])
    assert out.dtype == query.dtype
    assert torch.isfinite(out).all()
    _assert_close(out, ref, tol, "output")
    # Rows with nothing to read are exactly zero.
    batch, heads, length, _ = query.shape
    has_keys = readable_rows(
        span,
        kwargs.get("key_mask"),
        batch=batch,
        heads=heads,
        length=length,
        keys=key.shape[2],
        max_span=kwargs["max_span"],
        ramp=kwargs["ramp"],
        causal=kwargs.get("causal", True),
        query_offset=kwargs.get("query_offset"),
        sink_mask=kwargs.get("sink_mask"),
    )
    assert (out.detach()[~has_keys] == 0).all()
    if check_grads:
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
        grads = torch.autograd.grad((out_device * weights.to(device)).sum(), leaves)
        ref_grads = torch.autograd.grad((ref * weights).sum(), ref_leaves)
        for name, grad, ref_grad, leaf in zip(LEAVES, grads, ref_grads, leaves, strict=True):
            assert grad.shape == leaf.shape, name
            assert grad.device == leaf.device, name
            grad = grad.cpu()
            assert torch.isfinite(ref_grad).all(), f"reference d/d{name}"
            assert torch.isfinite(grad).all(), f"non-finite d/d{name}"
            _assert_close(grad, ref_grad, tol, f"d/d{name}")
    if also_float64 and query.dtype == torch.float32:
        as64 = [t.double() for t in (query, key, value, span, temperature)]
        assert_matches_reference(*as64, check_grads=check_grads, also_float64=False, device=device, **kwargs)
    return out


class MaxNumel(TorchDispatchMode):
    """Records the largest tensor (in elements) produced by any aten op run inside it."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0
        self.max_op = None
        self.by_op = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.by_op[str(func)] = max(self.by_op.get(str(func), 0), t.numel())
                if t.numel() > self.max_numel:
                    self.max_numel, self.max_op = t.numel(), str(func)
        return out


# ----------------------------------------------------------------------------------------------------------------
# 1. Kernel == dense reference, outputs and gradients, float32 to 1e-5
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [1, 16, 64])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "length",
    [1, MAX_SPAN - 1, MAX_SPAN, MAX_SPAN + 1, WINDOW, 4 * WINDOW + 5, 131],
)
def test_matches_reference_over_lengths(length, causal, block_size, device):
    case = make_case(length=length, seed=length)
    assert_matches_reference(*case, max_span=MAX_SPAN, ramp=RAMP, causal=causal, block_size=block_size, device=device)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1), (2, 1)])
def test_matches_reference_grouped_query_attention(heads, kv_heads, causal, device):
    case = make_case(heads=heads, kv_heads=kv_heads, length=37, head_dim=16, seed=heads * 10 + kv_heads)
    assert_matches_reference(*case, max_span=MAX_SPAN, ramp=RAMP, causal=causal, block_size=16, device=device)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padding", ["left", "right", "mixed", "holes"])
@pytest.mark.parametrize("length", [9, 40])
def test_matches_reference_with_padding(padding, causal, length, device):
    case = make_case(length=length, kv_heads=1, seed=length)
    key_mask = make_key_mask(2, length, padding)
    assert key_mask is not None and (key_mask == 0).any()
    assert_matches_reference(
        *case, max_span=MAX_SPAN, ramp=RAMP, causal=causal, key_mask=key_mask, block_size=16, device=device
    )


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("max_distance", [0, 1, 4, WINDOW - 2, WINDOW - 1, 100])
@pytest.mark.parametrize("padding", ["none", "mixed"])
def test_matches_reference_with_max_distance(max_distance, causal, padding, device):
    case = make_case(length=41, seed=max_distance)
    kwargs = dict(
        max_span=MAX_SPAN, ramp=RAMP, causal=causal, key_mask=make_key_mask(2, 41, padding), max_distance=max_distance
    )
    assert_matches_reference(*case, block_size=16, device=device, **kwargs)
    with torch.no_grad():  # the inference path narrows the band to the limit
        torch.testing.assert_close(
            adaptive_local_attention(*(t.to(device) for t in case), **on_device(kwargs, device)).cpu(),
            reference_local_attention(*case, **kwargs),
            atol=1e-5,
            rtol=0,
        )


@pytest.mark.parametrize("causal", [True, False])
def test_matches_reference_with_a_value_width_of_its_own(causal):
    """Values may be wider or narrower than queries and keys (e.g. multi-head latent attention)."""
    query, key, _, span, temperature = make_case(length=37, seed=11)
    value = torch.randn(2, 2, 37, 12, generator=torch.Generator().manual_seed(12))
    out = assert_matches_reference(query, key, value, span, temperature, max_span=MAX_SPAN, ramp=RAMP, causal=causal)
    assert out.shape == (2, 4, 37, 12)


def packed_segments(batch, keys, lengths):
    """`(B, S)` sequence indices of packed rows: sequences of `lengths` one after another."""
    row = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[:keys]
    return row.expand(batch, keys).clone()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lengths", [(5, 20, 3, 13), (1, 1, 39), (41,)])
def test_matches_reference_with_packed_sequences(causal, lengths):
    case = make_case(length=41, seed=len(lengths))
    segments = packed_segments(2, 41, lengths)
    kwargs = dict(max_span=MAX_SPAN, ramp=RAMP, causal=causal, segment_ids=segments, block_size=16)
    assert_matches_reference(*case, **kwargs)
    with torch.no_grad():
        torch.testing.assert_close(
            adaptive_local_attention(*case, **kwargs), reference_local_attention(*case, **kwargs), atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("causal", [True, False])
def test_packed_sequences_equal_each_sequence_alone(causal):
    query, key, value, span, temperature = make_case(batch=1, length=30, seed=5)
    lengths = (12, 18)
    kwargs = dict(max_span=MAX_SPAN, ramp=RAMP, causal=causal)
    packed = adaptive_local_attention(
        query, key, value, span, temperature, segment_ids=packed_segments(1, 30, lengths), **kwargs
    )
    start = 0
    for n in lengths:
        part = slice(start, start + n)
        alone = adaptive_local_attention(
            query[:, :, part], key[:, :, part], value[:, :, part], span[:, :, part], temperature[:, :, part], **kwargs
        )
        torch.testing.assert_close(packed[:, :, part], alone, atol=1e-6, rtol=0)
        start += n


@pytest.mark.parametrize("causal", [True, False])
def test_keys_beyond_max_distance_are_never_read(causal):
    length, t, limit = 40, 20, 3
    query, key, value, span, temperature = make_case(length=length, span=float(MAX_SPAN), seed=4)
    kwargs = dict(max_span=MAX_SPAN, ramp=RAMP, causal=causal, max_distance=limit)
    out = adaptive_local_attention(query, key, value, span, temperature, **kwargs)
    far = (torch.arange(length) - t).abs() > limit
    key2, value2 = key.clone(), value.clone()
    key2[:, :, far] = 50 * torch.randn_like(key2[:, :, far])
    value2[:, :, far] = 50 * torch.randn_like(value2[:, :, far])
    out2 = adaptive_local_attention(query, key2, value2, span, temperature, **kwargs)
    torch.testing.assert_close(out2[:, :, t], out[:, :, t], rtol=0, atol=1e-6)
    near = (torch.arange(length) - t).abs() == limit
    value2[:, :, near] += 1.0
    assert not torch.allclose(
        adaptive_local_attention(query, key2, value2, span, temperature, **kwargs)[:, :, t], out[:, :, t]
    )


def test_key_mask_bool_and_long_agree():
    case = make_case(length=30)
    mask = make_key_mask(2, 30, "left")
    out_long = adaptive_local_attention(*case, max_span=MAX_SPAN, ramp=RAMP, key_mask=mask)
    out_bool = adaptive_local_attention(*case, max_span=MAX_SPAN, ramp=RAMP, key_mask=mask.bool())
    torch.testing.assert_close(out_long, out_bool, rtol=0, atol=0)
    # And the mask does something: it changes the output of the real tokens next to the padding.
    out_none = adaptive_local_attention(*case, max_span=MAX_SPAN, ramp=RAMP)
    assert not torch.allclose(out_long[1, :, 17:22], out_none[1, :, 17:22])


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize(
    "length,keys,query_offset",
    [
        (1, 50, None),  # one decoding step at the end of a cache
        (13, 50, None),  # a chunk of queries after a cache (offset S - N = 37)
        (13, 50, 0),  # explicit offset: queries are the first positions
        (13, 50, 20),  # explicit offset in the middle: later keys exist but the causal form must not read them
        (13, 50, 37),  # explicit offset equal to the default
        (40, 41, None),
    ],
)
def test_matches_reference_with_query_offsets(length, keys, query_offset, padding, causal):
    case = make_case(length=length, keys=keys, kv_heads=2, seed=length + keys)
    key_mask = make_key_mask(2, keys, padding)
    assert_matches_reference(
        *case,
        max_span=MAX_SPAN,
        ramp=RAMP,
        causal=causal,
        key_mask=key_mask,
        query_offset=query_offset,
        block_size=16,
    )


def sink_slots(batch, sinks, key_mask=None):
    """`(B, K)` sink mask: the first `K` keys, as far as they are real tokens."""
    mask = torch.ones(batch, sinks, dtype=torch.bool)
    return mask if key_mask is None else mask & key_mask[:, :sinks].bool()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padding", ["none", "left", "mixed"])
@pytest.mark.parametrize("sinks", [1, 4])
@pytest.mark.parametrize("max_distance", [None, 6])
@pytest.mark.parametrize(
    "length,keys,query_offset",
    [(40, 40, None), (13, 50, None), (1, 50, None), (1, 3, None), (1, 18, None), (1, 50, 20), (9, 50, 20)],
)
def test_matches_reference_with_sinks(length, keys, query_offset, sinks, max_distance, padding, causal, device):
    case = make_case(length=length, keys=keys, kv_heads=2, seed=3 * length + keys + sinks)
    key_mask = make_key_mask(2, keys, padding)
    settings_ = dict(
        max_span=MAX_SPAN,
        ramp=RAMP,
        causal=causal,
        key_mask=key_mask,
        query_offset=query_offset,
        max_distance=max_distance,
        sink_mask=sink_slots(2, min(sinks, keys), key_mask),
        block_size=16,
    )
    assert_matches_reference(*case, device=device, **settings_)  # gradients tracked: the band's autograd function
    with torch.no_grad():  # inference: the fused path (float32 on the CPU), and the decoding step when length == 1
        expected = reference_local_attention(*case, **settings_)
        on = on_device(settings_, device)
        _assert_close(adaptive_local_attention(*(t.to(device) for t in case), **on).cpu(), expected, 1e-5, "inference")
        bf16 = [t.to(device, torch.bfloat16) for t in case[:3]] + [t.to(device) for t in case[3:]]  # unfused path
        _assert_close(adaptive_local_attention(*bf16, **on).float().cpu(), expected, 5e-2, "bfloat16")


@pytest.mark.parametrize("causal", [True, False])
def test_matches_reference_with_sinks_and_packed_sequences(causal):
    case = make_case(length=41, kv_heads=2, seed=5)
    segments = packed_segments(2, 41, (5, 20, 16))
    assert_matches_reference(
        *case, max_span=MAX_SPAN, ramp=RAMP, causal=causal, segment_ids=segments, sink_mask=sink_slots(2, 3)
    )


@pytest.mark.parametrize("length", [1, 3])
def test_sinks_and_window_alone_equal_the_whole_sequence(length):
    """A cache may drop the keys between the sinks and the band: the last queries read the same keys."""
    sinks, keys = 4, 60
    query, key, value, span, temperature = make_case(length=keys, keys=keys, kv_heads=2, seed=11)
    key_mask = make_key_mask(2, keys, "left")
    settings_ = dict(max_span=MAX_SPAN, ramp=RAMP, causal=True, sink_mask=sink_slots(2, sinks, key_mask))
    whole = reference_local_attention(query, key, value, span, temperature, key_mask=key_mask, **settings_)
    kept = torch.cat([torch.arange(sinks), torch.arange(keys - (WINDOW - 1) - length, keys)])  # sinks + band
    last = slice(keys - length, keys)
    with torch.no_grad():
        cached = adaptive_local_attention(
            query[:, :, last],
            key[:, :, kept],
            value[:, :, kept],
            span[:, :, last],
            temperature[:, :, last],
            key_mask=key_mask[:, kept],
            **settings_,
        )
    _assert_close(cached, whole[:, :, last], 1e-5, "sinks + window")


def test_sinks_are_read_with_full_weight_whatever_the_span():
    """Span 0, ramp 3 and two sinks: query t weighs itself 1, t-1 2/3, t-2 1/3 and each sink 1 (hand-computed)."""
    length, t = 12, 9
    query, key, value, span, temperature = one_hot_case(length, span=0)
    out = adaptive_local_attention(
        query, key, value, span, temperature, max_span=4, ramp=3, scaling=1.0, sink_mask=sink_slots(1, 2)
    )
    expected = torch.zeros(length, dtype=torch.float64)
    expected[[0, 1, t, t - 1, t - 2]] = torch.tensor([1, 1, 1, 2 / 3, 1 / 3], dtype=torch.float64) / 4
    torch.testing.assert_close(out[0, 0, t], expected, rtol=0, atol=1e-12)
    # a query among the sinks reads itself once, as a sink, and the earlier sink
    torch.testing.assert_close(out[0, 0, 1, :2], torch.tensor([0.5, 0.5], dtype=torch.float64), rtol=0, atol=1e-12)


def test_default_query_offset_is_the_last_positions():
    case = make_case(length=13, keys=50)
    default = adaptive_local_attention(*case, max_span=MAX_SPAN, ramp=RAMP, causal=True)
    explicit = adaptive_local_attention(*case, max_span=MAX_SPAN, ramp=RAMP, causal=True, query_offset=37)
    other = adaptive_local_attention(*case, max_span=MAX_SPAN, ramp=RAMP, causal=True, query_offset=20)
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    assert not torch.allclose(default, other)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "span",
    [
        0.0,
        1e-4,
        (0.0, 0.5),
        1.0,
        (MAX_SPAN - 1e-3, MAX_SPAN),
        float(MAX_SPAN),
        MAX_SPAN + 5.0,  # beyond max_span: clamped
        (-2.0, MAX_SPAN + 3.0),  # below 0 and beyond max_span, clamped
        (0.0, MAX_SPAN),
    ],
    ids=str,
)
def test_matches_reference_over_spans(span, causal, device):
    case = make_case(length=45, span=span, seed=3)
    assert_matches_reference(*case, max_span=MAX_SPAN, ramp=RAMP, causal=causal, block_size=16, device=device)


def test_matches_reference_with_integer_spans():
    """Integer spans put keys exactly on the kinks of the ramp (m = 0 and m = 1)."""
    case = list(make_case(length=45, seed=4))
    case[3] = torch.randint(0, MAX_SPAN + 1, case[3].shape, generator=torch.Generator().manual_seed(4)).float()
    for causal in (True, False):
        assert_matches_reference(*case, max_span=MAX_SPAN, ramp=RAMP, causal=causal, block_size=16)


def test_spans_beyond_max_span_are_clamped():
    case = list(make_case(length=30, span=float(MAX_SPAN)))
    at_max = adaptive_local_attention(*case, max_span=MAX_SPAN, ramp=RAMP)
    case[3] = case[3] + 100.0
    beyond = adaptive_local_attention(*case, max_span=MAX_SPAN, ramp=RAMP)
    torch.testing.assert_close(beyond, at_max, rtol=0, atol=0)
    case[3] = torch.full_like(case[3], -5.0)
    below = adaptive_local_attention(*case, max_span=MAX_SPAN, ramp=RAMP)
    case[3] = torch.zeros_like(case[3])
    torch.testing.assert_close(below, adaptive_local_attention(*case, max_span=MAX_SPAN, ramp=RAMP), rtol=0, atol=0)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("temperature_shape", ["position", "head"])
@pytest.mark.parametrize("span_shape", ["position", "head"])
@pytest.mark.parametrize("temperature", [0.05, 2.0, (0.05, 2.0)], ids=str)
def test_matches_reference_over_temperatures_and_shapes(temperature, span_shape, temperature_shape, causal, device):
    case = make_case(
        length=33, temperature=temperature, span_shape=span_shape, temperature_shape=temperature_shape, seed=5
    )
    assert_matches_reference(*case, max_span=MAX_SPAN, ramp=RAMP, causal=causal, block_size=16, device=device)


@pytest.mark.parametrize("causal", [True, False])
def test_matches_reference_with_scalar_span_and_temperature_and_scaling(causal):
    case = make_case(length=20, span=2.5, temperature=0.7, span_shape="scalar", temperature_shape="scalar")
    assert_matches_reference(*case, max_span=MAX_SPAN, ramp=RAMP, causal=causal, scaling=0.3, block_size=8)


@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck_float64(causal):
    """Gradients against finite differences: independent of the reference. Spans off the ramp's kinks."""
    query, key, value, span, temperature = make_case(
        batch=1, heads=2, kv_heads=1, length=7, head_dim=3, span=(0.3, 3.7), dtype=torch.float64, seed=11
    )
    span = torch.tensor([[[0.3, 1.4, 2.6, 3.7, 0.55, 1.2, 2.25]]], dtype=torch.float64).expand(1, 2, 7).clone()
    inputs = [t.requires_grad_() for t in (query, key, value, span, temperature)]

    def fn(q, k, v, z, tau):
        return adaptive_local_attention(q, k, v, z, tau, max_span=4, ramp=2, causal=causal, block_size=3)

    assert torch.autograd.gradcheck(fn, inputs)


def test_span_gradient_is_nonzero():
    """The soft span is differentiable: the loss depends on the span through the ramp."""
    query, key, value, span, temperature = make_case(length=30, span=(1.0, MAX_SPAN - 1.0))
    span.requires_grad_()
    out = adaptive_local_attention(query, key, value, span, temperature, max_span=MAX_SPAN, ramp=RAMP)
    (grad,) = torch.autograd.grad(out.square().sum(), span)
    # Once the ramp lies inside the sequence (t >= max_span + ramp), every query's loss depends on its span.
    assert (grad[..., WINDOW:].abs() > 0).all()


# ----------------------------------------------------------------------------------------------------------------
# 2. torch.no_grad() narrows the band to max(span) + ramp without changing the result
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "span,padding,length,keys",
    [
        ((0.0, 2.5), "none", 50, 50),
        ((0.0, 2.0), "left", 50, 50),  # integer max span
        (0.0, "right", 50, 50),  # band of ramp keys only
        ((3.0, MAX_SPAN), "none", 37, 37),
        (MAX_SPAN + 3.0, "left", 37, 37),  # clamped: full band
        ((0.0, 4.5), "left", 7, 60),  # cached-decoding chunk
    ],
    ids=str,
)
def test_no_grad_equals_grad_tracked(span, padding, length, keys, causal):
    query, key, value, span_t, temperature = make_case(length=length, keys=keys, span=span, seed=length)
    kwargs = dict(max_span=MAX_SPAN, ramp=RAMP, causal=causal, key_mask=make_key_mask(2, keys, padding), block_size=16)
    tracked_inputs = [t.clone().requires_grad_() for t in (query, key, value, span_t, temperature)]
    with MaxNumel() as tracked_mode:
        tracked = adaptive_local_attention(*tracked_inputs, **kwargs)
    with torch.no_grad(), MaxNumel() as free_mode:
        free = adaptive_local_attention(query, key, value, span_t, temperature, **kwargs)
    assert tracked.requires_grad and not free.requires_grad
    torch.testing.assert_close(free, tracked.detach(), rtol=1e-6, atol=1e-6)
    if span_t.max() + 1 < MAX_SPAN:  # the band really is narrower without gradients: fewer softmax weights
        # the band's width shows in the soft mask, made by aten.sub (aten.exp runs in place)
        assert free_mode.by_op["aten.sub.Tensor"] < tracked_mode.by_op["aten.sub.Tensor"]
    # Inputs that do not require grad narrow the band too, with grad mode on.
    torch.testing.assert_close(
        adaptive_local_attention(query, key, value, span_t, temperature, **kwargs), free, rtol=0, atol=0
    )


# ----------------------------------------------------------------------------------------------------------------
# 3. Property test: kernel == reference over random settings
# ----------------------------------------------------------------------------------------------------------------


@st.composite
def attention_settings(draw):
    batch = draw(st.integers(1, 2))
    kv_heads = draw(st.integers(1, 2))
    groups = draw(st.integers(1, 3))
    length = draw(st.integers(1, 48))
    extra = draw(st.integers(0, 20))
    causal = draw(st.booleans())
    query_offset = draw(st.one_of(st.none(), st.integers(0, extra)))
    max_span = draw(st.integers(1, 24))
    ramp = draw(st.integers(1, 8))
    span_lo = draw(st.floats(-1.0, max_span + 2.0))
    span_hi = draw(st.floats(span_lo, max_span + 2.0))
    tau_lo = draw(st.floats(0.05, 2.0))
    tau_hi = draw(st.floats(tau_lo, 2.0))
    pad_sides = st.sampled_from(["none", "left", "right"])
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    # A (1, 1, 1) span or temperature has one gradient summed over every query: in float32 that sum's round-off
    # (~1e-4 relative, in the float32 reference as well) exceeds 1e-5, so scalars are drawn in float64 only.
    shapes = st.sampled_from(["position", "head", "scalar"] if dtype == torch.float64 else ["position", "head"])
    return dict(
        batch=batch,
        kv_heads=kv_heads,
        heads=kv_heads * groups,
        length=length,
        keys=length + extra,
        causal=causal,
        query_offset=query_offset,
        head_dim=draw(st.sampled_from([1, 4, 8, 16])),
        max_span=max_span,
        ramp=ramp,
        padding=[draw(st.tuples(pad_sides, st.integers(0, length + extra))) for _ in range(batch)],
        block_size=draw(st.sampled_from([1, 2, 5, 16, 64])),
        span=(span_lo, span_hi),
        temperature=(tau_lo, tau_hi),
        span_shape=draw(shapes),
        temperature_shape=draw(shapes),
        dtype=dtype,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def test_property_kernel_matches_reference():
    _property_kernel_matches_reference()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(attention_settings())
def _property_kernel_matches_reference(p):
    case = make_case(
        batch=p["batch"],
        heads=p["heads"],
        kv_heads=p["kv_heads"],
        length=p["length"],
        keys=p["keys"],
        head_dim=p["head_dim"],
        span=p["span"],
        temperature=p["temperature"],
        span_shape=p["span_shape"],
        temperature_shape=p["temperature_shape"],
        dtype=p["dtype"],
        seed=p["seed"],
    )
    # A span just above an integer k puts the key at distance k + ramp at m = frac(z) / ramp ~ 0. For a query
    # whose every readable key sits there (its own key is padding), d/dz is ill-conditioned: round-off of order
    # eps / m in BOTH implementations (e.g. m = 1e-6 in float32: kernel and float32 reference both ~0.06 off a
    # float64 value of ~1e-10). Such spans are snapped to the integer; integers and all other fractions remain.
    span = case[3]
    fraction = span - span.floor()
    case = (*case[:3], torch.where((fraction > 0) & (fraction < 0.05), span.floor(), span), case[4])
    key_mask = torch.ones(p["batch"], p["keys"], dtype=torch.bool)
    for b, (side, amount) in enumerate(p["padding"]):
        if side == "left":
            key_mask[b, :amount] = False
        elif side == "right":
            key_mask[b, p["keys"] - amount :] = False
    assert_matches_reference(
        *case,
        max_span=p["max_span"],
        ramp=p["ramp"],
        causal=p["causal"],
        key_mask=key_mask,
        query_offset=p["query_offset"],
        block_size=p["block_size"],
    )
    # Inference path (narrowed band) too.
    with torch.no_grad():
        kwargs = {k: p[k] for k in ("max_span", "ramp", "causal", "query_offset", "block_size")}
        free = adaptive_local_attention(*case, key_mask=key_mask, **kwargs)
        ref = reference_local_attention(*case, key_mask=key_mask, **kwargs)
    _assert_close(free, ref, TOL[p["dtype"]], "no_grad output")


# ----------------------------------------------------------------------------------------------------------------
# 4. Hand-computed values: the window's exact edge, the ramp weights, causality, symmetry
# ----------------------------------------------------------------------------------------------------------------


def one_hot_case(length, *, span, logits=None, temperature=1.0, dtype=torch.float64):
    """Values one-hot per position, so output[t, j] is the weight query t gives key j.

    The query is e_0 and key j is `logits[j] * e_0`, so with `scaling=1` the logit of key j is `logits[j]`
    (all zero by default: the weights are then just `m` normalised).
    """
    query = torch.zeros(1, 1, length, length, dtype=dtype)
    query[..., 0] = 1.0
    key = torch.zeros(1, 1, length, length, dtype=dtype)
    if logits is not None:
        key[0, 0, :, 0] = torch.as_tensor(logits, dtype=dtype)
    value = torch.eye(length, dtype=dtype)[None, None]
    span_t = torch.full((1, 1, length), float(span), dtype=dtype)
    temperature_t = torch.full((1, 1, length), float(temperature), dtype=dtype)
    return query, key, value, span_t, temperature_t


def ramp_mask(z, delta, ramp):
    return min(1.0, max(0.0, (z - delta) / ramp + 1.0))


@pytest.mark.parametrize("no_grad", [False, True])
@pytest.mark.parametrize("block_size", [1, 4, 64])
@pytest.mark.parametrize("max_span,ramp", [(4, 3), (5, 1), (1, 1), (6, 4)])
def test_window_edge_causal(max_span, ramp, block_size, no_grad):
    length = 24
    case = one_hot_case(length, span=max_span)
    with torch.set_grad_enabled(not no_grad):
        if not no_grad:
            case[3].requires_grad_()
        out = adaptive_local_attention(
            *case, max_span=max_span, ramp=ramp, causal=True, scaling=1.0, block_size=block_size
        )[0, 0].detach()
    t = length - 1
    edge = max_span + ramp - 1
    assert out[t, t - edge] > 0, "key at distance max_span + ramp - 1 must be read"
    assert out[t, t - edge] == pytest.approx((1.0 / ramp) / (max_span + 1 + sum(k / ramp for k in range(1, ramp))))
    assert out[t, t - edge - 1] == 0.0, "key at distance max_span + ramp must not be read"
    assert (out[t, : t - edge] == 0).all()
    # Every row: weights = m(t - j) normalised, by hand.
    expected = torch.zeros(length, length, dtype=torch.float64)
    for i in range(length):
        m = [ramp_mask(max_span, i - j, ramp) if j <= i else 0.0 for j in range(length)]
        expected[i] = torch.tensor(m, dtype=torch.float64) / sum(m)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("block_size", [1, 4, 64])
def test_window_edge_bidirectional(block_size):
    max_span, ramp, length = 4, 3, 17
    out = adaptive_local_attention(
        *one_hot_case(length, span=max_span),
        max_span=max_span,
        ramp=ramp,
        causal=False,
        scaling=1.0,
        block_size=block_size,
    )[0, 0]
    t = 8
    total = 1 + 2 * 4 + 2 * (2 / 3 + 1 / 3)  # = 11
    assert out[t, t - 6] == pytest.approx((1 / 3) / total)
    assert out[t, t + 6] == pytest.approx((1 / 3) / total)
    assert out[t, t - 5] == pytest.approx((2 / 3) / total)
    assert out[t, t + 5] == pytest.approx((2 / 3) / total)
    assert out[t, t] == pytest.approx(1 / total)
    assert out[t, t - 7] == 0.0 and out[t, t + 7] == 0.0
    assert out[t, :2].abs().sum() == 0 and out[t, 15:].abs().sum() == 0


def test_span_zero_reads_self_and_ramp_only():
    """z = 0, ramp = 3: m(0) = 1, m(1) = 2/3, m(2) = 1/3, m(3) = 0 -> weights 1/2, 1/3, 1/6."""
    out = adaptive_local_attention(*one_hot_case(12, span=0.0), max_span=4, ramp=3, causal=True, scaling=1.0)[0, 0]
    t = 10
    assert out[t, t].item() == pytest.approx(1 / 2)
    assert out[t, t - 1].item() == pytest.approx(1 / 3)
    assert out[t, t - 2].item() == pytest.approx(1 / 6)
    assert out[t, : t - 2].abs().sum() == 0 and out[t, t + 1 :].abs().sum() == 0
    # The first query only has itself.
    assert out[0, 0].item() == pytest.approx(1.0)
    # Bidirectional: both sides, 1 + 2 * (2/3 + 1/3) = 3.
    out = adaptive_local_attention(*one_hot_case(14, span=0.0), max_span=4, ramp=3, causal=False, scaling=1.0)[0, 0]
    for j, w in zip(range(t - 2, t + 3), [1 / 9, 2 / 9, 1 / 3, 2 / 9, 1 / 9], strict=True):
        assert out[t, j].item() == pytest.approx(w)
    assert out[t].sum().item() == pytest.approx(1.0)


def test_ramp_with_fractional_span():
    """z = 1.5, ramp = 2: m = 1, 1, 0.75, 0.25, 0 for delta = 0..4 -> sum 3."""
    out = adaptive_local_attention(*one_hot_case(10, span=1.5), max_span=4, ramp=2, causal=True, scaling=1.0)[0, 0]
    t = 9
    torch.testing.assert_close(
        out[t, 5:], torch.tensor([0.0, 0.25 / 3, 0.75 / 3, 1 / 3, 1 / 3], dtype=torch.float64), rtol=1e-12, atol=1e-12
    )
    assert out[t, :5].abs().sum() == 0


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_ramp_times_exp_logit_over_temperature(temperature):
    """Weights proportional to m(delta) * exp(logit / tau), by hand, for z = 0 and ramp = 3."""
    length, t = 12, 10
    logits = [0.5 * j for j in range(length)]
    out = adaptive_local_attention(
        *one_hot_case(length, span=0.0, logits=logits, temperature=temperature),
        max_span=4,
        ramp=3,
        causal=True,
        scaling=1.0,
    )[0, 0]
    raw = {
        t: 1.0 * math.exp(5.0 / temperature),
        t - 1: (2 / 3) * math.exp(4.5 / temperature),
        t - 2: (1 / 3) * math.exp(4.0 / temperature),
    }
    total = sum(raw.values())
    for j, w in raw.items():
        assert out[t, j].item() == pytest.approx(w / total, rel=1e-12)
    assert out[t, : t - 2].abs().sum() == 0


@pytest.mark.parametrize("block_size", [1, 16, 64])
@pytest.mark.parametrize("t", [0, 15, 16, 17, 40])
def test_causal_never_reads_the_future(t, block_size):
    length = 48
    query, key, value, span, temperature = make_case(length=length, span=(0.0, MAX_SPAN), seed=t)
    kwargs = dict(max_span=MAX_SPAN, ramp=RAMP, causal=True, block_size=block_size)
    out = adaptive_local_attention(query, key, value, span, temperature, **kwargs)
    key2, value2 = key.clone(), value.clone()
    key2[:, :, t + 1 :] = 100 * torch.randn_like(key2[:, :, t + 1 :])
    value2[:, :, t + 1 :] = 100 * torch.randn_like(value2[:, :, t + 1 :])
    out2 = adaptive_local_attention(query, key2, value2, span, temperature, **kwargs)
    torch.testing.assert_close(out2[:, :, : t + 1], out[:, :, : t + 1], rtol=0, atol=1e-6)
    if t + 1 < length:
        assert not torch.allclose(out2[:, :, t + 1 :], out[:, :, t + 1 :])
    # And no gradient flows from the output up to t into later keys and values.
    key3, value3 = key.clone().requires_grad_(), value.clone().requires_grad_()
    prefix = adaptive_local_attention(query, key3, value3, span.requires_grad_(), temperature, **kwargs)[:, :, : t + 1]
    gk, gv = torch.autograd.grad(prefix.square().sum(), (key3, value3))
    assert gk[:, :, t + 1 :].abs().sum() == 0 and gv[:, :, t + 1 :].abs().sum() == 0
    assert gv[:, :, : t + 1].abs().sum() > 0


@pytest.mark.parametrize("causal", [True, False])
def test_keys_beyond_the_band_are_never_read(causal):
    length, t = 60, 35
    query, key, value, span, temperature = make_case(length=length, span=float(MAX_SPAN), seed=9)
    kwargs = dict(max_span=MAX_SPAN, ramp=RAMP, causal=causal, block_size=16)
    out = adaptive_local_attention(query, key, value, span, temperature, **kwargs)
    far = torch.ones(length, dtype=torch.bool)
    far[t - WINDOW + 1 : t + WINDOW] = False  # keys at distance >= max_span + ramp
    key2, value2 = key.clone(), value.clone()
    key2[:, :, far] = 50 * torch.randn_like(key2[:, :, far])
    value2[:, :, far] = 50 * torch.randn_like(value2[:, :, far])
    out2 = adaptive_local_attention(query, key2, value2, span, temperature, **kwargs)
    torch.testing.assert_close(out2[:, :, t], out[:, :, t], rtol=0, atol=1e-6)


@pytest.mark.parametrize("padding", ["none", "mixed"])
def test_bidirectional_is_symmetric_in_distance(padding):
    """Reversing the sequence (queries, keys, values, spans, temperatures, mask) reverses the output."""
    length = 37
    query, key, value, span, temperature = make_case(length=length, seed=21)
    mask = make_key_mask(2, length, padding)
    kwargs = dict(max_span=MAX_SPAN, ramp=RAMP, causal=False, block_size=16)
    out = adaptive_local_attention(query, key, value, span, temperature, key_mask=mask, **kwargs)
    flipped = adaptive_local_attention(
        query.flip(2),
        key.flip(2),
        value.flip(2),
        span.flip(2),
        temperature.flip(2),
        key_mask=None if mask is None else mask.flip(1),
        **kwargs,
    )
    torch.testing.assert_close(flipped.flip(2), out, rtol=1e-5, atol=1e-6)
    # With equal logits, key t + d and key t - d get the same weight.
    one_hot = adaptive_local_attention(*one_hot_case(31, span=3.3), max_span=5, ramp=2, causal=False, scaling=1.0)
    w = one_hot[0, 0, 15]
    torch.testing.assert_close(w[15 + 1 :], w[:15].flip(0), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# 5. No NaN or inf: padding, length 1, tiny spans, the lowest temperature, large inputs; float32 and bfloat16
# ----------------------------------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.bfloat16]


def _forward_backward(query, key, value, span, temperature, **kwargs):
    """Forward and backward; asserts everything is finite."""
    leaves = [t.detach().clone().requires_grad_() for t in (query, key, value, span, temperature)]
    out = adaptive_local_attention(*leaves, **kwargs)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad((out.float() * upstream).sum(), leaves)
    assert torch.isfinite(out).all(), "output"
    for name, grad in zip(LEAVES, grads, strict=True):
        assert torch.isfinite(grad).all(), f"d/d{name}"
    return out, grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
def test_fully_padded_rows_return_zeros(dtype, causal):
    length = 30
    case = make_case(length=length, dtype=dtype, span=float(MAX_SPAN))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[0, :20] = 0  # left padding longer than the window
    mask[1] = 0  # nothing real at all
    out, grads = _forward_backward(*case, max_span=MAX_SPAN, ramp=RAMP, causal=causal, key_mask=mask, block_size=16)
    assert (out[1] == 0).all()
    if causal:
        assert (out[0, :, :20] == 0).all()  # queries before the first real token
        assert (out[0, :, 20:].abs().sum(-1) > 0).all()
    else:
        assert (out[0, :, : 20 - WINDOW + 1] == 0).all()  # no real key within the window
        assert (out[0, :, 20 - WINDOW + 1 :].abs().sum(-1) > 0).all()
    for grad in grads[:3]:
        assert (grad[1] == 0).all()


@pytest.mark.parametrize("causal", [True, False])
def test_span_gradient_finite_on_fully_padded_rows_minimal(causal):
    """Minimal repro: 4 padded keys, every query has nothing to read, upstream gradient 2 per output element."""
    ones = torch.ones(1, 1, 4, 2)
    span = torch.full((1, 1, 4), 2.0, requires_grad=True)
    out = adaptive_local_attention(
        ones, ones, ones, span, torch.ones(1, 1, 4), max_span=4, ramp=2, causal=causal, key_mask=torch.zeros(1, 4)
    )
    assert (out == 0).all()
    (grad,) = torch.autograd.grad(2.0 * out.sum(), span)
    assert torch.isfinite(grad).all(), grad
    assert (grad == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
def test_length_one_reads_itself(dtype, causal):
    query, key, value, span, temperature = make_case(length=1, kv_heads=1, dtype=dtype, span=0.0)
    out, _ = _forward_backward(query, key, value, span, temperature, max_span=MAX_SPAN, ramp=RAMP, causal=causal)
    torch.testing.assert_close(out, value.expand_as(out), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("span", [0.0, 1e-6], ids=str)
def test_tiny_span_and_lowest_temperature_with_large_logits(span, causal, dtype):
    query, key, value, span_t, temperature = make_case(length=40, span=span, temperature=0.01, dtype=dtype)
    query, key = 30 * query, 30 * key  # logits of order 1e5 after the temperature
    out, _ = _forward_backward(query, key, value, span_t, temperature, max_span=MAX_SPAN, ramp=RAMP, causal=causal)
    if dtype == torch.float32:
        ref = reference_local_attention(
            *(t.double() for t in (query, key, value, span_t, temperature)),
            max_span=MAX_SPAN,
            ramp=RAMP,
            causal=causal,
        )
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("magnitude", [1e2, 1e4])
def test_large_magnitude_inputs(magnitude, causal, dtype):
    query, key, value, span, temperature = make_case(length=40, temperature=(0.05, 2.0), dtype=dtype, seed=2)
    out, _ = _forward_backward(
        magnitude * query,
        magnitude * key,
        magnitude * value,
        span,
        temperature,
        max_span=MAX_SPAN,
        ramp=RAMP,
        causal=causal,
        block_size=16,
    )
    # A convex combination of values: bounded by the largest value.
    assert out.float().abs().max() <= magnitude * value.float().abs().max() * 1.01


@pytest.mark.parametrize("causal", [True, False])
def test_bfloat16_close_to_reference_at_moderate_temperature(causal, device):
    """bf16 on the device, outputs and gradients, against the float64 reference on the CPU."""
    case = make_case(length=64, temperature=(0.7, 2.0), dtype=torch.bfloat16)
    kwargs = dict(max_span=MAX_SPAN, ramp=RAMP, causal=causal, key_mask=make_key_mask(2, 64, "mixed"))
    leaves = [t.to(device, copy=True).requires_grad_() for t in case]
    ref_leaves = [t.double().requires_grad_() for t in case]
    out = adaptive_local_attention(*leaves, **on_device(kwargs, device))
    ref = reference_local_attention(*ref_leaves, **kwargs)
    assert out.dtype == torch.bfloat16 and out.device.type == torch.device(device).type
    torch.testing.assert_close(out.double().cpu(), ref, rtol=0, atol=4e-2)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * weights.to(device)).sum(), leaves)
    ref_grads = torch.autograd.grad((ref * weights).sum(), ref_leaves)
    for name, grad, ref_grad in zip(LEAVES, grads, ref_grads, strict=True):
        assert grad.dtype == torch.bfloat16 and torch.isfinite(grad).all(), name
        _assert_close(grad.double().cpu(), ref_grad, 5e-2, f"d/d{name}")


def test_bfloat16_logits_are_accurate_at_low_temperature():
    """bf16 activations, float32 span and temperature (as a float32 span predictor would give)."""
    query, key, value, span, temperature = make_case(length=64, temperature=0.05)
    query, key, value = query.bfloat16(), key.bfloat16(), value.bfloat16()
    kwargs = dict(max_span=MAX_SPAN, ramp=RAMP, causal=True)
    exact = reference_local_attention(*(t.double() for t in (query, key, value, span, temperature)), **kwargs)
    ref_bf16 = reference_local_attention(query, key, value, span, temperature, **kwargs)
    assert (ref_bf16.double() - exact).abs().max() < 2e-2  # the bf16 reference achieves this
    out = adaptive_local_attention(query, key, value, span, temperature, **kwargs)
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=4e-2)


@pytest.mark.parametrize("causal", [True, False])
def test_empty_sequence(causal):
    case = make_case(length=0)
    out = adaptive_local_attention(*case, max_span=MAX_SPAN, ramp=RAMP, causal=causal)
    assert out.shape == (2, 4, 0, 8)


# ----------------------------------------------------------------------------------------------------------------
# 6. Context (prefix mean, masked mean), span predictor, temperature
# ----------------------------------------------------------------------------------------------------------------


def _hand_prefix_mean(x, mask):
    batch, length, dim = x.shape
    expected = torch.zeros(batch, length, dim, dtype=torch.float64)
    for b in range(batch):
        for t in range(length):
            rows = [x[b, j].double() for j in range(t + 1) if mask is None or mask[b, j]]
            if rows:
                expected[b, t] = torch.stack(rows).mean(0)
    return expected


@pytest.mark.parametrize("padding", ["none", "left", "right", "holes"])
def test_causal_prefix_mean_equals_hand_loop(padding):
    x = torch.randn(2, 23, 5, generator=torch.Generator().manual_seed(0))
    mask = make_key_mask(2, 23, padding)
    mean, total, count = causal_prefix_mean(x, mask)
    expected = _hand_prefix_mean(x, mask)
    assert mean.shape == x.shape and mean.dtype == x.dtype
    torch.testing.assert_close(mean.double(), expected, rtol=1e-5, atol=1e-6)
    real = torch.ones(2, 23) if mask is None else mask.float()
    torch.testing.assert_close(count, real.cumsum(1))
    torch.testing.assert_close(total, (x * real[..., None]).cumsum(1), rtol=1e-5, atol=1e-5)
    if padding == "left":
        assert (mean[0, :3] == 0).all() and (mean[1, :17] == 0).all()  # before the first real token
        torch.testing.assert_close(mean[1, 17], x[1, 17])


@pytest.mark.parametrize("padding", ["none", "left", "holes"])
@pytest.mark.parametrize("split", [1, 7, 22])
def test_causal_prefix_mean_in_two_chunks(split, padding):
    x = torch.randn(2, 23, 5, generator=torch.Generator().manual_seed(1))
    mask = make_key_mask(2, 23, padding)
    whole, whole_sum, whole_count = causal_prefix_mean(x, mask)
    first_mask, second_mask = (None, None) if mask is None else (mask[:, :split], mask[:, split:])
    first, s, c = causal_prefix_mean(x[:, :split], first_mask)
    second, s2, c2 = causal_prefix_mean(x[:, split:], second_mask, past_sum=s[:, -1], past_count=c[:, -1])
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([s, s2], 1), whole_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([c, c2], 1), whole_count)


def test_causal_prefix_mean_token_by_token():
    x = torch.randn(2, 9, 3, generator=torch.Generator().manual_seed(2))
    mask = make_key_mask(2, 9, "left")
    whole, _, _ = causal_prefix_mean(x, mask)
    s = c = None
    for t in range(9):
        step, s, c = causal_prefix_mean(x[:, t : t + 1], mask[:, t : t + 1], past_sum=s, past_count=c)
        s, c = s[:, -1], c[:, -1]
        torch.testing.assert_close(step[:, 0], whole[:, t], rtol=1e-5, atol=1e-6)


def test_causal_prefix_mean_restarts_at_each_packed_sequence():
    x = torch.randn(2, 20, 4, generator=torch.Generator().manual_seed(4))
    segments = torch.tensor([[0] * 7 + [1] * 13, [0] * 1 + [1] * 9 + [2] * 10])
    mean, _, _ = causal_prefix_mean(x, segment_ids=segments)
    for b in range(2):
        for s in segments[b].unique():
            part = segments[b] == s
            alone, _, _ = causal_prefix_mean(x[b : b + 1, part])
            torch.testing.assert_close(mean[b, part], alone[0], rtol=1e-5, atol=1e-6)


def test_causal_prefix_mean_ignores_later_tokens():
    x = torch.randn(2, 15, 4, generator=torch.Generator().manual_seed(3))
    mask = make_key_mask(2, 15, "right")
    t = 6
    before, _, _ = causal_prefix_mean(x, mask)
    x2 = x.clone()
    x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :]) * 100
    after, _, _ = causal_prefix_mean(x2, mask)
    torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], rtol=0, atol=0)


def test_causal_prefix_mean_in_bfloat16():
    x = torch.randn(1, 300, 4, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    mean, total, count = causal_prefix_mean(x)
    assert mean.dtype == torch.bfloat16 and total.dtype == torch.float32
    torch.testing.assert_close(mean.double(), _hand_prefix_mean(x, None), rtol=0, atol=1e-2)


@pytest.mark.parametrize("padding", ["none", "left", "right", "holes"])
def test_masked_mean_over_real_tokens(padding):
    x = torch.randn(2, 19, 6, generator=torch.Generator().manual_seed(5))
    mask = make_key_mask(2, 19, padding)
    out = masked_mean(x, mask)
    assert out.shape == (2, 1, 6)
    for b in range(2):
        real = x[b] if mask is None else x[b][mask[b].bool()]
        torch.testing.assert_close(out[b, 0], real.mean(0), rtol=1e-5, atol=1e-6)
    if mask is not None:  # padding values do not matter
        x2 = x.masked_fill(~mask.bool()[..., None], 1e6)
        torch.testing.assert_close(masked_mean(x2, mask), out, rtol=1e-5, atol=1e-6)


def test_masked_mean_of_all_padding_is_zero():
    x = torch.randn(1, 5, 3)
    assert (masked_mean(x, torch.zeros(1, 5)) == 0).all()


@pytest.mark.parametrize("initial_span", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("span_per_head", [True, False])
def test_span_predictor_shape_and_initial_value(span_per_head, initial_span):
    predictor = SpanPredictor(hidden_size=12, num_heads=3, span_per_head=span_per_head, initial_span=initial_span)
    context = torch.randn(2, 7, 12, generator=torch.Generator().manual_seed(0)) * 10
    scale = predictor(context)
    assert scale.shape == ((2, 3, 7) if span_per_head else (2, 1, 7))
    torch.testing.assert_close(scale, torch.full_like(scale, initial_span), rtol=1e-6, atol=1e-6)
    # Bidirectional context (B, 1, d): one value per sequence and head.
    assert predictor(context.mean(1, keepdim=True)).shape == ((2, 3, 1) if span_per_head else (2, 1, 1))
    # After training moves the weights, it follows the context and stays strictly inside (0, 1).
    with torch.no_grad():
        predictor.proj.weight.normal_(std=0.3, generator=torch.Generator().manual_seed(1))
    moved = predictor(context / 10)
    assert ((moved > 0) & (moved < 1)).all()
    assert moved.std() > 0.01
    # Gradients reach the predictor.
    moved.sum().backward()
    assert predictor.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("initial_span", [0.0, 1.0, -0.5, 2.0])
def test_span_predictor_rejects_bad_initial_span(initial_span):
    with pytest.raises(ValueError, match="initial_span"):
        SpanPredictor(hidden_size=4, num_heads=2, initial_span=initial_span)


def test_span_temperature_endpoints():
    scale = torch.tensor([0.0, 0.25, 0.5, 1.0])
    tau = span_temperature(scale, tau_min=0.1, tau_max=2.1)
    assert tau[0].item() == pytest.approx(0.1)
    assert tau[-1].item() == pytest.approx(2.1)
    torch.testing.assert_close(tau, torch.tensor([0.1, 0.6, 1.1, 2.1]))
    grid = torch.rand(3, 4, 5)
    assert span_temperature(grid, 0.3, 1.0).shape == grid.shape
    assert (span_temperature(torch.linspace(0, 1, 11), 0.5, 1.5).diff() > 0).all()


# ----------------------------------------------------------------------------------------------------------------
# 7. Invalid settings raise ValueError naming the argument
# ----------------------------------------------------------------------------------------------------------------

KERNELS = [adaptive_local_attention, reference_local_attention]


def _valid(length=10, keys=None, heads=4, kv_heads=2, head_dim=8):
    query, key, value, span, temperature = make_case(
        length=length, keys=keys, heads=heads, kv_heads=kv_heads, head_dim=head_dim
    )
    return dict(query=query, key=key, value=value, span=span, temperature=temperature, max_span=MAX_SPAN, ramp=RAMP)


def _call(fn, args):
    args = dict(args)
    return fn(args.pop("query"), args.pop("key"), args.pop("value"), args.pop("span"), args.pop("temperature"), **args)


@pytest.mark.parametrize("fn", KERNELS)
@pytest.mark.parametrize("name", ["max_span", "ramp"])
@pytest.mark.parametrize("bad", [0, -3, 2.5, 4.0, True, None, "8"], ids=repr)
def test_bad_span_settings_raise(name, bad, fn):
    args = _valid()
    args[name] = bad
    with pytest.raises(ValueError, match=name):
        _call(fn, args)
    with pytest.raises(ValueError, match=name):
        validate_span_settings(**{"max_span": 8, "ramp": 2, name: bad})


@pytest.mark.parametrize(
    "tau_min,tau_max,name",
    [
        (2.0, 1.0, "tau_min"),
        (0.0, 1.0, "tau_min"),
        (-0.5, 1.0, "tau_min"),
        (0.5, 0.0, "tau_max"),
        (0.5, -1.0, "tau_max"),
        (None, 1.0, "tau_min"),
        (0.5, None, "tau_max"),
    ],
)
def test_bad_temperature_settings_raise(tau_min, tau_max, name):
    with pytest.raises(ValueError, match=name):
        validate_span_settings(8, 2, tau_min, tau_max)


def test_good_settings_pass():
    validate_span_settings(1, 1)
    validate_span_settings(64, 16, 0.5, 0.5)
    validate_span_settings(64, 16, 0.1, 2)


@pytest.mark.parametrize("fn", KERNELS)
@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_nonpositive_temperature_tensor_raises(fn, bad, monkeypatch):
    """A check that reads values: it runs with `DEBUG` on (a hybrid model's temperatures are positive by its
    config)."""
    monkeypatch.setattr(hybrid_attention, "DEBUG", True)
    args = _valid()
    args["temperature"] = args["temperature"].clone()
    args["temperature"][1, 2, 3] = bad
    with pytest.raises(ValueError, match="temperature"):
        _call(fn, args)


def _mutate(case):
    args = _valid()
    q, k, v = args["query"], args["key"], args["value"]
    if case == "heads_not_multiple":
        args["query"] = torch.randn(2, 3, 10, 8)
        return args, "heads"
    if case == "kv_heads_more_than_heads":
        args["key"], args["value"] = torch.randn(2, 8, 10, 8), torch.randn(2, 8, 10, 8)
        return args, "heads"
    if case == "key_value_mismatch":
        args["value"] = torch.randn(2, 2, 11, 8)
        return args, "`key` and `value`"
    if case == "head_dim":
        args["key"], args["value"] = torch.randn(2, 2, 10, 4), torch.randn(2, 2, 10, 4)
        return args, "`key`"
    if case == "batch":
        args["key"], args["value"] = torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
        return args, "`key`"
    if case == "query_3d":
        args["query"] = q[0]
        return args, "`query`"
    if case == "span_length":
        args["span"] = torch.rand(2, 4, 11)
        return args, "`span`"
    if case == "span_heads":
        args["span"] = torch.rand(2, 3, 10)
        return args, "`span`"
    if case == "span_4d":
        args["span"] = torch.rand(1, 2, 4, 10)
        return args, "`span`"
    if case == "temperature_shape":
        args["temperature"] = torch.rand(3, 1, 10) + 0.5
        return args, "`temperature`"
    if case == "key_mask_length":
        args["key_mask"] = torch.ones(2, 11)
        return args, "`key_mask`"
    if case == "key_mask_batch":
        args["key_mask"] = torch.ones(10)
        return args, "`key_mask`"
    if case == "causal_offset_past_keys":
        args["query_offset"] = 1
        return args, "`query_offset`"
    if case == "causal_offset_past_keys_longer":
        args["key"], args["value"] = torch.randn(2, 2, 30, 8), torch.randn(2, 2, 30, 8)
        args["query_offset"] = 21
        return args, "`query_offset`"
    if case == "negative_offset":
        args["query_offset"] = -1
        args["causal"] = False
        return args, "`query_offset`"
    if case == "fewer_keys_than_queries":
        args["key"], args["value"] = k[:, :, :5], v[:, :, :5]
        return args, "`query_offset`"
    raise AssertionError(case)


@pytest.mark.parametrize("fn", KERNELS)
@pytest.mark.parametrize(
    "case",
    [
        "heads_not_multiple",
        "kv_heads_more_than_heads",
        "key_value_mismatch",
        "head_dim",
        "batch",
        "query_3d",
        "span_length",
        "span_heads",
        "span_4d",
        "temperature_shape",
        "key_mask_length",
        "key_mask_batch",
        "causal_offset_past_keys",
        "causal_offset_past_keys_longer",
        "negative_offset",
        "fewer_keys_than_queries",
    ],
)
def test_bad_shapes_raise(case, fn):
    args, message = _mutate(case)
    with pytest.raises(ValueError, match=message):
        _call(fn, args)


@pytest.mark.parametrize("bad", [0, MAX_SPAN + RAMP + 1, 2.0, True], ids=repr)
def test_bad_reach_raises(bad):
    with pytest.raises(ValueError, match="`reach`"):
        _call(adaptive_local_attention, {**_valid(), "reach": bad})


def test_reach_shorter_than_the_spans_raises_in_debug(monkeypatch):
    monkeypatch.setattr(hybrid_attention, "DEBUG", True)
    args = _valid()
    args["span"] = torch.full_like(args["span"], 5.0)  # needs 5 + RAMP keys
    _call(adaptive_local_attention, {**args, "reach": 5 + RAMP})
    with pytest.raises(ValueError, match="`reach`"):
        _call(adaptive_local_attention, {**args, "reach": 4 + RAMP})


def test_valid_edge_offsets_do_not_raise():
    args = _valid(keys=30)
    args["query_offset"] = 20  # the last possible causal offset
    _call(adaptive_local_attention, args)
    args["query_offset"] = 0
    _call(adaptive_local_attention, args)


# ----------------------------------------------------------------------------------------------------------------
# 8. Memory: the kernel never materialises an N x N tensor
# ----------------------------------------------------------------------------------------------------------------


def test_recorder_sees_the_dense_reference():
    """Sanity check of the memory probe itself: the dense reference does allocate N x N."""
    length = 512
    case = make_case(batch=1, heads=1, kv_heads=1, length=length, span=4.0)
    with torch.no_grad(), MaxNumel() as mode:
        reference_local_attention(*case, max_span=64, ramp=16)
    assert mode.max_numel >= length * length


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("grad", [False, True])
def test_no_quadratic_intermediate_at_4096(grad, causal):
    length, max_span, ramp, block = 4096, 64, 16, 64
    case = make_case(batch=1, heads=1, kv_heads=1, length=length, head_dim=8, span=(0.0, max_span), seed=0)
    leaves = [t.requires_grad_(grad) for t in case]
    with torch.set_grad_enabled(grad), MaxNumel() as mode:
        out = adaptive_local_attention(*leaves, max_span=max_span, ramp=ramp, causal=causal, block_size=block)
        if grad:
            out.sum().backward()
    width = block + (max_span + ramp - 1) * (1 if causal else 2)
    assert mode.max_numel <= length * width, (mode.max_numel, mode.max_op)
    assert mode.max_numel * 10 < length * length
    assert torch.isfinite(out).all()


def test_no_grad_band_follows_the_largest_span():
    """At inference in eager mode the band reaches exactly ceil(max(z)) + ramp: short spans allocate proportionally
    less."""
    length, max_span, ramp, block = 4096, 64, 16, 64
    sizes = {}
    for top in (4.0, 32.0, 64.0):
        case = make_case(batch=1, heads=1, kv_heads=1, length=length, head_dim=8, span=(0.0, top), seed=1)
        case[3][..., 0] = top  # the maximum is reached
        with torch.no_grad(), MaxNumel() as mode:
            adaptive_local_attention(*case, max_span=max_span, ramp=ramp, causal=True, block_size=block)
        sizes[top] = mode.max_numel
        assert mode.max_numel <= length * (block + math.ceil(top) + ramp - 1)
    assert sizes[4.0] < sizes[32.0] < sizes[64.0]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("max_distance", [None, 3])
@pytest.mark.parametrize("padding", ["none", "holes"])
def test_single_query_path_matches_reference_at_every_offset(causal, max_distance, padding):
    """One query (a decoding step) takes its own short path at inference: the reference at every position."""
    keys = 3 * WINDOW
    query, key, value, span, temperature = make_case(length=1, keys=keys, seed=21, kv_heads=2, heads=4)
    key_mask = make_key_mask(2, keys, padding)
    for offset in range(keys):
        kwargs = dict(
            max_span=MAX_SPAN,
            ramp=RAMP,
            causal=causal,
            key_mask=key_mask,
            query_offset=offset,
            max_distance=max_distance,
        )
        with torch.no_grad():
            fast = adaptive_local_attention(query, key, value, span, temperature, **kwargs)
        torch.testing.assert_close(
            fast,
            reference_local_attention(query, key, value, span, temperature, **kwargs),
            atol=1e-5,
            rtol=0,
            msg=lambda m, offset=offset: f"offset {offset}: {m}",
        )
