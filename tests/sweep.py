"""Every text model type of the installed transformers with a causal-LM or masked-LM class, every text-to-text
encoder-decoder and every image-text-to-text family, converted on a tiny random config and checked: exact at
conversion, moved by the hybrid parameters, cached decoding equal to a whole forward, padding that changes nothing.
Encoder-decoders are checked as sequence-to-sequence LMs (padding of the source), composite models (a text model with
vision or audio parts) through their image-text class on text alone. `python tests/sweep.py OUT.md [model_type ...]`
runs it and writes the table."""

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
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from hybrid_hf import convert
from hybrid_hf.model.modeling_hybrid import UnsupportedHostError

SETTINGS = dict(max_span=4, ramp=2)
MAX_PARAMETERS = 10_000_000
SECONDS_PER_FAMILY = 300  # GLM-5-Next takes about 100 s on two loaded cores
MEMORY_LIMIT = 8 << 30  # address space of a worker, in bytes
_SEQ2SEQ = modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
_SPEECH2TEXT = modeling_auto.MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES
#: families the sweep must find passing
REQUIRED = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gpt2",
    "bert",
    "roberta",
    "gemma3_text",
    "gemma2",
    "phi3",
    "gpt_neox",
    "olmo2",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "starcoder2",
    "modernbert",
    "distilbert",
    "electra",
    "t5",
    "bart",
    "whisper",
    "gemma3",
    "qwen3_next",
    "qwen3_5_text",
)


_DRAFT = "a draft model: it runs only inside its target model, on the target's key-value states"
_NEEDS_IMAGE = (
    "its image-text class requires an image with every input (`pixel_values`): it does not run on text alone"
)
_IMAGE_ENCODER = "an encoder-decoder whose encoder reads images, not text input_ids"
#: families whose host no tiny config can make run on text, and why
UNSWEPT = {
    "musicgen": "a music model: its decoder reads audio codebooks, not text",
    "musicgen_melody": "a music model: its decoder reads audio codebooks, not text",
    "gemma4_assistant": _DRAFT,
    "gemma4_unified_assistant": _DRAFT,
    **dict.fromkeys(("blip", "blip-2", "idefics", "kosmos-2"), _NEEDS_IMAGE),
    **dict.fromkeys(
        ("instructblip", "instructblipvideo"),
        "its image-text class requires an image and the Q-Former's own text with every input (`pixel_values`, "
        "`qformer_input_ids`): it does not run on text alone",
    ),
    **dict.fromkeys(("vision-encoder-decoder", "pp_formulanet"), _IMAGE_ENCODER),
    "pix2struct": "an encoder-decoder whose encoder reads image patches (`flattened_patches`), not text input_ids",
    **dict.fromkeys(
        ("pi0", "pi05"),  # pi05: transformers 5.25
        "a robot action model: its forward requires the robot's `state` (and images), it does not run on text",
    ),
    "udop": "a document model: its encoder requires each token's bounding box (`bbox`) beside the text",
    "llama4": "transformers' Llama4ForConditionalGeneration fails on any input (its language model's output has no "
    "`image_outputs`); its text model is swept as llama4_text",
}


def model_types() -> list[str]:
    """The families with a causal-LM or masked-LM class, the text-to-text encoder-decoders (T5, LED, ...) and the
    image-text-to-text families (LLaVA, Qwen2-VL, PaliGemma, ...)."""
    causal = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    masked = modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    image_text = modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    return sorted(set(causal) | set(masked) | set(filter(_text_to_text, _SEQ2SEQ)) | set(image_text))


def _text_to_text(model_type: str) -> bool:
    """An encoder-decoder of text alone: its config has no parts (audio, vision, a separate encoder config)."""
    config_class = CONFIG_MAPPING[model_type]
    return not getattr(config_class, "sub_configs", None) and getattr(config_class(), "is_encoder_decoder", False)


def kind(config) -> str:
    """The family's kind: "encoder-decoder", "composite" (a text model with vision or audio parts) or "single"."""
    if config.is_encoder_decoder:
        return "encoder-decoder"
    parts = getattr(config, "sub_configs", None) or {}
    return "composite" if "text_config" in parts or "vision_config" in parts else "single"


def _host(model_type: str, seed: int = 0):
    """`(model, kind, decoder)`: an encoder-decoder's sequence-to-sequence LM (else its image-text class); a
    composite's image-text-to-text class (else its own LM class); otherwise the family's masked LM (an encoder) if it
    has one, else its causal LM, else its image-text class (Chameleon: one transformer over text and image tokens)."""
    masked = modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES.get(model_type)
    causal = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    image_text = modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(model_type)
    config = tiny_config(model_type)
    family_kind = kind(config)
    name = {
        "encoder-decoder": _SEQ2SEQ.get(model_type) or _SPEECH2TEXT.get(model_type) or image_text,
        "composite": image_text or masked or causal,
    }.get(family_kind, masked or causal or image_text)
    torch.manual_seed(seed)
    model = getattr(transformers, name)(config).eval()
    _randomize_zero_weights(model)
    return model, family_kind, name != masked


def _randomize_zero_weights(model) -> None:
    """Weight matrices a family initializes to zero (NeoMME's attention output projection, so that a new model's
    attention adds nothing) made random like the others: then every attention path reaches the output."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2 and not param.any():
                param.normal_(0.0, 0.02)


def _ids(config, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    low = (config.pad_token_id or 0) + 2 if isinstance(config.pad_token_id, int) else 2
    return torch.randint(low, 90, (batch, length), generator=torch.Generator().manual_seed(seed))


def _inputs(model, batch: int = 2, length: int = 16) -> dict[str, torch.Tensor]:
    """The model's inputs: token ids, or a speech model's features (as long as its encoder takes); an
    encoder-decoder's `decoder_input_ids` too."""
    config = model.config
    if model.main_input_name == "input_features":  # Whisper: mel features of the encoder's fixed length
        features = torch.randn(
            batch, config.num_mel_bins, 2 * config.max_source_positions, generator=torch.Generator().manual_seed(0)
        )
        inputs = {"input_features": features}
    else:
        inputs = {"input_ids": _ids(config, batch, length)}
    if config.is_encoder_decoder:
        inputs["decoder_input_ids"] = _ids(config, batch, 10, seed=1)
    return inputs


def _logits(model, ids=None, mask=None, **inputs):
    return model(input_ids=ids, attention_mask=mask, **inputs).logits


def check(model_type: str) -> dict:
    """`{"status": "pass" | "refused" | "skipped" | "fail", "reason": ..., "kind": ...}` for one family."""
    if model_type in UNSWEPT:
        return {"status": "skipped", "reason": UNSWEPT[model_type]}
    try:
        host, family_kind, decoder = _host(model_type)
        parameters = sum(p.numel() for p in host.parameters())
        if parameters > MAX_PARAMETERS:
            return {"status": "skipped", "reason": f"the tiny config still makes {parameters / 1e6:.0f}M parameters"}
        inputs = _inputs(host)
        with torch.no_grad():
            expected = host(**inputs).logits
    except ImportError as error:  # a part of the model (Gemma 3n's vision tower) comes from another package
        return {"status": "skipped", "reason": f"needs a package that is not installed: {_package(error)}"}
    except Exception as error:  # the host itself does not build or run from the tiny sizes
        return {"status": "skipped", "reason": f"the host does not run on a tiny config: {_line(error)}"}
    family = {"kind": family_kind, "decoder": decoder}
    try:
        hybrid = convert(host, **SETTINGS)
    except UnsupportedHostError as error:
        return {"status": "refused", "reason": _line(error), **family}
    except Exception as error:
        return {"status": "fail", "reason": f"conversion: {type(error).__name__}: {_line(error)}", **family}
    try:
        if family_kind == "encoder-decoder":
            reason = _verify_seq2seq(host, hybrid, inputs, expected)
        else:
            reason = _verify(host, hybrid, decoder, inputs["input_ids"], expected)
        return {"status": "pass", "reason": reason, **family}
    except UnsupportedHostError as error:  # refused when run past the conversion's two-token probe (BigBird's
        return {"status": "refused", "reason": _line(error), **family}  # block-sparse encoder on longer inputs)
    except Exception as error:
        return {"status": "fail", "reason": f"{type(error).__name__}: {_line(error)}", **family}


def _verify(host, hybrid, decoder: bool, ids, expected) -> str:
    pad = hybrid.config.pad_token_id if isinstance(hybrid.config.pad_token_id, int) else 0
    with torch.no_grad():
        exact = (_logits(hybrid, ids) - expected).abs().max().item()
        assert exact <= 1e-5, f"differs from the host by {exact:.2g} at conversion"
        perturb(hybrid)
        moved = (_logits(hybrid, ids) - expected).abs().max().item()
        assert moved > 1e-4, "the hybrid parameters do not move the output"
    if decoder:
        with torch.no_grad():
            if _reads_later(hybrid, {"input_ids": ids}, "input_ids"):
                assert _reads_later(host, {"input_ids": ids}, "input_ids"), "the hybrid model reads later tokens"
        greedy = dict(do_sample=False, pad_token_id=pad, eos_token_id=None)
        prompt = ids[:1, :6]
        new = SETTINGS["max_span"] + 24
        checked = "exact; causal; cached = uncached"
        if not _same_decoding(hybrid, {"input_ids": prompt}, new, greedy):
            # a host whose own cached decoding differs (BLT's byte patches): the hybrid cannot be held to it
            assert not _same_decoding(host, {"input_ids": prompt}, new, greedy), "cached greedy decoding differs"
            checked = "exact; causal; cached decoding not checked: the host's own differs from uncached"
        mask = torch.ones_like(ids[:, :10])
        mask[1, :4] = 0
        padded = ids[:, :10].masked_fill(mask == 0, pad)
        try:  # some hosts cannot generate from a left-padded batch at all
            host.generate(padded, attention_mask=mask, max_new_tokens=1, **greedy)
        except Exception as error:
            return f"{checked}; left padding not checked: the host fails ({_line(error)[:80]})"
        if not _same_left_padded(hybrid, padded, mask, greedy):
            # a host whose own left-padded row differs (Kosmos-2.5): the hybrid cannot be held to it
            assert not _same_left_padded(host, padded, mask, greedy), "a left-padded row differs from the row alone"
            return f"{checked}; left padding not checked: the host's own left-padded row differs from the row alone"
        return f"{checked}; left padding"
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    with torch.no_grad():
        together = _logits(hybrid, ids.masked_fill(mask == 0, pad), mask)[1, :-5]
        alone = _logits(hybrid, ids[1:, :-5])[0]
    difference = (together - alone).abs().max().item()
    assert difference <= 1e-4, f"right padding changes real tokens by {difference:.2g}"
    return "exact; right padding"


def _verify_seq2seq(host, hybrid, inputs: dict, expected) -> str:
    """An encoder-decoder: exact at conversion and moved by the hybrid parameters (logits for `decoder_input_ids`),
    a causal decoder (`_reads_later`), cached greedy decoding equal to uncached past
    the span, and a right-padded source row (with its attention mask)
    giving the logits of the row alone."""
    pad = hybrid.config.pad_token_id if isinstance(hybrid.config.pad_token_id, int) else 0
    with torch.no_grad():
        exact = (hybrid(**inputs).logits - expected).abs().max().item()
        assert exact <= 1e-5, f"differs from the host by {exact:.2g} at conversion"
        perturb(hybrid)
        moved = (hybrid(**inputs).logits - expected).abs().max().item()
        assert moved > 1e-4, "the hybrid parameters do not move the output"
        assert not _reads_later(hybrid, inputs, "decoder_input_ids"), "the decoder reads later tokens"
    greedy = dict(do_sample=False, pad_token_id=pad, eos_token_id=None)
    source = {name: value[:1] for name, value in inputs.items() if name != "decoder_input_ids"}
    new = SETTINGS["max_span"] + 24
    checked = "exact; causal; cached = uncached"
    if not _same_decoding(hybrid, source, new, greedy):
        # ProphetNet's own cached decoding differs from its uncached one: the hybrid cannot be held to it
        assert not _same_decoding(host, source, new, greedy), "cached greedy decoding differs"
        checked = "exact; causal; cached decoding not checked: the host's own differs from uncached"
    if "input_ids" not in inputs:
        return f"{checked}; encoder padding not checked: speech features of a fixed length, no mask"
    ids, target = inputs["input_ids"], inputs["decoder_input_ids"]
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    with torch.no_grad():
        together = _logits(hybrid, ids.masked_fill(mask == 0, pad), mask, decoder_input_ids=target)[1]
        alone = _logits(hybrid, ids[1:, :-5], decoder_input_ids=target[1:])[0]
    difference = (together - alone).abs().max().item()
    assert difference <= 1e-4, f"right padding of the source changes the logits by {difference:.2g}"
    return f"{checked}; encoder padding"


def _same_left_padded(model, padded, mask, greedy: dict) -> bool:
    """Whether the second row of `padded` (left-padded by 4 tokens) decodes greedily as the same row alone."""
    together = model.generate(padded, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, **greedy)
    alone = model.generate(padded[1:, 4:], max_new_tokens=8, min_new_tokens=8, **greedy)
    return torch.equal(together[1, 10:], alone[0, 6:])


def _reads_later(model, inputs: dict, key: str) -> bool:
    """Whether changing the last token of `inputs[key]` changes the logits of any earlier position (not causal)."""
    changed = {**inputs, key: inputs[key].clone()}
    changed[key][:, -1] += 1
    return (model(**changed).logits[:, :-1] - model(**inputs).logits[:, :-1]).abs().max().item() > 1e-5


def _same_decoding(model, source: dict, new: int, greedy: dict) -> bool:
    """Whether `new` greedily generated tokens are the same with the cache as without it."""
    cached = model.generate(**source, max_new_tokens=new, min_new_tokens=new, **greedy)
    uncached = model.generate(**source, max_new_tokens=new, min_new_tokens=new, use_cache=False, **greedy)
    return torch.equal(cached, uncached)


def _package(error: ImportError) -> str:
    """The package an import error asks for ("requires the timm library")."""
    words = str(error).split()
    return words[words.index("the") + 1] if "requires" in words and "the" in words else _line(error)


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
                    print(
                        f"{model_type}: {result['status']} ({time.perf_counter() - start:.1f} s) {result['reason']}",
                        file=sys.stderr,
                        flush=True,
                    )
                if results[model_type].get("reason") == "the worker process died":
                    break  # a new pool for the rest
    return results


def _kind_column(result: dict) -> str:
    """The table's kind: decoder, encoder, encoder-decoder, "decoder (composite)"; empty if the host never ran."""
    if "kind" not in result:
        return ""
    role = "decoder" if result["decoder"] else "encoder"
    return {"composite": f"{role} (composite)", "encoder-decoder": "encoder-decoder"}.get(result["kind"], role)


def markdown(results: dict[str, dict]) -> str:
    """The architecture table of docs/architectures.md: one row per family, passing ones first."""
    order = {"pass": 0, "refused": 1, "fail": 2, "skipped": 3}
    counts = {status: sum(r["status"] == status for r in results.values()) for status in order}
    lines = [
        "# Architectures",
        "",
        "Generated by `make architectures` (`tests/sweep.py`), which builds a tiny random model of every text model "
        "type of the installed transformers that has a causal-LM or masked-LM class, of every text-to-text "
        "encoder-decoder and of every image-text-to-text family, converts it and checks it "
        "(see [supported-architectures.md](supported-architectures.md)). "
        "Encoder-decoders are checked as sequence-to-sequence LMs, composite models (a text model with vision or "
        "audio parts) through their image-text class on text alone.",
        "",
        f"Swept on transformers {transformers.__version__}: {counts['pass']} families pass, {counts['refused']} are "
        f"refused, {counts['fail']} fail, {counts['skipped']} are skipped (each row says why).",
        "",
        "| model_type | kind | result | checked / reason |",
        "| --- | --- | --- | --- |",
    ]
    for name, result in sorted(results.items(), key=lambda item: (order[item[1]["status"]], item[0])):
        reason = result["reason"].replace("|", "\\|")
        lines.append(f"| `{name}` | {_kind_column(result)} | {result['status']} | {reason} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    results = sweep(sys.argv[2:] or None, progress=True)
    with open(sys.argv[1], "w") as f:
        f.write(markdown(results))
    print(markdown(results).splitlines()[0])
