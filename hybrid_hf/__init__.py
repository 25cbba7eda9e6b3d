"""hybrid_hf: hybrid attention with an adaptive, sharpened local focus for Hugging Face Transformers."""

from .hybrid_attention import (
    SpanPredictor,
    adaptive_local_attention,
    causal_prefix_mean,
    masked_mean,
    span_temperature,
)

__all__ = [
    "SpanPredictor",
    "adaptive_local_attention",
    "causal_prefix_mean",
    "masked_mean",
    "span_temperature",
]
__version__ = "0.1.0"
