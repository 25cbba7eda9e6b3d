"""Benchmark section `long`: a real model at long context with part of its layers local-only, beside the original.

SmolLM2-135M-Instruct (real weights, `examples.assets.smollm2_folder`; `--quick`: a tiny random Llama and random
tokens) is converted four ways: with 0% of its layers local-only (every layer hybrid: the default conversion), and
with 25%, 50% and 75% local-only (`--long-fractions`), chosen by calibration (`calibration.layer_scores` on the
first `CALIBRATION_TOKENS` tokens of *Macbeth*), the other layers left as the host's own. Local-only layers use
`LONG_SETTINGS`. At `--long-tokens` N (default 8192, the model's positions), each model beside the original, in one
process run:

- prefill: one forward over the first N tokens of *Hamlet* (logits of the last position only), time;
- cache: the bytes the cache holds after that prefill (keys, values and the hybrid layers' context state);
- decoding: greedy tokens/s after that N-token prompt, each timed call starting from a copy of the prompt's cache
  (`decoding.decoding_rates` with `prefilled`);
- perplexity: over the first N tokens of *Hamlet* and of the Lee news corpus, one window each.

With `--long-recovery-steps S` (0 skips), each model with local-only layers then gets a recovery fine-tune of S steps
(LoRA, distillation from the original with weight 1 on top of the LM loss, `RECOVERY` settings) on the other plays,
and its perplexities are measured again. A last row sets the decoding state of one *hybrid* layer against the host
layer's KV cache, in bfloat16, at N (SmolLM2's layer shape, random weights).
"""

from __future__ import annotations

import time

import torch

from ..calibration import choose_local_layers, layer_scores
from ..conversion import convert
from .decoding import decoding_rates, prefill
from .harness import BenchContext, Measurement, _no_grad, make_row

#: the local-only layers' window: 512 keys (max_span + ramp) and 4 sinks (`--quick`: 32 keys)
LONG_SETTINGS = dict(max_span=480, ramp=32, sink_tokens=4)
QUICK_SETTINGS = dict(max_span=24, ramp=8, sink_tokens=4)
CALIBRATION_TOKENS = 1024
#: the recovery fine-tune: blocks of `seq_len` tokens, one a step
RECOVERY = dict(seq_len=1024, batch_size=1, lr=5e-4, lora=True, lora_r=16, distill_weight=1.0)


def cache_bytes(cache) -> int:
    """Bytes of the tensors a cache holds: keys, values and a hybrid layer's context state."""
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values", "context_sums", "context_counts"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def _inputs(ctx: BenchContext, tokens: int):
    """`(host, tokenizer, {"hamlet": ids, "lee news": ids}, calibration ids, training texts)`."""
    if ctx.quick:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=tokens)  # fmt: skip
        torch.manual_seed(ctx.seed)
        host = LlamaForCausalLM(config).eval()
        gen = ctx.generator()
        texts = {name: torch.randint(0, 256, (1, tokens), generator=gen) for name in ("hamlet", "lee news")}
        return host, None, texts, torch.randint(0, 256, (1, 64), generator=gen), None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..examples.assets import held_out_split, lee_news_text, shakespeare_plays, smollm2_folder

    folder = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    host = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    plays = shakespeare_plays()
    train, hamlet = held_out_split({k: v for k, v in plays.items() if k != "macbeth"}, "hamlet")

    def ids(text: str, n: int) -> torch.Tensor:
        return tokenizer(text, return_tensors="pt")["input_ids"][:, :n]

    texts = {"hamlet": ids(hamlet, tokens), "lee news": ids(lee_news_text(), tokens)}
    return host, tokenizer, texts, ids(plays["macbeth"], CALIBRATION_TOKENS), train


def _perplexity(model, ids: torch.Tensor) -> tuple[float, float]:
    """`(perplexity, seconds)` of one window."""
    start = time.perf_counter()
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    return float(torch.exp(loss)), time.perf_counter() - start


def _models(ctx: BenchContext, host, calibration: torch.Tensor) -> tuple[dict, list[float]]:
    settings = QUICK_SETTINGS if ctx.quick else LONG_SETTINGS
    scores = layer_scores(host, calibration, **settings)
    models = {"original": host}
    for fraction in ctx.long_fractions:
        layers = choose_local_layers(scores, fraction)
        kept = {"hybrid_layers": []} if layers else {}  # the other layers stay the host's own
        models[f"{fraction:.0%} local-only"] = convert(host, local_layers=layers, **kept, **settings).eval()
    return models, scores


def bench_long(ctx: BenchContext) -> list[dict]:
    """See the module docstring."""
    tokens = 256 if ctx.quick else ctx.long_tokens
    host, tokenizer, texts, calibration, train = _inputs(ctx, tokens)
    models, scores = _models(ctx, host, calibration)
    ctx.log(f"[bench] long: calibration scores {[round(s, 4) for s in scores]}")
    prompt = texts["hamlet"][:, :tokens]
    n = prompt.shape[1]
    rows: list[dict] = []

    def add(name: str, mode: str, measurement: Measurement | None, ratios: dict, note: str = "", **extra) -> None:
        local = getattr(models[name].config, "local_layers", None) or []
        rows.append(make_row("long", name, n, mode, measurement, ratios=ratios, note=note, impl=name,
                             local_layers=local, **extra))  # fmt: skip

    prompts = {name: _no_grad(lambda m=m: m(input_ids=prompt, logits_to_keep=1)) for name, m in models.items()}
    measured = ctx.compare(prompts)
    starts = {name: prefill(model, prompt) for name, model in models.items()}  # for the decoding too
    held = {name: cache_bytes(cache) for name, (_, cache) in starts.items()}
    for name in models:
        ratios = {"time converted/original": measured[name].median_ms / measured["original"].median_ms,
                  "cache converted/original": held[name] / held["original"]}  # fmt: skip
        add(name, "prefill (forward with cache, no grad)", measured[name], ratios,
            f"cache {held[name] / 2**20:.1f} MiB", cache_bytes=held[name])  # fmt: skip

    measured, rate = decoding_rates(ctx, models, prompt, new_tokens=6 if ctx.quick else 32, prefilled=starts)
    for name in models:
        add(name, "greedy decoding after the prompt", measured[name],
            {"tokens/s converted/original": rate[name] / rate["original"]}, f"{rate[name]:.2f} tokens/s",
            tokens_per_s=rate[name])  # fmt: skip

    def perplexities(stage: str, names: list[str]) -> None:
        for name in names:
            for text, ids in texts.items():
                value, seconds = _perplexity(models[name], ids)
                base = next((r for r in rows if r["impl"] == "original" and r["mode"] == f"perplexity, {text}"), None)
                ratio = {"perplexity converted/original": value / base["perplexity"]} if base else {}
                add(name, f"perplexity, {text}", Measurement([seconds * 1e3]), ratio, f"{value:.2f} {stage}",
                    perplexity=value, stage=stage)  # fmt: skip

    perplexities("before recovery", list(models))
    if ctx.long_recovery_steps and tokenizer is not None:  # not with --quick: no text to train on
        perplexities("after recovery", _recover(ctx, models, tokenizer, train))
    rows.append(_hybrid_state_row(ctx, tokens))
    for row in rows:
        row["calibration_scores"] = scores
    return rows


def _recover(ctx: BenchContext, models: dict, tokenizer, train: list[str]) -> list[str]:
    """The recovery fine-tune of every model with local-only layers, in place; returns their names."""
    from ..finetuning import finetune

    names = [name for name, model in models.items() if getattr(model.config, "local_layers", None)]
    for name in names:
        start = time.perf_counter()
        result = finetune(models[name], None, tokenizer=tokenizer, texts=train, steps=ctx.long_recovery_steps,
                          use_cpu=ctx.device.type == "cpu", distill_from=models["original"], quiet=True,
                          **RECOVERY)  # fmt: skip
        models[name] = result.model.eval()
        ctx.log(f"[bench] long: recovery of {name}: {ctx.long_recovery_steps} steps in "
                f"{time.perf_counter() - start:.0f} s")  # fmt: skip
    return names


def _hybrid_state_row(ctx: BenchContext, tokens: int) -> dict:
    """One hybrid layer's decoding state (KV cache + context state) against the host layer's KV cache, bfloat16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    width = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2) if ctx.quick \
        else dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)
    config = LlamaConfig(vocab_size=256, num_hidden_layers=1, max_position_embeddings=tokens, **width)
    torch.manual_seed(ctx.seed)
    host = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    hybrid = convert(host, **(QUICK_SETTINGS if ctx.quick else LONG_SETTINGS))
    ids = torch.randint(0, 256, (1, tokens), generator=ctx.generator())
    held, start = {}, time.perf_counter()
    for name, model in (("host layer", host), ("hybrid layer", hybrid)):
        with torch.no_grad():
            held[name] = cache_bytes(model(input_ids=ids, logits_to_keep=1).past_key_values)
    seconds = time.perf_counter() - start
    ratio = held["hybrid layer"] / held["host layer"]
    return make_row("long", "one hybrid layer's decoding state (bfloat16)", tokens, "decoding state after the prompt",
                    Measurement([seconds * 1e3]), ratios={"state hybrid/host KV": ratio}, impl="hybrid layer state",
                    note=f"{held['hybrid layer'] / 2**20:.2f} MiB vs {held['host layer'] / 2**20:.2f} MiB; "
                    "time: both prefills")  # fmt: skip
