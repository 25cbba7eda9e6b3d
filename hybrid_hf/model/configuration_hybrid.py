"""Configs of hybrid models: a host architecture's config plus the hybrid attention settings.

`HybridLlamaConfig` is `LlamaConfig` with `model_type="hybrid_llama"` and the fields of `HybridSettings`; the class for
any host config class is made on demand (`hybrid_config_class(LlamaConfig)`, or the name `HybridLlamaConfig` looked
up in this module). `config.json` holds the host's fields and the hybrid ones side by side.
This file travels with saved checkpoints (`trust_remote_code`).
"""

from __future__ import annotations

import functools

import transformers
from transformers import PreTrainedConfig
from transformers.models import auto

from .hybrid_attention import TAU_LIMIT, validate_span_settings

#: prefix of a hybrid config's `model_type` (`"hybrid_llama"`)
HYBRID_PREFIX = "hybrid_"
#: the `attn_implementation` name of hybrid attention
HYBRID_ATTENTION = "hybrid"
#: the largest span penalty weight: more than 1000 outweighs the LM loss (a few units) by orders of magnitude, and
#: a weight such as 3.4e38 (a finite float32) makes the gradients infinite
SPAN_LOSS_COEF_LIMIT = 1000.0
#: setting -> its largest value, where training stays finite in float32 and bfloat16 (the gradients at the bounds
#: are tested)
UPPER_BOUNDS = {"tau_max": TAU_LIMIT, "span_loss_coef": SPAN_LOSS_COEF_LIMIT}


class HybridSettings(PreTrainedConfig):
    """The hybrid attention settings, validated on construction.

    Args:
        max_span: longest local span, in tokens; the local window reads at most `max_span + ramp` keys per side.
        ramp: width of the soft edge of the span mask, in tokens.
        tau_min, tau_max: temperature of the local softmax at the shortest and the longest span.
        span_per_head: one span per token and head (`True`) or one per token shared by its heads.
        hybrid_layers: indices of the self-attention layers made hybrid; `None` for all. An encoder-decoder counts its
            encoder's layers first, then its decoder's.
        span_loss_coef: weight of the span penalty `mean(span) / max_span` added to the loss when labels are given.
        initial_span: span at initialisation, as a fraction of `max_span`, in (0, 1).
        global_attn_implementation: the attention implementation of the global branch (`"sdpa"`, `"eager"`,
            `"flash_attention_2"`, ...); `None` for transformers' default. `from_pretrained(attn_implementation=...)`
            and `set_attn_implementation(...)` set it; the model itself dispatches to `"hybrid"`.
        local_layers: indices of the self-attention layers made *local-only*: no global branch, the local branch
            alone (with `sink_tokens` sinks), a KV cache of `sink_tokens + max_span + ramp - 1 + max_crop` positions.
            Listed layers are local-only whatever `hybrid_layers` says; `None` or `[]` for none.
        sink_tokens: the first real tokens of a sequence that every query of a local-only layer reads with full
            weight, whatever its span (attention sinks).
        max_crop: the most tokens `Cache.crop` may remove at once (assisted and prompt-lookup decoding remove a few):
            a layer's decoding state keeps that many positions of history beyond what the next token needs.
        layer_scores: per-layer scores of the calibration that chose `local_layers` (lower: the layer loses less by
            going local-only), or `None`; a record, not a setting.
    """

    max_span: int = 128
    ramp: int = 32
    tau_min: float = 0.5
    tau_max: float = 1.0
    span_per_head: bool = True
    hybrid_layers: list[int] | None = None
    span_loss_coef: float = 0.0
    initial_span: float = 0.5
    global_attn_implementation: str | None = None
    local_layers: list[int] | None = None
    sink_tokens: int = 4
    max_crop: int = 64
    layer_scores: list[float] | None = None

    def __post_init__(self, **kwargs):
        validate_span_settings(self.max_span, self.ramp, self.tau_min, self.tau_max)
        if not isinstance(self.span_per_head, bool):
            raise ValueError(f"`span_per_head` must be True or False, got {self.span_per_head!r}")
        coef, initial = self.span_loss_coef, self.initial_span
        if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not 0 <= coef <= SPAN_LOSS_COEF_LIMIT:
            raise ValueError(
                f"`span_loss_coef` must be a number in [0, {SPAN_LOSS_COEF_LIMIT:g}] (beyond, training gives "
                f"infinite gradients), got {coef!r}"
            )
        if isinstance(initial, bool) or not isinstance(initial, (int, float)) or not 0 < initial < 1:
            raise ValueError(f"`initial_span` must be in (0, 1) (a fraction of max_span), got {initial!r}")
        for name in ("hybrid_layers", "local_layers"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), (list, tuple)):
                raise ValueError(f"`{name}` must be a list of layer indices or None, got {getattr(self, name)!r}")
        for name in ("sink_tokens", "max_crop"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be an integer >= 0 (a number of tokens), got {value!r}")
        check_attention_implementation(self.global_attn_implementation)
        kwargs.pop("model_type", None)  # a host config.json loaded into this class keeps the hybrid model_type
        super().__post_init__(**kwargs)
        positions = getattr(self, "max_position_embeddings", None)
        for name in ("max_span", "ramp"):  # a window beyond the model's positions is never used, only allocated
            if isinstance(positions, int) and positions > 0 and getattr(self, name) > positions:
                value = getattr(self, name)
                raise ValueError(f"`{name}` must be at most the model's number of positions ({positions}): {value}")
        layers = getattr(self, "num_hidden_layers", None)
        if getattr(self, "is_encoder_decoder", False) and isinstance(layers, int):  # the decoder's layers follow
            layers += getattr(self, "decoder_layers", None) or getattr(self, "num_decoder_layers", None) or 0
        for name in ("hybrid_layers", "local_layers"):
            indices = getattr(self, name)
            if indices is None:
                continue
            bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < (layers or 0)]
            if bad or len(set(indices)) != len(indices):
                raise ValueError(f"`{name}` must be distinct layer indices in [0, {layers}), got {indices!r}")
            setattr(self, name, sorted(indices))
        if self.hybrid_layers is not None and not self.hybrid_layers and not self.local_layers:
            raise ValueError(
                "`hybrid_layers` is an empty list and there are no `local_layers`: no layer would be hybrid; list at "
                "least one layer index, or give None for all layers"
            )

    @property
    def _attn_implementation(self):
        return self._attn_implementation_internal

    @_attn_implementation.setter
    def _attn_implementation(self, value) -> None:
        """Once a hybrid model dispatches to `"hybrid"`, a write of another implementation
        (`model.config._attn_implementation = "eager"`, as older code and transformers' tests do) chooses the global
        branch's: the model stays hybrid."""
        active = getattr(self, "_attn_implementation_internal", None) == HYBRID_ATTENTION
        if active and isinstance(value, str) and value != HYBRID_ATTENTION:
            check_attention_implementation(value)
            self.global_attn_implementation = value
            return
        PreTrainedConfig._attn_implementation.fset(self, value)

    @property
    def output_attentions(self) -> bool:
        return self._output_attentions

    @output_attentions.setter
    def output_attentions(self, value: bool) -> None:
        """transformers' rule (attention weights come from eager attention), applied to the global branch, whose
        weights a hybrid model returns."""
        if self._attn_implementation != HYBRID_ATTENTION:
            PreTrainedConfig.output_attentions.fset(self, value)
            return
        if value and self.global_attn_implementation != "eager":
            raise ValueError(
                "The `output_attentions` attribute needs the global branch's attention to be 'eager', got "
                f"{self.global_attn_implementation!r}; call `model.set_attn_implementation('eager')` first"
            )
        self._output_attentions = value

    def is_local_layer(self, layer_idx: int) -> bool:
        """Whether self-attention layer `layer_idx` is local-only (no global branch)."""
        return layer_idx in (self.local_layers or ())

    def is_hybrid_layer(self, layer_idx: int) -> bool:
        """Whether self-attention layer `layer_idx` is hybrid (global and local branches, mixed)."""
        return not self.is_local_layer(layer_idx) and (self.hybrid_layers is None or layer_idx in self.hybrid_layers)


@functools.cache
def _config_class(host: type[PreTrainedConfig]) -> type[PreTrainedConfig]:
    name = f"Hybrid{host.__name__}"
    doc = f"`{host.__name__}` with hybrid attention: the host's fields plus those of `HybridSettings`."
    attributes = {
        "model_type": HYBRID_PREFIX + host.model_type,
        "__doc__": doc,
        "__module__": __name__,
        "__qualname__": name,
    }
    if "text_config" in (getattr(host, "sub_configs", None) or {}):  # a composite model: settings on its text config
        text_config = text_config_class(host)
        if text_config is not None:  # else the text config's class follows its `model_type` ("hybrid_llama")
            # transformers builds sub-configs from `sub_configs_defaults` where it has them (before: `sub_configs`)
            table = "sub_configs_defaults" if getattr(host, "sub_configs_defaults", None) else "sub_configs"
            attributes[table] = {**getattr(host, table), "text_config": _config_class(text_config)}
        attributes["__doc__"] = f"`{host.__name__}` whose text model has hybrid attention (see its `text_config`)."
        cls = type(name, (host,), attributes)
    else:  # the host comes first so its field defaults win; `HybridSettings` adds the hybrid fields and validation
        cls = type(name, (host, HybridSettings), attributes)
    cls.register_for_auto_class()
    return cls


def text_config_class(host: type[PreTrainedConfig]) -> type[PreTrainedConfig] | None:
    """The config class of a composite (multimodal) config's text model, when its `sub_configs` name one."""
    text_config = (getattr(host, "sub_configs", None) or {}).get("text_config")
    return text_config if isinstance(text_config, type) and issubclass(text_config, PreTrainedConfig) else None


def hybrid_config_class(host: type[PreTrainedConfig]) -> type[PreTrainedConfig]:
    """`Hybrid<HostConfig>`: the host config class plus the fields of `HybridSettings`; `model_type` is
    `hybrid_<host>`. Made on first use, and registered then with `AutoConfig`, and the hybrid classes of its family
    with the Auto classes (`modeling_hybrid.register_hybrid_family`)."""
    from .modeling_hybrid import register_hybrid_family  # it imports this module

    cls = _config_class(host)
    register_hybrid_family(cls)
    return cls


def attention_implementations() -> list[str]:
    """The names `global_attn_implementation` accepts: `"eager"` and transformers' registered attention functions
    (a hub kernel, `"org/repo"`, is also accepted: transformers loads it)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ["eager", *(name for name in ALL_ATTENTION_FUNCTIONS.valid_keys() if name != HYBRID_ATTENTION)]


def check_attention_implementation(name: str | None) -> None:
    """`ValueError` naming `global_attn_implementation` unless `name` is None or an implementation transformers
    knows (whether its package is installed is checked when a model is built)."""
    if name is None or (isinstance(name, str) and "/" in name):
        return
    known = attention_implementations()
    if name not in known:
        raise ValueError(f"`global_attn_implementation` must be one of {', '.join(known)}, got {name!r}")


def host_class(name: str, base: type) -> type | None:
    """The transformers class `X` that the name `HybridX` stands for, when `X` is a host subclass of `base`."""
    host = getattr(transformers, name.removeprefix("Hybrid"), None) if name.startswith("Hybrid") else None
    if isinstance(host, type) and issubclass(host, base) and not host.__name__.startswith("Hybrid"):
        return host
    return None


def register_model_type(model_type: str) -> None:
    """Register the hybrid classes of a host or hybrid `model_type` (`"llama"`, `"hybrid_llama"`) for every Auto
    class that builds the host, so that `AutoModelFor*.from_pretrained` loads a saved hybrid folder without remote
    code. `ValueError` if transformers does not know the type. (Once this module is imported, `AutoConfig` does this
    for every `hybrid_*` type it is asked for; see `_HybridModelTypes`.)"""
    host_type = model_type.removeprefix(HYBRID_PREFIX)
    if host_type not in auto.configuration_auto.CONFIG_MAPPING_NAMES:
        raise ValueError(f"model_type {model_type!r} is not a model type of the installed transformers")
    hybrid_config_class(auto.CONFIG_MAPPING[host_type])


def _is_hybrid_type(model_type) -> bool:
    """Whether `model_type` is `hybrid_<a model type of the installed transformers>`."""
    return (
        isinstance(model_type, str)
        and model_type.startswith(HYBRID_PREFIX)
        and model_type.removeprefix(HYBRID_PREFIX) in auto.configuration_auto.CONFIG_MAPPING_NAMES
    )


class _HybridModelTypes(dict):
    """The model types registered with `AutoConfig` (transformers keeps them in `CONFIG_MAPPING._extra_content`),
    answering for every `hybrid_<host>` type too: its classes are made and registered on first lookup. So a saved
    hybrid folder loads with the Auto classes once this module is imported (by hybrid_hf, or as a checkpoint's own
    code), and a composite model's `text_config` of type `hybrid_<host>` resolves."""

    def __contains__(self, model_type) -> bool:
        return super().__contains__(model_type) or _is_hybrid_type(model_type)

    def __missing__(self, model_type):
        if not _is_hybrid_type(model_type):
            raise KeyError(model_type)
        register_model_type(model_type)
        if not super().__contains__(model_type):  # a checkpoint's own code that left a registered type in place
            raise KeyError(model_type)
        return super().__getitem__(model_type)


def _registered_types() -> dict:
    """transformers' table of the model types registered with `AutoConfig` (`CONFIG_MAPPING._extra_content`)."""
    return getattr(auto.CONFIG_MAPPING, "_extra_content", None)


def is_registered(model_type: str) -> bool:
    """Whether `model_type` is registered with `AutoConfig` (not merely answerable by `_HybridModelTypes`)."""
    registered = _registered_types()
    return isinstance(registered, dict) and dict.__contains__(registered, model_type)


def _answer_for_hybrid_types() -> None:
    registered = _registered_types()
    # by name: hybrid_hf's own module or a checkpoint's copy of it may have answered first; the first one stays
    if isinstance(registered, dict) and type(registered).__name__ != _HybridModelTypes.__name__:
        auto.CONFIG_MAPPING._extra_content = _HybridModelTypes(registered)


_answer_for_hybrid_types()


def __getattr__(name: str):
    """`HybridLlamaConfig` and the like, made on demand (this is how a checkpoint's `auto_map` finds them)."""
    host = host_class(name, PreTrainedConfig)
    if host is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return hybrid_config_class(host)
