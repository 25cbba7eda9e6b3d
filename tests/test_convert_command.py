"""`hybrid-hf convert`: tiny random checkpoints in tmp folders, converted, verified, written atomically.

Bad inputs must give exactly one line on stderr, a non-zero exit status and no output folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for the hub, whatever the order of imports
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    BertForMaskedLM,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    RobertaConfig,
    RobertaModel,
)

import hybrid_hf
from hybrid_hf import checkpoint, commands, conversion, publishing
from hybrid_hf.checkpoint import ConversionReport, convert_checkpoint
from hybrid_hf.verification import VERIFY_TEXT, VerificationError

NEW_MODULES = tuple(f".{name}." for name in conversion.NEW_PARAMETER_MODULES)
TINY = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)


def _tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built offline, whose vocabulary covers the verification text."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted(set(VERIFY_TEXT.replace(".", " . ").replace(",", " , ").split()))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{word: i + 4 for i, word in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def _save(model, folder: Path, tokenizer=None) -> Path:
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def _llama(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, "num_key_value_heads": 2, **overrides})).eval()


def _bert(cls=BertModel, **overrides):
    torch.manual_seed(0)
    return cls(BertConfig(**{**TINY, **overrides})).eval()


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny source folders, made once: llama (with tokenizer), tied llama, bert (no tokenizer), a bin-only one."""
    root = tmp_path_factory.mktemp("sources")
    folders = {
        "llama": _save(_llama(), root / "llama", _tokenizer()),
        "llama_tied": _save(_llama(tie_word_embeddings=True), root / "llama_tied"),
        "bert": _save(_bert(), root / "bert"),
        "bert_mlm": _save(_bert(BertForMaskedLM), root / "bert_mlm"),
    }
    # Pickled weights only, as old checkpoints have them.
    bin_only = root / "bin_only"
    bin_only.mkdir()
    model = _llama()
    model.config.save_pretrained(bin_only)
    torch.save(model.state_dict(), bin_only / "pytorch_model.bin")
    folders["bin_only"] = bin_only
    return folders


def _leftovers(parent: Path) -> list[str]:
    """Temporary folders (ours start with a dot) left beside an output."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _convert(capsys, *args: str) -> tuple[int, str, str]:
    status = commands.main(["convert", *map(str, args)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _assert_one_line_error(status: int, err: str) -> str:
    assert status != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    return lines[0]


def _assert_late_error(status: int, err: str) -> str:
    """A failure after loading: progress lines may precede it, but it ends in one error line, no traceback."""
    assert status != 0
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ")
    assert sum(line.startswith("error: ") for line in err.splitlines()) == 1
    return last


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's safetensors files (one file, or the shards of a streamed conversion); each name
    stored once."""
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        shard = load_file(path)
        assert not set(shard) & set(tensors), f"{path.name} stores a tensor again"
        tensors.update(shard)
    return tensors


def _assert_host_weights_kept(source: Path, output: Path) -> None:
    """Every weight of the source file is in the output files under its name, bit for bit; the rest is new.

    A tied weight the source stores once (e.g. the embedding for `lm_head`) is stored once in the output too.
    """
    before = load_file(source / "model.safetensors")
    after = _weights(output)
    for name, tensor in before.items():
        assert name in after, f"{name} missing from the converted checkpoint"
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name
    extra = sorted(set(after) - set(before))
    assert extra and all(any(module in name for module in NEW_MODULES) for name in extra), extra


# --- converting ----------------------------------------------------------------------------------


def test_llama_folder_converts_and_reloads_with_remote_code(sources, tmp_path, capsys) -> None:
    out = tmp_path / "hybrid-llama"
    status, stdout, err = _convert(capsys, sources["llama"], out, "--max-span", "8", "--ramp", "2")
    assert status == 0, err
    assert "llama (LlamaForCausalLM -> HybridLlamaForCausalLM)" in stdout
    assert "2 of 2 converted" in stdout
    assert "max |difference| 0 " in stdout  # the identity mix: exact
    assert str(out) in stdout
    assert "tokenizer:    saved" in stdout
    assert _leftovers(tmp_path) == []

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "hybrid_llama" and (config["max_span"], config["ramp"]) == (8, 2)
    assert "AutoModelForCausalLM" in config["auto_map"]
    assert (out / "modeling_hybrid.py").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / "pytorch_model.bin").exists()
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert "is_local" not in tokenizer_config and "local_files_only" not in tokenizer_config

    hybrid = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    original = LlamaForCausalLM.from_pretrained(sources["llama"]).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    texts = ["the converted model computes exactly", "what the original did"]
    ids = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected, actual = original(**ids).logits, hybrid(**ids).logits
    assert type(hybrid).__name__ == "HybridLlamaForCausalLM"
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)
    _assert_host_weights_kept(sources["llama"], out)


def test_local_layers_chosen_on_calibration_text(sources, tmp_path, capsys) -> None:
    text = tmp_path / "calibration.txt"
    text.write_text(VERIFY_TEXT * 4)
    out = tmp_path / "local"
    status, stdout, err = _convert(
        capsys, sources["llama"], out, "--max-span", "2", "--ramp", "1", "--local-layers", "auto",
        "--calibration", text, "--local-fraction", "0.5", "--sink-tokens", "1",
    )  # fmt: skip
    assert status == 0, err
    config = json.loads((out / "config.json").read_text())
    scores = config["layer_scores"]
    assert len(scores) == 2 and all(score > 0 for score in scores)
    assert config["local_layers"] == [min(range(2), key=lambda i: (scores[i], i))]
    assert f"1 of them local-only: {config['local_layers']}" in stdout and "not exact" in stdout
    assert "local-only layers" in (out / "README.md").read_text()
    hybrid = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert [getattr(m, "local_only", False) for m in hybrid.modules() if hasattr(m, "mix")] == [
        i in config["local_layers"] for i in range(2)
    ]


def test_bert_without_tokenizer_converts_with_settings(sources, tmp_path) -> None:
    out = tmp_path / "hybrid-bert"
    report = convert_checkpoint(sources["bert"], out, max_span=4, ramp=2, span_per_head=False, hybrid_layers=[1])
    assert isinstance(report, ConversionReport)
    assert (report.architecture, report.source_class, report.model_class) == ("bert", "BertModel", "HybridBertModel")
    assert (report.task, report.layers_converted, report.layers_total) == ("base", 1, 2)
    assert report.max_difference == 0.0 and report.verification_tokens > 0
    assert report.tokenizer_saved is False and report.output == out.absolute()
    config = json.loads((out / "config.json").read_text())
    assert (config["span_per_head"], config["hybrid_layers"]) == (False, [1])
    assert not (out / "tokenizer_config.json").exists()

    after = _weights(out)
    added = sum(t.numel() for name, t in after.items() if any(module in name for module in NEW_MODULES))
    assert report.parameters_added == added > 0
    _assert_host_weights_kept(sources["bert"], out)

    hybrid = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    original = BertModel.from_pretrained(sources["bert"]).eval()
    ids = torch.tensor([[5, 17, 33, 8, 41, 2, 9], [5, 17, 33, 0, 0, 0, 0]])
    mask = (torch.arange(7) < torch.tensor([[7], [3]])).long()
    with torch.no_grad():
        expected = original(input_ids=ids, attention_mask=mask).last_hidden_state
        actual = hybrid(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(actual[mask.bool()], expected[mask.bool()], rtol=0, atol=1e-6)


def test_tied_embeddings_stay_tied_and_stored_once(sources, tmp_path) -> None:
    out = tmp_path / "tied"
    report = convert_checkpoint(sources["llama_tied"], out)
    assert "lm_head.weight" not in load_file(sources["llama_tied"] / "model.safetensors")
    _assert_host_weights_kept(sources["llama_tied"], out)  # no second copy of the embedding as lm_head
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    new = sum(p.numel() for name, p in model.named_parameters() if any(m in f".{name}" for m in NEW_MODULES))
    assert report.parameters_added == new


def test_shared_span_and_layers_flags(sources, tmp_path, capsys) -> None:
    out = tmp_path / "flags"
    status, stdout, err = _convert(
        capsys, sources["llama"], out, "--no-span-per-head", "--hybrid-layers", "1",
        "--tau-min", "0.25", "--tau-max", "2", "--span-loss-coef", "0.1", "--initial-span", "0.3",
    )  # fmt: skip
    assert status == 0, err
    assert "1 of 2 converted" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["span_per_head"] is False
    assert config["hybrid_layers"] == [1]
    assert (config["tau_min"], config["tau_max"]) == (0.25, 2.0)
    assert (config["span_loss_coef"], config["initial_span"]) == (0.1, 0.3)


def test_task_comes_from_the_config_or_the_flag(sources, tmp_path) -> None:
    report = convert_checkpoint(sources["bert_mlm"], tmp_path / "mlm")  # architectures: BertForMaskedLM
    assert (report.task, report.model_class) == ("masked_lm", "HybridBertForMaskedLM")
    report = convert_checkpoint(sources["bert_mlm"], tmp_path / "base", task="base")
    assert report.model_class == "HybridBertModel"
    report = convert_checkpoint(sources["bert"], tmp_path / "cls", task="sequence_classification")
    assert report.model_class == "HybridBertForSequenceClassification" and report.max_difference == 0.0


def test_no_verify_skips_the_check(sources, tmp_path, capsys) -> None:
    report = convert_checkpoint(sources["bert"], tmp_path / "lib", verify=False)
    assert report.max_difference is None and report.verification_tokens == 0
    status, stdout, err = _convert(capsys, sources["bert"], tmp_path / "cli", "--no-verify")
    assert status == 0, err
    assert "verification: skipped" in stdout


HOSTS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**TINY, num_key_value_heads=2)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**TINY, num_key_value_heads=2)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**TINY, num_key_value_heads=2)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**TINY, num_key_value_heads=2, head_dim=8)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=99, n_embd=32, n_head=4, n_layer=2, n_positions=64)),
    "bert": lambda: BertModel(BertConfig(**TINY)),
    "roberta": lambda: RobertaModel(RobertaConfig(**TINY, pad_token_id=1)),
}


@pytest.mark.parametrize("model_type", sorted(HOSTS))
def test_every_architecture_converts_verified(model_type, tmp_path) -> None:
    torch.manual_seed(0)
    source = _save(HOSTS[model_type]().eval(), tmp_path / "source")
    report = convert_checkpoint(source, tmp_path / "out", max_span=4, ramp=2)
    assert report.architecture == model_type and report.max_difference == 0.0
    assert report.layers_converted == report.layers_total == 2
    _assert_host_weights_kept(source, tmp_path / "out")


# --- the output folder: refused, replaced, never half-written -------------------------------------


def test_existing_output_is_refused_and_left_untouched(sources, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "marker.txt").write_text("mine")
    status, stdout, err = _convert(capsys, sources["llama"], out)
    line = _assert_one_line_error(status, err)
    assert "already exists" in line and "--force" in line
    assert sorted(p.name for p in out.iterdir()) == ["marker.txt"] and (out / "marker.txt").read_text() == "mine"
    assert _leftovers(tmp_path) == []


def _model_folder(out: Path) -> Path:
    """An earlier output: a model folder (config.json) with a marker file."""
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "marker.txt").write_text("mine")
    return out


def test_force_replaces_a_model_folder_only(sources, tmp_path, capsys) -> None:
    out = _model_folder(tmp_path / "out")
    status, _, err = _convert(capsys, sources["llama"], out, "--force")
    assert status == 0, err
    assert not (out / "marker.txt").exists() and _weights(out)
    assert _leftovers(tmp_path) == []
    # User files (a folder without config.json, or a file) are never replaced.
    for mine in (tmp_path / "notes", tmp_path / "file"):
        if mine.name == "notes":
            mine.mkdir()
            (mine / "thesis.tex").write_text("mine")
        else:
            mine.write_text("a file")
        status, _, err = _convert(capsys, sources["bert"], mine, "--force")
        assert "not a model folder" in _assert_one_line_error(status, err)
    assert (tmp_path / "notes" / "thesis.tex").read_text() == "mine" and (tmp_path / "file").read_text() == "a file"
    assert _leftovers(tmp_path) == []


def test_output_may_not_replace_its_source(sources, tmp_path, capsys) -> None:
    status, _, err = _convert(capsys, sources["bert"], sources["bert"].parent, "--force")
    assert "would replace the source" in _assert_one_line_error(status, err)
    assert (sources["bert"] / "model.safetensors").is_file()


def _boom(*args, **kwargs):
    raise OSError("disk full")


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("failure", [_boom, _interrupt], ids=["error", "ctrl-c"])
def test_failed_save_leaves_nothing(sources, tmp_path, capsys, monkeypatch, failure) -> None:
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", failure)
    status, _, err = _convert(capsys, sources["llama"], tmp_path / "out", "--no-streaming")
    line = _assert_late_error(status, err)
    assert ("disk full" if failure is _boom else "interrupted") in line
    assert list(tmp_path.iterdir()) == []


def test_failed_tokenizer_save_with_force_keeps_the_old_output(sources, tmp_path, capsys, monkeypatch) -> None:
    out = _model_folder(tmp_path / "out")
    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", _boom)
    status, _, err = _convert(capsys, sources["llama"], out, "--force")
    assert "disk full" in _assert_late_error(status, err)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "marker.txt"]
    assert _leftovers(tmp_path) == []


def test_failed_final_rename_with_force_restores_the_old_output(sources, tmp_path, capsys, monkeypatch) -> None:
    out = _model_folder(tmp_path / "out")
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".out.tmp-"):
            raise OSError("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(publishing.os, "rename", rename)
    status, _, err = _convert(capsys, sources["bert"], out, "--force")
    assert "rename failed" in _assert_late_error(status, err)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "marker.txt"]
    assert _leftovers(tmp_path) == []


def test_failed_conversion_leaves_nothing(sources, tmp_path, monkeypatch) -> None:
    def broken(model, **settings):
        raise RuntimeError("conversion broke")

    monkeypatch.setattr(checkpoint, "convert", broken)
    with pytest.raises(RuntimeError, match="conversion broke"):
        convert_checkpoint(sources["llama"], tmp_path / "out", streaming=False)
    assert list(tmp_path.iterdir()) == []


def test_verification_failure_writes_nothing(sources, tmp_path, capsys, monkeypatch) -> None:
    real_convert = conversion.convert

    def off_by_a_little(model, **settings):  # a conversion whose mix is not the identity any more
        hybrid = real_convert(model, **settings)
        with torch.no_grad():
            hybrid_hf.hybrid_layers(hybrid)[0].mix.weight.mul_(1.01)
        return hybrid

    monkeypatch.setattr(checkpoint, "convert", off_by_a_little)
    with pytest.raises(VerificationError, match="differ"):
        convert_checkpoint(sources["llama"], tmp_path / "out", streaming=False)
    status, _, err = _convert(capsys, sources["bert"], tmp_path / "out", "--no-streaming")
    assert status == 1 and "nothing was written" in _assert_late_error(status, err)
    assert list(tmp_path.iterdir()) == []


# --- pickled weights ---------------------------------------------------------------------------------


def test_pickle_only_source_needs_allow_pickle(sources, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    status, _, err = _convert(capsys, sources["bin_only"], out)
    line = _assert_one_line_error(status, err)
    assert "pytorch_model.bin" in line and "--allow-pickle" in line
    assert list(tmp_path.iterdir()) == []

    status, stdout, err = _convert(capsys, sources["bin_only"], out, "--allow-pickle")
    assert status == 0, err
    assert (out / "model.safetensors").is_file() and not (out / "pytorch_model.bin").exists()
    original = torch.load(sources["bin_only"] / "pytorch_model.bin", weights_only=True)
    after = load_file(out / "model.safetensors")
    for name, tensor in original.items():
        assert torch.equal(after[name], tensor), name


# --- bad inputs: one line, non-zero, no traceback, nothing written ------------------------------------


def _unknown_to_transformers(root: Path) -> Path:
    folder = root / "unknown"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "not_a_real_model", "hidden_size": 32}))
    return folder


def _bad_heads_bert(root: Path) -> Path:
    folder = root / "bad_heads_bert"
    BertConfig(**{**TINY, "hidden_size": 30}).save_pretrained(folder)  # BERT's config does not check it itself
    return folder


def _bad_heads_llama(root: Path) -> Path:
    folder = root / "bad_heads_llama"
    folder.mkdir()
    config = LlamaConfig(**TINY).to_dict()
    config["hidden_size"] = 30
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _not_a_model(root: Path) -> Path:
    folder = root / "empty"
    folder.mkdir()
    (folder / "notes.txt").write_text("no config here")
    return folder


def _no_weights(root: Path) -> Path:
    folder = root / "config_only"
    LlamaConfig(**TINY).save_pretrained(folder)
    return folder


BAD_SOURCES = {
    "architecture unknown to transformers": (_unknown_to_transformers, [], "no model class in the installed"),
    "not a model folder": (_not_a_model, [], "no config.json"),
    "a file, not a folder": (lambda root: _not_a_model(root) / "notes.txt", [], "not a model folder"),
    "missing local path": (lambda root: root / "does" / "not" / "exist", [], "not found"),
    "hub id, hub unreachable": (lambda root: "no-such-org/no-such-model", [], "hub is not reachable"),
    "heads do not divide hidden (bert)": (_bad_heads_bert, [], "not a multiple of the number of attention heads"),
    "heads do not divide hidden (llama)": (_bad_heads_llama, [], "not a multiple of the number of attention heads"),
    "no weights": (_no_weights, [], "no weights"),
    "max span 0": ("llama", ["--max-span", "0"], "max_span"),
    "tau min above tau max": ("llama", ["--tau-min", "2", "--tau-max", "1"], "tau_min"),
    "initial span out of range": ("llama", ["--initial-span", "1.5"], "initial_span"),
    "layer out of range": ("llama", ["--hybrid-layers", "5"], "hybrid_layers"),
    "layers not a list": ("llama", ["--hybrid-layers", "one"], "--hybrid-layers"),
    "task not in table": ("llama", ["--task", "masked_lm"], "masked_lm"),
    "unknown flag": ("llama", ["--spam"], "unrecognized arguments"),
    "already hybrid": ("hybrid", [], "already a hybrid model"),
    "local layers auto without calibration": ("llama", ["--local-layers", "auto"], "needs --calibration FILE"),
    "calibration without local layers auto": ("llama", ["--calibration", "text.txt"], "--local-layers auto"),
    "calibration file missing": ("llama", ["--local-layers", "auto", "--calibration", "no.txt"], "is not a file"),
    "local fraction out of range": (
        "llama",
        ["--local-layers", "auto", "--calibration", "no.txt", "--local-fraction", "1.5"],
        "local_fraction",
    ),
    "local layer out of range": ("llama", ["--local-layers", "7"], "local_layers"),
    "local layers not a list": ("llama", ["--local-layers", "half"], "--local-layers"),
    "sink tokens negative": ("llama", ["--sink-tokens", "-1"], "sink_tokens"),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_input_is_one_line(case, sources, tmp_path, capsys, monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the env var is read at import
    make, flags, expected = BAD_SOURCES[case]
    if make == "hybrid":
        source = tmp_path / "hybrid"
        convert_checkpoint(sources["bert"], source)
        capsys.readouterr()
    else:
        source = sources[make] if isinstance(make, str) else make(tmp_path)
    out = tmp_path / "out"
    status, stdout, err = _convert(capsys, source, out, *flags)
    line = _assert_one_line_error(status, err)
    assert expected in line
    assert status == 2 and stdout == ""
    assert not out.exists() and _leftovers(tmp_path) == []


def test_bad_input_in_a_subprocess(tmp_path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "hybrid_hf", "convert", str(tmp_path / "missing"), str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: source {str(tmp_path / 'missing')!r} not found: no such folder, and not a valid hub model id"
    ]
    assert result.stdout == "" and list(tmp_path.iterdir()) == []
