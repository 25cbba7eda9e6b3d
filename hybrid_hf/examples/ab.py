"""A seeded A/B comparison: the hybrid model against the original fine-tuned with the same budget, seed by seed.

For each seed both arms start from the same pretrained weights, get the same LoRA budget, learning rate, batches in
the same order (the Trainer's `data_seed` is the seed) and the same LoRA initialisation seed, and are evaluated on
the same held-out tokens of every evaluation text. The hybrid arm is converted afresh from the original for each
seed; the original is copied, so the model passed in is never changed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .stats import paired_t_interval, verdict

#: the two arms, in the order of the paired difference (hybrid - baseline)
ARMS = ("hybrid", "baseline")


@dataclass
class SeededAB:
    """What `seeded_ab` measured.

    Attributes:
        seeds: the seeds, in order.
        perplexities: evaluation text -> arm -> held-out perplexity per seed (in `seeds` order).
        first: arm -> the `FinetuneResult` of the first seed (its `model` is the fine-tuned model; the hybrid one
            is also saved to `hybrid_output` when that was given).
    """

    seeds: list[int]
    perplexities: dict[str, dict[str, list[float]]]
    first: dict[str, Any] = field(default_factory=dict)

    def summaries(self, level: float = 0.95) -> dict[str, dict]:
        """Evaluation text -> `stats.paired_t_interval` of the hybrid against the baseline over the seeds."""
        return {name: paired_t_interval(level, **arms) for name, arms in self.perplexities.items()}

    def report(self, level: float = 0.95) -> dict[str, dict]:
        """Evaluation text -> `{"per_seed": {"hybrid", "baseline", "difference"}, "summary", "verdict"}`."""
        entries = {}
        for name, summary in self.summaries(level).items():
            hybrid, baseline = (self.perplexities[name][arm] for arm in ARMS)
            entries[name] = {
                "per_seed": {
                    "hybrid": hybrid,
                    "baseline": baseline,
                    "difference": [h - b for h, b in zip(hybrid, baseline, strict=True)],
                },
                "summary": summary,
                "verdict": verdict(summary["difference"]),
            }
        return entries


def seeded_ab(
    host,
    tokenizer,
    train_texts: list[str],
    eval_sets: dict,
    seeds: list[int],
    *,
    settings: dict[str, Any],
    hybrid_output: Path | None = None,
    card: dict[str, Any] | None = None,
    batch_size: int = 4,
    log=print,
    **finetune_kwargs: Any,
) -> SeededAB:
    """Fine-tune the hybrid model and the same-budget baseline once per seed and evaluate both on every text.

    Args:
        host: the original (pretrained) model; left unchanged.
        tokenizer: its tokenizer.
        train_texts: the training texts, the same for every run.
        eval_sets: evaluation text name -> `training.text_dataset` of its held-out tokens.
        seeds: one run of each arm per seed.
        settings: the hybrid settings for `convert` (`max_span`, `ramp`, `span_loss_coef`...).
        hybrid_output: where the first seed's fine-tuned hybrid model is saved (None: not saved).
        card: `finetune`'s model-card arguments for that saved model (`base_model`, `base_model_note`).
        batch_size: the training and evaluation batch size.
        log: called with one line per run.
        **finetune_kwargs: the rest of `finetune`'s arguments (`lora`, `steps`, `lr`, ...), the same for both arms.
    """
    from ..conversion import convert
    from ..data import perplexity
    from ..finetuning import finetune

    if not seeds:
        raise ValueError("seeds must name at least one seed")
    result = SeededAB(seeds=list(seeds), perplexities={name: {arm: [] for arm in ARMS} for name in eval_sets})
    for index, seed in enumerate(seeds):
        for arm in ARMS:
            log(f"      seed {seed} ({index + 1}/{len(seeds)}): fine-tuning the {arm}")
            if arm == "hybrid":
                model = convert(copy.deepcopy(host), **settings)
                saved = dict(output=hybrid_output, **(card or {})) if index == 0 else dict(output=None)
                tuned = finetune(
                    model,
                    texts=train_texts,
                    tokenizer=tokenizer,
                    batch_size=batch_size,
                    seed=seed,
                    **saved,
                    **finetune_kwargs,
                )
            else:
                tuned = finetune(
                    copy.deepcopy(host),
                    None,
                    hybrid=False,
                    texts=train_texts,
                    tokenizer=tokenizer,
                    batch_size=batch_size,
                    seed=seed,
                    **finetune_kwargs,
                )
            for name, dataset in eval_sets.items():
                value = perplexity(tuned.model, dataset, batch_size=batch_size, progress=f"perplexity, {arm}, {name}")
                result.perplexities[name][arm].append(value)
            if index == 0:
                result.first[arm] = tuned
            else:
                del tuned
    return result
