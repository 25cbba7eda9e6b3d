"""transformers' `ModelTesterMixin` and `GenerationTesterMixin` on the hybrid Llama, GPT-2, BERT, BART and T5 classes.

The testers follow transformers' own (`LlamaModelTester`, `GPT2ModelTester`, `BertModelTester`): tiny random
configs, here of the hybrid config classes, with a local window (`max_span + ramp` = 6 keys) shorter than the
7-token sequences, so the window's edge falls inside every test.

A new model starts as its conversion leaves it: `mix = [0 | I]`, the global branch alone. The `Blended` test classes
run the same tests with the local branch in use from the start (`a = (l + g) / 2`, spans that vary per token).
"""

from __future__ import annotations

import contextlib
import unittest
from unittest import mock

import pytest
import torch
from transformers import initialization as init
from transformers.models.auto.modeling_auto import MODEL_FOR_PRETRAINING_MAPPING_NAMES
from transformers.testing_utils import torch_device
from transformers_tests.generation.test_utils import GenerationTesterMixin
from transformers_tests.test_modeling_common import ModelTesterMixin, ids_tensor, random_attention_mask

import hybrid_hf
from hybrid_hf.model import modeling_hybrid

# transformers' tests check its deprecation warnings (FutureWarning), which this project's pytest settings hide.
pytestmark = pytest.mark.filterwarnings("default::FutureWarning")

#: hybrid settings of every tester: a window of 6 keys on 7-token sequences
HYBRID = dict(max_span=4, ramp=2)


class HybridModelTester:
    """Tiny config and inputs for one host family, as transformers' `<Family>ModelTester` makes them."""

    def __init__(
        self,
        parent: unittest.TestCase,
        config_class: type,
        config_fields: dict,
        causal_mask: bool,
        use_token_type_ids: bool = False,
        batch_size: int = 13,
        seq_length: int = 7,
        vocab_size: int = 99,
        hidden_size: int = 32,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_labels: int = 3,
        num_choices: int = 4,
        type_vocab_size: int = 16,
        type_sequence_label_size: int = 2,
    ):
        self.parent = parent
        self.config_class = config_class
        self.config_fields = config_fields
        self.causal_mask = causal_mask
        self.use_token_type_ids = use_token_type_ids
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_labels = num_labels
        self.num_choices = num_choices
        self.type_vocab_size = type_vocab_size
        self.type_sequence_label_size = type_sequence_label_size
        self.is_training = True

    def get_config(self):
        return self.config_class(vocab_size=self.vocab_size, **self.config_fields, **HYBRID)

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        if self.causal_mask:  # right padding of every length, as the causal-LM testers make it
            attention_mask = torch.tril(torch.ones_like(input_ids)).to(torch_device)
        else:
            attention_mask = random_attention_mask([self.batch_size, self.seq_length])
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.use_token_type_ids:
            inputs["token_type_ids"] = ids_tensor([self.batch_size, self.seq_length], self.type_vocab_size)
        return self.get_config(), inputs


class HybridLlamaTest(ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (
        hybrid_hf.HybridLlamaModel,
        hybrid_hf.HybridLlamaForCausalLM,
        hybrid_hf.HybridLlamaForSequenceClassification,
        hybrid_hf.HybridLlamaForQuestionAnswering,
        hybrid_hf.HybridLlamaForTokenClassification,
    )
    all_generative_model_classes = (hybrid_hf.HybridLlamaForCausalLM,)

    def setUp(self):
        fields = dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=37,
            hidden_act="gelu",
            max_position_embeddings=512,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        self.model_tester = HybridModelTester(self, hybrid_hf.HybridLlamaConfig, fields, causal_mask=True)


class HybridGPT2Test(ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (
        hybrid_hf.HybridGPT2Model,
        hybrid_hf.HybridGPT2LMHeadModel,
        hybrid_hf.HybridGPT2ForSequenceClassification,
        hybrid_hf.HybridGPT2ForTokenClassification,
        hybrid_hf.HybridGPT2ForQuestionAnswering,
    )
    all_generative_model_classes = (hybrid_hf.HybridGPT2LMHeadModel,)

    def setUp(self):
        fields = dict(
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_inner=37,
            activation_function="gelu",
            n_positions=512,
            bos_token_id=98,
            eos_token_id=98,
            pad_token_id=98,
        )
        self.model_tester = HybridModelTester(self, hybrid_hf.HybridGPT2Config, fields, causal_mask=False)


class HybridBertTest(ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (
        hybrid_hf.HybridBertModel,
        hybrid_hf.HybridBertLMHeadModel,
        hybrid_hf.HybridBertForMaskedLM,
        hybrid_hf.HybridBertForMultipleChoice,
        hybrid_hf.HybridBertForNextSentencePrediction,
        hybrid_hf.HybridBertForPreTraining,
        hybrid_hf.HybridBertForQuestionAnswering,
        hybrid_hf.HybridBertForSequenceClassification,
        hybrid_hf.HybridBertForTokenClassification,
    )
    all_generative_model_classes = (hybrid_hf.HybridBertLMHeadModel,)

    def setUp(self):
        fields = dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            hidden_act="gelu",
            max_position_embeddings=512,
            type_vocab_size=16,
            pad_token_id=0,
        )
        self.model_tester = HybridModelTester(
            self, hybrid_hf.HybridBertConfig, fields, causal_mask=False, use_token_type_ids=True
        )

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        """As `BertModelTest`'s: the pre-training head takes the next-sentence label too."""
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels and model_class.__name__ == f"Hybrid{MODEL_FOR_PRETRAINING_MAPPING_NAMES['bert']}":
            inputs_dict["labels"] = torch.zeros(
                (self.model_tester.batch_size, self.model_tester.seq_length), dtype=torch.long, device=torch_device
            )
            inputs_dict["next_sentence_label"] = torch.zeros(
                self.model_tester.batch_size, dtype=torch.long, device=torch_device
            )
        return inputs_dict


class HybridSeq2SeqModelTester(HybridModelTester):
    """An encoder-decoder's tiny config and inputs, as `BartModelTester` and `T5ModelTester` make them: the encoder
    reads `input_ids` (ending in `eos_token_id` where `eos_at_end`, as BART's heads need) with a random padding
    mask, the decoder `decoder_input_ids` of as many tokens."""

    def __init__(self, parent, config_class, config_fields, eos_at_end: bool = False):
        super().__init__(parent, config_class, config_fields, causal_mask=False)
        self.eos_at_end = eos_at_end
        self.encoder_seq_length = self.seq_length
        self.decoder_seq_length = self.decoder_key_length = self.seq_length

    def prepare_config_and_inputs_for_common(self):
        config, inputs = super().prepare_config_and_inputs_for_common()
        input_ids = inputs["input_ids"].clamp(3)  # no special token inside the text
        if self.eos_at_end:
            input_ids[:, -1] = config.eos_token_id
            inputs["attention_mask"][:, -1] = 1
        inputs["input_ids"] = input_ids
        inputs["decoder_input_ids"] = ids_tensor([self.batch_size, self.decoder_seq_length], self.vocab_size).clamp(3)
        return config, inputs


class Seq2SeqMixin:
    """What transformers' own encoder-decoder tests adjust."""

    is_encoder_decoder = True

    def test_attention_outputs(self):
        """transformers counts the fields of a seq2seq output; a hybrid model's output adds `span_loss`, which is
        left out here (the hybrid forward returns the host's output as it is)."""
        with contextlib.ExitStack() as stack:
            for model_class in self.all_model_classes:
                stack.enter_context(mock.patch.object(model_class, "_hybrid_part", True))
            super().test_attention_outputs()

    def test_inputs_embeds(self):
        """As in transformers' BART-like tests: the sequence-classification head finds its <eos> tokens in
        `input_ids`, so it takes no `inputs_embeds`."""
        classes = tuple(c for c in self.all_model_classes if "SequenceClassification" not in c.__name__)
        with mock.patch.object(self, "all_model_classes", classes):
            super().test_inputs_embeds()


class HybridBartTest(Seq2SeqMixin, ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (
        hybrid_hf.HybridBartModel,
        hybrid_hf.HybridBartForConditionalGeneration,
        hybrid_hf.HybridBartForSequenceClassification,
        hybrid_hf.HybridBartForQuestionAnswering,
    )
    all_generative_model_classes = (hybrid_hf.HybridBartForConditionalGeneration,)

    def setUp(self):
        fields = dict(
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=37,
            decoder_ffn_dim=37,
            max_position_embeddings=512,
            eos_token_id=2,
            pad_token_id=1,
            bos_token_id=0,
            forced_eos_token_id=None,
        )
        self.model_tester = HybridSeq2SeqModelTester(self, hybrid_hf.HybridBartConfig, fields, eos_at_end=True)


class HybridT5Test(Seq2SeqMixin, ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (hybrid_hf.HybridT5Model, hybrid_hf.HybridT5ForConditionalGeneration)
    all_generative_model_classes = (hybrid_hf.HybridT5ForConditionalGeneration,)

    def setUp(self):
        fields = dict(
            d_model=32,
            d_ff=37,
            d_kv=8,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            eos_token_id=1,
            pad_token_id=0,
            decoder_start_token_id=0,
        )
        self.model_tester = HybridSeq2SeqModelTester(self, hybrid_hf.HybridT5Config, fields)

    @unittest.skip(reason="T5ForConditionalGeneration has no base model (it builds its stacks itself), as the host")
    def test_model_base_model_prefix(self):
        pass


@torch.no_grad()
def blended_hybrid_parameters(module: torch.nn.Module) -> None:
    """Initial hybrid parameters that use the local branch: `a = (l + g) / 2`, spans that depend on the context.

    Uses `transformers.initialization`, as the conversion-time values do, so loaded parameters keep their values.
    """
    width = module.mix.out_features
    half = torch.eye(width) / 2
    init.copy_(module.mix.weight, torch.cat([half, half], dim=1).to(module.mix.weight.dtype))  # (W, 2W)
    init.normal_(module.span_predictor.proj.weight, std=1.0)
    init.zeros_(module.span_predictor.proj.bias)


class BlendedMixin:
    """Every model the tests make starts with `blended_hybrid_parameters` instead of the conversion-time values."""

    def setUp(self):
        super().setUp()
        patch = mock.patch.object(modeling_hybrid, "reset_hybrid_parameters", blended_hybrid_parameters)
        patch.start()
        self.addCleanup(patch.stop)


class HybridLlamaBlendedTest(BlendedMixin, HybridLlamaTest):
    pass


class HybridGPT2BlendedTest(BlendedMixin, HybridGPT2Test):
    pass


class HybridBertBlendedTest(BlendedMixin, HybridBertTest):
    pass


class HybridBartBlendedTest(BlendedMixin, HybridBartTest):
    pass


class HybridT5BlendedTest(BlendedMixin, HybridT5Test):
    pass
