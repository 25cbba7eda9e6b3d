"""`hybrid-hf convert` on the kinds beyond decoders and encoders: an encoder-decoder (T5), a speech encoder-decoder
(Whisper) and an image-text model (Gemma 3). Each folder converts, is verified exact, and loads with the Auto class
of its kind to the host's outputs."""

import json

import pytest
import torch
import transformers
from test_encoder_decoder import log_mel, text_inputs, tiny_t5, tiny_whisper
from test_multimodal import image_prompt, tiny_gemma3

from hybrid_hf import commands

KINDS = {
    "t5": (tiny_t5, "AutoModelForSeq2SeqLM", lambda: {**text_inputs(0), "decoder_input_ids": torch.full((2, 5), 3)}),
    "whisper": (tiny_whisper, "AutoModelForSpeechSeq2Seq", lambda: {"input_features": log_mel(), "decoder_input_ids": torch.full((2, 5), 3)}),  # noqa: E501
    "gemma3": (tiny_gemma3, "AutoModelForImageTextToText", image_prompt),
}  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_converts_exactly_and_loads_with_its_auto_class(kind, tmp_path, capsys):
    build, auto_name, inputs = KINDS[kind]
    host = build()
    host.save_pretrained(tmp_path / "source")
    status = commands.main(["convert", str(tmp_path / "source"), str(tmp_path / "hybrid"), "--max-span", "4"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "max |difference| 0 " in out
    config = json.loads((tmp_path / "hybrid" / "config.json").read_text())
    assert config["auto_map"]["AutoConfig"].startswith("configuration_hybrid.")
    settings = config["text_config"] if kind == "gemma3" else config  # a composite's settings: its text config
    assert settings["max_span"] == 4
    hybrid = getattr(transformers, auto_name).from_pretrained(tmp_path / "hybrid", trust_remote_code=True).eval()
    batch = inputs()
    with torch.no_grad():
        torch.testing.assert_close(hybrid(**batch).logits, host(**batch).logits, atol=1e-6, rtol=0)
