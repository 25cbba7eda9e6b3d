"""Tiny random host models of every supported architecture, for tests."""

from __future__ import annotations

import torch
import transformers

from hybrid_hf import hybrid_layers
from hybrid_hf.architectures import ARCHITECTURES

VOCAB = 99
SEQ = 24

_CONFIGS = {
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "qwen2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "qwen3": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0),
    "bert": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128),
    "roberta": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128, pad_token_id=1),
}

#: (model_type, task) for every class the table supports
ALL_CLASSES = [(model_type, task) for model_type, arch in ARCHITECTURES.items() for task in arch.model_classes]
DECODERS = [name for name, arch in ARCHITECTURES.items() if arch.causal]
ENCODERS = [name for name, arch in ARCHITECTURES.items() if not arch.causal]


def tiny_config(model_type: str, **overrides):
    arch = ARCHITECTURES[model_type]
    config_class = getattr(transformers, arch.config_class)
    return config_class(vocab_size=VOCAB, **{**_CONFIGS[model_type], **overrides})


def tiny_host(model_type: str, task: str | None = None, seed: int = 0, **overrides):
    """A random host model in eval mode; `task` defaults to the causal LM (decoders) or the base model (encoders)."""
    arch = ARCHITECTURES[model_type]
    task = task or ("causal_lm" if arch.causal else "base")
    torch.manual_seed(seed)
    model = getattr(transformers, arch.model_classes[task])(tiny_config(model_type, **overrides))
    return model.eval()


def perturb(model, seed: int = 1, scale: float = 0.3) -> None:
    """Move the hybrid parameters off their conversion values, so the local branch and the span matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in hybrid_layers(model):
            for param in (layer.mix.weight, layer.span_predictor.proj.weight):
                param.add_(torch.randn(param.shape, generator=generator) * scale)


def batch(model_type: str, batch_size: int = 2, length: int = SEQ, padding: str | None = None, seed: int = 0):
    """`(input_ids, attention_mask)` with the second row padded on the left or right by 5 tokens."""
    generator = torch.Generator().manual_seed(seed)
    low = 3 if model_type == "roberta" else 1  # RoBERTa's positions depend on pad_token_id=1
    input_ids = torch.randint(low, VOCAB, (batch_size, length), generator=generator)
    mask = torch.ones_like(input_ids)
    if padding == "left":
        mask[-1, :5] = 0
    elif padding == "right":
        mask[-1, -5:] = 0
    pad_id = 1 if model_type == "roberta" else 0
    input_ids = input_ids.masked_fill(mask == 0, pad_id)
    return input_ids, mask


def outputs_of(model, input_ids, attention_mask=None) -> torch.Tensor:
    """The model's main output tensor: logits for heads, last hidden state for base models."""
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    return out.logits if "logits" in out else out.last_hidden_state


#: words of `TEXT` and of `word_tokenizer`
WORDS = "the cat sat on a mat and dog ran in park king queen play act scene night day old young".split()
#: a repetitive training text for tiny models (a few hundred tokens)
TEXT = " .\n".join(" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(8)) for i in range(60)) + " .\n"


def word_tokenizer():
    """A word-level tokenizer of `WORDS`, built offline (ids below `VOCAB`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "<s>": 2, "</s>": 3, ".": 4, **{w: i + 5 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
