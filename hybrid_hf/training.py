"""Training helpers for hybrid models: LoRA defaults, span logging, a causal-LM text dataset, perplexity, model cards.

    from hybrid_hf.training import add_span_logging, get_lora_model, perplexity, text_dataset

    model = hybrid_hf.convert(host, max_span=64, ramp=16, span_loss_coef=0.05)
    peft_model = get_lora_model(model)                               # LoRA on q/k/v/o + hybrid modules trained
    trainer = Trainer(model=peft_model, args=..., train_dataset=text_dataset(tokenizer, texts, 256))
    add_span_logging(trainer)                                        # span/temperature per layer in every log
    trainer.train()
    print(perplexity(peft_model, eval_dataset))                      # LM loss only, without the span loss

The `hybrid-hf finetune` command (`hybrid_hf.finetune`) puts these together. This module is not shipped with
checkpoints (it needs `peft`, `datasets` and `huggingface_hub`); the model files do not import it.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PrinterCallback, ProgressCallback, TrainerCallback

from .architectures import attention_projections, model_classes
from .architectures import model_task as _model_task
from .configuration_hybrid import HYBRID_PREFIX
from .cli import quiet_transformers
from .modeling_hybrid import hybrid_layers

#: hybrid submodules trained in full (`modules_to_save`); the mix and separate local projections get LoRA instead.
HYBRID_MODULES = ("span_predictor",)
#: hybrid submodules that get LoRA adapters beside the host family's targets.
HYBRID_LORA_TARGETS = ("mix",)

#: task of a model class (key of `HostArchitecture.model_classes`) -> PEFT `TaskType` (None: PEFT's generic model).
PEFT_TASK_TYPES = {
    "causal_lm": "CAUSAL_LM",
    "sequence_classification": "SEQ_CLS",
    "base": "FEATURE_EXTRACTION",
    "masked_lm": None,  # PEFT has no masked-LM task type; the generic PeftModel trains it fine
}

#: task -> Hub `pipeline_tag`
PIPELINE_TAGS = {
    "causal_lm": "text-generation",
    "masked_lm": "fill-mask",
    "sequence_classification": "text-classification",
    "base": "feature-extraction",
}


# --------------------------------------------------------------------------------------------------------------
# LoRA


def _unwrap(model):
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def model_task(model) -> str:
    """The task of a (hybrid or host) model from its class: `"causal_lm"`, `"masked_lm"`, `"sequence_classification"`
    or `"base"`. Matches class names, so remote-code classes (`transformers_modules.*`) work too."""
    return _model_task(_unwrap(model))


def hybrid_modules_to_save(model) -> list[str]:
    """Names of the hybrid submodules trained in full under LoRA (PEFT's `modules_to_save`)."""
    return list(HYBRID_MODULES)


def lora_config(model, r: int = 8, alpha: int = 16, dropout: float = 0.0, **kwargs: Any):
    """A `peft.LoraConfig` with the right defaults for a hybrid model (PEFT has none for `hybrid_*` model types).

    A host model of a supported family gets the same targets and no `modules_to_save` (a baseline with the same
    LoRA budget).

    - `target_modules`: the linear layers of the host's self-attention modules (e.g. `q_proj, k_proj, v_proj, o_proj`
      for Llama, `c_attn, c_proj` for GPT-2, `query, key, value` for BERT), plus the hybrid `mix`. LoRA on the mix keeps it at `[0 | I]`
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

    base = _unwrap(model)
    model_type = base.config.model_type
    hybrid = model_type.startswith(HYBRID_PREFIX)
    settings: dict[str, Any] = {
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": attention_projections(base) + (list(HYBRID_LORA_TARGETS) if hybrid else []),
        "modules_to_save": hybrid_modules_to_save(base) if hybrid else None,
        "task_type": PEFT_TASK_TYPES[model_task(base)],
    }
    settings.update(kwargs)
    return LoraConfig(**settings)


def get_lora_model(model, **kwargs: Any):
    """`peft.get_peft_model(model, lora_config(model, **kwargs))`: the model with LoRA adapters, ready to train.

    PEFT (0.21 and earlier) reads `model.is_gradient_checkpointing`, which transformers deprecates with a
    `FutureWarning`; that one warning, about a call this package does not make, is silenced here.
    """
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, lora_config(model, **kwargs))


# --------------------------------------------------------------------------------------------------------------
# Span logging


class SpanLoggingCallback(TrainerCallback):
    """Adds the learned spans and temperatures of the training forwards to every Trainer log.

    At each `on_log`, for every hybrid layer `i` (zero-padded to two digits) the mean over the training forwards
    since the previous log of:

    - `span/layer_ii`: the span `s * max_span`, in tokens;
    - `temperature/layer_ii`: the local-softmax temperature `tau_min + (tau_max - tau_min) * s`;
    - `span/layer_ii/head_h`: the span of head `h` (with `span_per_head=True` and `per_head=True`);
    - `span/mean`, `temperature/mean`: the means of the layer values.

    Values are collected by forward hooks on each layer's `span_predictor` (registered in `on_train_begin`, removed
    in `on_train_end`), detached and summed on the model's device, read back only when logging. Only forwards in
    training mode count (evaluation forwards are skipped). Every token position is averaged with equal weight:
    padding positions are *not* excluded (the hook sees the span scale, not the mask); for encoders, whose span is
    one per sequence, sequences count equally. Recomputed forwards under gradient checkpointing count twice with
    the same values, which leaves the means unchanged. Under DDP each process reports the spans of its own batches
    (no communication); the loggers write those of process zero.

    Where the values go (checked against transformers 5.x `Trainer.log`): `Trainer.log` appends a *copy* of the
    logs to `state.log_history` and then calls the callbacks' `on_log` in order with the same `logs` dict. This
    callback adds its values to `logs` (seen by every callback after it: the progress bar / printer, which the
    Trainer always adds last) and to the `state.log_history` entry of this log. Reporting integrations
    (`report_to`: TensorBoard, W&B, MLflow...) are created *before* the callbacks passed to `Trainer(callbacks=...)`,
    so they would miss the values: use `add_span_logging(trainer)`, which puts this callback first, and has the
    console show only the means (`console_logs`).
    """

    def __init__(self, per_head: bool = True):
        self.per_head = per_head
        self._handles: list = []
        self._stats: dict[int, list] = {}  # layer_idx -> [sum of s per head (tensor), token count, layer]

    # -- hooks -----------------------------------------------------------------------------------------------

    def _hook(self, layer):
        def record(module, inputs, output) -> None:
            if not layer.training:
                return
            scale = output.detach()  # (B, H, N) or (B, 1, N); (B, *, 1) for encoders
            sums = scale.float().sum(dim=(0, 2))
            entry = self._stats.get(layer.layer_idx)
            if entry is None:
                self._stats[layer.layer_idx] = [sums, scale.shape[0] * scale.shape[2], layer]
            else:
                entry[0] = entry[0] + sums
                entry[1] += scale.shape[0] * scale.shape[2]

        return record

    def attach(self, model) -> None:
        """Register the hooks on `model`'s hybrid layers (done by `on_train_begin`)."""
        self.detach()
        self._stats.clear()
        for layer in hybrid_layers(model):
            self._handles.append(layer.span_predictor.register_forward_hook(self._hook(layer)))

    def detach(self) -> None:
        """Remove the hooks (done by `on_train_end`)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def summary(self, reset: bool = True) -> dict[str, float]:
        """The log entries for the forwards recorded so far (empty when none); `reset` starts a new period."""
        values: dict[str, float] = {}
        spans, temperatures = [], []
        for layer_idx in sorted(self._stats):
            sums, count, layer = self._stats[layer_idx]
            if count == 0:
                continue
            config = layer.config
            scale = (sums / count).cpu().tolist()  # per head (or one shared value)
            mean_scale = sum(scale) / len(scale)
            span = mean_scale * config.max_span
            temperature = config.tau_min + (config.tau_max - config.tau_min) * mean_scale
            name = f"layer_{layer_idx:02d}"
            values[f"span/{name}"] = span
            values[f"temperature/{name}"] = temperature
            if self.per_head and len(scale) > 1:
                for head, value in enumerate(scale):
                    values[f"span/{name}/head_{head}"] = value * config.max_span
            spans.append(span)
            temperatures.append(temperature)
        if spans:
            values["span/mean"] = sum(spans) / len(spans)
            values["temperature/mean"] = sum(temperatures) / len(temperatures)
        if reset:
            self._stats.clear()
        return values

    # -- Trainer events --------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.attach(model)

    def on_train_end(self, args, state, control, **kwargs):
        self.detach()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        values = self.summary()
        if not values:
            return
        logs.update(values)
        # `Trainer.log` appended `{**logs, "step": global_step}` just before calling `on_log`.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)


def console_logs(logs: dict[str, Any]) -> dict[str, Any]:
    """`logs` without the per-layer and per-head span values: loss, learning rate, `span/mean`, `temperature/mean`..."""
    return {key: value for key, value in logs.items() if "/layer_" not in key}


class SpanProgressCallback(ProgressCallback):
    """The Trainer's progress bar, printing each log as `console_logs` shortens it (one short line per log)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=console_logs(logs or {}), **kwargs)


class SpanPrinterCallback(PrinterCallback):
    """The Trainer's log printer (used with `disable_tqdm=True`), printing each log as `console_logs` shortens it."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=console_logs(logs or {}), **kwargs)


def add_span_logging(trainer, per_head: bool = False) -> SpanLoggingCallback:
    """Add a `SpanLoggingCallback` to `trainer` as its *first* callback, so that every logger sees the values, and
    have the console show only their means.

    (`Trainer(callbacks=[...])` places user callbacks after the `report_to` integrations, which log in their own
    `on_log` before a later callback could add anything.) The Trainer's progress bar or log printer is replaced by
    `SpanProgressCallback` or `SpanPrinterCallback`, which leave the per-layer values out of the console line; the
    integrations and `state.log_history` still get all of them. Returns the callback.
    """
    callback = SpanLoggingCallback(per_head=per_head)
    trainer.callback_handler.callbacks.insert(0, callback)
    for printer, short_printer in ((ProgressCallback, SpanProgressCallback), (PrinterCallback, SpanPrinterCallback)):
        if trainer.pop_callback(printer) is not None:
            trainer.add_callback(short_printer)
    return callback


class StopOnNonFiniteLoss(TrainerCallback):
    """Stop training at the end of the first step whose training loss is NaN or infinite, without saving it.

    The loss of every training forward is read by a forward hook on the model (one scalar read per step). After
    training, `step` is that step (None if every loss was finite) and `loss` its value: `finetune` reports them.
    """

    def __init__(self):
        self.step: int | None = None
        self.loss: float | None = None
        self._last: torch.Tensor | None = None
        self._handle = None

    def _record(self, module, inputs, output) -> None:
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if module.training and loss is not None:
            self._last = loss.detach()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self._handle = model.register_forward_hook(self._record)

    def on_step_end(self, args, state, control, **kwargs):
        if self._last is not None and self.step is None and not torch.isfinite(self._last).all():
            self.step, self.loss = state.global_step, float(self._last.float().mean())
            control.should_training_stop = True
            control.should_save = False  # a diverged model is no checkpoint to resume from

    def on_train_end(self, args, state, control, **kwargs):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


# --------------------------------------------------------------------------------------------------------------
# Data and evaluation


def text_dataset(tokenizer, texts: Iterable[str], seq_len: int):
    """A causal-LM dataset: the texts tokenised, concatenated and cut into blocks of `seq_len` tokens.

    Like transformers' `run_clm.py`: each text is tokenised with the tokenizer's default special tokens (e.g. a BOS
    at its start for Llama tokenizers), the token lists are concatenated, and the stream is cut into consecutive
    blocks of `seq_len` tokens; the incomplete last block is dropped, except when there is no full block, in which
    case the whole stream (at least 2 tokens) is the one, shorter, block. Columns: `input_ids`, `attention_mask`
    (all ones) and `labels` (= `input_ids`; the model shifts them).

    Raises:
        ValueError: `seq_len < 2`, no tokens at all, or a single token (nothing to predict).
    """
    from datasets import Dataset

    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    ids: list[int] = []
    with quiet_transformers():
        for text in texts:
            if text and text.strip():
                ids.extend(tokenizer(text)["input_ids"])
    if not ids:
        raise ValueError("the texts contain no tokens")
    if len(ids) < 2:
        raise ValueError("the texts contain a single token; at least 2 are needed to predict one")
    if len(ids) < seq_len:
        blocks = [ids]
    else:
        blocks = [ids[start : start + seq_len] for start in range(0, len(ids) - seq_len + 1, seq_len)]
    return Dataset.from_dict(
        {
            "input_ids": blocks,
            "attention_mask": [[1] * len(block) for block in blocks],
            "labels": [list(block) for block in blocks],
        }
    )


def model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


@torch.no_grad()
def perplexity(model, dataset, batch_size: int = 8, progress: str | None = None) -> float:
    """Perplexity of a causal LM on a `text_dataset`: `exp` of the mean next-token cross-entropy over all tokens.

    The LM loss only: the model is called without labels (so no span loss is added) and the cross-entropy is
    computed here from the logits, with labels shifted by one and `-100` ignored, summed over every predicted
    token of the dataset and divided by their number (not a mean of per-batch means). Rows of different lengths are
    right-padded. Runs in eval mode under `no_grad`, restoring the model's mode afterwards. Works on PEFT-wrapped
    models. Returns `inf` if the mean loss overflows `exp`. With `progress`, a progress bar of that title counts the
    batches.
    """
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    device = model_device(model)
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64)
    total_tokens = 0
    try:
        starts = range(0, len(dataset), batch_size)
        for start in tqdm(starts, desc=progress, unit="batch", leave=False, disable=progress is None):
            rows = dataset[start : start + batch_size]
            input_ids = rows["input_ids"]
            labels = rows.get("labels", input_ids)
            masks = rows.get("attention_mask") or [[1] * len(ids) for ids in input_ids]
            width = max(len(ids) for ids in input_ids)

            def pad(lists, value):
                return torch.tensor([list(x) + [value] * (width - len(x)) for x in lists], device=device)

            ids_t, mask_t, labels_t = pad(input_ids, 0), pad(masks, 0), pad(labels, -100)
            labels_t = labels_t.masked_fill(mask_t == 0, -100)
            logits = model(input_ids=ids_t, attention_mask=mask_t).logits
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            shift_labels = labels_t[:, 1:].reshape(-1)
            loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
            total_loss += loss.double().cpu()
            total_tokens += int(shift_labels.ne(-100).sum())
    finally:
        model.train(was_training)
    if total_tokens == 0:
        raise ValueError("the dataset has no token to predict")
    mean = total_loss.item() / total_tokens
    try:
        return math.exp(mean)
    except OverflowError:
        return math.inf


# --------------------------------------------------------------------------------------------------------------
# Model card

def hub_base_model(name: str | None) -> str | None:
    """The Hub id of the model `name` derives from, for a card's `base_model`; None when it is not known.

    `name` itself when it is a Hub id and no local path; for a local folder, the `base_model` of the folder's own
    model card (e.g. one `hybrid-hf finetune` wrote from a Hub model), else None: a local folder's
    name is no Hub id, even when it looks like one.
    """
    from huggingface_hub import ModelCard

    from .checkpoint import is_hub_id

    if not name:
        return None
    path = Path(name).expanduser()
    if not path.exists():
        return name if is_hub_id(name) else None
    try:
        base_model = ModelCard.load(path / "README.md").data.base_model
    except (OSError, ValueError):  # no card, or not a model card
        return None
    return base_model if isinstance(base_model, str) and is_hub_id(base_model) else None


def _markdown_table(rows: dict[str, Any]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            value = f"{value:.4g}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| | |", "| --- | --- |"]
    lines += [f"| {cell(key)} | {cell(value)} |" for key, value in rows.items()]
    return "\n".join(lines)


def _pipeline_tag(config: dict[str, Any]) -> str:
    """The Hub pipeline tag of a saved config's first architecture (`text-generation` when unknown)."""
    architectures = config.get("architectures") or []
    try:
        classes = model_classes(config.get("model_type", ""))
    except ValueError:
        return "text-generation"
    for task, name in classes.items():
        if architectures and architectures[0] in (name, f"Hybrid{name}"):
            return PIPELINE_TAGS[task]
    return "text-generation"


def write_model_card(
    folder,
    *,
    base_model: str | None,
    settings: dict[str, Any],
    training_summary: dict[str, Any],
    base_model_note: str | None = None,
    pipeline_tag: str | None = None,
    model_id: str | None = None,
    license: str | None = None,
) -> Path:
    """Write `folder/README.md`: a Hub model card for a hybrid checkpoint, built with `huggingface_hub.ModelCard`.

    Metadata: `base_model` (a Hub id, see `hub_base_model`; left out when unknown), `library_name: transformers`,
    `tags` (hybrid-attention, adaptive-span, custom_code, trust_remote_code, the host family), `pipeline_tag` (from
    `folder/config.json`'s class when not given) and `license` when given. Body: what the model is, a loading snippet,
    the hybrid settings and the training summary. No local path goes into the card: the snippet loads `model_id`.

    Args:
        folder: a saved hybrid model folder.
        base_model: the model it was converted / fine-tuned from: a Hub id, or a local folder (its own card's
            `base_model` is used, when it has one).
        settings: the hybrid settings (`max_span`, `ramp`, ...), shown as a table.
        training_summary: what the training did (steps, perplexities...), shown as a table.
        base_model_note: how the weights came from `base_model`, shown beside it (e.g. "its Q4_1 GGUF, dequantized").
        pipeline_tag: overrides the pipeline tag inferred from the config.
        model_id: what the usage snippet loads: the Hub id, or the folder's name (the default).
        license: the license metadata.
    Returns:
        The path of the README.
    """
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    config: dict[str, Any] = {}
    if (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text())
    model_type = config.get("model_type", "")
    host = model_type.removeprefix(HYBRID_PREFIX) if model_type else None
    if pipeline_tag is None:
        pipeline_tag = _pipeline_tag(config)
    base_model = hub_base_model(base_model)
    data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=["hybrid-attention", "adaptive-span", "custom_code", "trust_remote_code", *([host] if host else [])],
        license=license,
    )
    auto_class = {
        "text-generation": "AutoModelForCausalLM",
        "fill-mask": "AutoModelForMaskedLM",
        "text-classification": "AutoModelForSequenceClassification",
    }.get(pipeline_tag, "AutoModel")
    generate = (
        [
            'inputs = tokenizer("The quick brown fox", return_tensors="pt")',
            "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))",
        ]
        if auto_class == "AutoModelForCausalLM"
        else []
    )
    # `trust_remote_code=True` on the tokenizer too: `AutoTokenizer` reads config.json with `AutoConfig`, which asks
    # before running the folder's configuration code. The tokenizer itself is the library class in
    # tokenizer_config.json.
    usage = "\n".join(
        [
            "```python",
            f"from transformers import AutoTokenizer, {auto_class}",
            "",
            f'model_id = "{model_id or folder.name}"  # this folder, or its Hub id once pushed',
            "tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=True)",
            f"model = {auto_class}.from_pretrained(model_id, trust_remote_code=True)",
            *generate,
            "```",
        ]
    )
    if base_model:
        origin = f"[`{base_model}`](https://huggingface.co/{base_model})"
        origin += f" ({base_model_note})" if base_model_note else ""
    else:
        origin = f"A {host or 'host'} model"
    body = f"""
# Hybrid-attention {host or "model"}

{origin}
converted to **hybrid attention** with `hybrid_hf`: every hybrid layer mixes the host's own global attention with
an adaptive-span local attention, `y = W_mix [local ; global]`. Each token predicts its local span `s * max_span`
(and a temperature `tau_min + (tau_max - tau_min) * s`: short spans are sharp) from the mean of the global output
over the positions it can see; the soft span mask is the one of Sukhbaatar et al., 2019 ("Adaptive Attention Span
in Transformers"). The modeling code ships with the checkpoint, so loading needs `trust_remote_code=True` and only
`torch` and `transformers`.

## Usage

{usage}

## Hybrid settings

{_markdown_table(settings)}

## Training

{_markdown_table(training_summary)}
"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
    path = folder / "README.md"
    card.save(path)
    return path
