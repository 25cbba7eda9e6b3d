"""Bad inputs to every command and to the Python API, one table row each.

A command case must exit with status 2 and print exactly one line on stderr that starts with `error: ` and holds
the expected fragments (the argument or file, and what is accepted), with no traceback; no file under the test's
folder (sources, outputs, the working directory) may be created, changed or removed. An API case must raise
`ValueError` or `TypeError` naming the field. A hypothesis test draws random settings: each draw builds a model
whose forward is finite on finite input, or raises `ValueError`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from tiny_models import TEXT, VOCAB, tiny_host, word_tokenizer
from transformers import BertConfig, BertModel, BloomConfig

import hybrid_hf
from hybrid_hf import HybridSettings, commands, convert
from hybrid_hf.conversion import NEW_PARAMETER_MODULES
from hybrid_hf.finetuning import finetune
from hybrid_hf.settings import UPPER_BOUNDS, check_settings

INF, NAN = float("inf"), float("nan")
# Writes the file PWNED beside itself when imported (transformers imports a copy from its module cache: the path is
# written in): a model folder whose code runs unasked would leave it behind.
EVIL_CODE = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n"


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


class _Evil:
    """Pickled, it would run `touch PWNED` when loaded without `weights_only`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Every source the cases name, made once: good ones and bad ones (each broken in one way)."""
    root = tmp_path_factory.mktemp("world")
    tokenizer = word_tokenizer()
    host = tiny_host("llama")
    paths: dict[str, Path] = {"root": root}

    def model_folder(name: str, model=host, with_tokenizer: bool = True, **save) -> Path:
        folder = root / name
        model.save_pretrained(folder, **save)
        if with_tokenizer:
            tokenizer.save_pretrained(folder)
        paths[name] = folder
        return folder

    model_folder("host")
    model_folder("hybrid", convert(host, max_span=8, ramp=4))
    bert = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4)).eval()  # fmt: skip
    model_folder("bert", bert)
    BertConfig(vocab_size=VOCAB, hidden_size=30, num_hidden_layers=1, num_attention_heads=4).save_pretrained(
        root / "bad_heads_bert"
    )  # BERT's config does not check that the heads divide the hidden size
    paths["bad_heads_bert"] = root / "bad_heads_bert"

    for name in ("truncated", "corrupt", "hybrid_truncated"):
        folder = model_folder(name, convert(host, max_span=8, ramp=4) if name.startswith("hybrid") else host)
        data = (folder / "model.safetensors").read_bytes()
        if name.endswith("truncated"):
            (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
        else:
            (folder / "model.safetensors").write_bytes(data[:8] + b"#" * 32 + data[40:])
    for name, value in (("nan_weights", NAN), ("inf_weights", INF), ("hybrid_nan", NAN)):
        broken = tiny_host("llama")
        if name.startswith("hybrid"):
            broken = convert(broken, max_span=8, ramp=4)
        with torch.no_grad():
            broken.model.layers[1].mlp.up_proj.weight[0, 0] = value
        model_folder(name, broken)
    _edit_config(model_folder("vocab_mismatch"), vocab_size=50)
    _edit_config(model_folder("hybrid_vocab_mismatch", convert(host, max_span=8, ramp=4)), vocab_size=50)
    _edit_config(model_folder("zero_heads"), num_attention_heads=0)
    _edit_config(model_folder("string_heads"), num_attention_heads="four")
    _edit_config(model_folder("zero_layers"), num_hidden_layers=0)
    sharded = model_folder("missing_shard", max_shard_size="20KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()

    for name, state in (("pickle_only", host.state_dict()), ("evil_pickle", {"x": _Evil(root / "PWNED")})):
        folder = root / name
        host.config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        torch.save(state, folder / "pytorch_model.bin")
        paths[name] = folder
    # An unknown architecture whose config asks to run the folder's own code.
    evil = root / "evil_remote"
    evil.mkdir()
    (evil / "evil.py").write_text(EVIL_CODE.format(marker=str(root / "PWNED")))
    (evil / "config.json").write_text(json.dumps({
        "model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Evil",
                                           "AutoModel": "evil.Evil"}}))  # fmt: skip
    paths["evil_remote"] = evil
    unsupported = root / "unsupported"
    BloomConfig(vocab_size=VOCAB, hidden_size=32, n_head=4, n_layer=2).save_pretrained(unsupported)
    paths["unsupported"] = unsupported
    for name, content in (("bad_json", "{not json"), ("no_weights", None)):
        folder = root / name
        if content is None:
            host.config.save_pretrained(folder)
        else:
            folder.mkdir()
            (folder / "config.json").write_text(content)
        paths[name] = folder
    no_tokenizer = model_folder("hybrid_no_tokenizer", convert(host, max_span=8, ramp=4), with_tokenizer=False)
    assert not (no_tokenizer / "tokenizer.json").exists()

    user = root / "user_files"  # an ordinary folder of the user's: never deleted, not even with --force
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    paths["user_files"] = user
    notes = root / "notes.txt"
    notes.write_text("a file")
    paths["notes"] = notes
    for name, content in (("text", TEXT), ("empty", "  \n\n "), ("tiny_text", "the")):
        (root / f"{name}.txt").write_text(content)
        paths[name] = root / f"{name}.txt"
    (root / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50)
    paths["latin1"] = root / "latin1.txt"
    arguments = {"model_name_or_path": str(root / "host"), "output_dir": str(root / "out"), "learning_rat": 1}
    (root / "args_unknown_key.yaml").write_text(json.dumps(arguments))  # JSON is YAML
    paths["args_unknown_key"] = root / "args_unknown_key.yaml"
    # An interrupted fine-tune's checkpoint folder beside the output "interrupted".
    checkpoint = root / "interrupted.checkpoints" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    (root / "interrupted.checkpoints" / "finetune_run.json").write_text(json.dumps({"steps": 99, "save_steps": 2}))
    paths["interrupted"] = root / "interrupted"
    (root / "cwd").mkdir()
    paths["cwd"] = root / "cwd"
    paths["out"] = root / "out"
    paths["missing"] = root / "does" / "not" / "exist"
    paths["nest_inner"] = model_folder("nest/inner", convert(host, max_span=8, ramp=4))
    paths["nest"] = root / "nest"
    for name, damage in RESUME_DAMAGE.items():
        paths[name] = _checkpoint_of(root / name, damage)
    files = root / "resume_state_not_json.checkpoints" / "checkpoint-2"  # the interrupted run's, made complete
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (root / "interrupted.checkpoints" / "checkpoint-2" / name).write_bytes((files / name).read_bytes())
    _trust_loading_world(root, paths, host, tokenizer)
    return paths


def _checkpoint_of(output: Path, damage) -> Path:
    """What `finetune MODEL output --save-steps 2 --steps 2` leaves when killed after its last checkpoint (the
    files a checkpoint holds, with the run's arguments; the contents do not matter to checks made before loading),
    then changed by `damage(checkpoint folder)`."""
    checkpoint = output.with_name(f"{output.name}.checkpoints") / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    save_file({"weight": torch.zeros(64, 64)}, checkpoint / "model.safetensors")
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        torch.save({"state": {0: torch.zeros(4)}, "step": 2}, checkpoint / name)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    (checkpoint.parent / "finetune_run.json").write_text(json.dumps({"steps": 50, "save_steps": 2}))
    damage(checkpoint)
    return output


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


RESUME_DAMAGE = {
    "resume_no_optimizer": lambda checkpoint: (checkpoint / "optimizer.pt").unlink(),
    "resume_truncated_weights": lambda checkpoint: _truncate(checkpoint / "model.safetensors"),
    "resume_state_not_json": lambda checkpoint: (checkpoint / "trainer_state.json").write_text("{not json"),
    "resume_run_a_list": lambda checkpoint: (checkpoint.parent / "finetune_run.json").write_text("[1, 2]"),
    "resume_optimizer_link": lambda checkpoint: (
        (checkpoint / "optimizer.pt").unlink(),
        (checkpoint / "optimizer.pt").symlink_to("/etc/passwd"),
    ),
    "resume_nan_weights": lambda checkpoint: save_file(
        {"model.layers.0.self_attn.mix.weight": torch.full((4, 4), NAN)}, checkpoint / "model.safetensors"
    ),
    "resume_inf_optimizer": lambda checkpoint: torch.save(
        {"state": {0: {"exp_avg": torch.full((4,), INF)}}}, checkpoint / "optimizer.pt"
    ),
    "resume_optimizer_payload": lambda checkpoint: torch.save(
        {"state": _Evil(checkpoint.parents[1] / "PWNED")}, checkpoint / "optimizer.pt"
    ),
}


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder under `root`: path -> (size, mtime) for files, None for folders."""
    state = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            state[os.path.relpath(os.path.join(folder, name), root)] = None
        for name in files:
            info = os.stat(os.path.join(folder, name))
            state[os.path.relpath(os.path.join(folder, name), root)] = (info.st_size, info.st_mtime_ns)
    return state


# --- command cases: (argv with {placeholders} from `world`, fragments the error line must hold) -------------------

CONVERT = {
    "missing source": (["{missing}", "{out}"], ["does/not/exist", "not found"]),
    "source is a file": (["{notes}", "{out}"], ["notes.txt", "not a model folder"]),
    "source without config.json": (["{user_files}", "{out}"], ["user_files", "no config.json"]),
    "unsupported architecture": (["{unsupported}", "{out}"], ["BloomForCausalLM", "attention interface"]),
    "unknown architecture with remote code": (["{evil_remote}", "{out}"], ["'evil'", "no model class"]),
    "config.json not json": (["{bad_json}", "{out}"], ["bad_json", "unreadable config.json"]),
    "zero attention heads": (["{zero_heads}", "{out}"], ["num_attention_heads", "positive integer", "got 0"]),
    "attention heads a string": (["{string_heads}", "{out}"], ["num_attention_heads", "positive integer"]),
    "zero layers": (["{zero_layers}", "{out}"], ["num_hidden_layers", "positive integer"]),
    "heads do not divide hidden": (["{bad_heads_bert}", "{out}"], ["hidden size (30)", "attention heads (4)"]),
    "no weights": (["{no_weights}", "{out}"], ["no_weights", "no weights", "model.safetensors"]),
    "pickle only": (["{pickle_only}", "{out}"], ["pytorch_model.bin", "--allow-pickle"]),
    "malicious pickle, allowed": (["{evil_pickle}", "{out}", "--allow-pickle"], ["evil_pickle", "were not loaded"]),
    "truncated safetensors": (["{truncated}", "{out}"], ["truncated", "damaged or truncated"]),
    "corrupt safetensors": (["{corrupt}", "{out}"], ["corrupt", "damaged or truncated"]),
    "vocab_size does not match": (["{vocab_mismatch}", "{out}"], ["vocab_mismatch", "[99, 32]", "vocab_size"]),
    "NaN weights": (["{nan_weights}", "{out}"], ["nan_weights", "NaN or infinite", "up_proj"]),
    "inf weights": (["{inf_weights}", "{out}"], ["inf_weights", "NaN or infinite"]),
    "missing shard": (["{missing_shard}", "{out}"], ["model-0000", "model.safetensors.index.json", "incomplete"]),
    "already hybrid": (["{hybrid}", "{out}"], ["already a hybrid model"]),
    "hub id, offline": (["no-such-org/no-such-model", "{out}"], ["no-such-org/no-such-model", "not reachable"]),
    "not a hub id": (["no such model", "{out}"], ["'no such model'", "not a valid hub model id"]),
    "max span 0": (["{host}", "{out}", "--max-span", "0"], ["max_span", "positive integer"]),
    "max span negative": (["{host}", "{out}", "--max-span", "-4"], ["max_span", "positive integer"]),
    "max span huge": (["{host}", "{out}", "--max-span", "99999999999"], ["max_span", "number of positions (256)"]),
    "max span not a number": (["{host}", "{out}", "--max-span", "lots"], ["--max-span", "invalid int value"]),
    "max span float": (["{host}", "{out}", "--max-span", "8.5"], ["--max-span", "invalid int value"]),
    "ramp 0": (["{host}", "{out}", "--ramp", "0"], ["ramp", "positive integer"]),
    "ramp huge": (["{host}", "{out}", "--ramp", "100000"], ["ramp", "number of positions"]),
    "tau min 0": (["{host}", "{out}", "--tau-min", "0"], ["tau_min", "number in [0.001, 1000]"]),
    "tau min nan": (["{host}", "{out}", "--tau-min", "nan"], ["tau_min", "number in [0.001, 1000]"]),
    "tau min tiny": (["{host}", "{out}", "--tau-min", "1e-300"], ["tau_min", "number in [0.001, 1000]"]),
    "tau max inf": (["{host}", "{out}", "--tau-max", "inf"], ["tau_max", "number in [0.001, 1000]"]),
    "tau max negative": (["{host}", "{out}", "--tau-max", "-1"], ["tau_max", "number in [0.001, 1000]"]),
    "tau min above tau max": (["{host}", "{out}", "--tau-min", "2", "--tau-max", "1"], ["tau_min", "<= `tau_max`"]),
    "span loss coef nan": (["{host}", "{out}", "--span-loss-coef", "nan"], ["span_loss_coef", "number in [0, 1000]"]),
    "span loss coef inf": (["{host}", "{out}", "--span-loss-coef", "inf"], ["span_loss_coef", "number in [0, 1000]"]),
    "span loss coef negative": (["{host}", "{out}", "--span-loss-coef", "-0.1"], ["span_loss_coef", "[0, 1000]"]),
    "initial span 0": (["{host}", "{out}", "--initial-span", "0"], ["initial_span", "(0, 1)"]),
    "initial span 1": (["{host}", "{out}", "--initial-span", "1"], ["initial_span", "(0, 1)"]),
    "initial span nan": (["{host}", "{out}", "--initial-span", "nan"], ["initial_span", "(0, 1)"]),
    "layer out of range": (["{host}", "{out}", "--hybrid-layers", "5"], ["hybrid_layers", "[0, 2)"]),
    "layer repeated": (["{host}", "{out}", "--hybrid-layers", "0,0"], ["hybrid_layers", "distinct"]),
    "layer negative": (
        ["{host}", "{out}", "--hybrid-layers", "-1"],
        ["--hybrid-layers", "comma-separated layer indices"],
    ),
    "layers not numbers": (
        ["{host}", "{out}", "--hybrid-layers", "one"],
        ["--hybrid-layers", "comma-separated layer indices"],
    ),
    "removed flag": (["{host}", "{out}", "--local-projections", "both"], ["unrecognized", "--local-projections"]),
    "task unknown": (["{host}", "{out}", "--task", "nope"], ["--task", "'causal_lm'"]),
    "task not for the architecture": (
        ["{host}", "{out}", "--task", "masked_lm"],
        ["masked_lm", "not available for llama"],
    ),
    "unknown flag": (["{host}", "{out}", "--max-spam", "8"], ["unrecognized arguments: --max-spam"]),
    "no output argument": (["{host}"], ["output"]),
    "output exists": (["{host}", "{user_files}"], ["user_files", "already exists", "--force"]),
    "force onto user files": (["{host}", "{user_files}", "--force"], ["user_files", "not a model folder"]),
    "force onto a file": (["{host}", "{notes}", "--force"], ["notes.txt", "not a model folder"]),
    "output replaces the source": (["{host}", "{root}", "--force"], ["would replace the source"]),
    "output under a file": (["{host}", "{notes}/out"], ["notes.txt/out", "cannot write the output"]),
}

FINETUNE_TEXT = ["--data", "{text}"]
FINETUNE = {
    "missing model": (["{missing}", "{out}", *FINETUNE_TEXT], ["does/not/exist", "not found"]),
    "model is a file": (["{notes}", "{out}", *FINETUNE_TEXT], ["notes.txt", "not a model folder"]),
    "model without config.json": (["{user_files}", "{out}", *FINETUNE_TEXT], ["user_files", "no config.json"]),
    "unsupported architecture": (
        ["{unsupported}", "{out}", *FINETUNE_TEXT],
        ["BloomForCausalLM", "attention interface"],
    ),
    "encoder": (["{bert}", "{out}", *FINETUNE_TEXT], ["causal LMs", "encoders"]),
    "unknown architecture with remote code": (
        ["{evil_remote}", "{out}", *FINETUNE_TEXT],
        ["'evil'", "no model class"],
    ),
    "config.json not json": (["{bad_json}", "{out}", *FINETUNE_TEXT], ["unreadable config.json"]),
    "zero attention heads": (["{zero_heads}", "{out}", *FINETUNE_TEXT], ["num_attention_heads", "positive integer"]),
    "pickle only": (["{pickle_only}", "{out}", *FINETUNE_TEXT], ["pytorch_model.bin", "--allow-pickle"]),
    "malicious pickle, allowed": (["{evil_pickle}", "{out}", *FINETUNE_TEXT, "--allow-pickle"], ["were not loaded"]),
    "truncated safetensors": (["{truncated}", "{out}", *FINETUNE_TEXT], ["truncated", "damaged or truncated"]),
    "corrupt safetensors": (["{corrupt}", "{out}", *FINETUNE_TEXT], ["corrupt", "damaged or truncated"]),
    "vocab_size does not match": (["{vocab_mismatch}", "{out}", *FINETUNE_TEXT], ["[99, 32]", "vocab_size"]),
    "NaN weights": (["{nan_weights}", "{out}", *FINETUNE_TEXT], ["nan_weights", "NaN or infinite"]),
    "NaN weights, hybrid": (["{hybrid_nan}", "{out}", *FINETUNE_TEXT], ["hybrid_nan", "NaN or infinite"]),
    "missing shard": (["{missing_shard}", "{out}", *FINETUNE_TEXT], ["model.safetensors.index.json", "incomplete"]),
    "hub id, offline": (["no-such-org/no-such-model", "{out}", *FINETUNE_TEXT], ["not reachable"]),
    "no --data": (["{host}", "{out}"], ["--data"]),
    "missing data file": (["{host}", "{out}", "--data", "{missing}"], ["data file not found", "does/not/exist"]),
    "empty data file": (["{host}", "{out}", "--data", "{empty}"], ["training data is empty"]),
    "data not utf-8": (["{host}", "{out}", "--data", "{latin1}"], ["latin1.txt", "not UTF-8"]),
    "data a single token": (
        ["{host}", "{out}", "--data", "{tiny_text}", "--eval-data", "{text}"],
        ["training data", "single token"],
    ),
    "missing eval file": (
        ["{host}", "{out}", *FINETUNE_TEXT, "--eval-data", "{missing}"],
        ["eval data file not found"],
    ),
    "empty eval file": (["{host}", "{out}", *FINETUNE_TEXT, "--eval-data", "{empty}"], ["eval data is empty"]),
    "steps 0": (["{host}", "{out}", *FINETUNE_TEXT, "--steps", "0"], ["steps", "integer >= 1"]),
    "steps negative": (["{host}", "{out}", *FINETUNE_TEXT, "--steps", "-5"], ["steps", "integer >= 1"]),
    "steps not a number": (["{host}", "{out}", *FINETUNE_TEXT, "--steps", "ten"], ["--steps", "invalid int value"]),
    "seq len 1": (["{host}", "{out}", *FINETUNE_TEXT, "--seq-len", "1"], ["seq-len", "integer >= 2"]),
    "seq len beyond positions": (["{host}", "{out}", *FINETUNE_TEXT, "--seq-len", "100000"], ["seq-len", "256"]),
    "batch size 0": (["{host}", "{out}", *FINETUNE_TEXT, "--batch-size", "0"], ["batch-size", "integer >= 1"]),
    "lr 0": (["{host}", "{out}", *FINETUNE_TEXT, "--lr", "0"], ["lr", "positive finite number"]),
    "lr negative": (["{host}", "{out}", *FINETUNE_TEXT, "--lr=-1e-4"], ["lr", "positive finite number"]),
    "lr negative, as an option": (["{host}", "{out}", *FINETUNE_TEXT, "--lr", "-1e-4"], ["--lr", "expected one"]),
    "lr nan": (["{host}", "{out}", *FINETUNE_TEXT, "--lr", "nan"], ["lr", "positive finite number"]),
    "lr inf": (["{host}", "{out}", *FINETUNE_TEXT, "--lr", "inf"], ["lr", "positive finite number"]),
    "lora r 0": (["{host}", "{out}", *FINETUNE_TEXT, "--lora", "--lora-r", "0"], ["lora-r", "integer >= 1"]),
    "seed negative": (["{host}", "{out}", *FINETUNE_TEXT, "--seed", "-1"], ["seed", "integer >= 0"]),
    "logging steps 0": (["{host}", "{out}", *FINETUNE_TEXT, "--logging-steps", "0"], ["logging-steps", ">= 1"]),
    "save steps 0": (["{host}", "{out}", *FINETUNE_TEXT, "--save-steps", "0"], ["save-steps", ">= 1"]),
    "span loss coef nan": (
        ["{host}", "{out}", *FINETUNE_TEXT, "--span-loss-coef", "nan"],
        ["span-loss-coef", "finite"],
    ),
    "span loss coef inf": (
        ["{host}", "{out}", *FINETUNE_TEXT, "--span-loss-coef", "inf"],
        ["span-loss-coef", "finite"],
    ),
    "span loss coef negative": (["{host}", "{out}", *FINETUNE_TEXT, "--span-loss-coef", "-1"], ["span-loss-coef"]),
    "max span 0": (["{host}", "{out}", *FINETUNE_TEXT, "--max-span", "0"], ["max_span", "positive integer"]),
    "max span huge": (["{host}", "{out}", *FINETUNE_TEXT, "--max-span", "99999999999"], ["max_span", "positions"]),
    "tau max inf": (["{host}", "{out}", *FINETUNE_TEXT, "--tau-max", "inf"], ["tau_max", "finite"]),
    "initial span 2": (["{host}", "{out}", *FINETUNE_TEXT, "--initial-span", "2"], ["initial_span", "(0, 1)"]),
    "hybrid layers not numbers": (["{host}", "{out}", *FINETUNE_TEXT, "--hybrid-layers", "x"], ["--hybrid-layers"]),
    "hybrid layer out of range": (["{host}", "{out}", *FINETUNE_TEXT, "--hybrid-layers", "9"], ["hybrid_layers"]),
    "removed flag": (
        ["{host}", "{out}", *FINETUNE_TEXT, "--local-projections", "x"],
        ["unrecognized", "--local-projections"],
    ),
    "settings for a hybrid model": (["{hybrid}", "{out}", *FINETUNE_TEXT, "--max-span", "4"], ["already hybrid"]),
    "unknown flag": (["{host}", "{out}", *FINETUNE_TEXT, "--epochs", "1"], ["unrecognized arguments: --epochs"]),
    "bad TrainingArguments value": (
        ["{host}", "{out}", *FINETUNE_TEXT, "--lr_scheduler_type", "sideways"],
        ["--lr_scheduler_type", "invalid choice"],
    ),
    "no output": (["{host}", *FINETUNE_TEXT], ["OUTPUT", "--output_dir"]),
    "no model": (["--data", "{text}"], ["no model given", "--model_name_or_path"]),
    "save strategy epoch": (
        ["{host}", "{out}", *FINETUNE_TEXT, "--save_strategy", "epoch"],
        ["'epoch'", "--save_steps"],
    ),
    "arguments file, unknown key": (["{args_unknown_key}"], ["args_unknown_key.yaml", "learning_rat"]),
    "model and --model_name_or_path differ": (
        ["{host}", "{out}", *FINETUNE_TEXT, "--model_name_or_path", "{hybrid}"],
        ["differ"],
    ),
    "missing arguments file": (["{missing}.yaml"], ["arguments file not found"]),
    "output exists": (["{host}", "{user_files}", *FINETUNE_TEXT], ["user_files", "already exists", "--force"]),
    "force onto user files": (["{host}", "{user_files}", *FINETUNE_TEXT, "--force"], ["not a model folder"]),
    "force onto a file": (["{host}", "{notes}", *FINETUNE_TEXT, "--force"], ["notes.txt", "not a model folder"]),
    "output under a file": (["{host}", "{notes}/out", *FINETUNE_TEXT], ["notes.txt/out", "cannot write the output"]),
    "resume without checkpoints": (["{host}", "{out}", *FINETUNE_TEXT, "--resume"], ["nothing to resume"]),
    "checkpoints of an interrupted run": (
        ["{host}", "{interrupted}", *FINETUNE_TEXT],
        ["interrupted.checkpoints", "--resume"],
    ),
    "resume with other arguments": (
        ["{host}", "{interrupted}", *FINETUNE_TEXT, "--resume"],
        ["other arguments", "steps 99 then, 50 now"],
    ),
}

INSPECT_OUT = ["--prompt", "the cat sat", "--out", "{out}"]
INSPECT = {
    "missing model": (["{missing}", *INSPECT_OUT], ["does/not/exist", "not found"]),
    "model is a file": (["{notes}", *INSPECT_OUT], ["notes.txt", "got a file"]),
    "model without config.json": (["{user_files}", *INSPECT_OUT], ["user_files", "no config.json"]),
    "unsupported architecture": (["{unsupported}", *INSPECT_OUT], ["bloom", "no hybrid attention layers"]),
    "unknown architecture with remote code": (["{evil_remote}", *INSPECT_OUT], ["'evil'", "no model class"]),
    "host model, not hybrid": (["{host}", *INSPECT_OUT], ["no hybrid attention layers", "hybrid-hf convert"]),
    "truncated safetensors": (["{hybrid_truncated}", *INSPECT_OUT], ["damaged or truncated"]),
    "NaN weights": (["{hybrid_nan}", *INSPECT_OUT], ["hybrid_nan", "NaN or infinite"]),
    "vocab_size does not match": (["{hybrid_vocab_mismatch}", *INSPECT_OUT], ["[99, 32]", "vocab_size"]),
    "zero attention heads": (["{zero_heads}", *INSPECT_OUT], ["num_attention_heads", "positive integer"]),
    "no tokenizer": (["{hybrid_no_tokenizer}", *INSPECT_OUT], ["no usable tokenizer"]),
    "no --out": (["{hybrid}", "--prompt", "the cat"], ["--out"]),
    "--out is a file": (["{hybrid}", "--prompt", "the cat", "--out", "{notes}"], ["--out", "is a file"]),
    "no text": (["{hybrid}", "--out", "{out}"], ["--text", "--prompt"]),
    "text and prompt": (["{hybrid}", "--text", "{text}", *INSPECT_OUT], ["not allowed with"]),
    "missing text file": (["{hybrid}", "--text", "{missing}", "--out", "{out}"], ["text file not found"]),
    "empty text file": (["{hybrid}", "--text", "{empty}", "--out", "{out}"], ["empty.txt", "is empty"]),
    "empty prompt": (["{hybrid}", "--prompt", "  ", "--out", "{out}"], ["--prompt", "is empty"]),
    "max tokens 0": (["{hybrid}", *INSPECT_OUT, "--max-tokens", "0"], ["--max-tokens", "at least 1"]),
    "max tokens not a number": (["{hybrid}", *INSPECT_OUT, "--max-tokens", "many"], ["--max-tokens", "invalid int"]),
    "layers not numbers": (["{hybrid}", *INSPECT_OUT, "--layers", "a,b"], ["--layers", "comma-separated"]),
    "layer out of range": (["{hybrid}", *INSPECT_OUT, "--layers", "7"], ["7"]),
}

BENCH = {
    "unknown section": (["--only", "nope"], ["--only", "unknown section", "choose from"]),
    "repeats 0": (["--repeats", "0"], ["--repeats", ">= 1"]),
    "repeats not a number": (["--repeats", "x"], ["--repeats", "invalid int value"]),
    "threads 0": (["--threads", "0"], ["--threads", ">= 1"]),
    "case budget 0": (["--case-budget", "0"], ["--case-budget", "positive number"]),
    "case budget nan": (["--case-budget", "nan"], ["--case-budget", "positive number"]),
    "case budget inf": (["--case-budget", "inf"], ["--case-budget", "positive number"]),
    "reference max n 0": (["--reference-max-n", "0"], ["--reference-max-n", ">= 1"]),
    "seed negative": (["--seed", "-1"], ["--seed", "[0, 2**32)"]),
    "unknown device": (["--device", "toaster"], ["--device", "toaster"]),
    "out is a file": (["--out", "{notes}"], ["--out", "is a file"]),
    "unknown flag": (["--fast"], ["unrecognized arguments: --fast"]),
}

DEMO = {
    "steps 0": (["--steps", "0"], ["steps", "integer >= 1"]),
    "seq len 1": (["--seq-len", "1"], ["seq-len", "integer >= 2"]),
    "batch size 0": (["--batch-size", "0"], ["batch-size", "integer >= 1"]),
    "lr 0": (["--lr", "0"], ["lr", "positive finite number"]),
    "lr nan": (["--lr", "nan"], ["lr", "positive finite number"]),
    "lora r 0": (["--lora-r", "0"], ["lora-r", "integer >= 1"]),
    "seed negative": (["--seed", "-3"], ["seed", "integer >= 0"]),
    "max span 0": (["--max-span", "0"], ["--max-span", "positive integer"]),
    "ramp negative": (["--ramp", "-2"], ["--ramp", "positive integer"]),
    "span loss coef inf": (["--span-loss-coef", "inf"], ["span-loss-coef", "finite number >= 0"]),
    "span loss coef negative": (["--span-loss-coef", "-1"], ["span-loss-coef", "finite number >= 0"]),
    "train plays 0": (["--train-plays", "0"], ["--train-plays", ">= 1"]),
    "eval tokens 0": (["--eval-tokens", "0"], ["--eval-tokens", ">= 1"]),
    "seeds 0": (["--seeds", "0"], ["--seeds", ">= 1"]),
    "timing tokens negative": (["--timing-tokens", "-1"], ["--timing-tokens", ">= 0"]),
    "unknown second text": (
        ["--second-text", "{missing}"],
        ["--second-text", "lee, none or a file", "does/not/exist"],
    ),
    "missing model": (["--model", "{missing}"], ["does/not/exist", "not found"]),
    "model without config.json": (["--model", "{user_files}"], ["user_files", "no config.json"]),
    "missing text file": (["--model", "{host}", "--text", "{missing}"], ["--text file not found"]),
    "empty text file": (["--model", "{host}", "--text", "{empty}"], ["--text", "empty"]),
    "missing eval text": (
        ["--model", "{host}", "--text", "{text}", "--eval-text", "{missing}"],
        ["--eval-text file not found"],
    ),
    "output exists": (["--out", "{user_files}"], ["user_files", "already exists", "--force"]),
    "force onto user files": (["--out", "{user_files}", "--force"], ["user_files", "not a demo output or a model"]),
    "unknown flag": (["--epochs", "3"], ["unrecognized arguments: --epochs"]),
}

COMMAND_CASES = [
    pytest.param(command, argv, fragments, id=f"{command}: {name}")
    for command, table in (("convert", CONVERT), ("finetune", FINETUNE), ("inspect", INSPECT), ("bench", BENCH),
                           ("demo", DEMO))
    for name, (argv, fragments) in table.items()
]  # fmt: skip

SOURCE = "would replace the source"


def _resumed(checkpoints: str, fragments: list[str]) -> tuple[list[str], list[str]]:
    """A `finetune --resume` row into the output whose checkpoints are the world's `checkpoints`."""
    return ["{host}", "{" + checkpoints + "}", *FINETUNE_TEXT, "--resume"], fragments


TRUST_OUTPUT = {
    ("finetune", "output is the model"): (["{hybrid}", "{hybrid}", *FINETUNE_TEXT, "--force"], [SOURCE, "hybrid"]),
    ("finetune", "output is the model, spelled relative"): (
        ["../hybrid", "{hybrid}", *FINETUNE_TEXT, "--force"],
        [SOURCE, "'../hybrid'"],
    ),
    ("finetune", "output holds the model"): (["{nest_inner}", "{nest}", *FINETUNE_TEXT, "--force"], [SOURCE]),
    ("finetune", "output holds the teacher"): (
        ["{host}", "{nest}", *FINETUNE_TEXT, "--distill-from", "{nest_inner}", "--force"],
        [SOURCE, "nest/inner"],
    ),
    ("finetune", "output is the model, without --force"): (["{hybrid}", "{hybrid}", *FINETUNE_TEXT], [SOURCE]),
    ("inspect", "--out is the model"): (["{hybrid}", "--prompt", "the cat", "--out", "{hybrid}"], [SOURCE]),
    ("inspect", "--out holds the model"): (
        ["{nest_inner}", "--prompt", "the cat", "--out", "{nest}", "--force"],
        [SOURCE],
    ),
    ("inspect", "--out another model"): (
        ["{hybrid}", "--prompt", "the cat", "--out", "{host}"],
        ["host", "already exists", "--force"],
    ),
    ("inspect", "--out another model, forced"): (
        ["{hybrid}", "--prompt", "the cat", "--out", "{host}", "--force"],
        ["host", "not an earlier inspection"],
    ),
    ("inspect", "--out user files"): (["{hybrid}", *INSPECT_OUT[:2], "--out", "{user_files}"], ["already exists"]),
    ("demo", "--out is the model"): (["--model", "{nest_inner}", "--out", "{nest_inner}", "--force"], [SOURCE]),
    ("demo", "--out holds the model"): (["--model", "{host}", "--out", "{root}", "--force"], [SOURCE]),
    ("convert", "tau max 1e39"): (["{host}", "{out}", "--tau-max", "1e39"], ["tau_max", "1000]", "infinite"]),
    ("convert", "span loss coef 3.4e38"): (
        ["{host}", "{out}", "--span-loss-coef", "3.4e38"],
        ["span_loss_coef", "[0, 1000]", "infinite gradients"],
    ),
    ("finetune", "tau max 1e39"): (["{host}", "{out}", *FINETUNE_TEXT, "--tau-max", "1e39"], ["tau_max", "1000]"]),
    ("finetune", "span loss coef 3.4e38"): (
        ["{host}", "{out}", *FINETUNE_TEXT, "--span-loss-coef", "3.4e38"],
        ["span-loss-coef", "at most 1000"],
    ),
    ("demo", "span loss coef 3.4e38"): (["--span-loss-coef", "3.4e38"], ["span-loss-coef", "at most 1000"]),
    ("finetune", "resume without optimizer.pt"): _resumed(
        "resume_no_optimizer", ["checkpoint-2", "optimizer.pt", "is missing", "start over"]
    ),
    ("finetune", "resume from truncated weights"): _resumed(
        "resume_truncated_weights", ["model.safetensors", "damaged or truncated"]
    ),
    ("finetune", "resume, trainer_state.json not JSON"): _resumed(
        "resume_state_not_json", ["trainer_state.json", "not JSON"]
    ),
    ("finetune", "resume, finetune_run.json a list"): _resumed(
        "resume_run_a_list", ["finetune_run.json", "not a JSON object"]
    ),
    ("finetune", "resume, optimizer.pt a link to a system file"): _resumed(
        "resume_optimizer_link", ["optimizer.pt", "is a link"]
    ),
    ("finetune", "resume from NaN weights"): _resumed(
        "resume_nan_weights", ["model.safetensors", "NaN or infinite", "mix"]
    ),
    ("finetune", "resume from an infinite optimizer state"): _resumed(
        "resume_inf_optimizer", ["optimizer.pt", "NaN or infinite", "exp_avg"]
    ),
    ("finetune", "resume, optimizer.pt a pickle with a payload"): _resumed(
        "resume_optimizer_payload", ["optimizer.pt", "not loaded"]
    ),
}
TRUST_OUTPUT_CASES = [
    pytest.param(command, argv, fragments, id=f"{command}: {name}")
    for (command, name), (argv, fragments) in TRUST_OUTPUT.items()
]
COMMAND_CASES += TRUST_OUTPUT_CASES


# --- loading trusts nothing it cannot check: weights, configs and index files edited by hand ------------------------


def _trust_loading_world(root: Path, paths: dict[str, Path], host, tokenizer) -> None:
    """Host and hybrid folders whose weights, config.json or index disagree with the model they describe."""
    hybrid = convert(host, max_span=8, ramp=4)

    def edited(name: str, model, tensors=None, **config) -> Path:
        folder = root / name
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        if tensors is not None:
            stored = load_file(folder / "model.safetensors")
            save_file(tensors(stored), folder / "model.safetensors", metadata={"format": "pt"})
        if config:
            _edit_config(folder, **config)
        paths[name] = folder
        return folder

    edited("renamed", host, lambda t: {k.replace("model.", "backbone.", 1): v for k, v in t.items()})
    o_proj = "model.layers.1.self_attn.o_proj.weight"
    edited("no_o_proj", host, lambda t: {k: v for k, v in t.items() if k != o_proj})
    edited("no_mix", hybrid, lambda t: {k: v for k, v in t.items() if ".mix." not in k})
    edited("no_span_predictor", hybrid, lambda t: {k: v for k, v in t.items() if ".span_predictor." not in k})
    edited("fewer_hybrid_layers", hybrid, hybrid_layers=[0])
    edited("more_layers", hybrid, num_hidden_layers=3)
    edited("gpt2_over_llama", hybrid, model_type="hybrid_gpt2")
    edited("unknown_hybrid_type", hybrid, model_type="hybrid_nosuchmodel")
    edited("bogus_attention", hybrid, global_attn_implementation="bogus_attention")
    edited("flash_attention", hybrid, global_attn_implementation="flash_attention_2")
    sizes = (
        ("many_layers", "num_hidden_layers", 100000),
        ("huge_vocab", "vocab_size", 2**31 - 1),
        ("huge_hidden", "hidden_size", 2**20),
        ("huge_intermediate", "intermediate_size", 2**34),
    )
    for name, field, value in sizes:
        edited(name, host, **{field: value})
        edited(f"hybrid_{name}", hybrid, **{field: value})  # fmt: skip
    shards = (
        ("index_bin_shard", "pytorch_model-00001-of-00001.bin"),
        ("index_parent", "../../../../etc/passwd"),
        ("index_absolute", "/etc/passwd"),
        ("index_empty", None),
    )
    for name, shard in shards:
        folder = edited(name, host)
        (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
        names = load_file(folder / "model-00001-of-00001.safetensors")
        weight_map = {} if shard is None else dict.fromkeys(names, shard)
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))  # fmt: skip
    torch.save(host.state_dict(), paths["index_bin_shard"] / "pytorch_model-00001-of-00001.bin")


_FLASH_ATTN_INSTALLED = importlib.util.find_spec("flash_attn") is not None
_TOO_LARGE = {"many_layers": "num_hidden_layers", "huge_vocab": "vocab_size", "huge_hidden": "hidden_size",
              "huge_intermediate": "intermediate_size"}  # fmt: skip
_INCOMPLETE_HYBRID = {
    "no_mix": ["lack 2 tensor(s)", "model.layers.0.self_attn.mix.weight", "never leaves a weight random"],
    "no_span_predictor": ["lack 4 tensor(s)", "span_predictor.proj.bias"],
    "fewer_hybrid_layers": ["hold 3 tensor(s)", "model.layers.1.self_attn.mix.weight"],
    "more_layers": ["lack 12 tensor(s)", "model.layers.2."],
    "gpt2_over_llama": ["HybridGPT2LMHeadModel", "transformer.h.0.attn"],
    "unknown_hybrid_type": ["'hybrid_nosuchmodel'", "not a model type"],
    "bogus_attention": ["global_attn_implementation", "'bogus_attention'", "sdpa"],
    **({} if _FLASH_ATTN_INSTALLED else {"flash_attention": ["global_attn_implementation", "'flash_attention_2'"]}),
}
_RENAMED = ["renamed", "lack 20 tensor(s)", "model.embed_tokens.weight", "backbone.embed_tokens.weight"]
_NO_O_PROJ = ["no_o_proj", "lack 1 tensor(s)", "model.layers.1.self_attn.o_proj.weight"]
_INDEX = {
    "index_bin_shard": ["pytorch_model-00001-of-00001.bin", "ending in .safetensors"],
    "index_parent": ["'../../../../etc/passwd'", "plain file name"],
    "index_absolute": ["'/etc/passwd'", "plain file name"],
    "index_empty": ["weight_map", "lists no tensors"],
}
TRUST_LOADING = {
    "convert": {
        "renamed tensors": (["{renamed}", "{out}"], _RENAMED),
        "renamed tensors, streaming": (["{renamed}", "{out}", "--streaming"], _RENAMED),
        "a tensor missing": (["{no_o_proj}", "{out}"], _NO_O_PROJ),
        "a tensor missing, streaming": (["{no_o_proj}", "{out}", "--streaming"], _NO_O_PROJ),
        **{f"index: {name}": ([f"{{{name}}}", "{out}"], fragments) for name, fragments in _INDEX.items()},
        **{f"index: {name}, streaming": ([f"{{{name}}}", "{out}", "--streaming"], fragments)
           for name, fragments in _INDEX.items()},
        **{f"too large: {field}": ([f"{{{name}}}", "{out}"], ["refused before loading", f"`{field}`"])
           for name, field in _TOO_LARGE.items()},
        **{f"too large: {field}, streaming": ([f"{{{name}}}", "{out}", "--streaming"], [f"`{field}`"])
           for name, field in _TOO_LARGE.items()},
    },
    "finetune": {
        "renamed tensors": (["{renamed}", "{out}", *FINETUNE_TEXT], _RENAMED),
        "a tensor missing": (["{no_o_proj}", "{out}", *FINETUNE_TEXT], _NO_O_PROJ),
        "index: .bin shard": (["{index_bin_shard}", "{out}", *FINETUNE_TEXT], _INDEX["index_bin_shard"]),
        "index: outside the folder": (["{index_parent}", "{out}", *FINETUNE_TEXT], _INDEX["index_parent"]),
        **{f"hybrid: {name}": ([f"{{{name}}}", "{out}", *FINETUNE_TEXT], fragments)
           for name, fragments in _INCOMPLETE_HYBRID.items()},
        **{f"too large: {field}": ([f"{{{name}}}", "{out}", *FINETUNE_TEXT], [f"`{field}`"])
           for name, field in _TOO_LARGE.items()},
    },
    "inspect": {
        **{f"hybrid: {name}": ([f"{{{name}}}", *INSPECT_OUT], fragments)
           for name, fragments in _INCOMPLETE_HYBRID.items()},
        **{f"too large: {field}": ([f"{{hybrid_{name}}}", *INSPECT_OUT], [f"`{field}`"])
           for name, field in _TOO_LARGE.items()},
    },
}  # fmt: skip
TRUST_LOADING_CASES = [
    pytest.param(command, argv, fragments, id=f"{command}: {name}")
    for command, table in TRUST_LOADING.items()
    for name, (argv, fragments) in table.items()
]
COMMAND_CASES += TRUST_LOADING_CASES


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("command, argv, fragments", COMMAND_CASES)
def test_command_bad_input(command, argv, fragments, world, capsys, monkeypatch, one_thread):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the env var is read at import
    monkeypatch.chdir(world["cwd"])  # default outputs (bench_output, demo_output) would land here
    names = {key: str(value) for key, value in world.items()}
    before = _snapshot(world["root"])
    status = commands.main([command, *(arg.format(**names) for arg in argv)])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert status == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err + out
    for fragment in fragments:
        assert fragment.format(**names) in lines[0], lines[0]
    assert _snapshot(world["root"]) == before, "files were created, changed or removed"
    assert not (world["root"] / "PWNED").exists()


# --- API cases: (call, exception type, the field the message must name) ---------------------------------------------

SETTINGS_VALUES = {
    "max_span": [0, -1, 1.5, True, "8", NAN, INF, None, 10**11],
    "ramp": [0, -3, 2.5, False, "4", INF, 10**9],
    "tau_min": [0, -1.0, NAN, INF, True, "0.5", 1e-300],
    "tau_max": [0.0, -1, NAN, INF, False, "1"],
    "span_per_head": [1, "yes", None, 0.0],
    "hybrid_layers": [[True], [-1], [2], [0, 0], 3, "0", [0.5], [None]],
    "span_loss_coef": [-1, NAN, INF, -INF, True, "0.1"],
    "initial_span": [0, 1, NAN, INF, True, -0.5, 1.5, "0.5"],
}
API_CASES = [
    pytest.param(lambda field=field, value=value: convert(tiny_host("llama"), **{field: value}), ValueError, field,
                 id=f"convert {field}={value!r}")
    for field, values in SETTINGS_VALUES.items()
    for value in values
]  # fmt: skip
API_CASES += [
    pytest.param(lambda: convert(tiny_host("llama"), tau_min=2.0, tau_max=1.0), ValueError, "tau_min", id="tau order"),
    pytest.param(lambda: HybridSettings(tau_max=INF), ValueError, "tau_max", id="HybridSettings tau_max=inf"),
    pytest.param(lambda: HybridSettings(span_loss_coef=NAN), ValueError, "span_loss_coef", id="HybridSettings coef"),
    pytest.param(lambda: HybridSettings(max_span=True), ValueError, "max_span", id="HybridSettings max_span=True"),
    pytest.param(lambda: HybridSettings(initial_span=NAN), ValueError, "initial_span", id="HybridSettings initial"),
    pytest.param(
        lambda: HybridSettings(hybrid_layers=[True]), ValueError, "hybrid_layers", id="HybridSettings layers"
    ),
]  # fmt: skip
for typo in ("max_spam", "maxspan", "span", "tau", "temperature", "local_projections"):
    API_CASES.append(pytest.param(lambda typo=typo: convert(tiny_host("llama"), **{typo: 16}), TypeError, typo,
                                  id=f"convert unknown setting {typo}"))  # fmt: skip

FINETUNE_VALUES = {
    "steps": [0, -1, 1.5, True], "seq_len": [1, 0, "256"], "batch_size": [0, 2.0], "lr": [0, -1e-4, NAN, INF, True,
    "1e-4"], "eval_fraction": [0, 1, NAN], "span_loss_coef": [-1, NAN, INF], "lora_r": [0, False], "seed": [-1, 2**40],
    "save_steps": [0, 1.5], "logging_steps": [0],
}  # fmt: skip
API_CASES += [
    pytest.param(lambda field=field, value=value: finetune(tiny_host("llama"), None, tokenizer=word_tokenizer(),
                                                           texts=[TEXT], **{field: value}),
                 ValueError, field.replace("_", "-"), id=f"finetune {field}={value!r}")
    for field, values in FINETUNE_VALUES.items()
    for value in values
]  # fmt: skip
API_CASES += [
    pytest.param(lambda: finetune(tiny_host("llama"), None, tokenizer=word_tokenizer(), texts=[TEXT], resume=True),
                 ValueError, "resume", id="finetune resume without output"),
    pytest.param(lambda: finetune(tiny_host("llama"), None, tokenizer=word_tokenizer(), texts=[TEXT],
                                  settings={"max_spam": 8}), TypeError, "max_spam", id="finetune unknown setting"),
]  # fmt: skip


TRUST_OUTPUT_API_CASES = [
    pytest.param(lambda: convert(tiny_host("llama"), tau_max=1e39), ValueError, "tau_max", id="convert tau_max=1e39"),
    pytest.param(lambda: HybridSettings(span_loss_coef=3.4e38), ValueError, "span_loss_coef",
                 id="HybridSettings span_loss_coef=3.4e38"),
    pytest.param(lambda: finetune(tiny_host("llama"), None, tokenizer=word_tokenizer(), texts=[TEXT],
                                  settings={"tau_max": 1e39}), ValueError, "tau_max", id="finetune tau_max=1e39"),
    pytest.param(lambda: finetune(tiny_host("llama"), None, tokenizer=word_tokenizer(), texts=[TEXT],
                                  span_loss_coef=3.4e38), ValueError, "span-loss-coef", id="finetune coef=3.4e38"),
]  # fmt: skip


def _nan_mix():
    model = convert(tiny_host("llama"), max_span=8, ramp=4)
    with torch.no_grad():
        model.model.layers[1].self_attn.mix.weight[0, 0] = NAN
    return model


TRUST_OUTPUT_API_CASES.append(
    pytest.param(lambda: finetune(_nan_mix(), None, tokenizer=word_tokenizer(), texts=[TEXT]), ValueError,
                 "NaN or infinite values (model.layers.1.self_attn.mix.weight) before training", id="finetune NaN mix")
)  # fmt: skip


def _lora_twice(inject: bool):
    from peft import inject_adapter_in_model

    from hybrid_hf.lora import get_lora_model, lora_config

    model = convert(tiny_host("llama"), max_span=8, ramp=4)
    model = inject_adapter_in_model(lora_config(model), model) if inject else get_lora_model(model)
    return get_lora_model(model)


TRUST_OUTPUT_API_CASES += [
    pytest.param(lambda: _lora_twice(False), ValueError, "already has LoRA adapters", id="get_lora_model twice"),
    pytest.param(lambda: _lora_twice(True), ValueError, "merge_and_unload", id="get_lora_model on injected LoRA"),
]
API_CASES += TRUST_OUTPUT_API_CASES


def _with_adapters(inject: bool):
    from peft import LoraConfig, get_peft_model, inject_adapter_in_model

    lora = LoraConfig(target_modules=["q_proj", "v_proj"])
    return inject_adapter_in_model(lora, tiny_host("llama")) if inject else get_peft_model(tiny_host("llama"), lora)


TRUST_LOADING_API_CASES = [
    pytest.param(lambda: convert(tiny_host("llama"), global_attn_implementation="bogus"), ValueError,
                 "global_attn_implementation", id="convert global_attn_implementation=bogus"),
    pytest.param(lambda: HybridSettings(global_attn_implementation="bogus_attention"), ValueError,
                 "global_attn_implementation", id="HybridSettings global_attn_implementation"),
    pytest.param(lambda: convert(_with_adapters(inject=False)), ValueError, "merge_and_unload",
                 id="convert PeftModel"),
    pytest.param(lambda: convert(_with_adapters(inject=True)), ValueError, "merge_and_unload",
                 id="convert a model with injected LoRA layers"),
    pytest.param(lambda: convert(tiny_host("llama"), hybrid_layers=[]), ValueError, "`hybrid_layers` is an empty list",
                 id="convert hybrid_layers=[]"),
]  # fmt: skip
if not _FLASH_ATTN_INSTALLED:
    TRUST_LOADING_API_CASES.append(
        pytest.param(
            lambda: convert(tiny_host("llama"), global_attn_implementation="flash_attention_2"),
            ValueError,
            "global_attn_implementation",
            id="convert global_attn_implementation=flash_attention_2, no flash-attn",
        )
    )
API_CASES += TRUST_LOADING_API_CASES


@pytest.mark.parametrize("call, error, field", API_CASES)
def test_api_bad_input(call, error, field):
    with pytest.raises(error) as raised:
        call()
    assert field in str(raised.value), str(raised.value)


def test_there_are_at_least_150_cases():
    assert len(COMMAND_CASES) + len(API_CASES) >= 150
    assert len(COMMAND_CASES) >= 100 and {case.values[0] for case in COMMAND_CASES} == set(commands.COMMANDS)


# --- random settings: a finite model, or ValueError ------------------------------------------------------------------


def _any_value(numbers):
    """`numbers` (a useful range), any float (NaN, inf, subnormal, huge) and values of other types."""
    specials = st.sampled_from([0, -1, 1, True, False, None, NAN, INF, -INF, 10**12, -(10**12), "8"])
    return st.one_of(numbers, st.floats(), specials)


SETTING_STRATEGIES = {
    "max_span": _any_value(st.integers(-4, 5000)),
    "ramp": _any_value(st.integers(-4, 5000)),
    "tau_min": _any_value(st.floats(-2, 1e6)),
    "tau_max": _any_value(st.floats(-2, 1e6)),
    "span_per_head": _any_value(st.booleans()),
    "hybrid_layers": st.one_of(st.none(), st.lists(_any_value(st.integers(-2, 3)), max_size=3)),
    "span_loss_coef": _any_value(st.floats(-1, 1e30)),
    "initial_span": _any_value(st.floats(-1, 2)),
}


@hypothesis_settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example({"span_loss_coef": 3.4028235677973366e38}, "llama")  # finite in float64, infinite in float32
@given(st.fixed_dictionaries({}, optional=SETTING_STRATEGIES), st.sampled_from(["llama", "gpt2", "bert"]))
def test_random_settings_give_a_finite_model_or_value_error(settings, model_type):
    host = tiny_host(model_type)
    try:  # the settings alone (no model: the layer indices cannot be checked)
        HybridSettings(**{key: value for key, value in settings.items() if key != "hybrid_layers"})
        valid_alone = True
    except ValueError:
        valid_alone = False
    try:
        model = convert(host, **settings)
    except ValueError:
        return
    assert valid_alone, f"convert accepted settings HybridSettings refuses: {settings}"
    input_ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(input_ids)
    mask[1, :3] = 0
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask)
    values = out.logits if "logits" in out else out.last_hidden_state
    assert torch.isfinite(values).all(), settings
    if settings.get("span_loss_coef") is not None and "logits" in out:  # the span loss too, with labels
        model.train()
        loss = model(input_ids=input_ids, attention_mask=mask, labels=input_ids).loss
        assert math.isfinite(loss.item()), settings


TAU_MAX, COEF_MAX = UPPER_BOUNDS["tau_max"], UPPER_BOUNDS["span_loss_coef"]


@hypothesis_settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(1e-3, TAU_MAX, COEF_MAX, 5.0, torch.bfloat16)
@example(TAU_MAX, TAU_MAX, COEF_MAX, 5.0, torch.float32)
@example(1e-3, 1e-3, COEF_MAX, 5.0, torch.float32)
@given(
    st.floats(1e-3, TAU_MAX),
    st.floats(1e-3, TAU_MAX),
    st.floats(0, COEF_MAX),
    st.floats(0.01, 5.0),
    st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_gradients_stay_finite_up_to_the_bounds(tau_a, tau_b, coef, scale, dtype):
    """Every setting the commands accept (`settings.UPPER_BOUNDS`) trains: the loss, every gradient and the squared
    gradient norm (gradient clipping) are finite in float32 and bfloat16, with the new parameters drawn away from
    their initial values (a model part-way through training) so that every gradient path carries weight."""
    settings = {"tau_min": min(tau_a, tau_b), "tau_max": max(tau_a, tau_b), "span_loss_coef": coef}
    check_settings(settings)
    torch.manual_seed(0)
    model = convert(tiny_host("llama"), **settings)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(part in NEW_PARAMETER_MODULES for part in name.split(".")):
                parameter.normal_(0, scale)
    model = model.to(dtype).train()
    input_ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    gradients = [p.grad.float() for p in model.parameters() if p.grad is not None]
    assert math.isfinite(loss.item()) and all(torch.isfinite(g).all() for g in gradients), settings
    assert math.isfinite(sum(g.square().sum() for g in gradients).item()), settings


def test_the_kernel_lets_nan_through():
    """A NaN span gives NaN outputs (it used to fail converting NaN to an integer); finite rows stay finite."""
    query = torch.randn(1, 2, 6, 4)
    span = torch.full((1, 2, 6), 3.0)
    span[0, 1, 2] = NAN
    with torch.no_grad():
        out = hybrid_hf.adaptive_local_attention(query, query, query, span, torch.ones(1, 2, 6), max_span=4, ramp=2)
    assert torch.isnan(out[0, 1, 2]).all()
    assert torch.isfinite(out[0, 0]).all()
