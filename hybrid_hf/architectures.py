"""Per-architecture facts: where a host family keeps its attention and how it projects, in one table.

Adding a family means adding a row here. This file travels with saved checkpoints (`trust_remote_code`).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class HostArchitecture:
    """How a host model family is laid out. Module paths are relative to the attention module unless noted.

    Attributes:
        config_class: the host's config class in `transformers`.
        model_classes: task (`"base"`, `"causal_lm"`, `"masked_lm"`, `"sequence_classification"`) -> host class.
        layers: path of the `ModuleList` of blocks, relative to the base model.
        attention: attribute of a block holding its self-attention; the hybrid layer replaces it.
        query, key, value: split projections; or `fused_qkv` for one projection giving `[q; k; v]` (GPT-2).
        output: the output projection (`o_proj` of DESIGN).
        query_norm, key_norm: per-head norms applied before rotary embeddings (Qwen3).
        core: sub-module that holds `scaling` and `sliding_window` (BERT keeps them in `self`).
        causal: decoder (prefix context, causal window) or encoder (whole-sequence context, symmetric window).
        output_dropout: dropout applied after the output projection.
        residual_norm: post-norm over `dropout(y) + x` that the attention module applies itself (BERT).
        dropout_config: config field with the attention-probability dropout.
        target_modules: PEFT LoRA targets for this family.
    """

    config_class: str
    model_classes: dict[str, str]
    layers: str
    attention: str
    output: str
    query: str | None = None
    key: str | None = None
    value: str | None = None
    fused_qkv: str | None = None
    query_norm: str | None = None
    key_norm: str | None = None
    core: str | None = None
    causal: bool = True
    output_dropout: str | None = None
    residual_norm: str | None = None
    dropout_config: str = "attention_dropout"
    target_modules: tuple[str, ...] = field(default=("q_proj", "k_proj", "v_proj", "o_proj"))

    def projections(self) -> list[str]:
        """Paths of the modules a separate local branch copies (projections and their norms)."""
        names = (self.fused_qkv, self.query, self.key, self.value, self.query_norm, self.key_norm, self.output)
        return [name for name in names if name is not None]


def _llama_like(prefix: str, **extra: str) -> HostArchitecture:
    return HostArchitecture(
        config_class=f"{prefix}Config",
        model_classes={"base": f"{prefix}Model", "causal_lm": f"{prefix}ForCausalLM"},
        layers="layers",
        attention="self_attn",
        query="q_proj",
        key="k_proj",
        value="v_proj",
        output="o_proj",
        **extra,
    )


def _bert_like(prefix: str) -> HostArchitecture:
    return HostArchitecture(
        config_class=f"{prefix}Config",
        model_classes={
            "base": f"{prefix}Model",
            "masked_lm": f"{prefix}ForMaskedLM",
            "sequence_classification": f"{prefix}ForSequenceClassification",
        },
        layers="encoder.layer",
        attention="attention",
        query="self.query",
        key="self.key",
        value="self.value",
        output="output.dense",
        core="self",
        causal=False,
        output_dropout="output.dropout",
        residual_norm="output.LayerNorm",
        dropout_config="attention_probs_dropout_prob",
        target_modules=("query", "key", "value", "dense"),
    )


ARCHITECTURES: dict[str, HostArchitecture] = {
    "llama": _llama_like("Llama"),
    "mistral": _llama_like("Mistral"),
    "qwen2": _llama_like("Qwen2"),
    "qwen3": _llama_like("Qwen3", query_norm="q_norm", key_norm="k_norm"),
    "gpt2": HostArchitecture(
        config_class="GPT2Config",
        model_classes={"base": "GPT2Model", "causal_lm": "GPT2LMHeadModel"},
        layers="h",
        attention="attn",
        fused_qkv="c_attn",
        output="c_proj",
        output_dropout="resid_dropout",
        dropout_config="attn_pdrop",
        target_modules=("c_attn", "c_proj"),
    ),
    "bert": _bert_like("Bert"),
    "roberta": _bert_like("Roberta"),
}

HYBRID_PREFIX = "hybrid_"


def host_model_type(model_type: str) -> str:
    """`"hybrid_llama"` -> `"llama"`; a host type is returned as is."""
    return model_type.removeprefix(HYBRID_PREFIX)


def get_architecture(model_type: str) -> HostArchitecture:
    """The table row for a host or hybrid `model_type`; `ValueError` listing the supported ones otherwise."""
    host = host_model_type(model_type)
    if host not in ARCHITECTURES:
        raise ValueError(
            f"model_type {model_type!r} is not supported; supported architectures: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[host]
