"""What a host architecture offers, read from transformers' and the model's own tables: its class for each task and
the projections LoRA adapts. There is no per-family list here: any architecture whose attention goes through
transformers' attention interface converts. Nothing in this file travels with checkpoints."""

from __future__ import annotations

from torch import nn
from transformers.models.auto import modeling_auto
from transformers.pytorch_utils import Conv1D

from .configuration_hybrid import HYBRID_PREFIX
from .conversion import NEW_PARAMETER_MODULES
from .modeling_hybrid import self_attention_modules

#: task -> transformers' table of the host class for that task
TASK_TABLES = {
    "base": modeling_auto.MODEL_MAPPING_NAMES,
    "causal_lm": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    "masked_lm": modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    "sequence_classification": modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
}
TASKS = tuple(TASK_TABLES)


def host_model_type(model_type: str) -> str:
    """`"hybrid_llama"` -> `"llama"`; a host type is returned as is."""
    return model_type.removeprefix(HYBRID_PREFIX)


def model_classes(model_type: str) -> dict[str, str]:
    """Task -> host class name for a host or hybrid `model_type`; `ValueError` when transformers has none."""
    host = host_model_type(model_type)
    classes = {task: table[host] for task, table in TASK_TABLES.items() if isinstance(table.get(host), str)}
    if not classes:
        raise ValueError(f"model_type {model_type!r} has no model class in the installed transformers")
    return classes


def is_encoder(config) -> bool:
    """An encoder family (BERT, RoBERTa, ...): it has a masked LM, and the config does not ask for a decoder (their
    causal-LM heads need `is_decoder=True`)."""
    return "masked_lm" in model_classes(config.model_type) and not getattr(config, "is_decoder", False)


def default_task(config) -> str:
    """`"causal_lm"` for a decoder family, else `"base"`."""
    return "base" if is_encoder(config) or "causal_lm" not in model_classes(config.model_type) else "causal_lm"


def model_task(model: nn.Module) -> str:
    """The task of a (hybrid or host) model from its class name, so remote-code classes work too."""
    name = type(model).__name__.removeprefix("Hybrid")
    classes = model_classes(model.config.model_type)
    for task, host_name in classes.items():
        if name == host_name:
            return task
    raise ValueError(f"{type(model).__name__} is none of {', '.join(classes.values())} (or their Hybrid* forms)")


def attention_projections(model: nn.Module) -> list[str]:
    """Names of the linear layers inside the host's self-attention modules (e.g. `q_proj, k_proj, v_proj, o_proj`
    for Llama, `c_attn, c_proj` for GPT-2, `query, key, value` for BERT): LoRA's targets. The hybrid modules'
    own linear layers are left out."""
    names = []
    for attention in self_attention_modules(model):
        for name, module in attention.named_modules():
            if isinstance(module, (nn.Linear, Conv1D)) and name.split(".")[0] not in NEW_PARAMETER_MODULES:
                leaf = name.rsplit(".", 1)[-1]
                if leaf not in names:
                    names.append(leaf)
    return names
