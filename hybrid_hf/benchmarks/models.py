"""Benchmark section of whole models: a converted SmolLM2-shaped model beside its host."""

from __future__ import annotations

import functools

import torch

from .decoding import decoding_rates
from .harness import BenchContext, Measurement, _no_grad, _ratio, make_row
from .kernels import MAX_SPAN, RAMP


def smollm2_pair(quick: bool, device: torch.device, seed: int, **overrides: int) -> tuple[dict, object]:
    """`({"original": model, "hybrid": converted model}, config)`: SmolLM2-135M's shape as a Llama with random weights
    (config fields changed by `overrides`; 2 narrow layers when `quick`), converted with the benchmark's `max_span`
    and `ramp`; both in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..conversion import convert

    sizes = dict(hidden_size=72, intermediate_size=128, num_hidden_layers=2) if quick else {}
    config = LlamaConfig(
        **{
            "vocab_size": 49152,
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "max_position_embeddings": 8192,
            "tie_word_embeddings": True,
            **overrides,
            **sizes,
        }
    )
    torch.manual_seed(seed)
    models = {"original": LlamaForCausalLM(config).to(device).eval()}
    models["hybrid"] = convert(models["original"], max_span=MAX_SPAN, ramp=RAMP)
    return models, config


def training_step(model: torch.nn.Module, ids: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    """One training step on `ids`: forward with the LM loss, backward, the optimizer's update, gradients dropped."""
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bench_model(ctx: BenchContext) -> list[dict]:
    """A converted SmolLM2-135M-shaped Llama (random weights) vs the same model unconverted.

    Forward (prefill) at N=2048, a training step (forward, backward, AdamW) at N=1024 with its peak memory, and
    greedy decoding tokens/s after a 1024-token prompt (`decoding.decoding_rates`).
    """
    models, config = smollm2_pair(ctx.quick, ctx.device, ctx.seed)
    n_forward, n_train, context, new_tokens = (128, 64, 64, 8) if ctx.quick else (2048, 1024, 1024, 32)
    gen = ctx.generator()
    ids = torch.randint(0, config.vocab_size, (1, n_forward), generator=gen).to(ctx.device)
    labels = {name: f"{name} (SmolLM2-135M config, max_span={MAX_SPAN} ramp={RAMP})" for name in models}
    rows: list[dict] = []

    def add(mode: str, n: int, measured: dict[str, Measurement], **extra: object) -> None:
        for name in models:
            rows.append(make_row("model", labels[name], n, mode, measured[name], impl=name, **extra.get(name, {})))
        ratio = _ratio(rows[-1], rows[-2])
        rows[-1]["ratios"]["hybrid/original"] = ratio

    forward = {name: _no_grad(lambda m=m: m(input_ids=ids, logits_to_keep=1)) for name, m in models.items()}
    add("forward (no grad)", n_forward, ctx.compare(forward))

    measured, rate = decoding_rates(ctx, models, ids[:, :context], new_tokens)
    add(
        f"greedy decoding of {new_tokens} tokens after the prompt",
        context,
        measured,
        **{name: {"tokens_per_s": rate[name]} for name in models},
    )
    rows[-1]["ratios"] = {"tokens/s hybrid/original": rate["hybrid"] / rate["original"]}
    for row in rows[-2:]:
        row["note"] = f"{rate[row['impl']]:.1f} tokens/s"

    train_ids = ids[:, :n_train]
    steps = {}
    for name, model in models.items():
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        steps[name] = functools.partial(training_step, model, train_ids, optimizer)
    measured = ctx.compare(steps)
    add("training step (forward, backward, AdamW)", n_train, measured)
    if all(measured[name].peak_bytes for name in models):
        rows[-1]["ratios"]["peak memory hybrid/original"] = (
            measured["hybrid"].peak_bytes / measured["original"].peak_bytes
        )
    return rows
