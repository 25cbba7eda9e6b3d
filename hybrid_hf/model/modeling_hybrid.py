"""Hybrid attention as a transformers attention backend, and hybrid model classes for any host architecture.

A host self-attention module computes its query, key and value (its projections, norms, rotary embeddings and cache
update), calls the attention function that `config._attn_implementation` names, and applies its output projection to
the result. Hybrid models set that name to `"hybrid"`, registered here, so that for every hybrid layer:

    g = Attn(q, k, v)                            global branch: the host's own implementation (eager, sdpa, ...)
    c = mean of g over the positions each token sees  (prefix for decoders, all real tokens for encoders)
    s = sigmoid(W_s c + b_s)                     span scale per token (and head)
    l = LocalAttn(q, k, v; span = s * max_span, temperature = tau(s))   on the very same q, k, v
    a = W_mix [l ; g]                            W_mix = [0 | I] at conversion; the host then applies o_proj(a)

and for every *local-only* layer (`config.local_layers`), which never computes `g`:

    c = mean of the values v over the positions each token sees (what `g` would be under uniform attention)
    s, l as above, with `sink_tokens` attention sinks;  a = W_mix l   (W_mix = I at conversion)

`HybridLlamaForCausalLM` is `LlamaForCausalLM` with the new parameters (`span_predictor`, `mix`) added to each
self-attention module; host weights keep their names. The class of any host model class is made on demand:
`hybrid_model_class(LlamaForCausalLM)`, or the name `HybridLlamaForCausalLM` looked up in this module.
This file travels with saved checkpoints (`trust_remote_code`).
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import sys
import types

import torch
import transformers
from torch import nn
from transformers import AutoConfig, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import (
    Cache,
    DynamicCache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    EncoderDecoderCache,
    StaticLayer,
)
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionMaskInterface,
    find_packed_sequence_indices,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
from transformers.models.auto import modeling_auto

from .configuration_hybrid import (
    HYBRID_ATTENTION,
    HYBRID_PREFIX,
    _config_class,
    attention_implementations,
    check_attention_implementation,
    host_class,
    is_registered,
    text_config_class,
)
from .hybrid_attention import (
    SpanPredictor,
    adaptive_local_attention,
    causal_prefix_mean,
    masked_mean,
    span_temperature,
)

#: the keyword argument that carries a forward's `HybridForwardState` to the attention function
STATE_KWARG = "hybrid_state"

#: Auto class -> transformers' table of host classes for it; the first that lists a host class is its Auto class.
AUTO_CLASSES = {
    "AutoModelForCausalLM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "AutoModelForMaskedLM": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "AutoModelForSequenceClassification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "AutoModelForTokenClassification": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "AutoModelForQuestionAnswering": "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
    "AutoModelForSeq2SeqLM": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "AutoModelForSpeechSeq2Seq": "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES",
    "AutoModelForImageTextToText": "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
    "AutoModel": "MODEL_MAPPING_NAMES",
}


#: the submodules of a hybrid attention module that hold its own parameters (all else is the host's)
NEW_PARAMETER_MODULES = ("span_predictor", "mix")


class UnsupportedHostError(ValueError):
    """The host model cannot be made hybrid (the message says why)."""


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors are not those of the model that loads it: loading would leave weights random."""


class HybridForwardState:
    """What one model forward hands its hybrid layers, through the attention function's keyword arguments.

    A plain class, not a dataclass: FSDP2 rebuilds the dataclasses (and the lists in them) that it finds in a
    layer's arguments, and the spans recorded by earlier layers would then go to a copy.

    Attributes:
        config: the hybrid config (settings and the global branch's implementation).
        key_mask: `(B, S)` 1 for real tokens, the model's 2-D `attention_mask` (None: no padding).
        decoder_key_mask: the same for the causal layers, where they have a mask of their own (an encoder-decoder's
            `decoder_attention_mask`); `key_mask` otherwise.
        cache: the model's KV cache, where decoders keep their context state (None without cache).
        segment_ids: `(B, N)` sequence index of each token when sequences are packed in a row without padding and
            told apart by `position_ids` (as transformers' masks tell them apart); None otherwise.
        sink_mask: `(B, K)` the attention sinks of local-only layers among the first `K` positions (the first
            `sink_tokens` real tokens of each row); None without local-only layers.
        spans: `(span_scale (B, H, N), query_mask (B, N) | None)` per hybrid layer call, for the span loss.
        layers_reached: ids of the hybrid modules that ran, to tell a host whose attention never reaches this backend,
            or reaches it more than once a forward.
        finished: the model's forward has returned (gradient checkpointing then runs the layers again).
    """

    def __init__(
        self,
        config: PreTrainedConfig,
        key_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        segment_ids: torch.Tensor | None = None,
        sink_mask: torch.Tensor | None = None,
    ):
        self.config = config
        self.key_mask = self.decoder_key_mask = key_mask
        self.cache = cache
        self.segment_ids = segment_ids
        self.sink_mask = sink_mask
        self.spans: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self.layers_reached: set[int] = set()
        self.finished = False


# ----------------------------------------------------------------------------------------------------------------
# The attention function
# ----------------------------------------------------------------------------------------------------------------


def global_attention_function(module: nn.Module, implementation: str):
    """The host's attention function for `implementation`: `ALL_ATTENTION_FUNCTIONS[implementation]`, or for
    `"eager"` the host family's own `eager_attention_forward` (which may add softcapping, layer scaling, ...)."""
    if implementation == "eager":
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise ValueError(
                f"{type(module).__name__} has no `eager_attention_forward` in its module; use another "
                f"attn_implementation for the global branch: {', '.join(ALL_ATTENTION_FUNCTIONS.valid_keys())}"
            )
        return eager
    return ALL_ATTENTION_FUNCTIONS[implementation]


def hybrid_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The `"hybrid"` attention function: the host's global attention, then (on hybrid layers) the local branch on
    the same `query` `(B, H, N, D)`, `key` and `value` `(B, H_kv, S, D)`, mixed in head space; on local-only layers
    the local branch alone. Returns `(B, N, H, D)`.
    """
    state: HybridForwardState | None = kwargs.pop(STATE_KWARG, None)
    config = state.config if state is not None else module.config
    local_only = getattr(module, "local_only", False)
    global_output = weights = None
    if not local_only:
        attention = global_attention_function(module, config.global_attn_implementation)
        global_output, weights = attention(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
        if not hasattr(module, "mix"):  # not a hybrid layer (cross-attention, or a layer left out of `hybrid_layers`)
            return global_output, weights
    if state is None:
        raise UnsupportedHostError(
            f"{type(module).__name__} called hybrid attention without the model's `{STATE_KWARG}` keyword argument: "
            "its model does not pass keyword arguments on to its attention, so it cannot be made hybrid"
        )
    if id(module) in state.layers_reached and state.cache is not None and not state.finished:
        raise UnsupportedHostError(
            f"{type(module).__name__} calls its attention more than once a forward; the context state a hybrid "
            "layer keeps in the cache needs one call per layer"
        )
    state.layers_reached.add(id(module))
    batch, heads, length, _ = query.shape
    kv_heads, value_dim = value.shape[1], value.shape[3]
    if heads * value_dim != module.mix.out_features or module.span_predictor.proj.out_features not in (1, heads):
        raise UnsupportedHostError(
            f"{type(module).__name__} attends with {heads} heads of {value_dim} features, but its config gives "
            f"{module.mix.out_features} features in all (num_attention_heads x head_dim), which sized the hybrid layer"
        )
    causal = kwargs.get("is_causal")
    causal = _is_causal(module) if causal is None else causal
    window = kwargs.get("sliding_window")  # the host layer's own sliding window, if any
    sink_mask = state.sink_mask if local_only and window is None else None  # sinks beyond a host window: unreadable
    layer = None
    if causal and state.cache is not None:
        if getattr(module, "layer_idx", None) is None:  # Zamba's one attention module shared by several layers
            raise UnsupportedHostError(
                f"{type(module).__name__} calls its attention more than once a forward (one module serves several "
                "layers, with no `layer_idx` of its own); the context state a hybrid layer keeps in the cache needs "
                "one call per layer"
            )
        sinks = None if sink_mask is None else sink_mask.shape[1]
        layer = hybrid_cache_layer(state.cache, module.layer_idx, config, sinks)
    padding = state.decoder_key_mask if causal else state.key_mask
    key_mask = _key_mask(padding, key.shape[2], getattr(layer, "sink_slots", 0))
    query_mask = key_mask[:, -length:] if key_mask is not None else None

    # Span and temperature from the context: prefix means (decoder, carried in the cache) or the whole-sequence mean,
    # of the global output, or on a local-only layer of the values (the global output under uniform attention).
    if local_only:
        source = value[:, :, -length:].transpose(1, 2).reshape(batch, length, kv_heads * value_dim)  # (B, N, H_kv * D)
    else:
        source = global_output.reshape(batch, length, heads * value_dim)  # (B, N, H * D)
    segment_ids = state.segment_ids if causal else None  # packed sequences: decoders only, as transformers' masks
    if causal:
        past = layer.context_before(length) if layer is not None else (None, None)
        context, sums, counts = causal_prefix_mean(source, query_mask, *past, segment_ids)  # (B, N, width)
        if layer is not None:
            layer.append_context(sums, counts)
    else:
        context = masked_mean(source, query_mask)  # (B, 1, width)
    if local_only:  # each query head reads its key/value head: (B, N or 1, H * D)
        context = context.unflatten(-1, (kv_heads, value_dim)).repeat_interleave(heads // kv_heads, dim=2).flatten(2)
    span_scale = module.span_predictor(context).expand(-1, -1, length)  # (B, H or 1, N)
    state.spans.append((span_scale, query_mask))
    span = span_scale * config.max_span
    temperature = span_temperature(span_scale, config.tau_min, config.tau_max)

    # Local branch: never further than the host's own sliding window reaches (transformers' masks read
    # `distance < window` causally and `|distance| <= window` bidirectionally).
    local_output = adaptive_local_attention(
        query,
        key,
        value,
        span,
        temperature,
        max_span=config.max_span,
        ramp=config.ramp,
        causal=causal,
        scaling=scaling,
        key_mask=key_mask,
        max_distance=None if window is None else (window - 1 if causal else window),
        segment_ids=segment_ids,
        sink_mask=sink_mask,
    )  # (B, H, N, D)
    local_flat = local_output.transpose(1, 2).reshape(batch, length, heads * value_dim)  # (B, N, H * D)
    if local_only:
        return module.mix(local_flat).view(batch, length, heads, value_dim), None
    global_flat = global_output.reshape(batch, length, heads * value_dim)
    mixed = module.mix(torch.cat([local_flat.to(global_flat.dtype), global_flat], dim=-1))  # (B, N, H * D)
    return mixed.view(batch, length, heads, value_dim), weights


def _is_causal(module: nn.Module) -> bool:
    """Whether a self-attention module attends causally: as its encoder-decoder's side says (`hybrid_causal`, set
    for an encoder's and a decoder's layers), else as its `is_causal` says (True by default, as transformers reads)."""
    return getattr(module, "hybrid_causal", getattr(module, "is_causal", True))


def hybrid_mask_function(*args, config: PreTrainedConfig, **kwargs):
    """The mask of the global branch's implementation (the host's masks are unchanged)."""
    return ALL_MASK_ATTENTION_FUNCTIONS[config.global_attn_implementation](*args, config=config, **kwargs)


AttentionInterface.register(HYBRID_ATTENTION, hybrid_attention_forward)
AttentionMaskInterface.register(HYBRID_ATTENTION, hybrid_mask_function)


def _key_mask(mask: torch.Tensor | None, keys: int, sinks: int = 0) -> torch.Tensor | None:
    """The 2-D padding mask aligned to the `keys` keys this layer sees: the last ones (a sliding cache keeps fewer),
    after the first `sinks` positions when the cache keeps those too."""
    if mask is None:
        return None
    if mask.shape[1] < keys:
        raise ValueError(
            f"`attention_mask` covers {mask.shape[1]} tokens but the layer reads {keys} keys; pass a mask over the "
            "cached and the new tokens"
        )
    if sinks and mask.shape[1] > keys:
        return torch.cat([mask[:, :sinks], mask[:, mask.shape[1] - (keys - sinks) :]], dim=1)
    return mask[:, -keys:]


def sink_positions(
    mask: torch.Tensor | None, sink_tokens: int, batch: int, length: int, device: torch.device
) -> torch.Tensor | None:
    """`(B, K)` True at the first `sink_tokens` real tokens of each row, `K` the fewest leading positions that hold
    them all (all `length` positions while a row has fewer); None for no sinks.

    With a padding `mask`, `K` is read from it: one device-to-host copy per forward (not per layer), on models with
    local-only layers and `sink_tokens > 0` only. Without a mask nothing is read (`K = sink_tokens`)."""
    if sink_tokens == 0 or length == 0:
        return None
    if mask is None:
        return torch.ones(batch, min(sink_tokens, length), dtype=torch.bool, device=device)
    real = mask[:, :length].bool()
    sinks = real & (real.cumsum(dim=1) <= sink_tokens)  # (B, length)
    complete = real.sum(dim=1) >= sink_tokens
    last = torch.where(complete, sinks.cumsum(dim=1).argmax(dim=1), length - 1)  # each row's last sink
    return sinks[:, : int(last.max()) + 1]


# ----------------------------------------------------------------------------------------------------------------
# Decoding state: a transformers cache layer that also holds the prefix sums of the global output
# ----------------------------------------------------------------------------------------------------------------


class HybridCacheLayerMixin:
    """Added to a dynamic cache layer of a hybrid or local-only layer: beside its keys and values, the running sum of
    the context's source `(B, d)` (float32) and the running count of real tokens `(B,)`, so the prefix-mean context
    continues across decoding steps. They are kept for the last `context_history + 1` positions only, so that `crop`
    can remove up to `context_history` tokens (`config.max_crop`): the state does not grow with the context.
    """

    context_sums: torch.Tensor | None = None  # (B, P, d): the running sums at the last P positions seen
    context_counts: torch.Tensor | None = None  # (B, P)
    context_length: int = 0
    context_history: int = 64

    def context_before(self, new_tokens: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`(sum (B, d), count (B,))` over the positions before the `new_tokens` this call added to the cache."""
        seen = self.get_seq_length() - new_tokens
        if self.context_length != seen:
            raise RuntimeError(
                f"the cache holds {seen} earlier tokens but the hybrid context state {self.context_length}; a cache "
                "filled outside this model's forward cannot be continued"
            )
        if seen == 0:
            return None, None
        return self.context_sums[:, -1], self.context_counts[:, -1]

    def append_context(self, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """Record the running sums `(B, n, d)` and counts `(B, n)` of the `n` positions this call added."""
        keep, added = self.context_history + 1, sums.shape[1]
        if self.context_sums is not None and added < keep:
            sums, counts = torch.cat([self.context_sums, sums], dim=1), torch.cat([self.context_counts, counts], dim=1)
        # a copy of the kept positions, so no (B, N, d) tensor of a long prompt stays alive behind a view
        self.context_sums, self.context_counts = sums[:, -keep:].clone(), counts[:, -keep:].clone()
        self.context_length += added

    def _apply_to_context(self, fn) -> None:
        if self.context_sums is not None:
            self.context_sums, self.context_counts = fn(self.context_sums), fn(self.context_counts)

    def crop(self, tokens_to_remove: int) -> None:
        length = _cropped_length(self.get_seq_length(), tokens_to_remove)
        removed = self.context_length - length
        if 0 < length and self.context_sums is not None and removed >= self.context_sums.shape[1]:
            raise ValueError(
                f"cannot crop {removed} tokens: a hybrid layer's decoding state keeps the last "
                f"{self.context_history} positions (`max_crop` in the model's config)"
            )
        super().crop(tokens_to_remove)
        if length == 0:
            self.context_sums = self.context_counts = None
        elif removed > 0:
            self._apply_to_context(lambda t: t[:, :-removed])
        self.context_length = length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._apply_to_context(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._apply_to_context(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._apply_to_context(lambda t: t[indices])

    def reset(self) -> None:
        super().reset()
        self.context_sums = self.context_counts = None
        self.context_length = 0


def _cropped_length(length: int, tokens_to_remove: int) -> int:
    """The length `Cache.crop(tokens_to_remove)` leaves: `-n` removes `n` tokens (`0` none); `n > 0`, the older
    form, keeps at most `n`."""
    return max(0, length + tokens_to_remove) if tokens_to_remove <= 0 else min(length, tokens_to_remove)


class SinkWindowLayer(DynamicSlidingWindowLayer):
    """The KV cache layer of a local-only layer: transformers' sliding-window layer that also keeps the first
    `sink_slots` positions (the attention sinks). After each update it holds those and the last
    `sliding_window - 1 + history` positions, so `crop` can remove up to `history` tokens; `update` returns the sinks
    first, then contiguous positions up to the new ones: at least the window of every new query.

    Masks see it as a full-attention layer (`get_mask_sizes` of every position): only the host's other layers use
    them, since a local-only layer computes no global attention.
    """

    is_sliding = False

    def __init__(self, sliding_window: int, sink_slots: int = 0, history: int = 0, **kwargs):
        super().__init__(sliding_window=sliding_window, **kwargs)
        self.sink_slots = sink_slots
        self.history = history

    def _kept(self, states: torch.Tensor) -> torch.Tensor:
        recent = self.sliding_window - 1 + self.history
        if states.shape[-2] <= self.sink_slots + recent:
            return states
        return torch.cat([states[..., : self.sink_slots, :], states[..., -recent:, :]], dim=-2)

    def _append(self, held: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(what the new queries read, what the layer keeps)`: one copy when a step adds at most `history`
        positions (decoding), two for a longer chunk (a prompt)."""
        recent = self.sliding_window - 1 + self.history
        length = held.shape[-2] + new.shape[-2]
        if new.shape[-2] <= self.history and length > self.sink_slots + recent:
            # the positions kept hold every key the new queries read
            start = length - recent
            states = torch.cat([held[..., : self.sink_slots, :], held[..., start:, :], new], dim=-2)
            return states, states
        states = torch.cat([held, new], dim=-2)
        return states, self._kept(states)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        keys, self.keys = self._append(self.keys, key_states)
        values, self.values = self._append(self.values, value_states)
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        length = _cropped_length(self.cumulative_length, tokens_to_remove)
        removed, held = self.cumulative_length - length, self.keys.shape[-2] if self.is_initialized else 0
        if removed <= 0:
            return
        if held < self.cumulative_length and held - self.sink_slots - removed < self.sliding_window - 1:
            raise ValueError(
                f"cannot crop {removed} tokens: a local-only layer's cache keeps {self.history} positions beyond its "
                "window (`max_crop` in the model's config)"
            )
        self.keys, self.values = self.keys[..., : held - removed, :], self.values[..., : held - removed, :]
        self.cumulative_length = length


@functools.cache
def _hybrid_layer_class(layer_class: type) -> type:
    return type(f"Hybrid{layer_class.__name__}", (HybridCacheLayerMixin, layer_class), {"__module__": __name__})


def hybrid_cache_layer(
    cache: Cache, layer_idx: int, config: PreTrainedConfig, sink_slots: int | None = None
) -> HybridCacheLayerMixin:
    """The cache layer of hybrid layer `layer_idx`, given the context state on first use (a dynamic layer only).

    With `sink_slots` (a local-only layer over a full-attention host layer), a `SinkWindowLayer` that keeps those
    first positions and the band `max_span + ramp`, trimmed to them at once.
    """
    layer = cache.layers[layer_idx]
    if not isinstance(layer, DynamicLayer):
        raise ValueError(
            f"hybrid layer {layer_idx} needs a dynamic cache layer for its context state, got {type(layer).__name__}"
        )
    if sink_slots is not None and not isinstance(layer, SinkWindowLayer):
        if isinstance(layer, DynamicSlidingWindowLayer):
            raise ValueError(f"local-only layer {layer_idx} has sinks but a sliding cache layer of the host's")
        sink_layer = SinkWindowLayer(config.max_span + config.ramp, sink_slots, config.max_crop)
        if layer.is_initialized:
            sink_layer.lazy_initialization(layer.keys, layer.values)
            sink_layer.keys, sink_layer.values = sink_layer._kept(layer.keys), sink_layer._kept(layer.values)
            sink_layer.cumulative_length = layer.get_seq_length()
        sink_layer.__dict__.update({k: v for k, v in vars(layer).items() if k.startswith("context_")})
        layer = sink_layer
    if not isinstance(layer, HybridCacheLayerMixin):
        hybrid_class = _hybrid_layer_class(type(layer))
        hybrid = hybrid_class.__new__(hybrid_class)
        hybrid.__dict__.update(vars(layer))  # the same keys, values and counters
        hybrid.context_history = config.max_crop
        layer = hybrid
    if sink_slots is not None:
        layer.sink_slots = sink_slots
    cache.layers[layer_idx] = layer
    return layer


def check_cache(cache) -> None:
    """Hybrid decoders keep their context state in dynamic cache layers; preallocated caches are refused up front."""
    for layer in getattr(cache, "layers", None) or []:
        if isinstance(layer, StaticLayer):
            raise ValueError(
                f"hybrid models decode with a dynamic cache (`DynamicCache`, the default), got {type(cache).__name__} "
                f"with {type(layer).__name__}s: preallocated layers have no room for the hybrid layers' context state "
                "(so `cache_implementation='static'` is not supported)"
            )


# ----------------------------------------------------------------------------------------------------------------
# Hybrid layers inside a host model
# ----------------------------------------------------------------------------------------------------------------


def uses_attention_interface(model_class: type) -> bool:
    """transformers' own test of whether a model class's attention goes through `AttentionInterface` (the private
    classmethod `_can_set_attn_implementation`, which reads the modeling file; where it is missing: assume so)."""
    check = getattr(model_class, "_can_set_attn_implementation", None)
    return True if check is None else bool(check())


def attention_specs(model_class: type) -> list | None:
    """What a model class's `_can_record_outputs["attentions"]` names: its self-attention classes (or recorders);
    None when the class names none but its attention goes through the attention interface (an encoder-decoder's
    outer classes leave that to their encoder and decoder, which `self_attention_modules` searches)."""
    specs = _recorded_attentions(model_class)
    if specs is None and not uses_attention_interface(model_class):
        raise UnsupportedHostError(
            f"{model_class.__name__}'s attention does not go through transformers' attention interface "
            "(it is written inside the model), so there is no attention function to make hybrid"
        )
    return specs


def _recorded_attentions(model_class: type) -> list | None:
    specs = (getattr(model_class, "_can_record_outputs", None) or {}).get("attentions")
    if specs is None:
        return None
    return list(specs) if isinstance(specs, (list, tuple)) else [specs]


def _spec_matches(spec, name: str, module: nn.Module) -> bool:
    """Whether `module` (at `name` below the model that declares `spec`) is what an attention recorder names."""
    target = getattr(spec, "target_class", spec)
    class_name = getattr(spec, "class_name", None)
    layer_name = getattr(spec, "layer_name", None)
    matches = (
        isinstance(module, target)
        if isinstance(target, type)
        else bool(class_name and type(module).__name__.endswith(class_name))
    )
    return matches and (layer_name is None or f".{layer_name.strip('.')}." in f".{name}.")


def _attention_of(module: nn.Module) -> nn.Module:
    """The module that calls the attention function: the recorded one, or the one attention module a recorded
    wrapper holds (T5's `T5LayerSelfAttention` holds `T5Attention`)."""
    inner = [child for child in module.children() if type(child).__name__.endswith("Attention")]
    return inner[0] if len(inner) == 1 else module


def _named_attentions(model: PreTrainedModel) -> list[nn.Module]:
    """The modules of `model` that its class's `_can_record_outputs["attentions"]` names, in order."""
    specs = _recorded_attentions(type(model)) or []
    return [module for name, module in model.named_modules() if any(_spec_matches(s, name, module) for s in specs)]


def self_attention_modules(model: PreTrainedModel) -> list[nn.Module]:
    """The host's self-attention modules in order (an encoder's before its decoder's), as named by the
    `_can_record_outputs["attentions"]` of the outermost models within `model` whose names match modules they hold:
    `model`, or its encoder and decoder when only those name theirs, or a composite model's language model (not its
    towers; LLaVA-OneVision names "LlamaAttention" whatever its language model is). Cross-attention is not among
    them."""
    attention_specs(type(model))  # refuses a model whose attention is written inside it
    text_config = model.config.get_text_config()
    owners: list[str] = []
    found: list[nn.Module] = []
    for name, module in model.named_modules():
        inside = any(name.startswith(f"{owner}.") or not owner for owner in owners)
        if not isinstance(module, PreTrainedModel) or inside:
            continue
        if name and text_config is not model.config and not isinstance(module.config, type(text_config)):
            continue  # a composite model's tower
        named = _named_attentions(module)
        if named:
            owners.append(name)
            found.extend(map(_attention_of, named))
    if not found:
        raise UnsupportedHostError(
            f"{type(model).__name__} does not name its attention modules (`_can_record_outputs['attentions']`), "
            "so its self-attention cannot be found"
        )
    return found


def attention_sizes(config: PreTrainedConfig, module: nn.Module) -> tuple[int, int]:
    """`(heads, head_dim)` of a self-attention module's output, before its output projection. An encoder-decoder's
    encoder and decoder may differ: there the module's own head count (`num_heads`, T5's `n_heads`) is used."""
    heads = config.num_attention_heads
    if getattr(config, "is_encoder_decoder", False):
        heads = getattr(module, "num_heads", None) or getattr(module, "n_heads", None) or heads
    head_dim = (
        getattr(config, "v_head_dim", None)
        or getattr(module, "head_dim", None)
        or getattr(module, "key_value_proj_dim", None)  # T5 and kin
        or getattr(config, "head_dim", None)
        or config.hidden_size // heads
    )
    return heads, head_dim


#: span scale at which local-only layers start: nearly the whole window at nearly `tau_max`, the closest a window
#: comes to the host's full attention (with `initial_span` they would start sharper and shorter than the host)
LOCAL_INITIAL_SPAN = 0.98


def add_hybrid_parameters(module: nn.Module, config: PreTrainedConfig, local_only: bool = False) -> None:
    """Give a host self-attention module the span predictor and the head-space mix, at their conversion values:
    `mix` `(H * D, 2 * H * D)` over `[local ; global]`, or `(H * D, H * D)` over the local branch of a local-only
    layer."""
    heads, head_dim = attention_sizes(config, module)
    width = heads * head_dim
    initial_span = LOCAL_INITIAL_SPAN if local_only else config.initial_span
    module.span_predictor = SpanPredictor(width, heads, config.span_per_head, initial_span)
    module.mix = nn.Linear(width if local_only else 2 * width, width, bias=False)
    module.local_only = local_only
    reset_hybrid_parameters(module)


@torch.no_grad()
def reset_hybrid_parameters(module: nn.Module) -> None:
    """Conversion-time values: `mix = [0 | I]` (the global branch exactly; `I` on a local-only layer), every span at
    `initial_span` (`LOCAL_INITIAL_SPAN` on a local-only layer).

    Uses `transformers.initialization`, so parameters loaded from a checkpoint are left as they are.
    """
    width = module.mix.out_features
    identity = torch.eye(width)
    if module.mix.in_features != width:
        identity = torch.cat([torch.zeros(width, width), identity], dim=1)
    init.copy_(module.mix.weight, identity.to(module.mix.weight.dtype))
    predictor = module.span_predictor
    init.zeros_(predictor.proj.weight)
    init.constant_(predictor.proj.bias, math.log(predictor.initial_span / (1.0 - predictor.initial_span)))


def hybrid_layers(model: nn.Module) -> list[nn.Module]:
    """The hybrid attention modules of a model, in order (works on PEFT-wrapped and remote-code models)."""
    return [
        m
        for m in model.modules()
        if isinstance(getattr(m, "span_predictor", None), nn.Module) and isinstance(getattr(m, "mix", None), nn.Module)
    ]


def _mean_span_scale(spans: list[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
    """`mean(z) / max_span` over real tokens and heads, averaged over hybrid layers."""
    per_layer = []
    for span_scale, mask in spans:  # (B, H, N), (B, N)
        if mask is None:
            per_layer.append(span_scale.mean())
        else:
            weights = mask[:, None, :].to(span_scale.dtype).expand_as(span_scale)
            per_layer.append((span_scale * weights).sum() / weights.sum().clamp_min(1))
    return torch.stack(per_layer).mean()


class HybridModelMixin:
    """Makes a transformers model class hybrid: new parameters on its self-attention, the `"hybrid"` attention
    function, the context state in its cache and the span loss in its outputs. The host's forward signature is kept.
    """

    _can_compile_fullgraph = (
        False  # the forward keeps Python state per call (context state, spans); the kernel compiles
    )

    def __init__(self, config, *args, **kwargs):
        settings = config.get_text_config()  # a composite model's hybrid settings live on its text config
        requested = settings._attn_implementation  # before transformers resolves it
        if requested not in (None, HYBRID_ATTENTION):
            check_attention_implementation(requested)
            settings.global_attn_implementation = requested
        settings._attn_implementation_internal = settings.global_attn_implementation
        try:
            super().__init__(config, *args, **kwargs)
        except ImportError as error:  # transformers' check: e.g. flash_attention_2 without the flash-attn package
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(
                f"`global_attn_implementation` {settings.global_attn_implementation!r} cannot be used here "
                f"({reason}); choose one of {', '.join(attention_implementations())} whose package is installed"
            ) from error
        self._use_hybrid_attention()
        settings = self.hybrid_settings
        modules = self_attention_modules(self)
        if settings.local_layers and getattr(config, "is_encoder_decoder", False):
            raise ValueError(
                "`local_layers` are for decoder-only and encoder models: an encoder-decoder's layers are all hybrid "
                f"(or those `hybrid_layers` lists), got local_layers={settings.local_layers}"
            )
        if getattr(config, "is_encoder_decoder", False):  # the decoder's self-attention is causal, whatever its class
            in_decoder = {id(module) for module in self.get_decoder().modules()}
            for module in modules:
                module.hybrid_causal = id(module) in in_decoder
        self._hybrid_decoder = any(map(_is_causal, modules))  # keeps a cache
        for index, module in enumerate(modules):
            made = hasattr(module, "mix")  # by a hybrid text model that a composite model built as its part
            if not made and (settings.is_hybrid_layer(index) or settings.is_local_layer(index)):
                add_hybrid_parameters(module, settings, local_only=settings.is_local_layer(index))
        encoder = self.get_encoder() if getattr(config, "is_encoder_decoder", False) else None
        if isinstance(encoder, PreTrainedModel) and encoder is not self and hybrid_layers(encoder):
            # Generation runs the encoder on its own (`get_encoder()(...)`): it hands its layers their state itself.
            # Its class stays the host's (transformers keys what a class records, e.g. attentions, on it).
            encoder.forward = types.MethodType(_hybrid_encoder_forward(type(encoder)), encoder)
            encoder._hybrid_decoder, encoder._hybrid_causal_lm, encoder._hybrid_part = False, False, True

    @property
    def hybrid_settings(self) -> PreTrainedConfig:
        """The config that holds the hybrid settings: the model's own, or a composite model's text config."""
        return self.config.get_text_config()

    def _use_hybrid_attention(self) -> None:
        """Keep the implementation transformers resolved (e.g. sdpa) for the global branch; dispatch to `"hybrid"`.
        Copies of the config that the host gave its parts (T5's encoder and decoder stacks, a composite model's
        language model) follow; other parts (a vision tower) keep their own implementation."""
        settings = self.hybrid_settings
        if settings._attn_implementation != HYBRID_ATTENTION:
            settings.global_attn_implementation = settings._attn_implementation
        settings._attn_implementation = HYBRID_ATTENTION
        for module in self.modules():
            config = getattr(module, "config", None)
            if config is not settings and isinstance(config, type(settings)):
                config.global_attn_implementation = settings.global_attn_implementation
                config._attn_implementation = HYBRID_ATTENTION

    def set_attn_implementation(self, attn_implementation, *args, **kwargs):
        """Choose the global branch's implementation (`"eager"`, `"sdpa"`, ...); the layers stay hybrid. A choice
        transformers refuses (e.g. flash-attn not installed) raises and leaves the model as it was."""
        if attn_implementation != HYBRID_ATTENTION:
            settings = self.hybrid_settings
            settings._attn_implementation_internal = settings.global_attn_implementation
            try:
                super().set_attn_implementation(attn_implementation, *args, **kwargs)
            finally:
                self._use_hybrid_attention()
        self._use_hybrid_attention()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, refusing a checkpoint that would leave any weight random.

        Raises `CheckpointMismatchError` (a `ValueError`) naming the tensors the checkpoint lacks or holds beyond the
        model (`load_report_problem`): only a host checkpoint (one saved from a host class) may lack the hybrid
        layers' new parameters, which then take their conversion-time values. As in transformers,
        `ignore_mismatched_sizes=True` initialises the tensors whose shapes differ from the config's (a new head's
        `num_labels`), and `output_loading_info=True` hands the load report to the caller instead of checking it.
        """
        report = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        if report:
            return model, info
        problem = load_report_problem(model, info, mismatched_allowed=bool(kwargs.get("ignore_mismatched_sizes")))
        if problem is not None:
            raise CheckpointMismatchError(f"the weights of {str(pretrained_model_name_or_path)!r} {problem}")
        return model

    def initialize_weights(self) -> None:
        """The host's initialisation, then the conversion-time values of the hybrid parameters.

        `from_pretrained` calls this after loading, for the weights missing from the checkpoint (parameters that
        were loaded keep their values), and then refuses the checkpoint unless only a host checkpoint's missing
        hybrid parameters were set (see `from_pretrained`).
        """
        super().initialize_weights()
        for module in hybrid_layers(self):
            reset_hybrid_parameters(module)


def is_new_parameter(name: str) -> bool:
    """Whether the parameter `name` belongs to a hybrid layer's own modules (`NEW_PARAMETER_MODULES`)."""
    return any(f".{module}." in f".{name}" for module in NEW_PARAMETER_MODULES)


def _listed(names: set[str], limit: int = 3) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _other_task_keys(model: PreTrainedModel, stored_class: str | None, keys: set[str], stored: bool) -> set[str]:
    """The keys of `keys` that a checkpoint saved from the family's class `stored_class` (another task) does not
    share with `model`: its own head's when `stored`, else the parts of `model` it does not have (a new head, a
    pooler). Compared without the base model's prefix. No architecture recorded: every key outside the base model;
    a class of another family, or one transformers does not know: none."""
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    host = getattr(transformers, stored_class, None) if stored_class else None
    if stored_class is not None and not (isinstance(host, type) and issubclass(host, PreTrainedModel)):
        return set()  # a class transformers does not know: nothing is allowed
    if host is None:
        return {key for key in keys if not key.startswith(prefix)} if model.base_model is not model else set()
    if not isinstance(model.config, host.config_class):
        return set()  # a class of another family: its checkpoint is not this model's
    with torch.device("meta"):
        other = host(copy.deepcopy(model.config))
    own = {key.removeprefix(prefix) for key in (other.state_dict() if not stored else model.state_dict())}
    return {key for key in keys if key.removeprefix(prefix) not in own}


def load_report_problem(model: PreTrainedModel, info: dict, mismatched_allowed: bool = False) -> str | None:
    """What the load report of `from_pretrained(..., output_loading_info=True)` shows would leave a weight of `model`
    random or a stored tensor unused, as the end of a sentence naming the tensors; None when nothing would.
    `mismatched_allowed`: tensors of another shape than the config's (initialised by `ignore_mismatched_sizes=True`)
    are not a problem.

    Two gaps are allowed: a checkpoint saved from another class of the family (its `config.architectures`) may lack
    the task head of `model` and hold its own; a host checkpoint (not saved from a `Hybrid*` class, and holding no
    hybrid parameter) lacks the hybrid layers' new parameters, which take their conversion-time values.
    """
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched and not mismatched_allowed:
        name, stored, expected = mismatched[0]
        return (
            f"do not match its config.json: {name} is {list(stored)} in the weights but {list(expected)} by the "
            "config (check vocab_size and the other sizes)"
        )
    missing, unexpected = set(info.get("missing_keys") or ()), set(info.get("unexpected_keys") or ())
    architectures = list(getattr(model.config, "architectures", None) or [])
    stored_class = architectures[0].removeprefix("Hybrid") if architectures else None
    if stored_class != type(model).__name__.removeprefix("Hybrid") and (missing or unexpected):  # another task
        missing -= _other_task_keys(model, stored_class, missing, stored=False)
        unexpected -= _other_task_keys(model, stored_class, unexpected, stored=True)
    new = {key for key in missing if is_new_parameter(key)}
    all_new = {name for name, _ in model.named_parameters() if is_new_parameter(name)}
    host_checkpoint = not any(name.startswith("Hybrid") for name in architectures) and new == all_new
    if host_checkpoint and not any(is_new_parameter(key) for key in unexpected):
        missing -= new
    if not missing and not unexpected:
        return None
    lacks = f"lack {len(missing)} tensor(s) of {type(model).__name__} ({_listed(missing)})" if missing else ""
    extra = f"hold {len(unexpected)} tensor(s) it does not have ({_listed(unexpected)})" if unexpected else ""
    return f"{lacks}{', and ' if lacks and extra else ''}{extra}; loading never leaves a weight random"


def _hybrid_forward(host_forward):
    """The host's `forward`, with its signature, handing the hybrid layers their state and adding the span loss."""
    signature = inspect.signature(host_forward)
    var_keyword = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
    if var_keyword is None:
        raise UnsupportedHostError(
            f"{host_forward.__qualname__} takes no `**kwargs`, so it cannot pass the hybrid state on to its attention"
        )

    # transformers 5.24 renamed the models' `past_key_values` argument to `cache` (and still takes the old name).
    cache_name = "cache" if "cache" in signature.parameters else "past_key_values"

    @functools.wraps(host_forward)
    def forward(self, *args, **kwargs):
        if STATE_KWARG in kwargs:  # called by an outer hybrid model, which adds the span loss
            return host_forward(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        extra = bound.arguments.setdefault(var_keyword, {})
        arguments = {**extra, **bound.arguments}  # named and keyword-only arguments alike
        legacy = cache_name == "cache" and arguments.get("past_key_values") is not None  # the host warns and renames
        mask, cache = arguments.get("attention_mask"), arguments.get("past_key_values" if legacy else cache_name)
        use_cache = arguments.get("use_cache")
        use_cache = getattr(self.config, "use_cache", False) if use_cache is None else use_cache
        checkpointing = self.training and any(getattr(m, "gradient_checkpointing", False) for m in self.modules())
        takes_cache = cache_name in signature.parameters
        if cache is None and use_cache and takes_cache and self._hybrid_decoder and not checkpointing:
            cache = bound.arguments[cache_name] = _new_cache(self.config, arguments)
        if isinstance(cache, EncoderDecoderCache):  # the hybrid layers are self-attention layers
            cache = cache.self_attention_cache
        check_cache(cache)
        settings = self.config.get_text_config()
        state = HybridForwardState(
            settings,
            key_mask=_padding_mask(mask, arguments),
            cache=cache,
            segment_ids=_packed_segments(arguments) if mask is None and cache is None else None,
        )
        if getattr(self.config, "is_encoder_decoder", False):  # the decoder's padding is its own
            state.decoder_key_mask = _padding_mask(arguments.get("decoder_attention_mask"), arguments)
        if settings.local_layers and settings.sink_tokens:
            state.sink_mask = _sink_mask(state, arguments)
        outputs = host_forward(*bound.args, **bound.kwargs, **{STATE_KWARG: state})
        state.finished = True
        if not state.layers_reached:
            raise UnsupportedHostError(
                f"{type(self).__name__}: no hybrid layer ran; the host's attention does not go through "
                "transformers' attention interface"
            )
        if self._hybrid_part:  # an encoder run alone: its outputs go to the decoder as they are
            return outputs
        coef = settings.span_loss_coef
        span_loss = coef * _mean_span_scale(state.spans).float() if coef else torch.zeros((), device=self.device)
        labels, num_items = arguments.get("labels"), arguments.get("num_items_in_batch")
        if labels is not None and num_items is not None:
            # The Trainer divides the summed LM loss by the token count of the whole (accumulated, gathered) batch;
            # weigh this batch's penalty by its share of those tokens, counted as the Trainer counts them.
            counted = labels[..., 1:] if self._hybrid_causal_lm else labels
            span_loss = span_loss * (counted.ne(-100).sum() / num_items)
        penalise = labels is not None and coef > 0
        if isinstance(outputs, tuple):  # return_dict=False: the loss, when there is one, comes first
            return (outputs[0] + span_loss,) + outputs[1:] if penalise else outputs
        if penalise and outputs.get("loss") is not None:
            outputs["loss"] = outputs["loss"] + span_loss
        outputs["span_loss"] = span_loss
        return outputs

    return forward


def _new_cache(config: PreTrainedConfig, arguments: dict) -> Cache:
    """The cache the host would make: a `DynamicCache`, inside an `EncoderDecoderCache` when its layers also attend
    to an encoder's output (cross-attention)."""
    cross = arguments.get("encoder_hidden_states") is not None or getattr(config, "add_cross_attention", False)
    if cross or getattr(config, "is_encoder_decoder", False):
        return EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))
    return DynamicCache(config=config)


def _sink_mask(state: HybridForwardState, arguments: dict) -> torch.Tensor | None:
    """The sinks of this forward's local-only layers (`sink_positions`), told to the cache layers that keep them
    before any layer updates its cache."""
    if state.segment_ids is not None:
        raise ValueError(
            "local-only layers with `sink_tokens` > 0 read the first tokens of a row as its sinks, so packed "
            "sequences (position_ids that restart within a row) would share one sequence's sinks: pad the sequences "
            "instead, or set `sink_tokens=0`"
        )
    shape = _input_shape(arguments)  # (B, N), or (B, choices, N): rows of N tokens
    tokens = arguments.get("input_ids") if arguments.get("input_ids") is not None else arguments["inputs_embeds"]
    past = state.cache.get_seq_length() if state.cache is not None else 0
    rows, length = shape[:-1].numel(), past + shape[-1]
    sink_mask = sink_positions(state.key_mask, state.config.sink_tokens, rows, length, tokens.device)
    for layer in getattr(state.cache, "layers", None) or []:
        if isinstance(layer, SinkWindowLayer):
            layer.sink_slots = sink_mask.shape[1]
    return sink_mask


def _input_shape(arguments: dict) -> torch.Size | None:
    """The shape of a forward's tokens: `input_ids`'s, or `inputs_embeds`'s without the hidden size."""
    if arguments.get("input_ids") is not None:
        return arguments["input_ids"].shape
    embeds = arguments.get("inputs_embeds")
    return embeds.shape[:-1] if embeds is not None else None


def _padding_mask(mask, arguments: dict) -> torch.Tensor | None:
    """The `(B, S)` padding mask of a forward: the 2-D `attention_mask`, or the `(B, choices, S)` one of a
    multiple-choice head, whose choices run as rows; None for no mask or a 4-D mask given as is."""
    if not isinstance(mask, torch.Tensor):
        return None
    if mask.dim() == 2:
        return mask
    if mask.dim() == 3 and _input_shape(arguments) == mask.shape:
        return mask.reshape(-1, mask.shape[-1])
    return None


def _packed_segments(arguments: dict) -> torch.Tensor | None:
    """Sequence indices `(B, N)` of packed rows from `position_ids` (transformers' rule: a new sequence wherever the
    position does not go up by one); None when every row holds one sequence."""
    position_ids, shape = arguments.get("position_ids"), _input_shape(arguments)
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2 or shape is None:
        return None
    return find_packed_sequence_indices(position_ids.expand(shape[0], -1))


def auto_class_name(host: type) -> str | None:
    """The Auto class that builds `host` (e.g. `"AutoModelForCausalLM"` for `LlamaForCausalLM`), if any."""
    for auto_name, table in AUTO_CLASSES.items():
        names = getattr(modeling_auto, table).values()
        if any(host.__name__ == (name if isinstance(name, str) else name[0]) for name in names):
            return auto_name
    return None


@functools.cache
def _model_class(host: type[PreTrainedModel]) -> type[PreTrainedModel]:
    config_class = _config_class(host.config_class)
    auto_name = auto_class_name(host)
    name = f"Hybrid{host.__name__}"
    attributes = {
        "config_class": config_class,
        "forward": _hybrid_forward(host.forward),
        "_hybrid_causal_lm": auto_name == "AutoModelForCausalLM",
        "_hybrid_part": False,
        "__doc__": f"`{host.__name__}` with hybrid attention layers; config: `{config_class.__name__}`.",
        "__module__": __name__,
        "__qualname__": name,
    }
    # transformers tells generative classes by `GenerationMixin` among their direct bases: keep the host's.
    bases = (HybridModelMixin, host) + ((GenerationMixin,) if GenerationMixin in host.__bases__ else ())
    cls = type(name, bases, attributes)
    if auto_name is not None:
        cls.register_for_auto_class(auto_name)  # the `auto_map` a saved checkpoint gets
    return cls


@functools.cache
def _hybrid_encoder_forward(encoder: type[PreTrainedModel]):
    """The forward of an encoder-decoder's encoder, for when its hybrid layers run without the outer model's."""
    return _hybrid_forward(encoder.forward)


def hybrid_model_class(host: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """`Hybrid<Host>`: the host model class with hybrid attention, its config class `Hybrid<HostConfig>`. Made on
    first use, and registered then, with the rest of its family, with the Auto classes (`register_hybrid_family`)."""
    cls = _model_class(host)
    register_hybrid_family(cls.config_class)
    return cls


_REGISTERED_FAMILIES: set[type] = set()


def register_hybrid_family(config_class: type[PreTrainedConfig]) -> None:
    """Register a hybrid config class with `AutoConfig`, and the hybrid class of each host class its family has in
    `AUTO_CLASSES` with that Auto class (task heads build their base model with `AutoModel.from_config`), in this
    process. A checkpoint's own code (a `transformers_modules` class) does not replace a type registered before."""
    if config_class in _REGISTERED_FAMILIES:
        return
    _REGISTERED_FAMILIES.add(config_class)
    text_config = text_config_class(config_class)
    if text_config is not None and text_config.model_type.startswith(HYBRID_PREFIX):
        register_hybrid_family(text_config)  # a composite model builds its text model with `AutoModel.from_config`
    shipped = config_class.__module__.startswith("transformers_modules")
    if not (shipped and is_registered(config_class.model_type)):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    host_type = config_class.model_type.removeprefix(HYBRID_PREFIX)
    for auto_name, table in AUTO_CLASSES.items():
        host_name = getattr(modeling_auto, table).get(host_type)
        host = getattr(transformers, host_name, None) if isinstance(host_name, str) else None
        if isinstance(host, type) and issubclass(host, PreTrainedModel) and host.config_class in config_class.__mro__:
            getattr(transformers, auto_name).register(config_class, _model_class(host), exist_ok=True)


def __getattr__(name: str):
    """`HybridLlamaForCausalLM` and the like, made on demand (this is how a checkpoint's `auto_map` finds them)."""
    host = host_class(name, PreTrainedModel)
    if host is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return hybrid_model_class(host)
