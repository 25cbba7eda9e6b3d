"""Convert a loaded host model, of any architecture whose attention goes through transformers' attention interface,
into its hybrid form; and the Auto-class registration that lets the hybrid classes load in this process."""

from __future__ import annotations

import copy
import difflib

import torch
import transformers
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.initialization import no_init_weights
from transformers.models import auto

from .model.configuration_hybrid import HYBRID_PREFIX, HybridSettings, hybrid_config_class, text_config_class
from .model.configuration_hybrid import register_model_type as register_model_type  # re-exported
from .model.modeling_hybrid import (
    NEW_PARAMETER_MODULES as NEW_PARAMETER_MODULES,  # re-exported
)
from .model.modeling_hybrid import (
    HybridModelMixin,
    UnsupportedHostError,
    attention_specs,
    hybrid_layers,
    hybrid_model_class,
    is_new_parameter,
    reset_hybrid_parameters,
)
from .verification import speech_features

# Config entries that describe a saved file rather than the model.
_NOT_SETTINGS = ("model_type", "transformers_version", "auto_map", "architectures", "_name_or_path")


def _refuse_hybrid(config: PreTrainedConfig) -> None:
    if config.model_type.startswith(HYBRID_PREFIX):
        raise ValueError(f"the model is already hybrid (model_type {config.model_type!r})")


def hybrid_config_from(host_config: PreTrainedConfig, **settings) -> PreTrainedConfig:
    """The hybrid config for a host config: the host's fields plus the hybrid `settings` (validated)."""
    _refuse_hybrid(host_config)
    check_setting_names(settings)
    fields = {k: v for k, v in host_config.to_dict().items() if k not in _NOT_SETTINGS}
    fields.pop("quantization_config", None)
    config_class = hybrid_config_class(type(host_config))
    host_text = host_config.get_text_config()
    if host_text is not host_config:  # a composite model: the settings go on its text config
        if "text_config" not in fields:
            raise UnsupportedHostError(
                f"{type(host_config).__name__} keeps its text model's config somewhere other than `text_config` "
                f"(a {type(host_text).__name__}), where a composite model's hybrid settings are kept"
            )
        text_class = text_config_class(type(host_config))
        if text_class is not None and getattr(type(host_config), "sub_configs_defaults", None) is None:
            raise UnsupportedHostError(
                f"{type(host_config).__name__} builds its {text_class.__name__} itself in transformers "
                f"{transformers.__version__}, so a saved hybrid model would lose its hybrid text config; converting "
                "this image-text model needs a transformers whose configs build their parts from "
                "`sub_configs_defaults` (5.24 has them)"
            )
        if text_class is not None and not isinstance(host_text, text_class):
            raise UnsupportedHostError(
                f"{type(host_config).__name__}'s text config is a {type(host_text).__name__}, not the "
                f"{text_class.__name__} its class names, so a saved hybrid model could not rebuild it"
            )
        text_fields = {k: v for k, v in fields["text_config"].items() if k not in _NOT_SETTINGS}
        text_config = hybrid_config_class(type(host_text))(**text_fields, **settings)
        config = config_class(**{**fields, "text_config": text_config})
    else:
        config = config_class(**{**fields, **settings})
    if settings.get("global_attn_implementation") is None:  # the host's own, unless one is asked for
        config.get_text_config().global_attn_implementation = host_text._attn_implementation
    return config


def _refuse_adapters(model: torch.nn.Module) -> None:
    """`ValueError` for a PEFT model or a model with PEFT's adapter layers injected: convert the plain model."""
    if any(type(module).__module__.split(".")[0] == "peft" for module in model.modules()):
        raise ValueError(
            f"convert takes a plain transformers model, got {type(model).__name__} with PEFT adapters: merge them "
            "first (`model = model.merge_and_unload()`) or unwrap it (`model.get_base_model()`, adapters left out)"
        )


def check_host_class(host_class: type[PreTrainedModel]) -> None:
    """Refuse, before any weight is loaded, a host class whose hybrid form cannot work (`UnsupportedHostError`, a
    `ValueError`, saying why). The conversion itself checks the rest with a two-token forward."""
    if issubclass(host_class, HybridModelMixin):
        raise ValueError(f"{host_class.__name__} is already hybrid")
    attention_specs(host_class)
    hybrid_model_class(host_class)  # a forward without **kwargs is refused here


def register_hybrid_class(host_class: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """The hybrid class of `host_class`, registered with `AutoConfig` and its Auto model class in this process."""
    return hybrid_model_class(host_class)


def _probe(hybrid: PreTrainedModel) -> None:
    """Run two tokens through the model (with its cache, as generation does), and an encoder-decoder's encoder on
    its own (as generation runs it): a host whose attention never reaches the hybrid backend, or reaches it in a way
    the hybrid layers cannot follow, fails here."""
    device = next(hybrid.parameters()).device
    if device.type == "meta":
        return
    inputs = _probe_inputs(hybrid, device)
    try:
        with torch.no_grad():
            hybrid(**inputs)
            if getattr(hybrid.config, "is_encoder_decoder", False) and hybrid_layers(hybrid.get_encoder()):
                hybrid.get_encoder()(**{k: v for k, v in inputs.items() if not k.startswith("decoder_")})
    except UnsupportedHostError:
        raise
    except Exception as error:  # the host itself refuses what the hybrid forward does (e.g. a cache of its own)
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UnsupportedHostError(f"{type(hybrid).__name__} fails its first forward: {message}") from error


def _probe_inputs(model: PreTrainedModel, device: torch.device) -> dict[str, torch.Tensor]:
    """Two tokens for the model (with two decoder tokens for an encoder-decoder), or for a speech encoder the log-mel
    frames its config asks for (`verification.speech_features`)."""
    host_name = type(model).__name__.removeprefix("Hybrid")
    multiple_choice = host_name in auto.modeling_auto.MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES.values()
    shape = (1, 1, 2) if multiple_choice else (1, 2)  # (batch, choices, tokens) for multiple-choice heads
    tokens = torch.ones(shape, dtype=torch.long, device=device)
    config = model.config
    if model.main_input_name == "input_features":
        inputs = {"input_features": speech_features(config).to(device=device, dtype=model.dtype)}
    else:
        inputs = {"input_ids": tokens}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = tokens
    return inputs


def convert(model: PreTrainedModel, **settings) -> PreTrainedModel:
    """Turn a loaded host model into the hybrid model that computes exactly what it did.

    Every host weight is copied under its original name; each self-attention module gets a span predictor and a
    head-space mix, `mix = [0 | I]`, so the output is the host's until fine-tuning moves the mix. The input model is
    left untouched and shares no storage with the result. The hybrid class is registered with the Auto classes.

    Args:
        model: a `transformers` model whose attention goes through the attention interface (`AttentionInterface`).
        **settings: hybrid settings (see `HybridSettings`): `max_span`, `ramp`, `tau_min`, `tau_max`,
            `span_per_head`, `hybrid_layers`, `span_loss_coef`, `initial_span`, `global_attn_implementation`.

    Returns:
        The hybrid model, on the input's device and dtype, in the input's train/eval mode.

    Raises:
        ValueError: for invalid settings, an already hybrid model, a model with PEFT adapters (merge or unwrap it
            first), or a host that cannot be made hybrid (the message says why).
    """
    if isinstance(model, HybridModelMixin):
        raise ValueError(f"the model is already hybrid (model_type {model.config.model_type!r})")
    _refuse_adapters(model)
    check_host_class(type(model))
    config = hybrid_config_from(model.config, **settings)
    hybrid_cls = register_hybrid_class(type(model))
    with no_init_weights():
        hybrid = hybrid_cls(config)
    hybrid.to(dtype=model.dtype)
    for name, buffer in model.named_buffers():  # as the host keeps them: rotary tables stay float32 in a bf16 model
        hybrid.get_buffer(name).data = buffer.detach().clone()
    missing, unexpected = hybrid.load_state_dict(model.state_dict(), strict=False)
    not_new = [key for key in missing if not is_new_parameter(key)]
    if unexpected or not_new:
        raise RuntimeError(f"conversion left host weights unmatched: missing {not_new}, unexpected {unexpected}")
    try:
        hybrid.tie_weights()  # `no_init_weights` skips tying: share what the host shares (e.g. tied embeddings)
    except ValueError as error:  # ties by pattern that the new parameters of one side only break (Diffusion Gemma)
        message = str(error).strip().splitlines()[0][:160]
        raise UnsupportedHostError(
            f"{type(model).__name__} ties the weights of two of its parts by name, which the hybrid layers' new "
            f"weights break ({message})"
        ) from error
    for layer in hybrid_layers(hybrid):
        reset_hybrid_parameters(layer)
    hybrid.to(model.device)
    if getattr(model, "generation_config", None) is not None:
        hybrid.generation_config = copy.deepcopy(model.generation_config)
    hybrid.config._name_or_path = model.config._name_or_path
    hybrid.eval()
    _probe(hybrid)
    hybrid.train(model.training)
    return hybrid


def check_setting_names(settings) -> None:
    """Raise `TypeError` naming any key of `settings` that is not a field of `HybridSettings` (e.g. a typo)."""
    known = list(HybridSettings.__annotations__)
    for name in settings:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise TypeError(f"unknown hybrid setting {name!r}; {hint}the settings are: {', '.join(known)}")
