"""Tiny random host models, for tests: any model type of the installed transformers, from one set of small sizes."""

from __future__ import annotations

import torch
import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from hybrid_hf import hybrid_layers
from hybrid_hf.tasks import model_classes

VOCAB = 99
SEQ = 24

#: small sizes every family understands (through its config's attribute map); families add their own below
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_FAMILY = {
    "gpt2": dict(bos_token_id=0, eos_token_id=0),
    "roberta": dict(pad_token_id=1),
}

#: the families the detailed tests run on: (model_type, tasks)
FAMILIES = {
    "llama": ("causal_lm", "base"),
    "mistral": ("causal_lm", "base"),
    "qwen2": ("causal_lm", "base"),
    "qwen3": ("causal_lm", "base"),
    "gpt2": ("causal_lm", "base"),
    "bert": ("base", "masked_lm", "sequence_classification"),
    "roberta": ("base", "masked_lm", "sequence_classification"),
}
ALL_CLASSES = [(model_type, task) for model_type, tasks in FAMILIES.items() for task in tasks]
DECODERS = [name for name, tasks in FAMILIES.items() if "causal_lm" in tasks]
ENCODERS = [name for name, tasks in FAMILIES.items() if "causal_lm" not in tasks]


#: multi-head latent attention (DeepSeek-V2/V3 and kin): query/key halves and the value width, small and consistent
_LATENT = dict(qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, kv_lora_rank=16, q_lora_rank=16)


def _is_attention_kind(layer_type) -> bool:
    """Whether a `layer_types` entry is softmax attention (full, sliding, chunked), not linear attention."""
    return "attention" in str(layer_type) and "linear" not in str(layer_type)


def tiny_config(model_type: str, **overrides):
    config_class = CONFIG_MAPPING[model_type]
    fields = {**TINY, **_FAMILY.get(model_type, {}), **overrides}
    if "qk_rope_head_dim" in config_class().to_dict():
        fields = {**_LATENT, **fields}
    try:
        config = config_class(**fields)
    except AttributeError:  # a config whose head_dim is computed, not set (Falcon)
        fields.pop("head_dim")
        config = config_class(**fields)
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and "layer_types" not in overrides and not any(map(_is_attention_kind, types)):
        # A family that interleaves attention with other layers (LFM's convolutions) and starts with those: one layer
        # of each of its kinds, in its own order, so that the tiny model has attention to convert.
        kinds = list(dict.fromkeys(config_class().layer_types))
        if any(map(_is_attention_kind, kinds)):
            config = config_class(**{**fields, "num_hidden_layers": len(kinds), "layer_types": kinds})
    return _shrink(config, overrides)


def _shrink(config, keep):
    """Size fields that families name their own way (experts, their widths, extra layers) set small too."""
    for name, value in vars(config).items():
        if name in keep or isinstance(value, bool) or not isinstance(value, int):
            continue
        if any(word in name for word in ("intermediate", "ffn_dim", "d_ff", "inner")) and value > 64:
            setattr(config, name, 64)
        elif "expert" in name and value > 4 and not any(word in name for word in ("per_tok", "top", "group")):
            setattr(config, name, 4)
        elif "expert" in name and value > 2 and any(word in name for word in ("per_tok", "top")):
            setattr(config, name, 2)
        elif name == "rotary_dim" and value > 8:  # at most the head size (GPT-J, CodeGen)
            setattr(config, name, 8)
    return config


def tiny_host(model_type: str, task: str | None = None, seed: int = 0, **overrides):
    """A random host model in eval mode; `task` defaults to the causal LM of a decoder family, else the base model."""
    classes = model_classes(model_type)
    task = task or ("causal_lm" if "causal_lm" in classes and "masked_lm" not in classes else "base")
    torch.manual_seed(seed)
    model = getattr(transformers, classes[task])(tiny_config(model_type, **overrides))
    return model.eval()


def tiny_llama(layers: int = 2, seed: int = 0):
    """A random Llama causal LM in eval mode, of the `TINY` sizes with `layers` layers, whose special token ids are
    those of `word_tokenizer` (and of the tokenizers trained in `test_training`): <pad> 1, <s> 2, </s> 3."""
    return tiny_host("llama", seed=seed, num_hidden_layers=layers, pad_token_id=1, bos_token_id=2, eos_token_id=3)


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
