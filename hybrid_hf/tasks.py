"""The tasks a hybrid model can be loaded for, in one table, and what a host architecture offers for each.

A task names the host class to load (read from transformers' Auto tables: there is no per-family list, any
architecture whose attention goes through transformers' attention interface converts), the Auto class that loads
the saved folder, PEFT's task type and the Hub's pipeline tag.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers.models.auto import modeling_auto

from .errors import UsageError
from .model.configuration_hybrid import HYBRID_PREFIX
from .model.modeling_hybrid import AUTO_CLASSES


@dataclass(frozen=True)
class Task:
    """What one task means to transformers, PEFT and the Hub."""

    auto_class: str  # the Auto class that loads a saved folder (it builds the host class of a host checkpoint)
    peft_task_type: str | None  # PEFT's `TaskType` (None: PEFT's generic model)
    pipeline_tag: str  # the Hub's pipeline tag

    @property
    def classes(self) -> dict[str, str]:
        """transformers' table of the Auto class: host model_type -> host class name."""
        return getattr(modeling_auto, AUTO_CLASSES[self.auto_class])


TASK_TABLE = {
    "base": Task("AutoModel", "FEATURE_EXTRACTION", "feature-extraction"),
    "causal_lm": Task("AutoModelForCausalLM", "CAUSAL_LM", "text-generation"),
    # PEFT has no masked-LM task type; its generic PeftModel trains one fine.
    "masked_lm": Task("AutoModelForMaskedLM", None, "fill-mask"),
    "sequence_classification": Task("AutoModelForSequenceClassification", "SEQ_CLS", "text-classification"),
    "seq2seq_lm": Task("AutoModelForSeq2SeqLM", "SEQ_2_SEQ_LM", "text2text-generation"),
    "speech_seq2seq": Task("AutoModelForSpeechSeq2Seq", None, "automatic-speech-recognition"),
    "image_text_to_text": Task("AutoModelForImageTextToText", None, "image-text-to-text"),
}
TASKS = tuple(TASK_TABLE)


def host_model_type(model_type: str) -> str:
    """`"hybrid_llama"` -> `"llama"`; a host type is returned as is."""
    return model_type.removeprefix(HYBRID_PREFIX)


def model_classes(model_type: str) -> dict[str, str]:
    """Task -> host class name for a host or hybrid `model_type`; `UsageError` when transformers has none."""
    host = host_model_type(model_type)
    classes = {
        name: task.classes[host] for name, task in TASK_TABLE.items() if isinstance(task.classes.get(host), str)
    }
    if not classes:
        raise UsageError(f"model_type {model_type!r} has no model class in the installed transformers")
    return classes


def class_task(model_type: str, class_name: str) -> str | None:
    """The task of the class `class_name` (host or `Hybrid*` name) of a `model_type`; None when it is none of them."""
    name = class_name.removeprefix("Hybrid")
    for task, host_name in model_classes(model_type).items():
        if name == host_name:
            return task
    return None


def is_encoder(config) -> bool:
    """An encoder family (BERT, RoBERTa, ...): it has a masked LM, and the config does not ask for a decoder (their
    causal-LM heads need `is_decoder=True`)."""
    return "masked_lm" in model_classes(config.model_type) and not getattr(config, "is_decoder", False)


#: the generative tasks a family's default is chosen from, in order
GENERATIVE_TASKS = ("causal_lm", "seq2seq_lm", "speech_seq2seq")


def default_task(config) -> str:
    """`"causal_lm"` for a decoder family, the sequence-to-sequence LM of an encoder-decoder, else `"base"`."""
    classes = model_classes(config.model_type)
    generative = [task for task in GENERATIVE_TASKS if task in classes]
    return "base" if is_encoder(config) or not generative else generative[0]


def choose_task(config, task: str | None = None) -> str:
    """`task` if given; else the task of `config.architectures[0]` when it is one; else `default_task`."""
    classes = model_classes(config.model_type)
    if task is not None:
        if task not in classes:
            raise UsageError(
                f"task {task!r} is not available for {config.model_type}; available: {', '.join(classes)}"
            )
        return task
    architectures = getattr(config, "architectures", None) or []
    # Only the first entry names the checkpoint's class.
    return (architectures and class_task(config.model_type, architectures[0])) or default_task(config)


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def model_task(model: nn.Module) -> str:
    """The task of a (hybrid or host, plain, remote-code or PEFT-wrapped) model, from its class name."""
    model = unwrap(model)
    task = class_task(model.config.model_type, type(model).__name__)
    if task is None:
        classes = model_classes(model.config.model_type)
        raise UsageError(f"{type(model).__name__} is none of {', '.join(classes.values())} (or their Hybrid* forms)")
    return task
