"""hybrid_hf: hybrid attention with an adaptive, sharpened local focus for Hugging Face Transformers.

Importing the package registers the `"hybrid"` attention function with transformers. `convert(model)` makes any
model whose attention goes through transformers' attention interface hybrid, and registers its hybrid class with the
Auto classes; `register_model_type("llama")` does the latter for loading saved hybrid folders without remote code.
"""

from .conversion import convert, register_model_type
from .model.configuration_hybrid import HybridSettings, hybrid_config_class
from .model.hybrid_attention import (
    SpanPredictor,
    adaptive_local_attention,
    causal_prefix_mean,
    masked_mean,
    span_temperature,
)
from .model.modeling_hybrid import HYBRID_ATTENTION, hybrid_layers, hybrid_model_class

__all__ = [
    "HYBRID_ATTENTION",
    "HybridSettings",
    "SpanPredictor",
    "adaptive_local_attention",
    "causal_prefix_mean",
    "convert",
    "hybrid_config_class",
    "hybrid_layers",
    "hybrid_model_class",
    "masked_mean",
    "register_model_type",
    "span_temperature",
]
__version__ = "0.3.0"


def __getattr__(name: str):
    """`hybrid_hf.HybridLlamaForCausalLM`, `hybrid_hf.HybridLlamaConfig` and the like, made on demand."""
    from .model import configuration_hybrid, modeling_hybrid

    for module in (modeling_hybrid, configuration_hybrid):
        try:
            return getattr(module, name)
        except AttributeError:
            pass
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
