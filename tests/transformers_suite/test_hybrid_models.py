"""transformers' `ModelTesterMixin` and `GenerationTesterMixin` on the hybrid Llama, GPT-2 and BERT classes.

The testers follow transformers' own (`LlamaModelTester`, `GPT2ModelTester`, `BertModelTester`): tiny random
configs, here of the hybrid config classes, with a local window (`max_span + ramp` = 6 keys) shorter than the
7-token sequences, so the window's edge falls inside every test.

A new model starts as its conversion leaves it: `mix = [0 | I]`, the global branch alone. The `Blended` test classes
run the same tests with the local branch in use from the start (`a = (l + g) / 2`, spans that vary per token).
"""

from __future__ import annotations

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
