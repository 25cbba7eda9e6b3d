"""Hybrid models: a host architecture with its self-attention layers swapped for `HybridAttention`.

One hybrid layer (DESIGN section 1):

    g = o_proj(Attn(q, k, v))                       global branch: the host's own attention, weights and cache
    c = mean of g over the positions each token sees  (prefix for decoders, all real tokens for encoders)
    s = sigmoid(W_s c + b_s)                         span scale per token (and head)
    l = o_proj_local(LocalAttn(q_l, k_l, v_l; span = s * max_span, temperature = tau(s)))
    y = W_mix [l ; g]                                W_mix = [0 | I] at conversion: the host's output exactly

`HybridLlamaForCausalLM` is `LlamaForCausalLM` with this layer, and so on for every row of `ARCHITECTURES`.
Host weights keep their names (the hybrid layer adopts the host attention's children); the new parameters sit in
`span_predictor`, `mix` and, with separate local projections, `local`.
This file travels with saved checkpoints (`trust_remote_code`).
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
from dataclasses import dataclass

import torch
import transformers
from torch import nn
from transformers import initialization as init
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

from .architectures import ARCHITECTURES, HostArchitecture, get_architecture
from .configuration_hybrid import HYBRID_CONFIG_CLASSES
from .hybrid_attention import (
    SpanPredictor,
    adaptive_local_attention,
    causal_prefix_mean,
    masked_mean,
    span_temperature,
)

SPAN_LIST_KWARG = "hybrid_spans"
KEY_MASK_KWARG = "hybrid_key_mask"


@dataclass
class HybridLayerState:
    """What a decoder's hybrid layer carries across generation steps, beside the host's KV cache.

    `context_sum` `(B, d)` and `context_count` `(B,)` give the prefix mean of the global output; `local_key` and
    `local_value` `(B, H_kv, <= window, D)` are the separate local branch's recent keys (None when shared).
    """

    context_sum: torch.Tensor
    context_count: torch.Tensor
    seen: int
    local_key: torch.Tensor | None = None
    local_value: torch.Tensor | None = None

    def reorder(self, beam_idx: torch.LongTensor) -> None:
        for name in ("context_sum", "context_count", "local_key", "local_value"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.index_select(0, beam_idx.to(tensor.device)))


def _layer_states(cache) -> dict[int, HybridLayerState]:
    """The hybrid states kept on a transformers `Cache` object (created on first use)."""
    if not hasattr(cache, "hybrid_states"):
        cache.hybrid_states = {}
    return cache.hybrid_states


class HybridAttention(nn.Module):
    """The hybrid layer. It adopts the host attention module's children under their own names."""

    def __init__(self, host: nn.Module, config, arch: HostArchitecture, layer_idx: int):
        super().__init__()
        for name, child in host.named_children():
            self.add_module(name, child)
        core = host.get_submodule(arch.core) if arch.core else host
        self.arch = arch
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.scaling = core.scaling
        self.sliding_window = getattr(core, "sliding_window", None)
        self.is_causal = arch.causal
        self.attention_dropout = float(getattr(config, arch.dropout_config, 0.0) or 0.0)

        self.span_predictor = SpanPredictor(
            config.hidden_size, self.num_heads, config.span_per_head, config.initial_span
        )
        self.mix = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        if config.local_projections == "separate":
            self.local = nn.Module()
            for path in arch.projections():
                _set_submodule(self.local, path, copy.deepcopy(self.get_submodule(path)))
        self.reset_hybrid_parameters()

    @torch.no_grad()
    def reset_hybrid_parameters(self) -> None:
        """Conversion-time values: `mix = [0 | I]`, span at `initial_span`, local projections copied from the host.

        Uses `transformers.initialization`, so parameters loaded from a checkpoint are left as they are.
        """
        hidden = self.config.hidden_size
        identity = torch.cat([torch.zeros(hidden, hidden), torch.eye(hidden)], dim=1)
        init.copy_(self.mix.weight, identity.to(self.mix.weight.dtype))
        predictor = self.span_predictor.proj
        init.zeros_(predictor.weight)
        init.constant_(predictor.bias, math.log(self.config.initial_span / (1.0 - self.config.initial_span)))
        if hasattr(self, "local"):
            for path in self.arch.projections():
                for name, param in self.local.get_submodule(path).named_parameters():
                    init.copy_(param, self.get_submodule(path).get_parameter(name))

    def _project(self, owner: nn.Module, hidden_states: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, ...]:
        """q, k, v `(B, H, N, D)` from `owner`'s projections (the host's, or the separate local copies)."""
        arch = self.arch
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        if arch.fused_qkv:
            q_size, kv_size = self.num_heads * self.head_dim, self.num_key_value_heads * self.head_dim
            fused = owner.get_submodule(arch.fused_qkv)(hidden_states)
            query, key, value = fused.split([q_size, kv_size, kv_size], dim=-1)
        else:
            query = owner.get_submodule(arch.query)(hidden_states)
            key = owner.get_submodule(arch.key)(hidden_states)
            value = owner.get_submodule(arch.value)(hidden_states)
        query, key, value = query.view(hidden_shape), key.view(hidden_shape), value.view(hidden_shape)  # (B, N, H, D)
        if arch.query_norm:
            query = owner.get_submodule(arch.query_norm)(query)
            key = owner.get_submodule(arch.key_norm)(key)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, H, N, D)
        if position_embeddings is not None:
            cos, sin = position_embeddings
            query, key = apply_rotary_pos_emb(query, key, cos, sin)
        return query, key, value

    def _context(self, global_output: torch.Tensor, query_mask: torch.Tensor | None, state: HybridLayerState | None):
        """Context the span is predicted from: `(B, N, d)` prefix means (decoder) or `(B, 1, d)` (encoder)."""
        if not self.is_causal:
            return masked_mean(global_output, query_mask), None
        past = (state.context_sum, state.context_count) if state is not None else (None, None)
        context, total, count = causal_prefix_mean(global_output, query_mask, *past)
        return context, (total, count)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache=None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cache = cache if cache is not None else past_key_values
        key_mask = kwargs.pop(KEY_MASK_KWARG, None)  # (B, S) 1 for real tokens, set by the model
        spans = kwargs.pop(SPAN_LIST_KWARG, None)
        for unused in ("use_cache", "output_attentions", "encoder_hidden_states", "encoder_attention_mask"):
            kwargs.pop(unused, None)
        batch, length = hidden_states.shape[:2]
        config = self.config

        # Global branch: the host's attention, kernels and cache.
        query, key, value = self._project(self, hidden_states, position_embeddings)  # (B, H, N, D)
        past_length = 0
        if cache is not None:
            past_length = cache.get_seq_length(self.layer_idx) if self.layer_idx < len(cache.layers) else 0
            key, value = cache.update(key, value, self.layer_idx)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            config._attn_implementation, eager_attention_forward
        )
        if self.sliding_window is not None:
            kwargs["sliding_window"] = self.sliding_window
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        global_output = self.get_submodule(self.arch.output)(attn_output.reshape(batch, length, -1))  # (B, N, d)

        # Span and temperature from the context.
        key_mask = key_mask[:, -key.shape[2] :] if key_mask is not None else None
        query_mask = key_mask[:, -length:] if key_mask is not None else None
        states = _layer_states(cache) if cache is not None and self.is_causal else None
        state = states.get(self.layer_idx) if states is not None and past_length > 0 else None
        if states is not None and past_length > 0 and (state is None or state.seen != past_length):
            raise RuntimeError(
                f"hybrid layer {self.layer_idx}: the cache holds {past_length} tokens but the hybrid context state "
                f"{'is missing' if state is None else f'has seen {state.seen}'}; a cache cropped or filled outside "
                "this model's forward cannot be continued"
            )
        context, totals = self._context(global_output, query_mask, state)
        span_scale = self.span_predictor(context)  # (B, H, N) or (B, 1, N); (B, *, 1) for encoders
        if not self.is_causal:
            span_scale = span_scale.expand(-1, -1, length)
        if spans is not None:
            spans.append((span_scale, query_mask))
        span = span_scale * config.max_span
        temperature = span_temperature(span_scale, config.tau_min, config.tau_max)

        # Local branch: shared projections reuse q/k/v (and the cache); separate ones keep a short cache of their own.
        owner = self.local if hasattr(self, "local") else self
        local_key_mask = key_mask
        if owner is self:
            local_query, local_key, local_value = query, key, value
        else:
            local_query, local_key, local_value = self._project(owner, hidden_states, position_embeddings)
            if state is not None:
                local_key = torch.cat([state.local_key, local_key], dim=2)
                local_value = torch.cat([state.local_value, local_value], dim=2)
            local_key_mask = key_mask[:, -local_key.shape[2] :] if key_mask is not None else None
        local_output = adaptive_local_attention(
            local_query,
            local_key,
            local_value,
            span,
            temperature,
            max_span=config.max_span,
            ramp=config.ramp,
            causal=self.is_causal,
            scaling=self.scaling,
            key_mask=local_key_mask,
        )  # (B, H, N, D)
        local_output = owner.get_submodule(self.arch.output)(local_output.transpose(1, 2).reshape(batch, length, -1))

        if states is not None:
            window = config.max_span + config.ramp - 1
            keep = owner is not self
            states[self.layer_idx] = HybridLayerState(
                context_sum=totals[0],
                context_count=totals[1],
                seen=past_length + length,
                local_key=local_key[:, :, -window:] if keep else None,
                local_value=local_value[:, :, -window:] if keep else None,
            )

        output = self.mix(torch.cat([local_output, global_output], dim=-1))  # (B, N, d)
        if self.arch.output_dropout:
            output = self.get_submodule(self.arch.output_dropout)(output)
        if self.arch.residual_norm:
            output = self.get_submodule(self.arch.residual_norm)(output + hidden_states)
        return output, attn_weights


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    *parents, name = path.split(".")
    for parent in parents:
        if not hasattr(root, parent):
            root.add_module(parent, nn.Module())
        root = getattr(root, parent)
    root.add_module(name, module)


def hybrid_layers(model: nn.Module) -> list[HybridAttention]:
    """The hybrid attention layers of a model, in order (works on PEFT-wrapped and remote-code models)."""
    return [module for module in model.modules() if type(module).__name__ == "HybridAttention"]


@functools.lru_cache(maxsize=None)
def _forward_signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def _key_mask_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of the base model: hands its 2-d padding mask to the hybrid layers."""
    if KEY_MASK_KWARG not in kwargs:
        bound = _forward_signature(type(module)).bind_partial(module, *args, **kwargs).arguments
        mask = bound.get("attention_mask")
        kwargs[KEY_MASK_KWARG] = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    return args, kwargs


class HybridModelMixin:
    """Makes a transformers model class hybrid: swaps attention after the host builds, adds the span loss."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        arch = get_architecture(config.model_type)
        blocks = self.base_model.get_submodule(arch.layers)
        for layer_idx, block in enumerate(blocks):
            if config.is_hybrid_layer(layer_idx):
                host = getattr(block, arch.attention)
                setattr(block, arch.attention, HybridAttention(host, config, arch, layer_idx))
        self.base_model.register_forward_pre_hook(_key_mask_hook, with_kwargs=True)

    def initialize_weights(self) -> None:
        """The host's initialisation, then the conversion-time values of the hybrid parameters.

        `from_pretrained` calls this after loading, for the weights missing from the checkpoint; parameters that
        were loaded keep their values. (Overriding `_init_weights` would not reach layers inside a nested base model,
        which transformers initialises with that model's own `_init_weights`.)
        """
        super().initialize_weights()
        for layer in hybrid_layers(self):
            layer.reset_hybrid_parameters()

    def forward(self, *args, **kwargs):
        if SPAN_LIST_KWARG in kwargs:  # called by an outer hybrid model, which adds the span loss
            return super().forward(*args, **kwargs)
        spans: list = []
        outputs = super().forward(*args, **{SPAN_LIST_KWARG: spans}, **kwargs)
        if not spans:
            return outputs
        span_loss = self.config.span_loss_coef * _mean_span_scale(spans)
        labels, num_items = kwargs.get("labels"), kwargs.get("num_items_in_batch")
        if labels is not None and num_items is not None:
            # The Trainer divides the summed LM loss by the token count of the whole (accumulated, gathered) batch;
            # weigh this batch's penalty by its share of those tokens, counted as the Trainer counts them.
            counted = labels[..., 1:] if get_architecture(self.config.model_type).causal else labels
            span_loss = span_loss * counted.ne(-100).sum() / num_items
        penalise = labels is not None and self.config.span_loss_coef > 0
        if isinstance(outputs, tuple):  # return_dict=False: the loss, when there is one, comes first
            return (outputs[0] + span_loss,) + outputs[1:] if penalise else outputs
        if penalise and outputs.get("loss") is not None:
            outputs["loss"] = outputs["loss"] + span_loss
        outputs["span_loss"] = span_loss
        return outputs

    def _reorder_cache(self, cache, beam_idx: torch.LongTensor):
        """Beam search: reorders the KV cache and the hybrid context states with it."""
        cache.reorder_cache(beam_idx)
        for state in _layer_states(cache).values():
            state.reorder(beam_idx)
        return cache


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


def _hybrid_model_class(host_type: str, task: str) -> type:
    arch = ARCHITECTURES[host_type]
    host = getattr(transformers, arch.model_classes[task])
    config_class = HYBRID_CONFIG_CLASSES[host_type]
    name = f"Hybrid{host.__name__}"
    doc = f"`{host.__name__}` with hybrid attention layers (see `HybridAttention`); config: `{config_class.__name__}`."
    return type(name, (HybridModelMixin, host), {"config_class": config_class, "__doc__": doc, "__module__": __name__})


#: host model_type -> task -> hybrid model class
HYBRID_MODEL_CLASSES: dict[str, dict[str, type]] = {
    host_type: {task: _hybrid_model_class(host_type, task) for task in arch.model_classes}
    for host_type, arch in ARCHITECTURES.items()
}
globals().update({cls.__name__: cls for classes in HYBRID_MODEL_CLASSES.values() for cls in classes.values()})

AUTO_CLASSES = {
    "base": "AutoModel",
    "causal_lm": "AutoModelForCausalLM",
    "masked_lm": "AutoModelForMaskedLM",
    "sequence_classification": "AutoModelForSequenceClassification",
}
for _host_type, _classes in HYBRID_MODEL_CLASSES.items():
    HYBRID_CONFIG_CLASSES[_host_type].register_for_auto_class()
    for _task, _cls in _classes.items():
        _cls.register_for_auto_class(AUTO_CLASSES[_task])
