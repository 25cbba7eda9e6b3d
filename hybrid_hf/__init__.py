"""hybrid_hf: hybrid attention with an adaptive, sharpened local focus for Hugging Face Transformers.

Importing the package registers the hybrid model types with the Auto classes.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
)

from .architectures import ARCHITECTURES
from .configuration_hybrid import HYBRID_CONFIG_CLASSES, HybridSettings
from .conversion import convert
from .hybrid_attention import (
    SpanPredictor,
    adaptive_local_attention,
    causal_prefix_mean,
    masked_mean,
    span_temperature,
)
from .modeling_hybrid import HYBRID_MODEL_CLASSES, HybridAttention, hybrid_layers

_AUTO = {
    "base": AutoModel,
    "causal_lm": AutoModelForCausalLM,
    "masked_lm": AutoModelForMaskedLM,
    "sequence_classification": AutoModelForSequenceClassification,
}
for _host_type, _config_class in HYBRID_CONFIG_CLASSES.items():
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
    for _task, _model_class in HYBRID_MODEL_CLASSES[_host_type].items():
        _AUTO[_task].register(_config_class, _model_class, exist_ok=True)

globals().update({cls.__name__: cls for cls in HYBRID_CONFIG_CLASSES.values()})
globals().update({cls.__name__: cls for classes in HYBRID_MODEL_CLASSES.values() for cls in classes.values()})

__all__ = [
    "ARCHITECTURES",
    "HybridAttention",
    "HybridSettings",
    "SpanPredictor",
    "adaptive_local_attention",
    "causal_prefix_mean",
    "convert",
    "hybrid_layers",
    "masked_mean",
    "span_temperature",
]
__version__ = "0.1.0"
