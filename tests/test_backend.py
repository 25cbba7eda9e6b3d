"""Hybrid attention as a transformers attention backend: what a transformers user expects of a model class."""

import inspect

import pytest
import torch
from datasets import Dataset
from tiny_models import DECODERS, ENCODERS, batch, outputs_of, perturb, tiny_config, tiny_host
from transformers import BertForMultipleChoice, DynamicCache, GPT2ForQuestionAnswering, Trainer, TrainingArguments

from hybrid_hf import HYBRID_ATTENTION, convert, hybrid_layers

SETTINGS = dict(max_span=8, ramp=4)
GREEDY = dict(max_new_tokens=30, min_new_tokens=30, do_sample=False, pad_token_id=0)


def perturbed(model_type, task=None, **overrides):
    hybrid = convert(tiny_host(model_type, task, **overrides), **SETTINGS)
    perturb(hybrid)
    return hybrid


@pytest.mark.parametrize("model_type,task", [("llama", "causal_lm"), ("gpt2", "causal_lm"), ("bert", "base")])
def test_forward_keeps_the_host_signature(model_type, task):
    host = tiny_host(model_type, task)
    hybrid = convert(host, **SETTINGS)
    assert inspect.signature(hybrid.forward) == inspect.signature(host.forward)


def test_plain_trainer_with_default_arguments_and_extra_columns(tmp_path):
    hybrid = convert(tiny_host("llama"), span_loss_coef=0.1, **SETTINGS)
    ids, _ = batch("llama", batch_size=8, length=16)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist(), "text": ["a line"] * 8})
    before = hybrid_layers(hybrid)[0].mix.weight.clone()
    args = TrainingArguments(tmp_path, max_steps=2, per_device_train_batch_size=4, report_to=[], use_cpu=True)
    result = Trainer(model=hybrid, args=args, train_dataset=data).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(hybrid_layers(hybrid)[0].mix.weight, before)


def test_left_padded_gpt2_generates_as_the_original_right_after_conversion():
    host = tiny_host("gpt2")
    hybrid = convert(host, **SETTINGS)
    input_ids, mask = batch("gpt2", length=12, padding="left")
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(
        hybrid.generate(input_ids, attention_mask=mask, **kwargs),
        host.generate(input_ids, attention_mask=mask, **kwargs),
    )


@pytest.mark.parametrize("model_type", ENCODERS)
@pytest.mark.parametrize("task", ["base", "masked_lm"])
def test_right_padding_leaves_real_tokens_unchanged_with_the_local_branch_active(model_type, task):
    hybrid = perturbed(model_type, task).eval()
    input_ids, mask = batch(model_type, padding="right")
    with torch.no_grad():
        together = outputs_of(hybrid, input_ids, mask)
        alone = outputs_of(hybrid, input_ids[1:, :-5], mask[1:, :-5])
    torch.testing.assert_close(together[1, :-5], alone[0], atol=1e-5, rtol=0)


def test_sliding_window_layers_decode_as_they_run_whole():
    hybrid = perturbed("mistral", sliding_window=5)
    prompt, _ = batch("mistral", batch_size=1, length=10)
    assert torch.equal(hybrid.generate(prompt, **GREEDY), hybrid.generate(prompt, use_cache=False, **GREEDY))


@pytest.mark.parametrize("mode", ["prompt_lookup", "assistant", "assistant_host"])
def test_speculative_decoding_gives_the_greedy_tokens(mode):
    hybrid = perturbed("llama")
    prompt, _ = batch("llama", batch_size=1, length=10)
    prompt = torch.cat([prompt, prompt], dim=1)  # repeats, so prompt lookup finds candidates
    extra = {
        "prompt_lookup": dict(prompt_lookup_num_tokens=3),
        "assistant": dict(assistant_model=perturbed("llama", seed=3)),
        "assistant_host": dict(assistant_model=tiny_host("llama", seed=4)),
    }[mode]
    assert torch.equal(hybrid.generate(prompt, **GREEDY, **extra), hybrid.generate(prompt, **GREEDY))


def test_beam_search_with_cache_equals_without():
    hybrid = perturbed("llama")
    prompt, _ = batch("llama", length=10)
    kwargs = dict(GREEDY, num_beams=3, num_return_sequences=2)
    assert torch.equal(hybrid.generate(prompt, **kwargs), hybrid.generate(prompt, use_cache=False, **kwargs))


def test_static_cache_is_refused_before_any_token():
    hybrid = perturbed("llama")
    prompt, _ = batch("llama", batch_size=1, length=10)
    with pytest.raises(ValueError, match="dynamic cache.*StaticCache"):
        hybrid.generate(prompt, cache_implementation="static", **GREEDY)


def test_cropped_cache_continues_as_a_fresh_one():
    hybrid = perturbed("llama").eval()
    ids, _ = batch("llama", batch_size=2, length=20)
    with torch.no_grad():
        cache = DynamicCache(config=hybrid.config)
        hybrid(ids, past_key_values=cache)
        cache.crop(-8)  # back to 12 tokens
        continued = hybrid(ids[:, 12:], past_key_values=cache).logits
        whole = hybrid(ids).logits[:, 12:]
    torch.testing.assert_close(continued, whole, atol=1e-5, rtol=0)


def test_output_attentions_returns_one_tensor_per_layer():
    hybrid = perturbed("llama")
    hybrid.set_attn_implementation("eager")
    assert hybrid.config._attn_implementation == HYBRID_ATTENTION
    assert hybrid.config.global_attn_implementation == "eager"
    input_ids, _ = batch("llama")
    out = hybrid(input_ids, output_attentions=True)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 4, 24, 24)


@pytest.mark.parametrize("model_type", DECODERS)
def test_eager_global_branch_uses_the_family_own_eager_function(model_type):
    host = tiny_host(model_type)
    host.set_attn_implementation("eager")
    hybrid = convert(host, **SETTINGS)
    assert hybrid.config.global_attn_implementation == "eager"
    input_ids, mask = batch(model_type, padding="left")
    with torch.no_grad():
        torch.testing.assert_close(
            outputs_of(hybrid, input_ids, mask)[mask.bool()],
            outputs_of(host, input_ids, mask)[mask.bool()],
            atol=1e-5,
            rtol=0,
        )


def test_compile_fullgraph_is_declared_unsupported():
    assert convert(tiny_host("llama"), **SETTINGS)._can_compile_fullgraph is False


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_packed_sequences_equal_each_sequence_alone(model_type):
    """Padding-free packing: sequences told apart only by `position_ids` (as `DataCollatorWithFlattening` makes)."""
    hybrid = perturbed(model_type).eval()
    ids, _ = batch(model_type, batch_size=1, length=30)
    lengths = (11, 19)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = hybrid(input_ids=ids, position_ids=position_ids, use_cache=False).logits
        start = 0
        for n in lengths:
            alone = hybrid(input_ids=ids[:, start : start + n], use_cache=False).logits
            torch.testing.assert_close(packed[:, start : start + n], alone, atol=1e-5, rtol=0)
            start += n


def test_multiple_choice_padding_is_honoured_with_the_local_branch_active():
    torch.manual_seed(0)
    model = convert(BertForMultipleChoice(tiny_config("bert")).eval(), **SETTINGS)
    perturb(model)
    ids, mask = batch("bert", batch_size=2, length=10, padding="right")  # two choices, the second padded in reach
    with torch.no_grad():
        together = model(input_ids=ids[None], attention_mask=mask[None]).logits[0, 1]
        alone = model(input_ids=ids[None, 1:, :-5], attention_mask=mask[None, 1:, :-5]).logits[0, 0]
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_config_output_attentions_follows_the_global_branch():
    hybrid = perturbed("llama")
    with pytest.raises(ValueError, match="global branch.*eager"):
        hybrid.config.output_attentions = True  # sdpa returns no weights
    hybrid.set_attn_implementation("eager")
    hybrid.config.output_attentions = True
    input_ids, _ = batch("llama")
    assert len(hybrid(input_ids).attentions) == 2


def test_heads_without_a_cache_argument_run_with_use_cache():
    torch.manual_seed(0)
    model = convert(GPT2ForQuestionAnswering(tiny_config("gpt2")).eval(), **SETTINGS)
    input_ids, _ = batch("gpt2")
    with torch.no_grad():
        out = model(input_ids=input_ids, use_cache=True)
    assert out.start_logits.shape == input_ids.shape


def test_uses_attention_interface_tells_the_two_kinds_of_model_apart():
    from transformers import BloomForCausalLM, LlamaForCausalLM

    from hybrid_hf.model.modeling_hybrid import uses_attention_interface

    assert uses_attention_interface(LlamaForCausalLM) and not uses_attention_interface(BloomForCausalLM)


@pytest.mark.parametrize(
    "model_type,reason",
    [
        ("bloom", "does not go through transformers' attention interface"),
        # transformers 5.25 moved Falcon onto the attention interface, without naming its attention modules
        ("falcon", "does not go through transformers' attention interface|does not name its attention modules"),
        ("diffllama", "calls its attention more than once a forward"),
        ("stablelm", "does not pass keyword arguments on to its attention"),
    ],
)
def test_unsupported_hosts_are_refused_with_the_reason(model_type, reason):
    from hybrid_hf.model.modeling_hybrid import UnsupportedHostError

    with pytest.raises(UnsupportedHostError, match=reason):
        convert(tiny_host(model_type), **SETTINGS)


def test_register_model_type_names_unknown_types():
    from hybrid_hf import register_model_type

    with pytest.raises(ValueError, match="not_a_model"):
        register_model_type("hybrid_not_a_model")


def test_auto_config_answers_for_every_hybrid_type_and_registers_it_on_first_lookup():
    """transformers' private table of registered types (`CONFIG_MAPPING._extra_content`) answers for `hybrid_<host>`
    types, registering their classes on first lookup (how a composite model's `text_config` resolves)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from hybrid_hf.model.configuration_hybrid import is_registered

    families = ("olmo", "opt", "biogpt", "phi", "persimmon", "helium", "glm", "exaone")
    model_type = next(f"hybrid_{t}" for t in families if not is_registered(f"hybrid_{t}"))
    assert model_type in CONFIG_MAPPING and not is_registered(model_type)
    config_class = CONFIG_MAPPING[model_type]
    assert config_class.model_type == model_type and is_registered(model_type)
    assert "hybrid_not_a_model" not in CONFIG_MAPPING
