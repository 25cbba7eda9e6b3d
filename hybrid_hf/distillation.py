"""Distillation for recovery fine-tuning: the student's loss gains the KL divergence from a teacher's next-token
distribution, usually the host model a hybrid model was converted from.

A model whose layers went local-only computes something else than its host; fine-tuning on the LM loss alone brings
back the training text's perplexity but may trade other text for it. Matching the host's own predictions on the same
tokens (`distillation_loss`) keeps what the host knew while the local-only layers adapt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, Trainer


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over real tokens of `KL(teacher || student)` of the next-token distributions, from logits `(B, N, V)`,
    computed in float32."""
    teacher = F.log_softmax(teacher_logits.float(), dim=-1)
    student = F.log_softmax(student_logits.float(), dim=-1)
    per_token = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)  # (B, N)
    if attention_mask is None:
        return per_token.mean()
    weights = attention_mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp_min(1.0)


class DistillationTrainer(Trainer):
    """`Trainer` whose loss is the model's own (LM loss, plus the span penalty of a hybrid model) plus
    `distill_weight * distillation_loss` against `teacher`, which is frozen and kept on the model's device."""

    def __init__(self, *args, teacher: PreTrainedModel, distill_weight: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)
        self.distill_weight = distill_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        self.teacher.to(outputs.logits.device)
        with torch.no_grad():
            teacher_logits = self.teacher(
                input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False
            ).logits
        loss = loss + self.distill_weight * distillation_loss(
            outputs.logits, teacher_logits, inputs.get("attention_mask")
        )
        return (loss, outputs) if return_outputs else loss
