"""Convert a loaded host model (Llama, Mistral, Qwen2/3, GPT-2, BERT, RoBERTa) into its hybrid form."""

from __future__ import annotations

import copy

import torch
from transformers import PreTrainedModel
from transformers.initialization import no_init_weights

from .architectures import HYBRID_PREFIX, get_architecture, host_model_type
from .configuration_hybrid import HYBRID_CONFIG_CLASSES
from .modeling_hybrid import HYBRID_MODEL_CLASSES, hybrid_layers

NEW_PARAMETER_MODULES = ("span_predictor", "mix", "local")

# Config entries that describe a saved file rather than the model.
_NOT_SETTINGS = ("model_type", "transformers_version", "auto_map", "architectures", "_name_or_path")


def hybrid_config_from(host_config, **settings):
    """The hybrid config for a host config: the host's fields plus the hybrid `settings` (validated)."""
    _refuse_hybrid(host_config)
    check_setting_names(settings)
    get_architecture(host_config.model_type)  # raises for unsupported architectures
    fields = {k: v for k, v in host_config.to_dict().items() if k not in _NOT_SETTINGS}
    fields.pop("quantization_config", None)
    config = HYBRID_CONFIG_CLASSES[host_model_type(host_config.model_type)](**{**fields, **settings})
    config._attn_implementation = host_config._attn_implementation
    return config


def _refuse_hybrid(config) -> None:
    if config.model_type.startswith(HYBRID_PREFIX):
        raise ValueError(f"the model is already hybrid (model_type {config.model_type!r})")


def hybrid_class_for(model: PreTrainedModel) -> type[PreTrainedModel]:
    """The hybrid class matching a host model's class (e.g. `LlamaForCausalLM` -> `HybridLlamaForCausalLM`)."""
    _refuse_hybrid(model.config)
    arch = get_architecture(model.config.model_type)
    classes = HYBRID_MODEL_CLASSES[host_model_type(model.config.model_type)]
    for task, name in arch.model_classes.items():
        if type(model).__name__ == name:
            return classes[task]
    raise ValueError(
        f"{type(model).__name__} is not a supported {model.config.model_type} class; supported: "
        f"{', '.join(arch.model_classes.values())}"
    )


def convert(model: PreTrainedModel, **settings) -> PreTrainedModel:
    """Turn a loaded host model into the hybrid model that computes exactly what it did.

    Every host weight is copied under its original name; the new parameters (`span_predictor`, `mix`, and with
    `local_projections="separate"` the `local` copies) are set so that `mix = [0 | I]`. The input model is left
    untouched and shares no storage with the result.

    Args:
        model: a `transformers` model of a supported architecture and class.
        **settings: hybrid settings (see `HybridSettings`): `max_span`, `ramp`, `tau_min`, `tau_max`,
            `span_per_head`, `local_projections`, `hybrid_layers`, `span_loss_coef`, `initial_span`.

    Returns:
        The hybrid model, on the input's device and dtype, in the input's train/eval mode.
    """
    hybrid_cls = hybrid_class_for(model)
    config = hybrid_config_from(model.config, **settings)
    with no_init_weights():
        hybrid = hybrid_cls(config)
    hybrid.to(dtype=model.dtype)
    missing, unexpected = hybrid.load_state_dict(model.state_dict(), strict=False)
    not_new = [key for key in missing if not any(f".{name}." in key for name in NEW_PARAMETER_MODULES)]
    if unexpected or not_new:
        raise RuntimeError(f"conversion left host weights unmatched: missing {not_new}, unexpected {unexpected}")
    hybrid.tie_weights()  # `no_init_weights` skips tying: share what the host shares (e.g. tied embeddings)
    for layer in hybrid_layers(hybrid):
        layer.reset_hybrid_parameters()
    hybrid.to(model.device)
    if getattr(model, "generation_config", None) is not None:
        hybrid.generation_config = copy.deepcopy(model.generation_config)
    hybrid.config._name_or_path = model.config._name_or_path
    hybrid.train(model.training)
    return hybrid


def check_setting_names(settings) -> None:
    """Raise `TypeError` naming any key of `settings` that is not a field of `HybridSettings` (e.g. a typo)."""
    import difflib

    from .configuration_hybrid import HybridSettings

    known = list(HybridSettings.__annotations__)
    for name in settings:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise TypeError(f"unknown hybrid setting {name!r}; {hint}the settings are: {', '.join(known)}")
