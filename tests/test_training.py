"""Training: LoRA defaults, span logging, text data and perplexity, model cards, and `hybrid-hf finetune`.

Tiny random Llama models (vocab 99, hidden 32, 2 layers, 4 heads, 2 KV heads) and a word-level tokenizer trained
offline on a few sentences; no hub.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch
from tiny_models import tiny_llama
from transformers import (
    AutoModelForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

import hybrid_hf
from hybrid_hf import commands, hybrid_layers
from hybrid_hf.callbacks import SpanLoggingCallback, add_span_logging
from hybrid_hf.cards import write_model_card
from hybrid_hf.data import perplexity, text_dataset
from hybrid_hf.distillation import DistillationTrainer, distillation_loss
from hybrid_hf.finetuning import finetune
from hybrid_hf.lora import get_lora_model, lora_config

peft = pytest.importorskip("peft")

WORDS = (
    "the cat sat on mat a dog ran in park and too big small red blue green house tree river stone bird "
    "sings slowly quickly under over near far old young king queen play act scene enter exit night day"
).split()


def make_text(sentences: int = 400, seed: int = 0) -> str:
    """Repetitive text: a few fixed sentence patterns with some random words, learnable by a tiny model."""
    gen = torch.Generator().manual_seed(seed)
    patterns = ["the {} cat sat on the {} mat", "a {} dog ran in the {} park", "the king and the {} queen {}"]
    lines = []
    for i in range(sentences):
        pick = torch.randint(0, len(WORDS), (2,), generator=gen).tolist()
        lines.append(patterns[i % len(patterns)].format(WORDS[pick[0]], WORDS[pick[1]]))
    return " .\n".join(lines) + " .\n"


TEXT = make_text()


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ["<unk>", "<pad>", "<s>", "</s>"]
    backend.train_from_iterator(
        [TEXT, " ".join(WORDS)], trainers.WordLevelTrainer(vocab_size=99, special_tokens=special)
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def make_hybrid(seed: int = 0, **settings):
    return hybrid_hf.convert(tiny_llama(seed=seed), **{"max_span": 8, "ramp": 4, **settings})


def training_args(tmp_path, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path / "trainer"),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        remove_unused_columns=False,
        average_tokens_across_devices=False,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def dataset(tokenizer):
    return text_dataset(tokenizer, [TEXT], seq_len=32)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    """A host folder and a hybrid folder, each with the tokenizer, and a text file."""
    root = tmp_path_factory.mktemp("models")
    host_folder = root / "tiny-llama"
    tiny_llama().save_pretrained(host_folder)
    tokenizer.save_pretrained(host_folder)
    hybrid_folder = root / "tiny-hybrid-llama"
    make_hybrid(span_loss_coef=0.1).save_pretrained(hybrid_folder)
    tokenizer.save_pretrained(hybrid_folder)
    text = root / "train.txt"
    text.write_text(TEXT)
    return {"host": host_folder, "hybrid": hybrid_folder, "text": text, "root": root}


def batch_of(dataset, size: int = 4) -> dict[str, torch.Tensor]:
    return default_data_collator([dataset[i] for i in range(size)])


def mean_span(model, batch) -> float:
    """Mean span (tokens) predicted on `batch` in eval mode, over layers, heads and tokens."""
    values = []
    handles = [
        layer.span_predictor.register_forward_hook(
            lambda module, args, output, layer=layer: values.append(output.mean().item() * layer.config.max_span)
        )
        for layer in hybrid_layers(model)
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    assert len(values) == len(hybrid_layers(model))
    return sum(values) / len(values)


# --- lora_config ------------------------------------------------------------------------------------------


def test_lora_config_defaults():
    model = make_hybrid()
    config = lora_config(model)
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "mix"}
    assert list(config.modules_to_save) == ["span_predictor"]
    assert config.task_type == "CAUSAL_LM"
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 16, 0.0)
    other = lora_config(make_hybrid(), r=4, alpha=8, bias="none")
    assert list(other.modules_to_save) == ["span_predictor"]
    assert (other.r, other.lora_alpha) == (4, 8)
    assert set(lora_config(model, target_modules=["q_proj"]).target_modules) == {"q_proj"}
    host = lora_config(tiny_llama())  # a host baseline: same targets, nothing else trained
    assert set(host.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"} and host.modules_to_save is None


def test_lora_config_task_types_and_families():
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    gpt2 = hybrid_hf.convert(
        GPT2LMHeadModel(GPT2Config(vocab_size=99, n_embd=32, n_layer=1, n_head=4, n_positions=64)), max_span=8, ramp=4
    )
    config = lora_config(gpt2)
    assert set(config.target_modules) == {"c_attn", "c_proj", "mix"}
    assert config.task_type == "CAUSAL_LM"
    bert_config = BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37
    )
    bert = hybrid_hf.convert(BertForSequenceClassification(bert_config), max_span=8, ramp=4)
    config = lora_config(bert)
    assert config.task_type == "SEQ_CLS"
    assert set(config.target_modules) == {"query", "key", "value", "mix"}  # BERT's output dense is outside attention
    peft_model = peft.get_peft_model(bert, config)  # PEFT accepts it (classifier added to modules_to_save by PEFT)
    assert any("span_predictor.modules_to_save" in name for name, _ in peft_model.named_parameters())


def test_lora_training_changes_only_adapters_and_hybrid_parameters(tmp_path, dataset):
    model = make_hybrid(span_loss_coef=0.5)
    host_before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    peft_model = peft.get_peft_model(model, lora_config(model))
    trainable_before = {name: p.detach().clone() for name, p in peft_model.named_parameters() if p.requires_grad}
    trainer = Trainer(
        model=peft_model, args=training_args(tmp_path), train_dataset=dataset, data_collator=default_data_collator
    )
    trainer.train()
    assert trainer.state.global_step == 2

    # Every host weight (and the frozen originals of modules_to_save) is bit-identical.
    after = peft_model.base_model.model.state_dict()
    compared = 0
    for name, tensor in after.items():
        if "lora_" in name or ".modules_to_save." in name:
            continue
        key = name.replace(".original_module", "").replace(".base_layer", "")
        assert torch.equal(tensor, host_before[key]), name
        compared += 1
    assert compared >= len([k for k in host_before if not any(m in k for m in ("span_predictor", "mix"))])
    # The adapters and the trained copies of the hybrid modules did move.
    changed = {
        name
        for name, p in peft_model.named_parameters()
        if p.requires_grad and not torch.equal(p.detach(), trainable_before[name])
    }
    assert any("lora_B" in name for name in changed)
    assert any("span_predictor.modules_to_save" in name for name in changed)
    assert any("mix.lora_B" in name for name in changed)


def test_loss_includes_the_span_loss(tmp_path, dataset):
    model = make_hybrid(span_loss_coef=0.0)
    peft_model = peft.get_peft_model(model, lora_config(model)).eval()
    batch = batch_of(dataset)
    with torch.no_grad():
        plain = peft_model(**batch)
        model.config.span_loss_coef = 0.7
        penalised = peft_model(**batch)
    assert float(plain.span_loss) == 0.0
    assert float(penalised.span_loss) > 0
    torch.testing.assert_close(penalised.loss - plain.loss, penalised.span_loss, rtol=0, atol=1e-6)
    # The Trainer trains on exactly that loss.
    trainer = Trainer(
        model=peft_model, args=training_args(tmp_path), train_dataset=dataset, data_collator=default_data_collator
    )
    with torch.no_grad():
        torch.testing.assert_close(trainer.compute_loss(peft_model, dict(batch)), penalised.loss)


def test_span_penalty_weight_does_not_depend_on_gradient_accumulation(tmp_path, dataset):
    """Two micro-batches of 2 (the Trainer passes both the total token count) give the gradient of one batch of 4."""
    batch = batch_of(dataset, 4)

    def span_bias_grad(micro_batches: int) -> torch.Tensor:
        model = make_hybrid(span_loss_coef=1.0).train()
        trainer = Trainer(
            model=model,
            args=training_args(tmp_path, gradient_accumulation_steps=micro_batches),
            train_dataset=dataset,
            data_collator=default_data_collator,
        )
        num_items = batch["labels"][:, 1:].ne(-100).sum()
        size = 4 // micro_batches
        for start in range(0, 4, size):
            micro = {key: value[start : start + size] for key, value in batch.items()}
            trainer.training_step(model, micro, num_items_in_batch=num_items)
        return hybrid_layers(model)[0].span_predictor.proj.bias.grad.clone()

    torch.testing.assert_close(span_bias_grad(2), span_bias_grad(1), rtol=1e-4, atol=1e-6)


# --- learning shorter spans -------------------------------------------------------------------------------


def test_span_loss_makes_spans_shorter(tmp_path, dataset):
    """40 steps with the span penalty: the mean span on an eval batch falls well below its start and below the same
    run without the penalty (the LM alone also shortens spans a little on this local, repetitive text)."""
    eval_batch = batch_of(dataset, 4)
    spans, logged = {}, {}
    for coef in (0.0, 0.1):
        model = make_hybrid(span_loss_coef=coef, initial_span=0.5)
        start = mean_span(model, eval_batch)
        assert start == pytest.approx(4.0, abs=1e-5)  # initial_span * max_span
        trainer = Trainer(
            model=model,
            args=training_args(tmp_path, max_steps=40, learning_rate=2e-2, logging_steps=10),
            train_dataset=dataset,
            data_collator=default_data_collator,
        )
        add_span_logging(trainer)
        trainer.train()
        spans[coef] = mean_span(model, eval_batch)
        logged[coef] = [entry["span/mean"] for entry in trainer.state.log_history if "span/mean" in entry]
    print(
        f"mean span on an eval batch after 40 steps (max_span 8, start 4.0): "
        f"{spans[0.0]:.3f} without the penalty, {spans[0.1]:.3f} with span_loss_coef=0.1"
    )
    assert spans[0.1] < 4.0 - 1.0
    assert spans[0.1] < spans[0.0] - 1.0
    assert len(logged[0.1]) == 4 and logged[0.1][-1] < logged[0.1][0] < 4.0


# --- span logging -----------------------------------------------------------------------------------------


class Recorder(TrainerCallback):
    """Stands for a reporting integration: records what its `on_log` receives."""

    def __init__(self):
        self.seen: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs))


def test_span_logging_reaches_log_history_and_every_logger(tmp_path, dataset):
    model = make_hybrid(span_loss_coef=0.1, hybrid_layers=[1])
    recorder = Recorder()
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=3, learning_rate=1e-5),
        train_dataset=dataset,
        data_collator=default_data_collator,
        callbacks=[recorder],
    )
    callback = add_span_logging(trainer, per_head=True)
    assert trainer.callback_handler.callbacks[0] is callback
    trainer.train()
    train_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(train_logs) == 3
    expected = {"span/layer_01", "temperature/layer_01", "span/mean", "temperature/mean"}
    expected |= {f"span/layer_01/head_{h}" for h in range(4)}
    for entry in train_logs:
        assert expected <= set(entry)
        assert not any("layer_00" in key for key in entry)
        assert entry["span/layer_01"] == pytest.approx(4.0, abs=1e-2)  # initial span 0.5 * max_span, lr tiny
        assert entry["temperature/layer_01"] == pytest.approx(0.75, abs=1e-2)  # tau_min + (tau_max - tau_min) / 2
        heads = [entry[f"span/layer_01/head_{h}"] for h in range(4)]
        assert entry["span/layer_01"] == pytest.approx(sum(heads) / 4)
    # The "integration" created before add_span_logging's callback still saw the values.
    assert [e for e in recorder.seen if "loss" in e] and all(expected <= set(e) for e in recorder.seen if "loss" in e)
    # Evaluation-free final log (train_runtime...) gets nothing new; hooks are gone after training.
    assert all(not layer.span_predictor._forward_hooks for layer in hybrid_layers(model))


def test_span_logging_as_a_plain_callback_shared_span(tmp_path, dataset):
    model = make_hybrid(span_per_head=False)
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=2),
        train_dataset=dataset,
        data_collator=default_data_collator,
        callbacks=[SpanLoggingCallback()],
    )
    trainer.train()
    entry = [entry for entry in trainer.state.log_history if "loss" in entry][0]
    assert {"span/layer_00", "span/layer_01", "temperature/layer_00", "span/mean"} <= set(entry)
    assert not any("head_" in key for key in entry)


def test_span_logging_ignores_eval_forwards(dataset):
    model = make_hybrid()
    callback = SpanLoggingCallback()
    callback.attach(model)
    batch = batch_of(dataset, 2)
    with torch.no_grad():
        model.eval()(**batch)
        assert callback.summary(reset=False) == {}
        model.train()(**batch)
    values = callback.summary()
    assert values["span/mean"] == pytest.approx(4.0, abs=1e-5)
    assert callback.summary() == {}
    callback.detach()
    assert all(not layer.span_predictor._forward_hooks for layer in hybrid_layers(model))


# --- text data and perplexity -----------------------------------------------------------------------------


def test_text_dataset_blocks(tokenizer):
    texts = ["the cat sat on the mat", "a dog ran in the park and the cat ran too"]
    ids = [i for text in texts for i in tokenizer(text)["input_ids"]]
    data = text_dataset(tokenizer, texts, seq_len=4)
    assert len(data) == len(ids) // 4
    assert [i for row in data["input_ids"] for i in row] == ids[: len(data) * 4]
    assert data["labels"] == data["input_ids"]
    assert all(mask == [1, 1, 1, 1] for mask in data["attention_mask"])
    short = text_dataset(tokenizer, texts, seq_len=100)  # no full block: the whole stream is one block
    assert short["input_ids"] == [ids]
    with pytest.raises(ValueError, match="no tokens"):
        text_dataset(tokenizer, ["", "  \n"], seq_len=4)
    with pytest.raises(ValueError, match="seq_len"):
        text_dataset(tokenizer, texts, seq_len=1)


def test_perplexity_is_the_lm_loss_without_the_span_loss(dataset):
    model = make_hybrid(span_loss_coef=0.9)
    batch = batch_of(dataset, 4)
    subset = dataset.select(range(4))
    with torch.no_grad():
        outputs = model.eval()(**batch)
    lm_loss = outputs.loss - outputs.span_loss
    assert outputs.span_loss > 0
    assert perplexity(model, subset, batch_size=3) == pytest.approx(math.exp(lm_loss.item()), rel=1e-5)
    peft_model = peft.get_peft_model(model, lora_config(model))
    peft_model.train()
    assert perplexity(peft_model, subset) == pytest.approx(math.exp(lm_loss.item()), rel=1e-5)
    assert peft_model.training  # mode restored


# --- merging, saving, model card ---------------------------------------------------------------------------


def test_merge_and_unload_saves_and_loads(tmp_path, dataset, tokenizer):
    model = make_hybrid(span_loss_coef=0.2)
    peft_model = peft.get_peft_model(model, lora_config(model))
    Trainer(
        model=peft_model,
        args=training_args(tmp_path, max_steps=3),
        train_dataset=dataset,
        data_collator=default_data_collator,
    ).train()
    batch = batch_of(dataset, 2)
    with torch.no_grad():
        expected = peft_model.eval()(**batch)
    merged = peft_model.merge_and_unload()
    assert type(merged).__name__ == "HybridLlamaForCausalLM"
    assert not any(
        "lora_" in name or "modules_to_save" in name or "original_module" in name
        for name, _ in merged.named_parameters()
    )
    with torch.no_grad():
        got = merged.eval()(**batch)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    folder = tmp_path / "merged-hybrid"
    merged.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    files = {path.name for path in folder.iterdir()}
    assert {"model.safetensors", "config.json", "modeling_hybrid.py", "configuration_hybrid.py"} <= files
    assert "AutoModelForCausalLM" in json.loads((folder / "config.json").read_text())["auto_map"]
    loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(loaded).__name__ == "HybridLlamaForCausalLM"
    with torch.no_grad():
        again = loaded(**batch)
    torch.testing.assert_close(again.logits, expected.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again.loss, expected.loss, rtol=1e-5, atol=1e-6)


def test_model_card(tmp_path):
    from huggingface_hub import ModelCard

    folder = tmp_path / "card"
    make_hybrid().save_pretrained(folder)
    settings = {"max_span": 8, "ramp": 4}
    path = write_model_card(
        folder,
        base_model="HuggingFaceTB/SmolLM2-135M",
        settings=settings,
        training_summary={"steps": 3, "perplexity after": 12.5},
    )
    card = ModelCard.load(path)
    data = card.data.to_dict()
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-generation"
    assert {"hybrid-attention", "adaptive-span", "trust_remote_code", "llama"} <= set(data["tags"])
    assert "trust_remote_code=True" in card.text and "max_span" in card.text and "12.5" in card.text
    # A local path is not a Hub id: kept out of the metadata and the text.
    write_model_card(folder, base_model=str(tmp_path), settings=settings, training_summary={})
    card = ModelCard.load(path)
    assert "base_model" not in card.data.to_dict() and str(tmp_path) not in card.text


# --- the finetune command ---------------------------------------------------------------------------------


def test_finetune_in_process(folders, tmp_path, capsys):
    output = tmp_path / "out"
    result = finetune(
        str(folders["hybrid"]),
        output,
        data_files=[folders["text"]],
        steps=4,
        seq_len=32,
        batch_size=4,
        lr=1e-2,
        span_loss_coef=0.5,
        logging_steps=2,
        use_cpu=True,
    )
    assert result.steps == 4 and result.num_processes == 1 and not result.converted and not result.lora
    assert result.perplexity_after < result.perplexity_before
    assert result.final_span is not None and result.final_span < 4.0
    assert "perplexity" in capsys.readouterr().out
    files = {path.name for path in output.iterdir()}
    assert {"model.safetensors", "config.json", "modeling_hybrid.py", "tokenizer.json", "README.md"} <= files
    assert not [p for p in output.parent.iterdir() if p.name.startswith(".out.")]  # no temporary folder left
    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == "hybrid_llama" and config["span_loss_coef"] == 0.5 and "auto_map" in config
    with pytest.raises(FileExistsError, match="--force"):
        finetune(str(folders["hybrid"]), output, data_files=[folders["text"]], steps=1, seq_len=32)
    with pytest.raises(ValueError, match="already hybrid"):
        finetune(str(folders["hybrid"]), tmp_path / "x", data_files=[folders["text"]], settings={"max_span": 4})
    again = finetune(
        str(folders["hybrid"]),
        output,
        data_files=[folders["text"]],
        steps=1,
        seq_len=32,
        force=True,
        quiet=True,
        use_cpu=True,
    )
    assert again.steps == 1 and (output / "README.md").is_file()
    not_a_model = tmp_path / "precious"
    (not_a_model / "notes.txt").parent.mkdir()
    (not_a_model / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a model folder"):
        finetune(str(folders["hybrid"]), not_a_model, data_files=[folders["text"]], force=True)
    assert (not_a_model / "notes.txt").is_file()


def test_finetune_loaded_host_with_lora_and_texts(tmp_path, tokenizer):
    """The library path the demo uses: a loaded host model and in-memory texts, converted and trained with LoRA."""
    output = tmp_path / "lora-out"
    host = tiny_llama(seed=1)
    host_state = {name: tensor.clone() for name, tensor in host.state_dict().items()}
    result = finetune(
        host,
        output,
        tokenizer=tokenizer,
        texts=[TEXT],
        eval_texts=[make_text(40, seed=5)],
        lora=True,
        lora_r=4,
        settings={"max_span": 8, "ramp": 4},
        span_loss_coef=0.2,
        steps=3,
        seq_len=32,
        lr=1e-2,
        use_cpu=True,
        base_model="org/tiny-llama",
        quiet=True,
    )
    assert result.converted and result.lora and result.steps == 3
    assert all(torch.equal(tensor, host_state[name]) for name, tensor in host.state_dict().items())  # input untouched
    loaded = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True).eval()
    assert loaded.config.max_span == 8 and loaded.config.span_loss_coef == 0.2
    assert not any("lora" in name for name in loaded.state_dict())
    card = (output / "README.md").read_text()
    assert "base_model: org/tiny-llama" in card and "LoRA r=4" in card
    eval_data = text_dataset(tokenizer, [make_text(40, seed=5)], 32)
    assert perplexity(loaded, eval_data) == pytest.approx(result.perplexity_after, rel=1e-4)
    assert type(result.model).__name__ == "HybridLlamaForCausalLM"

    # The baseline form: the host trained as it is with the same LoRA budget, nothing saved.
    baseline = finetune(
        host,
        None,
        tokenizer=tokenizer,
        texts=[TEXT],
        eval_texts=[make_text(40, seed=5)],
        lora=True,
        lora_r=4,
        steps=3,
        seq_len=32,
        lr=1e-2,
        use_cpu=True,
        hybrid=False,
        quiet=True,
    )
    assert baseline.output is None and not baseline.converted and baseline.final_span is None
    assert type(baseline.model).__name__ == "LlamaForCausalLM"
    assert baseline.perplexity_after < baseline.perplexity_before
    with pytest.raises(ValueError, match="already hybrid"):
        finetune(result.model, None, tokenizer=tokenizer, texts=[TEXT], hybrid=False, use_cpu=True)


def run_cli(*args, cwd=None, timeout=300, launcher=None):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    command = (launcher or [sys.executable]) + ["-m", "hybrid_hf", "finetune", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and "Traceback" not in stderr
    return lines[0]


def test_cli_bad_arguments(folders, tmp_path, capfd):
    text, host = folders["text"], folders["host"]
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    cases = {
        "missing data": ([host, tmp_path / "o1", "--data", tmp_path / "nope.txt"], "not found"),
        "empty data": ([host, tmp_path / "o2", "--data", empty], "empty"),
        "seq len": ([host, tmp_path / "o3", "--data", text, "--seq-len", "1"], "seq-len"),
        "seq len too long": ([host, tmp_path / "o3", "--data", text, "--seq-len", "100000"], "exceeds"),
        "hybrid with settings": ([folders["hybrid"], tmp_path / "o3", "--data", text, "--max-span", "4"], "already"),
        "model path": ([tmp_path / "no-such-folder", tmp_path / "o4", "--data", text], "not found"),
        "no data flag": ([host, tmp_path / "o5"], "--data"),
        "existing output": ([host, tmp_path, "--data", text], "exists"),
        "output holds the model": ([host, folders["root"], "--data", text], "would replace the source"),
    }
    for name, (args, expected) in cases.items():
        capfd.readouterr()
        status = commands.main(["finetune", *map(str, args)])
        line = one_error_line(capfd.readouterr().err)
        assert status == 2, name
        assert expected in line, (name, line)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


def test_cli_unknown_model_subprocess(folders, tmp_path):
    result = run_cli("no-such-org/no-such-model", tmp_path / "out", "--data", folders["text"])
    assert result.returncode == 2
    assert "not found" in one_error_line(result.stderr)


@pytest.mark.slow
def test_cli_accelerate_launch_two_processes(folders, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo): LoRA on a host model converted on the fly, then load it.

    `--multi_gpu` selects accelerate's torchrun launcher; `finetune` trains on CPU (gloo) as no GPU is visible.
    (`accelerate launch --cpu --num_processes 2` would start a single process: its multi-CPU mode needs MPI.)
    """
    output = tmp_path / "ddp-out"
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
    ]
    result = run_cli(
        folders["host"],
        output,
        "--data",
        folders["text"],
        "--steps",
        "3",
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--lr",
        "1e-2",
        "--lora",
        "--lora-r",
        "4",
        "--max-span",
        "8",
        "--ramp",
        "4",
        "--span-loss-coef",
        "0.1",
        "--logging-steps",
        "1",
        "--cpu",
        launcher=launcher,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "on 2 process(es)" in result.stdout, result.stdout
    model = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True).eval()
    assert model.config.model_type == "hybrid_llama" and model.config.span_loss_coef == 0.1
    assert len(hybrid_layers(model)) == 2
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[2, 4, 5, 6, 7]])).logits
    assert torch.isfinite(logits).all()
    card = (output / "README.md").read_text()
    assert "library_name: transformers" in card and "| processes | 2 |" in card
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ddp-out.")]


def test_span_logging_under_lora(tmp_path, dataset):
    """PEFT wraps `span_predictor` (modules_to_save) and `mix` (LoRA): the layers and their spans are still found."""
    model = make_hybrid(span_loss_coef=0.1)
    peft_model = get_lora_model(model)
    assert len(hybrid_layers(peft_model)) == 2
    trainer = Trainer(
        model=peft_model,
        args=training_args(tmp_path, max_steps=2),
        train_dataset=dataset,
        data_collator=default_data_collator,
    )
    add_span_logging(trainer)
    trainer.train()
    train_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert train_logs and all({"span/mean", "temperature/mean", "span/layer_00"} <= set(e) for e in train_logs)


def test_distillation_loss_by_hand():
    teacher = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))  # (1, 2, 2)
    student = torch.log(torch.tensor([[[0.8, 0.2], [0.3, 0.7]]]))
    first = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    second = 0.9 * math.log(0.9 / 0.3) + 0.1 * math.log(0.1 / 0.7)
    assert distillation_loss(student, teacher).item() == pytest.approx((first + second) / 2, rel=1e-6)
    assert distillation_loss(student, teacher, torch.tensor([[1, 0]])).item() == pytest.approx(first, rel=1e-6)
    assert distillation_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)


def test_recovery_by_distillation_keeps_the_host_predictions(tmp_path, tokenizer):
    """A model with a local-only layer, fine-tuned on text with and without distillation from its host: the
    distilled one stays closer to the host's predictions on other text; the trainer's loss is the model's own loss
    plus the weighted KL."""
    host = tiny_llama(seed=2)
    eval_ids = torch.tensor([tokenizer(make_text(40, seed=6))["input_ids"][:64]])

    def local():
        return hybrid_hf.convert(host, max_span=2, ramp=1, local_layers=[0], sink_tokens=1)

    def kl_from_host(model):
        with torch.no_grad():
            return distillation_loss(model(eval_ids).logits, host(eval_ids).logits).item()

    model = local()
    trainer = DistillationTrainer(
        model=model, args=training_args(tmp_path, max_steps=1), teacher=host, distill_weight=0.5
    )
    inputs = {"input_ids": eval_ids, "labels": eval_ids}
    with torch.no_grad():
        expected = model(**inputs).loss + 0.5 * distillation_loss(model(eval_ids).logits, host(eval_ids).logits)
        torch.testing.assert_close(trainer.compute_loss(model, inputs), expected, rtol=1e-5, atol=1e-6)
    run = dict(tokenizer=tokenizer, texts=[TEXT], steps=15, seq_len=32, lr=3e-3, use_cpu=True, quiet=True)
    plain = finetune(local(), None, **run)
    distilled = finetune(local(), None, **run, distill_from=host, distill_weight=10.0)
    assert kl_from_host(distilled.model) < 0.5 * kl_from_host(plain.model)
