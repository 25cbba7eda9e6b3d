"""`hybrid-hf finetune` arguments through `HfArgumentParser`: every `TrainingArguments` flag, the former flags, and
YAML/JSON argument files giving the same run as the command line."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_models import TEXT, perturb, tiny_llama, word_tokenizer
from transformers import TrainingArguments

from hybrid_hf import commands, convert, hybrid_layers
from hybrid_hf.commands.finetune import parse_arguments
from hybrid_hf.errors import UsageError
from hybrid_hf.finetuning import HybridTrainingArguments, finetune

#: the flags of a run with most TrainingArguments of note, as a YAML file would hold them
FLAGS = {
    "bf16": True,
    "gradient_accumulation_steps": 2,
    "gradient_checkpointing": True,
    "warmup_steps": 0.25,  # transformers 5: a fraction is the warmup ratio
    "lr_scheduler_type": "cosine",
    "eval_strategy": "steps",
    "eval_steps": 2,
    "weight_decay": 0.01,
    "max_steps": 4,
    "per_device_train_batch_size": 2,
    "learning_rate": 1e-2,
    "seq_len": 16,
    "max_span": 8,
    "ramp": 4,
    "use_cpu": True,
}


def _argv(values: dict) -> list[str]:
    argv = []
    for name, value in values.items():
        flag = f"--{name}" if name in HybridTrainingArguments.__dataclass_fields__ else f"--{name.replace('_', '-')}"
        argv += [flag] if value is True else [flag, str(value)]
    return argv


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("args")
    tiny_llama().save_pretrained(root / "host")
    word_tokenizer().save_pretrained(root / "host")
    (root / "train.txt").write_text(TEXT)
    return root


def test_training_flags_reach_training_arguments(folders):
    ours, training, settings = parse_arguments(
        [str(folders / "host"), "out", "--data", "train.txt", *_argv(FLAGS), "--steps", "6", "--lr", "0.5"]
    )
    assert ours.model_name_or_path == str(folders / "host") and training.output_dir == "out"
    assert ours.train_file == ["train.txt"] and ours.seq_len == 16 and settings == {"max_span": 8, "ramp": 4}
    assert training.bf16 and training.gradient_checkpointing and training.gradient_accumulation_steps == 2
    assert training.lr_scheduler_type == "cosine" and training.warmup_steps == 0.25 and training.weight_decay == 0.01
    assert training.eval_strategy == "steps" and training.eval_steps == 2
    assert training.max_steps == 6 and training.learning_rate == 0.5  # the former flags are aliases
    ratio = parse_arguments(["m", "o", "--data", "t.txt", "--warmup_ratio", "0.1"])[1]
    assert ratio.warmup_steps == 0.1  # the example scripts' name of the warm-up share
    defaults = parse_arguments(["m", "o", "--data", "t.txt"])[1]
    assert (defaults.max_steps, defaults.learning_rate, defaults.per_device_train_batch_size, defaults.seed) == (
        50, 1e-4, 4, 0
    )  # fmt: skip
    assert defaults.logging_steps == 5 and defaults.save_strategy == "no"
    assert parse_arguments(["m", "o", "--data", "t.txt", "--save-steps", "3"])[1].save_strategy == "steps"


def test_yaml_and_json_files_are_the_command_line(folders, tmp_path):
    values = {"model_name_or_path": str(folders / "host"), "train_file": str(folders / "train.txt"), **FLAGS}
    (tmp_path / "args.yaml").write_text(yaml.safe_dump({**values, "output_dir": "o"}))
    (tmp_path / "args.json").write_text(json.dumps({**values, "output_dir": "o"}))
    by_flags = parse_arguments([str(folders / "host"), "o", "--train_file", str(folders / "train.txt"), *_argv(FLAGS)])
    assert parse_arguments([str(tmp_path / "args.yaml")]) == by_flags
    assert parse_arguments([str(tmp_path / "args.json")]) == by_flags
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**values, "learning_rat": 1}))
    with pytest.raises(UsageError, match="learning_rat"):
        parse_arguments([str(tmp_path / "bad.yaml")])


def test_a_run_from_yaml_equals_the_command_line(folders, tmp_path, capsys):
    """A run with gradient accumulation, checkpointing, bf16, a cosine schedule with warmup, weight decay and
    evaluation steps, on CPU, writes the same weights from flags and from a YAML file."""
    data = str(folders / "train.txt")
    assert commands.main(["finetune", str(folders / "host"), str(tmp_path / "a"), "--data", data, *_argv(FLAGS)]) == 0
    values = {"model_name_or_path": str(folders / "host"), "output_dir": str(tmp_path / "b"), "train_file": data}
    (tmp_path / "args.yaml").write_text(yaml.safe_dump({**values, **FLAGS}))
    assert commands.main(["finetune", str(tmp_path / "args.yaml")]) == 0
    first, second = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    host = load_file(folders / "host" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)
    assert not torch.equal(first["model.embed_tokens.weight"], host["model.embed_tokens.weight"])  # it trained


def test_finetune_takes_training_arguments(tmp_path):
    """The Python API: `training_args` sets the Trainer's fields, its mirrored fields included; keywords win."""
    result = finetune(tiny_llama(), None, tokenizer=word_tokenizer(), texts=[TEXT], seq_len=16, quiet=True,
                      settings={"max_span": 8, "ramp": 4},
                      training_args=TrainingArguments(max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
                                                      logging_steps=1, use_cpu=True, report_to="none",
                                                      gradient_accumulation_steps=2, save_strategy="no"))  # fmt: skip
    losses = [entry["loss"] for entry in result.log_history if "loss" in entry]
    assert result.steps == 3 and len(losses) == 3
    again = finetune(
        tiny_llama(),
        None,
        tokenizer=word_tokenizer(),
        texts=[TEXT],
        seq_len=16,
        quiet=True,
        steps=1,
        settings={"max_span": 8, "ramp": 4},
        training_args=HybridTrainingArguments(max_steps=3),
    )
    assert again.steps == 1


# --- training behaviour under TrainingArguments -----------------------------------------------------------------


def _sgd_step(**training) -> tuple[dict[str, torch.Tensor], list[float], float]:
    """One plain SGD step (lr 1: the update is the gradient) of a perturbed hybrid model with a span penalty:
    `(the trained weights, the logged losses, the mean span logged)`."""
    model = convert(tiny_llama(), max_span=8, ramp=4, span_loss_coef=0.5)
    perturb(model)
    arguments = dict(max_steps=1, learning_rate=1.0, optim="sgd", logging_steps=1, weight_decay=0.0,
                     max_grad_norm=0.0, **training)  # fmt: skip
    result = finetune(model, None, tokenizer=word_tokenizer(), texts=[TEXT], seq_len=16, quiet=True,
                      training_args=HybridTrainingArguments(**arguments))  # fmt: skip
    losses = [entry["loss"] for entry in result.log_history if "loss" in entry]
    spans = [entry["span/mean"] for entry in result.log_history if "span/mean" in entry]
    weights = {name: tensor.detach().clone() for name, tensor in result.model.state_dict().items()}
    return weights, losses, spans[-1]


def _assert_same(first, second):
    (weights_a, losses_a, span_a), (weights_b, losses_b, span_b) = first, second
    assert losses_a == pytest.approx(losses_b, rel=1e-5) and span_a == pytest.approx(span_b, rel=1e-5)
    for name, tensor in weights_a.items():
        torch.testing.assert_close(tensor, weights_b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_accumulation_equals_the_whole_batch():
    """2 micro-batches of 2 give the loss and the update (with SGD, the gradient) of one batch of 4, span penalty
    included: the model weighs each micro-batch's penalty by its share of the batch's tokens."""
    whole = _sgd_step(per_device_train_batch_size=4)
    accumulated = _sgd_step(per_device_train_batch_size=2, gradient_accumulation_steps=2)
    _assert_same(accumulated, whole)
    assert not torch.equal(
        whole[0]["model.layers.0.self_attn.mix.weight"],
        _sgd_step(per_device_train_batch_size=2)[0]["model.layers.0.self_attn.mix.weight"],
    )


def test_gradient_checkpointing_changes_nothing():
    """Recomputing the layers in the backward pass gives the same losses, spans and update."""
    _assert_same(_sgd_step(per_device_train_batch_size=4, gradient_checkpointing=True),
                 _sgd_step(per_device_train_batch_size=4))  # fmt: skip


def test_checkpointed_span_loss_is_counted_once_per_layer():
    """The span loss of a checkpointed forward is that of a plain one: the layers run again in the backward pass
    (`HybridForwardState.finished` is then set), and their spans are not counted again."""
    ids = torch.tensor([word_tokenizer()(TEXT)["input_ids"][:32]] * 2)  # (2, 32)
    outputs = {}
    for checkpointing in (False, True):
        model = convert(tiny_llama(), max_span=8, ramp=4, span_loss_coef=0.5)
        perturb(model)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        calls = []
        for layer in hybrid_layers(model):
            layer.span_predictor.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        assert len(calls) == (2 if checkpointing else 1) * len(hybrid_layers(model))  # recomputed in the backward
        grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
        outputs[checkpointing] = (out.loss.detach(), out.span_loss.detach(), grads)
    (loss, span_loss, grads), (loss_c, span_loss_c, grads_c) = outputs[False], outputs[True]
    assert span_loss > 0
    torch.testing.assert_close(loss_c, loss)
    torch.testing.assert_close(span_loss_c, span_loss)
    assert grads.keys() == grads_c.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_on_cpu():
    result = finetune(
        tiny_llama(),
        None,
        tokenizer=word_tokenizer(),
        texts=[TEXT],
        seq_len=16,
        quiet=True,
        settings={"max_span": 8, "ramp": 4},
        training_args=HybridTrainingArguments(max_steps=2, bf16=True, use_cpu=True, logging_steps=1),
    )
    losses = [entry["loss"] for entry in result.log_history if "loss" in entry]  # fmt: skip
    assert result.steps == 2 and len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


# --- --push_to_hub ------------------------------------------------------------------------------------------------

PUSH_RUN = ["--steps", "1", "--seq_len", "16", "--max-span", "8", "--ramp", "4", "--cpu", "--push_to_hub"]


def test_push_to_hub_uploads_the_written_folder(folders, tmp_path, monkeypatch):
    """`--push_to_hub --hub_model_id` pushes the final folder as the Trainer pushes: the repository is created, then
    one commit "End of training" adds every file of the folder (the hub's HTTP calls are replaced: no network)."""
    import huggingface_hub.hf_api
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoUrl

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs.get("private"))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, commit_message, **kwargs):
        calls["commit"] = (repo_id, commit_message, sorted(op.path_in_repo for op in operations))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(HfApi, "_validate_yaml", lambda self, content, **kwargs: calls.update(card=content))
    monkeypatch.setattr(huggingface_hub.hf_api, "is_xet_available", lambda: False)  # one commit, not the pipeline
    output = tmp_path / "pushed"
    argv = [str(folders / "host"), str(output), "--data", str(folders / "train.txt"), *PUSH_RUN, "--hub_model_id",
            "me/tiny-hybrid"]  # fmt: skip
    assert commands.main(["finetune", *argv]) == 0
    written = sorted(str(path.relative_to(output)) for path in output.rglob("*") if path.is_file())
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= set(written)
    assert calls["create_repo"] == ("me/tiny-hybrid", None)  # hub_private_repo: the account's default
    assert calls["commit"] == ("me/tiny-hybrid", "End of training", written)
    assert calls["card"] == (output / "README.md").read_text()  # the card's metadata is checked by the hub first


def test_push_to_hub_offline_fails_after_writing(folders, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    output = tmp_path / "kept"
    argv = [str(folders / "host"), str(output), "--data", str(folders / "train.txt"), *PUSH_RUN]
    capsys.readouterr()
    assert commands.main(["finetune", *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: the model is saved in") and "pushing it to the hub as kept failed" in lines[-1]
    assert (output / "model.safetensors").is_file() and (output / "config.json").is_file()


def test_a_resumed_run_must_keep_the_trainer_settings():
    """The record a resumed run is checked against holds the Trainer settings that change the weights."""
    from hybrid_hf.finetuning import FinetuneArguments, _run_record

    def record(**training):
        return _run_record("m", FinetuneArguments(), {}, ([TEXT], []), ([], []), HybridTrainingArguments(**training))

    assert record() == _run_record("m", FinetuneArguments(), {}, ([TEXT], []), ([], []), None)
    assert record(gradient_accumulation_steps=2)["trainer"]["gradient_accumulation_steps"] == 2
    assert record(lr_scheduler_type="cosine")["trainer"]["lr_scheduler_type"] == "cosine"
    assert json.loads(json.dumps(record(bf16=True, use_cpu=True))) == record(bf16=True, use_cpu=True)


def test_max_steps_minus_one_trains_by_epochs():
    """`--max_steps -1 --num_train_epochs N` trains N passes over the blocks, as the Trainer does."""
    training = parse_arguments(["m", "o", "--data", "t.txt", "--max_steps", "-1", "--num_train_epochs", "2"])[1]
    assert training.max_steps == -1 and training.logging_steps == 10
    training.output_dir = None
    result = finetune(tiny_llama(), None, tokenizer=word_tokenizer(), texts=[TEXT], seq_len=32, quiet=True,
                      settings={"max_span": 8, "ramp": 4}, training_args=training)  # fmt: skip
    blocks = result.train_tokens // 32  # full blocks of seq_len tokens
    assert blocks > 4 and result.steps == 2 * -(-blocks // 4)  # two epochs of batches of 4
    with pytest.raises(UsageError, match="steps must be an integer >= 1"):
        finetune(tiny_llama(), None, tokenizer=word_tokenizer(), texts=[TEXT], steps=-1)
