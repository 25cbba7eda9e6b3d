"""LoRA for hybrid models: PEFT's `LoraConfig` with the targets and trained modules a hybrid model needs.

from hybrid_hf.lora import get_lora_model

peft_model = get_lora_model(hybrid_hf.convert(host))   # LoRA on the attention projections and the mix
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from .conversion import NEW_PARAMETER_MODULES
from .errors import UsageError
from .model.configuration_hybrid import HYBRID_PREFIX
from .model.modeling_hybrid import self_attention_modules
from .tasks import TASK_TABLE, model_task, unwrap

#: hybrid submodules trained in full (`modules_to_save`); the mix gets LoRA instead.
HYBRID_MODULES = ("span_predictor",)
#: hybrid submodules that get LoRA adapters beside the host's attention projections.
HYBRID_LORA_TARGETS = ("mix",)


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


def hybrid_modules_to_save(model) -> list[str]:
    """Names of the hybrid submodules trained in full under LoRA (PEFT's `modules_to_save`)."""
    return list(HYBRID_MODULES)


def lora_config(model, r: int = 8, alpha: int = 16, dropout: float = 0.0, **kwargs: Any):
    """A `peft.LoraConfig` with the right defaults for a hybrid model (PEFT has none for `hybrid_*` model types).

    A host model of a supported family gets the same targets and no `modules_to_save` (a baseline with the same
    LoRA budget).

    - `target_modules`: the linear layers of the host's self-attention modules (e.g. `q_proj, k_proj, v_proj, o_proj`
      for Llama, `c_attn, c_proj` for GPT-2, `query, key, value` for BERT), plus the hybrid `mix`. LoRA on the mix
      keeps it at `[0 | I]`
      plus a low-rank update: training all `2 d^2` entries of a mix that starts as an exact identity with Adam moves
      every entry by about the learning rate at the first step, which at LoRA learning rates wrecks the model.
    - `modules_to_save`: `span_predictor` (small, starts at zero weight), trained in full and saved.
    - `task_type`: from the model class (`CAUSAL_LM`, `SEQ_CLS`, `FEATURE_EXTRACTION`; none for masked LMs).

    Args:
        model: a hybrid model (`config.model_type` `"hybrid_<host>"`), plain or remote-code, or a host model.
        r, alpha, dropout: LoRA rank, `lora_alpha` and `lora_dropout`.
        **kwargs: any other `LoraConfig` field; they replace the defaults above (to add to the hybrid modules, pass
            `modules_to_save=[*hybrid_modules_to_save(model), "lm_head"]`).
    """
    from peft import LoraConfig

    base = unwrap(model)
    model_type = base.config.model_type
    hybrid = model_type.startswith(HYBRID_PREFIX)
    settings: dict[str, Any] = {
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": attention_projections(base) + (list(HYBRID_LORA_TARGETS) if hybrid else []),
        "modules_to_save": hybrid_modules_to_save(base) if hybrid else None,
        "task_type": TASK_TABLE[model_task(base)].peft_task_type,
    }
    settings.update(kwargs)
    return LoraConfig(**settings)


def check_no_adapters(model: nn.Module) -> None:
    """Refuse a model that already has PEFT adapters (a `PeftModel`, or LoRA layers injected into it): a second
    set would wrap the first, and only one would be merged."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(model, PeftModel) or any(isinstance(module, BaseTunerLayer) for module in model.modules()):
        raise UsageError(
            f"the model ({type(model).__name__}) already has LoRA adapters; merge them first "
            "(`model = model.merge_and_unload()`), or train the ones it has"
        )


def get_lora_model(model, **kwargs: Any):
    """`peft.get_peft_model(model, lora_config(model, **kwargs))`: the model with LoRA adapters, ready to train.
    A model that has adapters already is refused (`check_no_adapters`).

    PEFT (0.21 and earlier) reads `model.is_gradient_checkpointing`, which transformers deprecates with a
    `FutureWarning`; that one warning, about a call this package does not make, is silenced here.
    """
    from peft import get_peft_model

    check_no_adapters(model)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, lora_config(model, **kwargs))
