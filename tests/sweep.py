"""Every text model type of the installed transformers with a causal-LM or masked-LM class, converted on a tiny
random config and checked: exact at conversion, moved by the hybrid parameters, cached decoding equal to a whole
forward, padding that changes nothing. `python tests/sweep.py OUT.json` runs it all and writes the results."""

from __future__ import annotations

import gc
import multiprocessing
import resource
import signal
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import torch
import transformers
from tiny_models import perturb, tiny_config
from transformers.models.auto import modeling_auto

from hybrid_hf import convert
from hybrid_hf.model.modeling_hybrid import UnsupportedHostError

SETTINGS = dict(max_span=4, ramp=2)
MAX_PARAMETERS = 10_000_000
SECONDS_PER_FAMILY = 120
MEMORY_LIMIT = 8 << 30  # address space of a worker, in bytes
#: families the sweep must find passing
REQUIRED = (
    "llama", "mistral", "qwen2", "qwen3", "gpt2", "bert", "roberta", "gemma3_text", "gemma2", "phi3", "gpt_neox",
    "olmo2", "mixtral", "qwen2_moe", "qwen3_moe", "starcoder2", "modernbert", "distilbert", "electra",
)


def model_types() -> list[str]:
    causal = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    masked = modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    return sorted(set(causal) | set(masked))


def _host(model_type: str, seed: int = 0):
    """The family's masked LM (an encoder) if it has one, else its causal LM (a decoder)."""
    masked = modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES.get(model_type)
    name = masked or modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    config = tiny_config(model_type)
    torch.manual_seed(seed)
    return getattr(transformers, name)(config).eval(), masked is None


def _ids(config, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    low = (config.pad_token_id or 0) + 2 if isinstance(config.pad_token_id, int) else 2
    return torch.randint(low, 90, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, mask=None):
    return model(input_ids=ids, attention_mask=mask).logits


def check(model_type: str) -> dict:
    """`{"status": "pass" | "refused" | "skipped" | "fail", "reason": ..., "decoder": bool}` for one family."""
    try:
        host, decoder = _host(model_type)
        if getattr(host.config, "sub_configs", None):
            return {"status": "skipped", "reason": "not a text-only model (its config has sub-configs)"}
        if getattr(host.config, "is_encoder_decoder", False):
            return {"status": "skipped", "reason": "an encoder-decoder model (not a causal or masked LM alone)"}
        parameters = sum(p.numel() for p in host.parameters())
        if parameters > MAX_PARAMETERS:
            return {"status": "skipped", "reason": f"the tiny config still makes {parameters / 1e6:.0f}M parameters"}
        ids = _ids(host.config, 2, 16)
        with torch.no_grad():
            expected = _logits(host, ids)
    except Exception as error:  # the host itself does not build or run from the tiny sizes
        return {"status": "skipped", "reason": f"the host does not run on a tiny config: {_line(error)}"}
    try:
        hybrid = convert(host, **SETTINGS)
    except UnsupportedHostError as error:
        return {"status": "refused", "reason": _line(error), "decoder": decoder}
    except Exception as error:
        return {"status": "fail", "reason": f"conversion: {type(error).__name__}: {_line(error)}", "decoder": decoder}
    try:
        return {"status": "pass", "reason": _verify(host, hybrid, decoder, ids, expected), "decoder": decoder}
    except Exception as error:
        return {"status": "fail", "reason": f"{type(error).__name__}: {_line(error)}", "decoder": decoder}


def _verify(host, hybrid, decoder: bool, ids, expected) -> str:
    pad = hybrid.config.pad_token_id if isinstance(hybrid.config.pad_token_id, int) else 0
    with torch.no_grad():
        exact = (_logits(hybrid, ids) - expected).abs().max().item()
        assert exact <= 1e-5, f"differs from the host by {exact:.2g} at conversion"
        perturb(hybrid)
        moved = (_logits(hybrid, ids) - expected).abs().max().item()
        assert moved > 1e-4, "the hybrid parameters do not move the output"
    if decoder:
        greedy = dict(do_sample=False, pad_token_id=pad, eos_token_id=None)
        prompt = ids[:1, :6]
        new = SETTINGS["max_span"] + 24
        cached = hybrid.generate(prompt, max_new_tokens=new, min_new_tokens=new, **greedy)
        uncached = hybrid.generate(prompt, max_new_tokens=new, min_new_tokens=new, use_cache=False, **greedy)
        assert torch.equal(cached, uncached), "cached greedy decoding differs from uncached"
        mask = torch.ones_like(ids[:, :10])
        mask[1, :4] = 0
        padded = ids[:, :10].masked_fill(mask == 0, pad)
        try:  # some hosts cannot generate from a left-padded batch at all
            host.generate(padded, attention_mask=mask, max_new_tokens=1, **greedy)
        except Exception as error:
            return f"exact; cached = uncached; left padding not checked: the host fails ({_line(error)[:80]})"
        together = hybrid.generate(padded, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, **greedy)
        alone = hybrid.generate(padded[1:, 4:], max_new_tokens=8, min_new_tokens=8, **greedy)
        assert torch.equal(together[1, 10:], alone[0, 6:]), "a left-padded row differs from the row alone"
        return "exact; cached = uncached; left padding"
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    with torch.no_grad():
        together = _logits(hybrid, ids.masked_fill(mask == 0, pad), mask)[1, :-5]
        alone = _logits(hybrid, ids[1:, :-5])[0]
    difference = (together - alone).abs().max().item()
    assert difference <= 1e-4, f"right padding changes real tokens by {difference:.2g}"
    return "exact; right padding"


def _line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:200]


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout(f"took more than {SECONDS_PER_FAMILY} s")


def _start_worker() -> None:
    """Each family runs in a worker process with a memory cap, so a family that allocates too much fails alone."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    signal.signal(signal.SIGALRM, _alarm)


def _check_in_worker(model_type: str) -> dict:
    signal.alarm(SECONDS_PER_FAMILY)
    try:
        return check(model_type)
    except _Timeout as error:
        return {"status": "fail", "reason": str(error)}
    except MemoryError:
        return {"status": "skipped", "reason": f"needs more than {MEMORY_LIMIT >> 30} GB on a tiny config"}
    finally:
        signal.alarm(0)
        gc.collect()


def sweep(types: list[str] | None = None, progress: bool = False) -> dict[str, dict]:
    """`check` every family (all of `model_types()` by default), each in a memory-capped worker process."""
    todo = list(types or model_types())
    results = {}
    context = multiprocessing.get_context("spawn")
    while todo:
        with ProcessPoolExecutor(1, mp_context=context, initializer=_start_worker, max_tasks_per_child=20) as pool:
            for model_type in list(todo):
                start = time.perf_counter()
                try:
                    results[model_type] = pool.submit(_check_in_worker, model_type).result()
                except BrokenProcessPool:
                    results[model_type] = {"status": "fail", "reason": "the worker process died"}
                todo.remove(model_type)
                if progress:
                    result = results[model_type]
                    print(f"{model_type}: {result['status']} ({time.perf_counter() - start:.1f} s) {result['reason']}",
                          file=sys.stderr, flush=True)
                if results[model_type].get("reason") == "the worker process died":
                    break  # a new pool for the rest
    return results


def markdown(results: dict[str, dict]) -> str:
    """The architecture table of docs/architectures.md: one row per family, passing ones first."""
    order = {"pass": 0, "refused": 1, "fail": 2, "skipped": 3}
    counts = {status: sum(r["status"] == status for r in results.values()) for status in order}
    lines = [
        "# Architectures",
        "",
        "Generated by `make architectures` (`tests/sweep.py`), which builds a tiny random model of every text model "
        "type of the installed transformers that has a causal-LM or masked-LM class, converts it and checks it (see "
        "[supported-architectures.md](supported-architectures.md)).",
        "",
        f"Swept on transformers {transformers.__version__}: {counts['pass']} families pass, {counts['refused']} are "
        f"refused, {counts['fail']} fail, {counts['skipped']} are not text models or do not run on a tiny config.",
        "",
        "| model_type | kind | result | checked / reason |",
        "| --- | --- | --- | --- |",
    ]
    for name, result in sorted(results.items(), key=lambda item: (order[item[1]["status"]], item[0])):
        kind = {True: "decoder", False: "encoder"}.get(result.get("decoder"), "")
        reason = result["reason"].replace("|", "\\|")
        lines.append(f"| `{name}` | {kind} | {result['status']} | {reason} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    results = sweep(sys.argv[2:] or None, progress=True)
    with open(sys.argv[1], "w") as f:
        f.write(markdown(results))
    print(markdown(results).splitlines()[0])
