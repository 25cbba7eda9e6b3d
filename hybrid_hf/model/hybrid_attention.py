"""The math of hybrid attention with an adaptive, sharpened local focus.

Plain functions and small modules on `(B, H, N, D)` tensors, with no config objects:

- the context a token's span is predicted from (`causal_prefix_mean`, `masked_mean`),
- the span predictor (`SpanPredictor`) and the span-dependent temperature (`span_temperature`),
- the banded local attention with a differentiable soft span (`adaptive_local_attention`),
- and its dense `O(N^2)` twin (`reference_local_attention`), written for clarity and used only by tests.

This file travels with saved checkpoints (`trust_remote_code`): it imports only `torch` and the standard library.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

#: Checks that read tensor values (positive temperatures, a given `reach` that covers every span) cost a
#: device-to-host copy and break `torch.compile`'s graph, so they run only when this is set (`HYBRID_HF_DEBUG=1`).
#: In a hybrid model the temperature is positive by construction (`tau_min >= 0.001`, checked by the config).
DEBUG = os.environ.get("HYBRID_HF_DEBUG", "") not in ("", "0")
#: the highest temperature: beyond 1000 the local softmax is uniform already, and a temperature such as 1e39 (a
#: finite number) makes the gradients of the span predictor infinite or NaN
TAU_LIMIT = 1000.0
#: the implementations of the local band (`adaptive_local_attention`'s `implementation`)
IMPLEMENTATIONS = ("banded", "flex")


def validate_span_settings(
    max_span: int, ramp: int, tau_min: float | None = None, tau_max: float | None = None
) -> None:
    """Raise `ValueError` naming the argument when a span or temperature setting is out of range."""
    for name, value in (("max_span", max_span), ("ramp", ramp)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"`{name}` must be a positive integer (number of tokens), got {value!r}")
    if tau_min is not None or tau_max is not None:
        for name, value in (("tau_min", tau_min), ("tau_max", tau_max)):
            # Below 1e-3 the softmax is an argmax already; far below, logits / tau overflow to inf and NaN.
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 1e-3 <= value <= TAU_LIMIT:
                raise ValueError(
                    f"`{name}` must be a number in [0.001, {TAU_LIMIT:g}] (a temperature; beyond, training gives "
                    f"infinite gradients), got {value!r}"
                )
        if tau_min > tau_max:
            raise ValueError(f"`tau_min` ({tau_min}) must be <= `tau_max` ({tau_max})")


def span_temperature(span_scale: torch.Tensor, tau_min: float, tau_max: float) -> torch.Tensor:
    """Temperature of the local softmax: `tau_min` for the shortest span, `tau_max` for the longest.

    `span_scale` is the predictor's output in `[0, 1]`; the result has its shape.
    """
    return tau_min + (tau_max - tau_min) * span_scale


def causal_prefix_mean(
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    past_sum: torch.Tensor | None = None,
    past_count: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean of `x` over each position's prefix, padding excluded: `c_t = mean(x_j : j <= t, mask_j)`.

    Args:
        x: `(B, N, d)` values, e.g. the global branch's output.
        mask: `(B, N)`, 1 for real tokens and 0 for padding (transformers' `attention_mask` convention).
        past_sum, past_count: `(B, d)` and `(B,)` running sum and count of earlier positions (cached decoding).
        segment_ids: `(B, N)` sequence index of each position when several sequences are packed in one row: the
            prefix restarts at each sequence's first position (not with `past_sum`).

    Returns:
        `(mean, sums, counts)`: the `(B, N, d)` prefix means (0 where no real token has been seen yet), and the
        running sums `(B, N, d)` and counts `(B, N)` at each position (the last ones carry on to the next call).
        Accumulated in float32.
    """
    weights = x.new_ones(x.shape[:2], dtype=torch.float32) if mask is None else mask.to(torch.float32)  # (B, N)
    sums = x.float() * weights[..., None]  # (B, N, d)
    counts = weights  # (B, N)
    if x.shape[1] > 1:  # one position (a decoding step) is its own running sum
        sums, counts = torch.cumsum(sums, dim=1), torch.cumsum(counts, dim=1)
    if past_sum is not None:
        sums = sums + past_sum[:, None, :]
        counts = counts + past_count[:, None]
    if segment_ids is not None:  # subtract the running totals just before each sequence's first position
        positions = torch.arange(x.shape[1], device=x.device).expand_as(segment_ids)
        first = torch.ones_like(segment_ids, dtype=torch.bool)
        first[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
        before = torch.cummax(torch.where(first, positions, 0), dim=1).values - 1  # (B, N), -1 for the first
        keep = (before >= 0).to(sums.dtype)
        index = before.clamp_min(0)
        sums = sums - sums.gather(1, index[..., None].expand_as(sums)) * keep[..., None]
        counts = counts - counts.gather(1, index) * keep
    mean = sums / counts.clamp_min(1.0)[..., None]
    return mean.to(x.dtype), sums, counts


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of `x` `(B, N, d)` over the real tokens of each sequence, as `(B, 1, d)` (bidirectional context)."""
    if mask is None:
        return x.mean(dim=1, keepdim=True)
    weights = mask.to(torch.float32)[..., None]  # (B, N, 1)
    total = (x.float() * weights).sum(dim=1, keepdim=True)
    return (total / weights.sum(dim=1, keepdim=True).clamp_min(1.0)).to(x.dtype)


class SpanPredictor(nn.Module):
    """`s = sigmoid(W c + b)`: the span scale in `[0, 1]`, per token and head (or per token shared by its heads).

    The weight starts at zero and the bias at `logit(initial_span)`, so every token starts with span
    `initial_span * max_span` and learns from its context from there.
    """

    def __init__(self, hidden_size: int, num_heads: int, span_per_head: bool = True, initial_span: float = 0.5):
        super().__init__()
        if not 0.0 < initial_span < 1.0:
            raise ValueError(f"`initial_span` must be in (0, 1) (a fraction of max_span), got {initial_span!r}")
        self.initial_span = initial_span
        self.proj = nn.Linear(hidden_size, num_heads if span_per_head else 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.proj.weight.zero_()
            self.proj.bias.fill_(math.log(self.initial_span / (1.0 - self.initial_span)))

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        """`context` `(B, N, d)` (or `(B, 1, d)`) -> span scale `(B, H, N)` (or `(B, 1, N)` when shared)."""
        return torch.sigmoid(self.proj(context)).transpose(1, 2)


def _check_attention_inputs(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    span: torch.Tensor,
    temperature: torch.Tensor,
    max_span: int,
    ramp: int,
    causal: bool,
    key_mask: torch.Tensor | None,
    query_offset: int | None,
    max_distance: int | None = None,
    segment_ids: torch.Tensor | None = None,
    sink_mask: torch.Tensor | None = None,
) -> int:
    """Validate the arguments shared by the kernel and the reference; return the query offset."""
    validate_span_settings(max_span, ramp)
    if max_distance is not None and (
        isinstance(max_distance, bool) or not isinstance(max_distance, int) or max_distance < 0
    ):
        raise ValueError(f"`max_distance` must be None or an integer >= 0, got {max_distance!r}")
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if tensor.dim() != 4:
            raise ValueError(f"`{name}` must be a 4-d tensor (B, H, N, D), got shape {tuple(tensor.shape)}")
    batch, heads, length, head_dim = query.shape
    if key.shape[:3] != value.shape[:3]:
        raise ValueError(
            f"`key` and `value` must agree in (B, H_kv, S), got {tuple(key.shape)} and {tuple(value.shape)}"
        )
    if key.shape[0] != batch or key.shape[3] != head_dim:
        raise ValueError(
            f"`key` must be (B={batch}, H_kv, S, D={head_dim}) to match `query` {tuple(query.shape)}, "
            f"got {tuple(key.shape)}"
        )
    if key.shape[1] == 0 or heads % key.shape[1] != 0:
        raise ValueError(
            f"the number of query heads ({heads}) must be a multiple of the number of key/value heads ({key.shape[1]})"
        )
    keys = key.shape[2]
    for name, tensor in (("span", span), ("temperature", temperature)):
        # broadcasts to (B, H, N) (`torch.broadcast_shapes` costs more than a decoding step's attention)
        shape = tensor.shape[::-1]  # (N, H, B) as far as given
        if len(shape) > 3 or any(
            size not in (1, full) for size, full in zip(shape, (length, heads, batch)[: len(shape)], strict=True)
        ):
            raise ValueError(
                f"`{name}` must broadcast to (B, H, N) = {(batch, heads, length)}, got shape {tuple(tensor.shape)}"
            )
    if DEBUG and (temperature <= 0).any():
        raise ValueError("`temperature` must be positive everywhere")
    if key_mask is not None and tuple(key_mask.shape) != (batch, keys):
        raise ValueError(f"`key_mask` must have shape (B, S) = {(batch, keys)}, got {tuple(key_mask.shape)}")
    if segment_ids is not None and tuple(segment_ids.shape) != (batch, keys):
        raise ValueError(f"`segment_ids` must have shape (B, S) = {(batch, keys)}, got {tuple(segment_ids.shape)}")
    if sink_mask is not None and (sink_mask.dim() != 2 or sink_mask.shape[0] != batch or sink_mask.shape[1] > keys):
        raise ValueError(
            f"`sink_mask` must have shape (B, K) = ({batch}, K) with K <= S = {keys} (the first K keys), "
            f"got {tuple(sink_mask.shape)}"
        )
    offset = keys - length if query_offset is None else query_offset
    if offset < 0 or offset + length > keys:
        raise ValueError(
            f"`query_offset` must place the {length} queries inside the {keys} keys (0 <= offset <= {keys - length}), "
            f"got {offset}"
        )
    return offset


def _soft_mask(reach: torch.Tensor, distance: torch.Tensor, ramp: int) -> torch.Tensor:
    """The ramp mask `m = clamp((reach - distance) / ramp, 0, 1)`, with `reach = z + ramp` per query and `distance`
    per slot (+inf where unreadable)."""
    return torch.sub(reach, distance).div_(ramp).clamp_(0, 1)


def _slot_distance(distance: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`distance` with +inf where `valid` is False (the key validity folded in, so that the soft mask is 0 there)."""
    return distance.masked_fill(~valid, float("inf"))


def _sink_validity(
    sink_mask: torch.Tensor,
    positions: torch.Tensor,
    causal: bool,
    key_mask: torch.Tensor | None,
    max_distance: int | None,
    segment_ids: torch.Tensor | None,
) -> torch.Tensor:
    """`(B, Nq, K)`: whether the query at key index `positions` `(Nq,)` reads sink slot `k` (a sink, real, at or before
    the query when causal, within `max_distance`, in the query's packed sequence)."""
    slots = torch.arange(sink_mask.shape[1], device=positions.device)
    valid = sink_mask.bool()[:, None, :]  # (B, 1, K)
    if key_mask is not None:
        valid = valid & key_mask[:, None, : sink_mask.shape[1]].bool()
    delta = positions[:, None] - slots[None, :]  # (Nq, K)
    if causal:
        valid = valid & (delta >= 0)
    if max_distance is not None:
        valid = valid & (delta.abs() <= max_distance)
    if segment_ids is not None:
        query_segments = segment_ids[:, positions.clamp(max=segment_ids.shape[1] - 1), None]  # (B, Nq, 1)
        valid = valid & (query_segments == segment_ids[:, None, : sink_mask.shape[1]])
    return valid.expand(sink_mask.shape[0], positions.shape[0], -1)


def _band_key_mask(key_mask: torch.Tensor | None, sink_mask: torch.Tensor | None, keys: int) -> torch.Tensor | None:
    """The keys the band may read: `key_mask` without the sink slots (a sink is read only as a sink)."""
    if sink_mask is None:
        return key_mask
    not_sink = ~F.pad(sink_mask.bool(), (0, keys - sink_mask.shape[1]))  # (B, S)
    return not_sink if key_mask is None else key_mask.bool() & not_sink


def _soft_masked_softmax(
    scores: torch.Tensor, soft_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`probs = m * exp(s - max) / sum(m * exp(s - max))`, max over the readable slots (m > 0); zero rows when none.

    Works in place on `scores` (owned by the caller: a fresh matmul output). Returns `(probs, row_max, total)`, the
    last two `(..., 1)`, from which the backward of `_BandAttention` recomputes the probabilities exactly.
    """
    x = scores.masked_fill_(soft_mask <= 0, float("-inf"))
    row_max = x.amax(dim=-1, keepdim=True)
    row_max.masked_fill_(~torch.isfinite(row_max), 0.0)
    total = _unnormalized(x, row_max).mul_(soft_mask).sum(dim=-1, keepdim=True)
    total.masked_fill_(total <= 0, 1.0)  # rows with nothing to read: zeros
    return x.div_(total), row_max, total


def _unnormalized(x: torch.Tensor, row_max: torch.Tensor) -> torch.Tensor:
    """`exp(x - row_max)` in place; exp of -inf or of underflowing values takes a slow path (~4x), so clamp first
    (the soft mask, 0 there, then zeroes them exactly)."""
    floor = math.log(torch.finfo(x.dtype).tiny) + 1.0
    return x.sub_(row_max).clamp_(min=floor).exp_()


def _block_queries(query: torch.Tensor, scale: torch.Tensor, kv_heads: int, block: int) -> torch.Tensor:
    """`query * scale` `(B, H, N, D)` in blocks of `block` queries: `(B, H_kv, nb, G * block, D)`, the G query heads
    that share a key/value head stacked in each block (zero rows pad the last block)."""
    batch, heads, length, head_dim = query.shape
    num_blocks = -(-length // block)
    q = query.to(scale.dtype) * scale[..., None]  # (B, H, N, D)
    if num_blocks * block > length:
        q = F.pad(q, (0, 0, 0, num_blocks * block - length))  # (B, H, padded, D)
    q = q.view(batch, kv_heads, heads // kv_heads, num_blocks, block, head_dim).transpose(2, 3)
    return q.reshape(batch, kv_heads, num_blocks, heads // kv_heads * block, head_dim)


def _unblock(x: torch.Tensor, heads: int, length: int) -> torch.Tensor:
    """The inverse of `_block_queries`' layout: `(B, H_kv, nb, G * block, D)` -> `(B, H, N, D)`."""
    batch, kv_heads, num_blocks, rows, dim = x.shape
    x = x.view(batch, kv_heads, num_blocks, heads // kv_heads, rows * kv_heads // heads, dim).transpose(2, 3)
    return x.reshape(batch, heads, -1, dim)[:, :, :length]


class _BandAttention(torch.autograd.Function):
    """The band for training, as flash attention computes it: `out = probs @ v` with
    `probs = _soft_masked_softmax(q @ k_t, m)` and `q = _block_queries(query, scale, ...)`.

    The forward keeps its inputs and two numbers per query (the row maximum and sum), neither the probabilities nor
    the blocked queries; the backward recomputes the scores with one matmul and the probabilities from those two
    numbers. What it keeps beyond the layer's own query, key and value: the band's key and value windows `k_t` and
    `v` (views of the padded keys and values, `(B, H_kv, S + window, D)` each) and a few numbers per query.

    Shapes: `query` `(B, H, N, D)` and `scale` `(B, H, N)` (`scaling / temperature`, the logit factor), `k_t`
    `(B, H_kv, nb, D, width)`, `v` `(B, H_kv, nb, width, D_v)`, `reach` `(B, H_kv, nb, G, block, 1)` (`z + ramp`
    per query), `distance` `(block, width)` of each slot from each query of a block, and `valid` broadcastable to
    `(B, 1, nb, 1, block, width)`, False where unreadable. Returns `(B, H_kv, nb, G * block, D_v)`.
    """

    @staticmethod
    def forward(ctx, query, scale, k_t, v, reach, distance, valid, ramp):
        q = _block_queries(query, scale, k_t.shape[1], distance.shape[0])  # (B, H_kv, nb, G * block, D)
        scores = torch.matmul(q, k_t).view(*reach.shape[:-1], k_t.shape[-1])  # (B, H_kv, nb, G, block, width)
        probs, row_max, total = _soft_masked_softmax(scores, _soft_mask(reach, _slot_distance(distance, valid), ramp))
        out = torch.matmul(probs.view(*q.shape[:-1], -1).to(v.dtype), v)  # (B, H_kv, nb, G * block, D_v)
        ctx.save_for_backward(query, scale, k_t, v, reach, distance, valid, row_max, total)
        ctx.ramp = ramp
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, scale, k_t, v, reach, distance, valid, row_max, total = ctx.saved_tensors
        ramp = ctx.ramp
        q = _block_queries(query, scale, k_t.shape[1], distance.shape[0])  # (B, H_kv, nb, G * block, D)
        mask = _soft_mask(reach, _slot_distance(distance, valid), ramp)  # (B, H_kv, nb, G, block, width)
        # p = m * e with e = exp(s - max) / total, recomputed exactly as in the forward
        scores = torch.matmul(q, k_t).view(mask.shape)
        e = _unnormalized(scores.masked_fill_(mask <= 0, float("-inf")), row_max).div_(total)
        probs = (e * mask).view(*q.shape[:-1], -1)  # (B, H_kv, nb, G * block, width)
        d_v = torch.matmul(probs.transpose(-1, -2).to(v.dtype), grad_out)  # (B, H_kv, nb, width, D_v)
        # softmax backward: d_logits = p * (dp - sum_j p_j dp_j)
        d_probs = torch.matmul(grad_out, v.transpose(-1, -2)).to(e.dtype)  # (B, H_kv, nb, G * block, width)
        delta = torch.linalg.vecdot(d_probs, probs).unsqueeze(-1)  # (B, H_kv, nb, G * block, 1)
        del probs
        d_over_m = d_probs.sub_(delta).view(mask.shape).mul_(e)  # d_logits / m (unused where m == 0)
        d_reach = None
        if ctx.needs_input_grad[4]:
            # logits = s + log m, so d/dm = d_logits / m; then through the clamp, whose gradient is taken as 1 strictly
            # inside (0, 1) and 0 at and beyond its ends (the ramp's kinks), and the division by the ramp.
            inside = (mask > 0) & (mask < 1)
            d_reach = (d_over_m * inside).sum(dim=-1, keepdim=True).div_(ramp)
        d_logits = d_over_m.mul_(mask).view(*q.shape[:-1], -1)  # (B, H_kv, nb, G * block, width)
        d_k_t = torch.matmul(q.transpose(-1, -2), d_logits)  # (B, H_kv, nb, D, width)
        d_q = _unblock(torch.matmul(d_logits, k_t.transpose(-1, -2)), *query.shape[1:3])  # (B, H, N, D), of q * scale
        d_query = (d_q * scale[..., None]).to(query.dtype)
        d_scale = torch.linalg.vecdot(d_q, query.to(d_q.dtype)) if ctx.needs_input_grad[1] else None  # (B, H, N)
        return d_query, d_scale, d_k_t, d_v, d_reach, None, None, None


def adaptive_local_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    span: torch.Tensor,
    temperature: torch.Tensor,
    *,
    max_span: int,
    ramp: int,
    causal: bool = True,
    scaling: float | None = None,
    key_mask: torch.Tensor | None = None,
    query_offset: int | None = None,
    max_distance: int | None = None,
    segment_ids: torch.Tensor | None = None,
    block_size: int | None = None,
    reach: int | None = None,
    sink_mask: torch.Tensor | None = None,
    implementation: str = "banded",
) -> torch.Tensor:
    """Sliding-window attention with a soft, per-query span and a per-query temperature, in `O(N * window)`.

    Query `i` sits at absolute position `t = query_offset + i`; key `j` at position `j`. Its distance is
    `delta = t - j` (causal) or `|t - j|` (bidirectional). With span `z` (clamped to `[0, max_span]`) the key
    is weighted by the ramp mask of adaptive span,

        m(delta) = clamp((z - delta) / ramp + 1, 0, 1),

    and the attention weights are `softmax(q.k * scaling / temperature + log m)`, computed as
    `m * exp(...) / sum(m * exp(...))`. **The window's exact edge:** a key is read iff `m > 0`, i.e.
    `delta < z + ramp`; so at most the keys with `0 <= delta <= max_span + ramp - 1` (causal) or
    `|t - j| <= max_span + ramp - 1` (bidirectional) are read, and keys at `delta <= z` get full weight.
    `m(0) = 1`: every query reads itself unless it is padding. A query with no readable key returns zeros.

    Args:
        query: `(B, H, N, D)`.
        key, value: `(B, H_kv, S, D)` and `(B, H_kv, S, D_v)`, with `H` a multiple of `H_kv` (grouped-query
            attention) and `S >= N`.
        span: span in tokens, broadcastable to `(B, H, N)` (e.g. `(B, 1, N)` for one span per token).
        temperature: positive, broadcastable to `(B, H, N)`.
        max_span, ramp: positive integers fixing the band (`max_span + ramp` keys on each reachable side).
        causal: read only keys at or before the query.
        scaling: logit scale, `D ** -0.5` by default.
        key_mask: `(B, S)`, 1 for real keys and 0 for padding (left or right padding).
        query_offset: absolute position of the first query; `S - N` by default (queries are the last `N`
            positions, as in cached decoding).
        max_distance: a hard limit on top of the span: keys at distance `delta > max_distance` are never read
            (the host layer's own sliding window, so that the local branch reads nothing the host cannot).
        segment_ids: `(B, S)` sequence index of each position when several sequences are packed in one row: a
            query reads only the keys of its own sequence.
        block_size: queries per block; each block reads `block_size + window - 1` keys (default: 64, or 32 on
            the fused inference path).
        reach: keys at distance `< reach` may be read, at most `max_span + ramp`. None: the whole band when
            gradients are tracked or under `torch.compile`; at inference in eager mode exactly `ceil(max(z)) + ramp`,
            so short learned spans cost less. A compiled kernel keeps that saving when called with
            `reach=band_reach(span, ...)`, rounded up to one of 8 sizes (one compiled graph per size). A reach
            shorter than the spans need cuts their ramps off (checked only with `DEBUG`).
        sink_mask: `(B, K)`, True where one of the first `K` keys is an attention sink: every query at or after it
            (any query when bidirectional) reads it with full weight (`m = 1`) whatever its span, within
            `max_distance` and its own packed sequence; a sink slot is never read through the band. The other keys
            keep their index distances, so a cache may drop the keys between the sinks and the window (a query
            then reads `K` sinks plus `max_span + ramp` keys).
        implementation: `"banded"` (the default: the blocked eager kernel below) or `"flex"`: PyTorch's
            `flex_attention`, the band as a `BlockMask` and the temperature and `log m` applied by a `score_mod`
            (`block_size` and `reach` do not apply). Compiled on CUDA; on the CPU, PyTorch runs flex eagerly and
            forward only (no gradients there).

    Returns:
        `(B, H, N, D_v)`, in `query`'s dtype.

    Nothing on the way reads a tensor's values unless `DEBUG` is set (`reach=None` at inference reads one, in eager
    mode only), so `torch.compile(adaptive_local_attention, fullgraph=True)` traces it whole. When gradients are
    tracked, the band runs as one autograd function (`_BandAttention`) that keeps its inputs and two numbers per
    query, and recomputes the scores and probabilities in the backward, as flash attention does: no
    `(queries x slots)` tensor is kept for the backward. At inference on the CPU the band goes through
    `scaled_dot_product_attention` calls with `log m` as their float mask.
    """
    offset = _check_attention_inputs(
        query, key, value, span, temperature, max_span, ramp, causal, key_mask, query_offset, max_distance,
        segment_ids, sink_mask,
    )  # fmt: skip
    batch, heads, length, _ = query.shape
    if length == 0:
        return query.new_zeros((batch, heads, 0, value.shape[3]))
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"`implementation` must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    band = max_span + ramp  # keys at distance <= band - 1 may be read
    span = span.clamp(0, max_span).expand(batch, heads, length)  # (B, H, N)
    temperature = temperature.expand(batch, heads, length)  # (B, H, N)
    if implementation == "flex":
        settings = (offset, max_span, ramp, causal, max_distance, scaling)
        return _flex_band(query, key, value, span, temperature, (key_mask, segment_ids, sink_mask), settings)
    tracking = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, span, temperature))
    if reach is None:
        # A band width read from the spans' values: at inference in eager mode, and not for one query (a decoding
        # step reads at most max_span + ramp keys; reading the spans would cost more than it saves).
        adaptive = length > 1 and not tracking and not torch.compiler.is_compiling()
        reach = band_reach(span, max_span=max_span, ramp=ramp, buckets=band) if adaptive else band  # exact
    elif isinstance(reach, bool) or not isinstance(reach, int) or not 1 <= reach <= band:
        raise ValueError(f"`reach` must be None or an integer in [1, max_span + ramp = {band}], got {reach!r}")
    elif DEBUG and reach < band_reach(span, max_span=max_span, ramp=ramp, buckets=band):
        raise ValueError(f"`reach` ({reach}) is shorter than the spans need: use `band_reach(span, ...)`")
    if max_distance is not None:
        reach = min(reach, max_distance + 1)
    return _banded_attention(
        query, key, value, span, temperature, key_mask, segment_ids, max_span=max_span, ramp=ramp, causal=causal,
        scaling=scaling, offset=offset, reach=reach, max_distance=max_distance, block_size=block_size,
        tracking=tracking, sink_mask=sink_mask,
    )  # fmt: skip


def _flex_band(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    span: torch.Tensor,
    temperature: torch.Tensor,
    masks: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
    settings: tuple[int, int, int, bool, int | None, float | None],
) -> torch.Tensor:
    """`adaptive_local_attention` through `flex_attention`: `masks` = `(key_mask, segment_ids, sink_mask)`,
    `settings` = `(offset, max_span, ramp, causal, max_distance, scaling)`; `span` (clamped) and `temperature`
    `(B, H, N)`. The `BlockMask` keeps the blocks within the band (and the sink columns); the `score_mod` reads the
    span and the logit factor of each (batch, head, query) from tensors, so gradients reach them."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    key_mask, segment_ids, sink_mask = masks
    offset, max_span, ramp, causal, max_distance, scaling = settings
    batch, heads, length, head_dim = query.shape
    keys, band = key.shape[2], max_span + ramp
    compute = torch.promote_types(query.dtype, torch.float32)
    scale = (head_dim**-0.5 if scaling is None else scaling) / temperature.to(compute)  # (B, H, N)
    span = span.to(compute)  # (B, H, N)
    sinks = 0 if sink_mask is None else sink_mask.shape[1]
    is_sink = None if sink_mask is None else F.pad(sink_mask.bool(), (0, keys - sinks))  # (B, S)
    valid = None if key_mask is None else key_mask.bool()  # (B, S)

    def mask_mod(b, h, q_idx, kv_idx):
        delta = offset + q_idx - kv_idx
        inside = (delta >= 0) & (delta < band) if causal else (delta.abs() < band)
        if max_distance is not None:
            inside = inside & (delta.abs() <= max_distance)
        return inside | (kv_idx < sinks) if sinks else inside

    def score_mod(score, b, h, q_idx, kv_idx):
        delta = offset + q_idx - kv_idx
        ramp_value = (span[b, h, q_idx] - delta.abs()) / ramp + 1
        # clamp to [0, 1] with the reference's gradient at the kinks: 0 at and beyond the ends
        m = torch.where(ramp_value >= 1, 1.0, torch.where(ramp_value <= 0, 0.0, ramp_value))
        if is_sink is not None:
            m = torch.where(is_sink[b, kv_idx], 1.0, m)
        readable = m > 0
        if causal:
            readable = readable & (delta >= 0)
        if max_distance is not None:
            readable = readable & (delta.abs() <= max_distance)
        if valid is not None:
            readable = readable & valid[b, kv_idx]
        if segment_ids is not None:
            readable = readable & (segment_ids[b, offset + q_idx] == segment_ids[b, kv_idx])
        logit = score * scale[b, h, q_idx] + torch.log(torch.where(readable, m, 1.0))
        return torch.where(readable, logit, -math.inf)

    block_mask = create_block_mask(mask_mod, None, None, length, keys, device=query.device)
    flex = flex_attention
    if query.device.type != "cpu" and not torch.compiler.is_compiling():
        flex = _compiled_flex()
    out = flex(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=1.0, enable_gqa=True)
    return out.to(query.dtype)  # (B, H, N, D_v)


@functools.cache
def _compiled_flex():
    """`torch.compile(flex_attention)`, made once: flex attention is fused only when compiled."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def band_reach(span: torch.Tensor, *, max_span: int, ramp: int, buckets: int = 8) -> int:
    """How far the band must reach for these spans at inference: `ceil(max(z)) + ramp` keys, rounded up to a
    multiple of `ceil((max_span + ramp) / buckets)`, so that a compiled kernel sees at most `buckets` band widths.

    Reads one value from `span` (a device-to-host copy); NaN spans get the full band `max_span + ramp`.
    """
    band = max_span + ramp
    if span.numel() == 0:
        return band
    top = span.detach().amax().nan_to_num(max_span).clamp(0, max_span)
    step = -(-band // buckets)
    needed = int(math.ceil(top.item())) + ramp
    return min(band, -(-needed // step) * step)


class _Sinks(NamedTuple):
    """The sink slots of a band: their keys `(B, H_kv, K, D)` (in the compute dtype), values `(B, H_kv, K, D_v)`,
    and whether each query reads each of them `(B, N, K)`."""

    key: torch.Tensor
    value: torch.Tensor
    valid: torch.Tensor

    def append_to(self, windows: torch.Tensor, value: bool = False) -> torch.Tensor:
        """Windows of keys or values `(B, H_kv, ..., W, D)` with the sinks after each: `(B, H_kv, ..., W + K, D)`."""
        sinks = self.value if value else self.key  # (B, H_kv, K, D)
        extra = windows.dim() - sinks.dim()
        sinks = sinks.view(*sinks.shape[:2], *(1,) * extra, *sinks.shape[2:])
        return torch.cat([windows, sinks.expand(*windows.shape[:-2], *sinks.shape[-2:])], dim=-2)


def _log_soft_mask(reach: torch.Tensor, distance: torch.Tensor, ramp: int) -> torch.Tensor:
    """`log m`, the float mask of an SDPA call, with -inf where `m = 0`. log(0) takes a slow path (~10x): clamp to
    the smallest normal, log, then -inf at log(tiny)."""
    tiny = torch.finfo(distance.dtype).tiny
    bias = torch.sub(reach, distance).div_(ramp).clamp_(tiny, 1).log_()
    return F.threshold_(bias, math.log(tiny) * (1 - 1e-6), -math.inf)


def _banded_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    span: torch.Tensor,
    temperature: torch.Tensor,
    key_mask: torch.Tensor | None,
    segment_ids: torch.Tensor | None,
    *,
    max_span: int,
    ramp: int,
    causal: bool,
    scaling: float | None,
    offset: int,
    reach: int,
    max_distance: int | None,
    block_size: int | None,
    tracking: bool,
    sink_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`adaptive_local_attention` on checked arguments, `span` and `temperature` expanded to `(B, H, N)`, reading the
    keys at distance < `reach` (and the sinks of `sink_mask`, appended to every window)."""
    batch, heads, length, head_dim = query.shape
    kv_heads, keys, value_dim = key.shape[1], key.shape[2], value.shape[3]
    groups = heads // kv_heads
    scaling = head_dim**-0.5 if scaling is None else scaling
    left, right = reach - 1, 0 if causal else reach - 1
    compute = torch.promote_types(query.dtype, torch.float32)  # softmax in float32 (or float64) at least
    # Inference on the CPU in float32/64: fused SDPA calls (whose CPU kernel returns zeros for empty rows) with the
    # float mask log(m).
    sdpa_path = not tracking and query.device.type == "cpu" and query.dtype == value.dtype == compute
    # Logits in float32 at least (bf16 logits times 1 / tau lose too much); scaling / tau folded into the query.
    scale = scaling / temperature.to(compute)  # (B, H, N)
    if length == 1 and not tracking and segment_ids is None:  # one query (a decoding step): no blocks to set up
        step = (offset, left, right, causal, ramp, max_distance)
        return _decode_band(query, key, value, span, scale, key_mask, sink_mask, step, sdpa_path)
    sinks = None
    if sink_mask is not None:  # the sink slots leave the band; each window gets them as extra slots at distance 0
        positions = offset + torch.arange(length, device=query.device)
        sink_valid = _sink_validity(sink_mask, positions, causal, key_mask, max_distance, segment_ids)  # (B, N, K)
        key_mask = _band_key_mask(key_mask, sink_mask, keys)
        count = sink_mask.shape[1]
        sinks = _Sinks(key[:, :, :count].to(compute), value[:, :, :count], sink_valid)
    if block_size is None:
        block_size = 32 if sdpa_path else 64

    # Queries in blocks of `block`; block b reads the keys at positions offset + b * block - left + c, c < width.
    block = max(1, min(block_size, length))
    num_blocks = -(-length // block)
    padded = num_blocks * block
    width = block + left + right
    pad_q = padded - length

    # Layout (B, H_kv, nb, G, block, ...): the G query heads that share a key/value head are stacked in each block,
    # so every block multiplies (G * block) queries with its own window of keys, and keys are never repeated per head.
    z = F.pad(span.to(compute), (0, pad_q)).view(batch, kv_heads, groups, num_blocks, block, 1).transpose(2, 3)
    z = (z + ramp).contiguous()  # the reach z + ramp, (B, H_kv, nb, G, block, 1), laid out as the scores

    # Key positions offset - left ... offset + padded - 1 + right, out-of-range ones padded and marked invalid.
    start, stop = offset - left, offset + padded + right
    valid = key.new_ones((batch, keys), dtype=torch.bool) if key_mask is None else key_mask.bool()
    valid = _windows(valid, start, stop, width, block)[:, None, :, None, None, :]  # (B, 1, nb, 1, 1, width)
    if segment_ids is not None:  # a query reads only keys of its own packed sequence
        key_segments = _windows(segment_ids, start, stop, width, block, value=-1)[:, None, :, None, None, :]
        query_segments = F.pad(segment_ids[:, offset : offset + length], (0, pad_q), value=-1)
        query_segments = query_segments.view(batch, 1, num_blocks, 1, block, 1)
        valid = valid & (key_segments == query_segments)  # (B, 1, nb, 1, block, width)

    # Distance of slot c from query i of the same block: delta = i + left - c, the same for every block.
    # Causal: the keys after the query (delta < 0) are put beyond the band, where the soft mask is 0.
    slots = torch.arange(width, device=query.device)
    rows = torch.arange(block, device=query.device)
    delta = rows[:, None] + left - slots[None, :]  # (block, width)
    distance = delta.masked_fill(delta < 0, max_span + ramp) if causal else delta.abs()
    if max_distance is not None:
        distance = distance.masked_fill(distance > max_distance, max_span + ramp)
    # The soft mask is m = clamp((z + ramp - distance) / ramp, 0, 1), with the distance +inf where unreadable.
    distance = distance.to(compute)  # (block, width)
    if sinks is not None:  # the sinks after each window: width + K slots, read at distance 0 where valid
        sink_valid = F.pad(sinks.valid, (0, 0, 0, pad_q)).view(batch, 1, num_blocks, 1, block, -1)
        distance = torch.cat([distance, distance.new_zeros(block, sink_valid.shape[-1])], dim=-1)  # (block, slots)
        valid = torch.cat([valid.expand(*sink_valid.shape[:-1], width), sink_valid], dim=-1)

    windows = (start, stop, width, block)
    if sdpa_path:
        out = _sdpa_band(query, key.to(compute), value, scale, z, distance, valid, windows, ramp, sinks)
    else:
        k = _windows(key.to(compute), *windows).transpose(-1, -2)  # (B, H_kv, nb, width, D): views of one copy
        v = _windows(value, *windows).transpose(-1, -2)  # (B, H_kv, nb, width, D_v)
        if sinks is not None:
            k, v = sinks.append_to(k), sinks.append_to(v, value=True)  # (B, H_kv, nb, width + K, D)
        k_t = k.transpose(-1, -2)  # (B, H_kv, nb, D, slots)
        if tracking:
            out = _BandAttention.apply(query, scale, k_t, v, z, distance, valid, ramp)  # (B, H_kv, nb, G * block, D_v)
        else:
            q = _block_queries(query, scale, kv_heads, block)  # (B, H_kv, nb, G * block, D)
            scores = torch.matmul(q, k_t)  # (B, H_kv, nb, G * block, slots), fresh: reused in place
            scores = scores.view(batch, kv_heads, num_blocks, groups, block, k_t.shape[-1])
            probs = _soft_masked_softmax(scores, _soft_mask(z, _slot_distance(distance, valid), ramp))[0]
            probs = probs.view(batch, kv_heads, num_blocks, groups * block, k_t.shape[-1])
            out = torch.matmul(probs.to(value.dtype), v)  # (B, H_kv, nb, G * block, D)
    out = out.view(batch, kv_heads, num_blocks, groups * block, value_dim)
    return _unblock(out, heads, length).to(query.dtype)  # (B, H, N, D_v)


def _decode_band(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    span: torch.Tensor,
    scale: torch.Tensor,
    key_mask: torch.Tensor | None,
    sink_mask: torch.Tensor | None,
    step: tuple[int, int, int, bool, int, int | None],
    sdpa_path: bool,
) -> torch.Tensor:
    """The band for one query `(B, H, 1, D)` (a decoding step), no blocks to set up: the keys `offset - left` to
    `offset + right` (`step` = `(offset, left, right, causal, ramp, max_distance)`) and the `K` sinks of `sink_mask`,
    `scale` `(B, H, 1)` the logit factor `scaling / temperature` in the compute dtype. Returns `(B, H, 1, D_v)`.

    The slots are key positions, read at their distance from the query (a sink: at 0). When the sinks lie at most
    `left` positions before the band (a local-only layer's cache keeps only the sinks, `max_crop` positions and the
    band), the slots are the keys from the first on, a view, with the few positions between the sinks and the band
    masked; further apart, the sinks and the band are gathered."""
    batch, heads, _, head_dim = query.shape
    kv_heads, keys, value_dim = key.shape[1], key.shape[2], value.shape[3]
    groups = heads // kv_heads
    offset, left, right, causal, ramp, max_distance = step
    compute = torch.promote_types(query.dtype, torch.float32)
    device, inf = query.device, math.inf
    start, stop = max(0, offset - left), min(keys, offset + right + 1)
    count = 0 if sink_mask is None else sink_mask.shape[1]
    if count and start - count > left:  # sinks far before the band: gathered
        slots = torch.cat([torch.arange(count, device=device), torch.arange(start, stop, device=device)])  # (W,)
        k, v = key.index_select(2, slots), value.index_select(2, slots)  # (B, H_kv, W, D)
    else:
        first = 0 if count else start
        slots = torch.arange(first, stop, device=device)  # (W,)
        k, v = key[:, :, first:stop], value[:, :, first:stop]
    distance = (offset - slots).to(compute)  # (W,)
    if not causal:
        distance = distance.abs_()
    if max_distance is not None:
        distance = distance.masked_fill_(distance > max_distance, inf)
    if key_mask is not None:
        distance = distance.masked_fill(key_mask[:, slots] == 0, inf)  # (B, W)
    if count:  # a sink is read at distance 0 where it is readable at all, never through the band
        is_sink = F.pad(sink_mask.bool(), (0, slots.shape[0] - count))  # (B, W)
        in_band = slots >= start  # (W,)
        distance = torch.where(is_sink, distance.where(distance == inf, 0.0), distance.where(in_band, inf))
    distance = distance.view(distance.shape[0] if distance.dim() == 2 else 1, 1, 1, -1)  # (B or 1, 1, 1, W)
    z = span.to(compute).view(batch, kv_heads, groups, 1) + ramp  # the reach z + ramp, (B, H_kv, G, 1)
    q = query.to(compute).view(batch, kv_heads, groups, head_dim) * scale.view(*z.shape)
    k = k.to(compute)
    if sdpa_path:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=_log_soft_mask(z, distance, ramp), scale=1.0)
    else:
        scores = torch.matmul(q, k.transpose(-1, -2))  # (B, H_kv, G, W)
        probs = _soft_masked_softmax(scores, _soft_mask(z, distance, ramp))[0]
        out = torch.matmul(probs.to(value.dtype), v)  # (B, H_kv, G, D_v)
    return out.reshape(batch, heads, 1, value_dim).to(query.dtype)


def _sdpa_band(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: torch.Tensor,
    reach: torch.Tensor,
    distance: torch.Tensor,
    valid: torch.Tensor,
    windows: tuple[int, int, int, int],
    ramp: int,
    sinks: _Sinks | None,
) -> torch.Tensor:
    """The band at inference on the CPU: fused SDPA calls with the float mask `log m` (-inf outside), in chunks of
    blocks. Each chunk lays out its own queries, key/value windows and mask, a few MB that the allocator reuses from
    chunk to chunk, and writes into the one output tensor. (Tensors over the whole sequence, past the C allocator's
    32 MB threshold at 16K tokens, come fresh from the operating system on every call: a page fault per 4 KiB page.)

    `reach` `(B, H_kv, nb, G, block, 1)`, `distance` `(block, slots)` and `valid` (broadcastable to
    `(B, 1, nb, 1, block, slots)`) as laid out by `_banded_attention`; `windows` the `(start, stop, width, block)` of
    `_windows`. Returns
    `(B, H_kv, nb, G * block, D_v)`.
    """
    batch, heads, _, head_dim = query.shape
    kv_heads, value_dim = key.shape[1], value.shape[3]
    groups = heads // kv_heads
    start, _, width, block = windows
    num_blocks, slots = reach.shape[2], distance.shape[-1]  # slots: width (+ sinks)
    flat = batch * kv_heads
    out = query.new_empty((batch, kv_heads, num_blocks, groups * block, value_dim))
    step = max(1, (1 << 20) // (flat * groups * block * slots))
    if torch.compiler.is_compiling():  # one chunk: a traced loop would unroll into a graph that grows with N
        step = num_blocks
    for first in range(0, num_blocks, step):
        last = min(num_blocks, first + step)
        rows, begin, end = slice(first * block, last * block), start + first * block, start + last * block
        q = _block_queries(query[:, :, rows], scale[:, :, rows], kv_heads, block)  # (B, H_kv, c, G * block, D)
        chunk_windows = (begin, end + width - block, width, block)  # the keys the chunk's blocks read
        k = _windows(key, *chunk_windows).transpose(-1, -2)  # (B, H_kv, c, width, D)
        v = _windows(value, *chunk_windows).transpose(-1, -2)  # (B, H_kv, c, width, D_v)
        if sinks is not None:
            k, v = sinks.append_to(k), sinks.append_to(v, value=True)  # (B, H_kv, c, slots, D)
        dist = _slot_distance(distance, valid[:, :, first:last])  # (B, 1, c, 1, block, slots)
        bias = _log_soft_mask(reach[:, :, first:last], dist, ramp)  # (B, H_kv, c, G, block, slots)
        chunk = (flat, last - first)
        o = F.scaled_dot_product_attention(
            q.reshape(*chunk, groups * block, head_dim),
            k.reshape(*chunk, slots, head_dim),
            v.reshape(*chunk, slots, value_dim),
            attn_mask=bias.reshape(*chunk, groups * block, slots),
            scale=1.0,
        )  # (B * H_kv, c, G * block, D_v); empty rows -> zeros
        out[:, :, first:last] = o.view(batch, kv_heads, last - first, groups * block, value_dim)
    return out


def _windows(x: torch.Tensor, start: int, stop: int, width: int, block: int, value: int = 0) -> torch.Tensor:
    """Positions `start ... stop - 1` of `x`, `value` outside `[0, S)`, as overlapping windows of `width` positions
    every `block`, views of one copy: `(B, H_kv, S, D)` -> `(B, H_kv, nw, D, width)` with
    `nw = (stop - start - width) // block + 1`, or `(B, S)` -> `(B, nw, width)`."""
    dim = 1 if x.dim() == 2 else 2  # the position dimension
    low, high = max(0, start), max(0, min(x.shape[dim], stop))
    pad = (0, 0) * (x.dim() - 1 - dim) + (low - start, stop - max(low, high))
    x = F.pad(x.narrow(dim, low, max(low, high) - low), pad, value=value)  # stop - start positions
    return x.unfold(dim, width, block)


def reference_local_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    span: torch.Tensor,
    temperature: torch.Tensor,
    *,
    max_span: int,
    ramp: int,
    causal: bool = True,
    scaling: float | None = None,
    key_mask: torch.Tensor | None = None,
    query_offset: int | None = None,
    max_distance: int | None = None,
    segment_ids: torch.Tensor | None = None,
    block_size: int | None = None,
    sink_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense `O(N * S)` twin of `adaptive_local_attention` (same arguments, same result); for tests only."""
    del block_size  # the dense form has no blocks
    offset = _check_attention_inputs(
        query, key, value, span, temperature, max_span, ramp, causal, key_mask, query_offset, max_distance,
        segment_ids, sink_mask,
    )  # fmt: skip
    batch, heads, length, head_dim = query.shape
    groups = heads // key.shape[1]
    scaling = head_dim**-0.5 if scaling is None else scaling
    key = key.repeat_interleave(groups, dim=1)  # (B, H, S, D)
    value = value.repeat_interleave(groups, dim=1)

    positions_q = offset + torch.arange(length, device=query.device)
    positions_k = torch.arange(key.shape[2], device=query.device)
    delta = positions_q[:, None] - positions_k[None, :]  # (N, S)
    distance = delta.clamp_min(0) if causal else delta.abs()

    z = span.clamp(0, max_span).expand(batch, heads, length)[..., None]  # (B, H, N, 1)
    ramp_value = (z - distance) / ramp + 1  # (B, H, N, S)
    # clamp to [0, 1], with the kernel's gradient convention at the kinks: 0 at and beyond the ends
    mask = torch.where(ramp_value >= 1, 1.0, torch.where(ramp_value <= 0, 0.0, ramp_value))
    if sink_mask is not None:  # sinks: weight 1 instead of the ramp, for every query at or after them
        is_sink = torch.zeros(batch, key.shape[2], dtype=torch.bool, device=query.device)
        is_sink[:, : sink_mask.shape[1]] = sink_mask.bool()
        mask = torch.where(is_sink[:, None, None, :], 1.0, mask)
    if causal:
        mask = mask * (delta >= 0)
    if max_distance is not None:
        mask = mask * (delta.abs() <= max_distance)
    if segment_ids is not None:
        same = segment_ids[:, offset : offset + length, None] == segment_ids[:, None, :]  # (B, N, S)
        mask = mask * same[:, None].to(mask.dtype)
    if key_mask is not None:
        mask = mask * key_mask[:, None, None, :].to(mask.dtype)

    compute = torch.promote_types(query.dtype, torch.float32)
    logits = torch.matmul(query.to(compute), key.to(compute).transpose(-1, -2)) * scaling
    logits = logits / temperature.expand(batch, heads, length)[..., None].to(compute)
    safe_log = torch.log(torch.where(mask > 0, mask, torch.ones_like(mask)))
    logits = torch.where(mask > 0, logits + safe_log, torch.full_like(logits, float("-inf")))
    empty = ~(mask > 0).any(dim=-1, keepdim=True)  # (B, H, N, 1): rows with nothing to read
    probs = torch.softmax(torch.where(empty, torch.zeros_like(logits), logits), dim=-1) * ~empty
    return torch.matmul(probs, value.to(compute)).to(query.dtype)
