"""Composite (image-text) models: the self-attention of the text model becomes hybrid, the vision tower stays as it
is; the hybrid settings live on the text config; generation with an image equals the host at conversion. Gemma 3
names its text config class; LLaVA's text config is any model type (here Llama), resolved from its `model_type`."""

import pytest
import torch
from test_remote_code import run_remote
from tiny_models import VOCAB, perturb
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, LlavaConfig, LlavaForConditionalGeneration

from hybrid_hf import convert, hybrid_layers

SETTINGS = dict(max_span=4, ramp=2)
NEW = SETTINGS["max_span"] + 24
GREEDY = dict(do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW)
IMAGE_TOKEN, BEGIN_IMAGE, END_IMAGE = VOCAB - 1, VOCAB - 3, VOCAB - 2
TOKENS_PER_IMAGE = 4


def tiny_gemma3(seed: int = 0) -> Gemma3ForConditionalGeneration:
    text = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, sliding_window=8, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                  patch_size=7)  # fmt: skip
    config = Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=TOKENS_PER_IMAGE, image_token_index=IMAGE_TOKEN,
        boi_token_index=BEGIN_IMAGE, eoi_token_index=END_IMAGE,
    )  # fmt: skip
    torch.manual_seed(seed)
    return Gemma3ForConditionalGeneration(config).eval()


def image_prompt(seed: int = 0) -> dict[str, torch.Tensor]:
    """`<bos> <boi> <image> x 4 <eoi>` and five text tokens, with a random 28 x 28 image."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(3, VOCAB - 3, (1, 5), generator=generator)
    image = torch.full((1, TOKENS_PER_IMAGE), IMAGE_TOKEN)
    input_ids = torch.cat([torch.tensor([[1, BEGIN_IMAGE]]), image, torch.tensor([[END_IMAGE]]), text], dim=1)
    return {
        "input_ids": input_ids,
        "token_type_ids": (input_ids == IMAGE_TOKEN).long(),
        "pixel_values": torch.randn(1, 3, 28, 28, generator=generator),
    }


def tiny_llava(seed: int = 0) -> LlavaForConditionalGeneration:
    text = dict(
        model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256, pad_token_id=0,
    )  # fmt: skip
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=28, patch_size=7, projection_dim=32)  # fmt: skip
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN, image_seq_length=16)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


def llava_prompt(seed: int = 0) -> dict[str, torch.Tensor]:
    """`<bos>`, the 16 image tokens of a 28 x 28 image in 7 x 7 patches, and five text tokens."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(3, VOCAB - 3, (1, 5), generator=generator)
    input_ids = torch.cat([torch.tensor([[1]]), torch.full((1, 16), IMAGE_TOKEN), text], dim=1)
    return {"input_ids": input_ids, "pixel_values": torch.randn(1, 3, 28, 28, generator=generator)}


FAMILIES = {"gemma3": (tiny_gemma3, image_prompt), "llava": (tiny_llava, llava_prompt)}


@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_text_models_attention_becomes_hybrid(family):
    hybrid = convert(FAMILIES[family][0](), **SETTINGS)
    text_attention = [layer.self_attn for layer in hybrid.model.language_model.layers]
    assert hybrid_layers(hybrid) == text_attention
    assert not hybrid_layers(hybrid.model.vision_tower)
    assert hybrid.config.text_config.max_span == 4 and not hasattr(hybrid.config, "max_span")
    assert hybrid.config.text_config._attn_implementation == "hybrid"
    assert hybrid.config.vision_config._attn_implementation != "hybrid"


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_an_image_equals_the_host_at_conversion(family):
    build, prompt = FAMILIES[family]
    host = build()
    hybrid = convert(host, **SETTINGS)
    prompt = prompt()
    with torch.no_grad():
        exact = (hybrid(**prompt).logits - host(**prompt).logits).abs().max()
    assert exact <= 1e-6
    assert torch.equal(hybrid.generate(**prompt, **GREEDY), host.generate(**prompt, **GREEDY))


@pytest.mark.parametrize("family", FAMILIES)
def test_with_an_image_cached_decoding_equals_uncached_when_the_local_branch_matters(family):
    build, prompt = FAMILIES[family]
    host = build()
    hybrid = convert(host, **SETTINGS)
    perturb(hybrid)
    prompt = prompt()
    with torch.no_grad():
        assert (hybrid(**prompt).logits - host(**prompt).logits).abs().max() > 1e-3
    assert torch.equal(hybrid.generate(**prompt, **GREEDY), hybrid.generate(**prompt, **GREEDY, use_cache=False))


def test_saved_image_text_models_load_with_remote_code_without_the_package(tmp_path):
    cases, expected = [], {}
    for family, (build, prompt) in FAMILIES.items():
        hybrid = convert(build(), **SETTINGS)
        perturb(hybrid)
        folder = tmp_path / family
        hybrid.save_pretrained(folder)
        torch.save(prompt(), folder / "inputs.pt")
        with torch.no_grad():
            expected[folder] = hybrid(**prompt()).logits, hybrid.state_dict()
        cases.append({"folder": str(folder), "auto": "AutoModelForImageTextToText", "generate": False})
    result = run_remote(cases, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for folder, (logits, state) in expected.items():
        remote = torch.load(folder / "remote.pt")
        assert remote["class"].startswith("transformers_modules.")
        assert all(torch.equal(remote["state"][name], tensor) for name, tensor in state.items())
        torch.testing.assert_close(remote["output"], logits, atol=1e-6, rtol=0)


def test_a_named_text_config_class_needs_transformers_to_build_parts_from_their_defaults():
    """Gemma 3's config names its text config class; a transformers whose configs build their parts themselves (no
    `sub_configs_defaults`) would load a saved model's text config without its hybrid settings: refused there."""
    host = tiny_gemma3()
    if getattr(Gemma3Config, "sub_configs_defaults", None) is None:
        with pytest.raises(ValueError, match="sub_configs_defaults"):
            convert(host, **SETTINGS)
    else:
        assert type(convert(host, **SETTINGS).config.text_config).__name__ == "HybridGemma3TextConfig"
