"""Tests of `hybrid-hf inspect` and the library behind it (`hybrid_hf/spans.py`, `hybrid_hf/plots.py`).

A tiny random Llama is converted, its span predictors get random weights, and it is saved with a tiny offline
tokenizer. The spans the command writes are checked against an independent computation: the global branch's
output is caught at the input of `mix` (`[local ; global]`), its causal prefix mean is taken by hand, and the
span is `sigmoid(W c + b) * max_span`.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from matplotlib.image import imread
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import hybrid_hf
from hybrid_hf import commands, hybrid_layers
from hybrid_hf.plots import SPAN_ALONG_SEQUENCE, SPAN_HEATMAP, TEMPERATURE_HEATMAP
from hybrid_hf.spans import JSON_NAME, collect_spans

MAX_SPAN = 8
HEADS = 4
LAYERS = 3
WORDS = "the a cat dog sat on mat and ran to house of king queen said good night day".split()
PROMPT = "the cat sat on the mat and the dog ran to the house of the king and the queen said good night"
PNGS = (SPAN_HEATMAP, TEMPERATURE_HEATMAP, SPAN_ALONG_SEQUENCE)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "[PAD]": 1, "<s>": 2, **{word: i + 3 for i, word in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>")


def tiny_hybrid(seed: int = 0, **settings):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
    )
    return hybrid_hf.convert(LlamaForCausalLM(config).eval(), max_span=MAX_SPAN, ramp=4, **settings)


def save(model, folder, tokenizer):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def run_cli(capsys, *argv):
    capsys.readouterr()  # drop what the setup printed (e.g. save progress bars)
    status = commands.main(["inspect", *map(str, argv)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def random_model(tokenizer, tmp_path_factory):
    """A hybrid model whose span predictors have random weights, saved with its tokenizer."""
    model = tiny_hybrid()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in hybrid_layers(model):
            proj = layer.span_predictor.proj
            proj.weight.copy_(torch.randn(proj.weight.shape, generator=generator) * 3.0)
            proj.bias.copy_(torch.randn(proj.bias.shape, generator=generator))
    return model, save(model, tmp_path_factory.mktemp("random_model"), tokenizer)


@pytest.fixture(scope="module")
def inspected(random_model, tmp_path_factory):
    """The output folder, stdout and the JSON of one `hybrid-hf inspect` run on `random_model`."""
    out = tmp_path_factory.mktemp("inspect_out") / "figures"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = commands.main(["inspect", random_model[1], "--prompt", PROMPT, "--out", str(out)])
    assert status == 0, stderr.getvalue()
    return out, stdout.getvalue(), json.loads((out / JSON_NAME).read_text())


def independent_spans(model, input_ids) -> list[torch.Tensor]:
    """Per hybrid layer, `(H, N)` spans computed by hand from the global branch's output."""
    globals_: list[torch.Tensor] = []
    layers = hybrid_layers(model)

    def keep_global_half(module, args):  # mix input: [local ; global]
        globals_.append(args[0][..., args[0].shape[-1] // 2 :])

    hooks = [layer.mix.register_forward_pre_hook(keep_global_half) for layer in layers]
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    spans = []
    for layer, global_output in zip(layers, globals_, strict=False):
        g = global_output[0].double()  # (N, d)
        prefix_mean = torch.cumsum(g, dim=0) / torch.arange(1, g.shape[0] + 1, dtype=g.dtype)[:, None]
        weight, bias = layer.span_predictor.proj.weight.double(), layer.span_predictor.proj.bias.double()
        spans.append(torch.sigmoid(prefix_mean @ weight.T + bias).T * MAX_SPAN)  # (H, N)
    return spans


# ----------------------------------------------------------------------------------------------------------------
# The command on a model with random span predictors
# ----------------------------------------------------------------------------------------------------------------


def test_writes_readable_pngs(inspected):
    out, stdout, _ = inspected
    for name in PNGS:
        path = out / name
        assert path.is_file(), name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 5000, name
        image = imread(path)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
        assert image.std() > 0.05  # not a blank canvas
        assert str(path) in stdout


def test_json_shape_and_range(inspected, tokenizer):
    _, stdout, data = inspected
    n = len(tokenizer(PROMPT)["input_ids"])
    assert data["max_span"] == MAX_SPAN
    assert data["tokens"] == n
    assert [entry["layer"] for entry in data["layers"]] == list(range(LAYERS))
    for entry in data["layers"]:
        assert len(entry["mean_span_per_head"]) == HEADS
        assert len(entry["mean_temperature_per_head"]) == HEADS
        assert len(entry["span_along_sequence"]) == HEADS
        assert all(len(row) == n for row in entry["span_along_sequence"])
        values = torch.tensor(entry["span_along_sequence"])
        assert values.min() >= 0 and values.max() <= MAX_SPAN
        assert values.std() > 0.1  # random predictors: the spans vary
        temps = torch.tensor(entry["mean_temperature_per_head"])
        assert temps.min() >= data["tau_min"] and temps.max() <= data["tau_max"]
        assert torch.allclose(values.mean(dim=1), torch.tensor(entry["mean_span_per_head"]), atol=1e-5)
    assert (
        "mean span" in stdout and len([line for line in stdout.splitlines() if line.strip()[:1].isdigit()]) >= LAYERS
    )


def test_json_matches_independent_computation(inspected, random_model, tokenizer):
    model, _ = random_model
    _, _, data = inspected
    input_ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    expected = independent_spans(model, input_ids)
    for entry, spans in zip(data["layers"], expected, strict=False):
        got = torch.tensor(entry["span_along_sequence"], dtype=torch.float64)
        torch.testing.assert_close(got, spans, atol=1e-4, rtol=0)
        scale = spans / MAX_SPAN
        temperature = data["tau_min"] + (data["tau_max"] - data["tau_min"]) * scale.mean(dim=1)
        torch.testing.assert_close(
            torch.tensor(entry["mean_temperature_per_head"], dtype=torch.float64), temperature, atol=1e-4, rtol=0
        )


def test_layers_option_and_bad_layers(random_model, tmp_path, capsys):
    status, out, err = run_cli(capsys, random_model[1], "--prompt", "the cat", "--out", tmp_path, "--layers", "2")
    assert status == 0, err
    assert (tmp_path / SPAN_ALONG_SEQUENCE).is_file()
    status, _, err = run_cli(capsys, random_model[1], "--prompt", "the cat", "--out", tmp_path / "o", "--layers", "7")
    assert status == 2
    assert err.startswith("error:") and "hybrid layers: 0-2" in err and len(err.strip().splitlines()) == 1


def test_padding_is_dropped(random_model):
    model, _ = random_model
    ids = torch.tensor([[2, 3, 4, 5, 6, 7, 1, 1], [2, 3, 4, 5, 6, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1] * 8])
    padded = collect_spans(model, ids, mask)
    plain = collect_spans(model, ids[:1, :6])
    assert padded.num_tokens == 6 and padded.layers == [0, 1, 2]
    for a, b in zip(padded.spans, plain.spans, strict=False):
        assert a.shape == (HEADS, 6)
        torch.testing.assert_close(torch.from_numpy(a), torch.from_numpy(b), atol=1e-5, rtol=0)
    for layer in hybrid_layers(model):  # hooks removed
        assert not layer.span_predictor._forward_hooks


def test_encoder_spans_span_the_sequence():
    """An encoder predicts one span per head from the whole (unpadded) sequence: constant along it."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    host = BertModel(
        BertConfig(
            vocab_size=99,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=HEADS,
            max_position_embeddings=64,
        )
    ).eval()
    model = hybrid_hf.convert(host, max_span=MAX_SPAN, ramp=4)
    with torch.no_grad():
        for layer in hybrid_layers(model):
            layer.span_predictor.proj.weight.normal_(0, 3.0)
    ids = torch.randint(3, 99, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    record = collect_spans(model, ids, mask)
    assert record.layers == [0, 1] and record.num_tokens == 7
    for span in record.spans:
        assert span.shape == (HEADS, 7)
        assert (span == span[:, :1]).all() and span.std() > 0.01
    assert model.training is False


# ----------------------------------------------------------------------------------------------------------------
# Shared span (span_per_head=False), exact values
# ----------------------------------------------------------------------------------------------------------------


def test_shared_span_exact(tokenizer, tmp_path, capsys):
    """Zero predictor weights and bias `b`: every span is `sigmoid(b) * max_span`, one value per layer."""
    model = tiny_hybrid(span_per_head=False, tau_min=0.25, tau_max=2.0)
    biases = [-1.5, 0.0, 2.0]
    with torch.no_grad():
        for layer, bias in zip(hybrid_layers(model), biases, strict=False):
            layer.span_predictor.proj.weight.zero_()
            layer.span_predictor.proj.bias.fill_(bias)
    folder = save(model, tmp_path / "model", tokenizer)
    text = tmp_path / "text.txt"
    text.write_text(PROMPT + "\n", encoding="utf-8")
    status, _, err = run_cli(capsys, folder, "--text", text, "--out", tmp_path / "out")
    assert status == 0, err
    data = json.loads((tmp_path / "out" / JSON_NAME).read_text())
    assert len(data["layers"]) == LAYERS
    for entry, bias in zip(data["layers"], biases, strict=False):
        scale = torch.sigmoid(torch.tensor(bias, dtype=torch.float64)).item()
        assert len(entry["mean_span_per_head"]) == 1 and len(entry["span_along_sequence"]) == 1
        assert entry["mean_span_per_head"][0] == pytest.approx(scale * MAX_SPAN, abs=1e-5)
        assert entry["mean_temperature_per_head"][0] == pytest.approx(0.25 + 1.75 * scale, abs=1e-5)
        assert all(value == pytest.approx(scale * MAX_SPAN, abs=1e-5) for value in entry["span_along_sequence"][0])
    for name in PNGS:
        assert imread(tmp_path / "out" / name).shape[0] > 200


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs: exit 2, one line on stderr, no traceback
# ----------------------------------------------------------------------------------------------------------------


def assert_one_line_error(status, err, *fragments):
    assert status == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_missing_model_folder(tmp_path, capsys):
    status, _, err = run_cli(capsys, tmp_path / "nope", "--prompt", "the cat", "--out", tmp_path / "out")
    assert_one_line_error(status, err, "not found")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("prompt", ["", "   \n\t "])
def test_empty_prompt(random_model, tmp_path, capsys, prompt):
    status, _, err = run_cli(capsys, random_model[1], "--prompt", prompt, "--out", tmp_path / "out")
    assert_one_line_error(status, err, "empty")


@pytest.mark.parametrize("content", ["", "  \n\n  "])
def test_empty_text_file(random_model, tmp_path, capsys, content):
    text = tmp_path / "empty.txt"
    text.write_text(content)
    status, _, err = run_cli(capsys, random_model[1], "--text", text, "--out", tmp_path / "out")
    assert_one_line_error(status, err, "empty")


def test_missing_text_file(random_model, tmp_path, capsys):
    status, _, err = run_cli(capsys, random_model[1], "--text", tmp_path / "nope.txt", "--out", tmp_path / "out")
    assert_one_line_error(status, err, "not found")


def test_text_and_prompt_are_exclusive(random_model, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(PROMPT)
    status, _, err = run_cli(capsys, random_model[1], "--text", text, "--prompt", "x", "--out", tmp_path / "o")
    assert_one_line_error(status, err, "not allowed with")
    status, _, err = run_cli(capsys, random_model[1], "--out", tmp_path / "o")
    assert_one_line_error(status, err, "--text")


def test_not_hybrid_model(tokenizer, tmp_path, capsys):
    torch.manual_seed(0)
    host = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=99,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    folder = save(host, tmp_path / "host", tokenizer)
    status, _, err = run_cli(capsys, folder, "--prompt", "the cat", "--out", tmp_path / "out")
    assert_one_line_error(status, err, "no hybrid attention layers", "hybrid-hf convert")
