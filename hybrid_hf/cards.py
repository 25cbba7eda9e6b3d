"""Hub model cards for hybrid checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import UsageError
from .loading import is_hub_id
from .model.configuration_hybrid import HYBRID_PREFIX
from .tasks import TASK_TABLE, class_task


def hub_base_model(name: str | None) -> str | None:
    """The Hub id of the model `name` derives from, for a card's `base_model`; None when it is not known.

    `name` itself when it is a Hub id and no local path; for a local folder, the `base_model` of the folder's own
    model card (e.g. one `hybrid-hf finetune` wrote from a Hub model), else None: a local folder's
    name is no Hub id, even when it looks like one.
    """
    from huggingface_hub import ModelCard

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
        task = architectures and class_task(config.get("model_type", ""), architectures[0])
    except UsageError:  # a model type the installed transformers does not know
        task = None
    return TASK_TABLE[task or "causal_lm"].pipeline_tag


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
    auto_class = next(
        (task.auto_class for task in TASK_TABLE.values() if task.pipeline_tag == pipeline_tag), "AutoModel"
    )
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
