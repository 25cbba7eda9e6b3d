"""Configs of hybrid models: the host architecture's config plus the hybrid attention settings.

`HybridLlamaConfig` is `LlamaConfig` with `model_type="hybrid_llama"` and the fields of `HybridSettings`, and so on
for every row of `architectures.ARCHITECTURES`. `config.json` holds the host's fields and the hybrid ones side by side.
This file travels with saved checkpoints (`trust_remote_code`).
"""

from __future__ import annotations

import transformers
from transformers import PreTrainedConfig

from .architectures import ARCHITECTURES, HYBRID_PREFIX
from .hybrid_attention import validate_span_settings

LOCAL_PROJECTIONS = ("shared", "separate")


class HybridSettings(PreTrainedConfig):
    """The hybrid attention settings, validated on construction.

    Args:
        max_span: longest local span, in tokens; the local window reads at most `max_span + ramp` keys per side.
        ramp: width of the soft edge of the span mask, in tokens.
        tau_min, tau_max: temperature of the local softmax at the shortest and the longest span.
        span_per_head: one span per token and head (`True`) or one per token shared by its heads.
        local_projections: `"shared"` reuses the global branch's q/k/v/o (and its KV cache); `"separate"` gives the
            local branch its own copies.
        hybrid_layers: indices of the layers made hybrid; `None` for all.
        span_loss_coef: weight of the span penalty `mean(span) / max_span` added to the loss when labels are given.
        initial_span: span at initialisation, as a fraction of `max_span`, in (0, 1).
    """

    max_span: int = 128
    ramp: int = 32
    tau_min: float = 0.5
    tau_max: float = 1.0
    span_per_head: bool = True
    local_projections: str = "shared"
    hybrid_layers: list[int] | None = None
    span_loss_coef: float = 0.0
    initial_span: float = 0.5

    def __post_init__(self, **kwargs):
        validate_span_settings(self.max_span, self.ramp, self.tau_min, self.tau_max)
        if self.local_projections not in LOCAL_PROJECTIONS:
            raise ValueError(f"`local_projections` must be one of {LOCAL_PROJECTIONS}, got {self.local_projections!r}")
        if not isinstance(self.span_per_head, bool):
            raise ValueError(f"`span_per_head` must be True or False, got {self.span_per_head!r}")
        coef, initial = self.span_loss_coef, self.initial_span
        if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not 0 <= coef < float("inf"):
            raise ValueError(f"`span_loss_coef` must be a finite number >= 0, got {coef!r}")
        if isinstance(initial, bool) or not isinstance(initial, (int, float)) or not 0 < initial < 1:
            raise ValueError(f"`initial_span` must be in (0, 1) (a fraction of max_span), got {initial!r}")
        if self.hybrid_layers is not None and not isinstance(self.hybrid_layers, (list, tuple)):
            raise ValueError(f"`hybrid_layers` must be a list of layer indices or None, got {self.hybrid_layers!r}")
        kwargs.pop("model_type", None)  # a host config.json loaded into this class keeps the hybrid model_type
        super().__post_init__(**kwargs)
        positions = getattr(self, "max_position_embeddings", None)
        for name in ("max_span", "ramp"):  # a window beyond the model's positions is never used, only allocated
            if isinstance(positions, int) and positions > 0 and getattr(self, name) > positions:
                raise ValueError(
                    f"`{name}` must be at most the model's number of positions ({positions}), got {getattr(self, name)}"
                )
        if self.hybrid_layers is not None:
            layers = getattr(self, "num_hidden_layers", None)
            bad = [
                i for i in self.hybrid_layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < (layers or 0)
            ]
            if bad or len(set(self.hybrid_layers)) != len(self.hybrid_layers):
                raise ValueError(
                    f"`hybrid_layers` must be distinct layer indices in [0, {layers}), got {self.hybrid_layers!r}"
                )
            self.hybrid_layers = sorted(self.hybrid_layers)

    def is_hybrid_layer(self, layer_idx: int) -> bool:
        return self.hybrid_layers is None or layer_idx in self.hybrid_layers


def _hybrid_config_class(host_type: str) -> type[PreTrainedConfig]:
    host = getattr(transformers, ARCHITECTURES[host_type].config_class)
    name = f"Hybrid{host.__name__}"
    doc = f"`{host.__name__}` with hybrid attention: the host's fields plus those of `HybridSettings`."
    # The host comes first so its field defaults win; `HybridSettings` adds the hybrid fields and validation.
    return type(name, (host, HybridSettings), {"model_type": HYBRID_PREFIX + host_type, "__doc__": doc, "__module__": __name__})


HYBRID_CONFIG_CLASSES: dict[str, type[PreTrainedConfig]] = {
    host_type: _hybrid_config_class(host_type) for host_type in ARCHITECTURES
}
globals().update({cls.__name__: cls for cls in HYBRID_CONFIG_CLASSES.values()})
