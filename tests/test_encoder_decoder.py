"""Encoder-decoders: the encoder's and the decoder's self-attention become hybrid (bidirectional and causal), their
cross-attention stays global; conversion is exact, cached decoding (greedy and beam search) equals uncached, padding
of the encoder's input changes nothing, and saved models load with remote code alone."""

import pytest
import torch
from test_remote_code import run_remote
from tiny_models import VOCAB, perturb
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    T5Config,
    T5ForConditionalGeneration,
    WhisperConfig,
    WhisperForConditionalGeneration,
)

from hybrid_hf import convert, hybrid_layers

SETTINGS = dict(max_span=4, ramp=2)
#: new tokens per generation: well past `max_span + ramp`, so the decoder's local window slides
NEW = SETTINGS["max_span"] + 24
GREEDY = dict(do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW)
MEL_BINS, FRAMES = 80, 60  # a tiny Whisper's log-mel input: 2 x max_source_positions frames


def tiny_whisper(seed: int = 0) -> WhisperForConditionalGeneration:
    config = WhisperConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=MEL_BINS,
        max_source_positions=FRAMES // 2, max_target_positions=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1, suppress_tokens=None, begin_suppress_tokens=None,
    )  # fmt: skip
    torch.manual_seed(seed)
    return WhisperForConditionalGeneration(config).eval()


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    config = T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config).eval()


def tiny_bart(seed: int = 0) -> BartForConditionalGeneration:
    config = BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=96,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=None,
        forced_eos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(seed)
    return BartForConditionalGeneration(config).eval()


def log_mel(batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A synthetic log-mel spectrogram `(B, mel bins, frames)`: a few tones over noise, in Whisper's [-1, 1] range."""
    generator = torch.Generator().manual_seed(seed)
    time = torch.arange(FRAMES, dtype=torch.float32)
    bins = torch.arange(MEL_BINS, dtype=torch.float32)[:, None]
    tones = torch.stack(
        [torch.exp(-((bins - 10 - 20 * b) ** 2) / 8) * (1 + torch.sin(time / 3 + b)) for b in range(batch)]
    )
    return (tones + 0.1 * torch.randn(batch, MEL_BINS, FRAMES, generator=generator)).clamp(-1, 1)


def text_inputs(pad_id: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two encoder rows of 16 tokens, the second right-padded by 5."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (2, 16), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[1, -5:] = 0
    return {"input_ids": input_ids.masked_fill(mask == 0, pad_id), "attention_mask": mask}


SEQ2SEQ = {"t5": tiny_t5, "bart": tiny_bart}


def test_whisper_transcribes_a_log_mel_input_to_its_hosts_tokens():
    host = tiny_whisper()
    hybrid = convert(host, **SETTINGS)
    features = log_mel()
    expected = host.generate(features, **GREEDY)
    assert torch.equal(hybrid.generate(features, **GREEDY), expected)
    assert torch.equal(
        hybrid.generate(features, **GREEDY, num_beams=3), host.generate(features, **GREEDY, num_beams=3)
    )


def test_whisper_self_attention_is_hybrid_and_cross_attention_global():
    hybrid = convert(tiny_whisper(), **SETTINGS)
    model = hybrid.model
    encoder = [layer.self_attn for layer in model.encoder.layers]
    decoder = [layer.self_attn for layer in model.decoder.layers]
    assert hybrid_layers(hybrid) == encoder + decoder
    assert not any(hasattr(layer.encoder_attn, "mix") for layer in model.decoder.layers)
    assert [m.is_causal for m in encoder + decoder] == [False, False, True, True]
    # each side's mix is sized by its own heads (4 in the encoder, 2 in the decoder, of 8 and 16 features)
    assert all(m.span_predictor.proj.out_features == 4 for m in encoder)
    assert all(m.span_predictor.proj.out_features == 2 for m in decoder)


@pytest.mark.parametrize("beams", [1, 3])
def test_whisper_cached_decoding_equals_uncached_when_the_local_branch_matters(beams):
    host = tiny_whisper()
    hybrid = convert(host, **SETTINGS)
    perturb(hybrid)
    features = log_mel()
    with torch.no_grad():
        decoder_input_ids = torch.ones(2, 4, dtype=torch.long)
        moved = hybrid(features, decoder_input_ids=decoder_input_ids).logits
        assert (moved - host(features, decoder_input_ids=decoder_input_ids).logits).abs().max() > 1e-3
    cached = hybrid.generate(features, **GREEDY, num_beams=beams)
    assert torch.equal(cached, hybrid.generate(features, **GREEDY, num_beams=beams, use_cache=False))


def test_whisper_long_form_generation_runs_segment_by_segment_as_its_host():
    """Input longer than the encoder's 30-"second" window: Whisper's long-form generation transcribes it in
    segments, each its own encoder pass and decoding; the hybrid model follows its host, cached or not."""
    host = tiny_whisper()
    generation = host.generation_config
    generation.no_timestamps_token_id = 50  # ids above it are timestamps
    generation.is_multilingual, generation.max_initial_timestamp_index = False, 5
    long_features = torch.cat([log_mel(1, seed) for seed in range(4)], dim=2)[:, :, : 3 * FRAMES + 10]
    mask = torch.ones(1, long_features.shape[2], dtype=torch.long)
    long_form = dict(attention_mask=mask, return_timestamps=True, max_new_tokens=10, do_sample=False)
    hybrid = convert(host, **SETTINGS)
    expected = host.generate(long_features, **long_form)
    assert expected.shape[1] > 20  # several segments
    assert torch.equal(hybrid.generate(long_features, **long_form), expected)
    perturb(hybrid)
    cached = hybrid.generate(long_features, **long_form)
    assert torch.equal(cached, hybrid.generate(long_features, **long_form, use_cache=False))


def test_the_encoder_run_alone_equals_the_encoder_inside_the_model():
    """Generation runs the encoder on its own (`get_encoder()(...)`); it must compute what the model's forward does."""
    hybrid = convert(tiny_t5(), **SETTINGS)
    perturb(hybrid)
    inputs = text_inputs(pad_id=0)
    with torch.no_grad():
        alone = hybrid.get_encoder()(**inputs).last_hidden_state
        inside = hybrid(**inputs, decoder_input_ids=torch.zeros(2, 1, dtype=torch.long)).encoder_last_hidden_state
    torch.testing.assert_close(alone, inside, atol=0, rtol=0)


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_seq2seq_generate_equals_the_host_at_conversion(family):
    host = SEQ2SEQ[family]()
    hybrid = convert(host, **SETTINGS)
    inputs = text_inputs(host.config.pad_token_id)
    decoder_input_ids = torch.full((2, 5), 3)
    with torch.no_grad():
        exact = (hybrid(**inputs, decoder_input_ids=decoder_input_ids).logits
                 - host(**inputs, decoder_input_ids=decoder_input_ids).logits).abs().max()  # fmt: skip
    assert exact <= 1e-6
    assert len(hybrid_layers(hybrid)) == 4  # two encoder and two decoder self-attention layers
    assert torch.equal(hybrid.generate(**inputs, **GREEDY), host.generate(**inputs, **GREEDY))
    assert torch.equal(
        hybrid.generate(**inputs, **GREEDY, num_beams=3), host.generate(**inputs, **GREEDY, num_beams=3)
    )


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_seq2seq_cached_equals_uncached_and_padding_changes_nothing(family):
    host = SEQ2SEQ[family]()
    hybrid = convert(host, **SETTINGS)
    perturb(hybrid)
    inputs = text_inputs(host.config.pad_token_id)
    for beams in (1, 3):
        cached = hybrid.generate(**inputs, **GREEDY, num_beams=beams)
        assert torch.equal(cached, hybrid.generate(**inputs, **GREEDY, num_beams=beams, use_cache=False))
    decoder_input_ids = torch.full((2, 12), 3)
    with torch.no_grad():
        together = hybrid(**inputs, decoder_input_ids=decoder_input_ids).logits[1]
        alone = hybrid(input_ids=inputs["input_ids"][1:, :-5], decoder_input_ids=decoder_input_ids[1:]).logits[0]
        moved = (hybrid(**inputs, decoder_input_ids=decoder_input_ids).logits
                 - host(**inputs, decoder_input_ids=decoder_input_ids).logits).abs().max()  # fmt: skip
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    assert moved > 1e-3


def test_encoder_decoders_load_with_remote_code_without_the_package(tmp_path):
    cases, expected = [], {}
    for name, host, inputs, auto in [
        ("whisper", tiny_whisper(), {"input_features": log_mel()}, "AutoModelForSpeechSeq2Seq"),
        ("t5", tiny_t5(), text_inputs(0), "AutoModelForSeq2SeqLM"),
    ]:
        folder = tmp_path / name
        hybrid = convert(host, **SETTINGS)
        perturb(hybrid)
        hybrid.save_pretrained(folder)
        inputs["decoder_input_ids"] = torch.full((2, 10), 3)
        torch.save(inputs, folder / "inputs.pt")
        with torch.no_grad():
            expected[folder] = {"output": hybrid(**inputs).logits, "state": hybrid.state_dict()}
        cases.append({"folder": str(folder), "auto": auto, "generate": False})
    result = run_remote(cases, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for folder, want in expected.items():
        remote = torch.load(folder / "remote.pt")
        assert remote["class"].startswith("transformers_modules.")
        assert all(torch.equal(remote["state"][name], tensor) for name, tensor in want["state"].items())
        torch.testing.assert_close(remote["output"], want["output"], atol=1e-6, rtol=0)


def test_local_only_layers_are_refused_on_an_encoder_decoder():
    with pytest.raises(ValueError, match="local_layers"):
        convert(tiny_t5(), local_layers=[0], **SETTINGS)


def test_hybrid_layers_count_the_encoder_first_then_the_decoder():
    host = tiny_whisper()
    hybrid = convert(host, hybrid_layers=[2, 3], **SETTINGS)  # the decoder's two layers only
    assert hybrid_layers(hybrid) == [layer.self_attn for layer in hybrid.model.decoder.layers]
    perturb(hybrid)
    features = log_mel()
    cached = hybrid.generate(features, **GREEDY)
    assert torch.equal(cached, hybrid.generate(features, **GREEDY, use_cache=False))
    with pytest.raises(ValueError, match=r"hybrid_layers.*\[0, 4\)"):
        convert(host, hybrid_layers=[4], **SETTINGS)


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_the_decoder_never_reads_later_tokens(family):
    hybrid = convert(SEQ2SEQ[family](), **SETTINGS)
    perturb(hybrid)
    inputs = text_inputs(hybrid.config.pad_token_id)
    decoder_input_ids = torch.full((2, 12), 3)
    changed = decoder_input_ids.clone()
    changed[:, -1] = 4
    with torch.no_grad():
        before = hybrid(**inputs, decoder_input_ids=decoder_input_ids).logits
        after = hybrid(**inputs, decoder_input_ids=changed).logits
    torch.testing.assert_close(after[:, :-1], before[:, :-1], atol=1e-6, rtol=0)
    assert (after[:, -1] - before[:, -1]).abs().max() > 1e-4
