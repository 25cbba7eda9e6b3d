"""Large checkpoints: the streamed (constant-memory) conversion of a sharded safetensors folder, checked against the
in-memory conversion, and converted folders run with most of their weights offloaded (`device_map="auto"`)."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
import subprocess
import sys
import textwrap

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import VOCAB, perturb, tiny_host, word_tokenizer
from transformers import AutoModelForCausalLM

from hybrid_hf import checkpoint, commands, convert, hybrid_layers, streaming
from hybrid_hf.checkpoint import convert_checkpoint
from hybrid_hf.conversion import NEW_PARAMETER_MODULES
from hybrid_hf.errors import UsageError
from hybrid_hf.verification import VerificationError

SETTINGS = ["--max-span", "8", "--ramp", "4"]
pytestmark = pytest.mark.usefixtures("one_thread")


def sharded_source(folder, model_type="llama", dtype=torch.float32, **overrides):
    """A tiny host saved in several safetensors shards, with a tokenizer."""
    host = tiny_host(model_type, **{"num_hidden_layers": 3, **overrides}).to(dtype)
    host.save_pretrained(folder, max_shard_size="20KB")
    word_tokenizer().save_pretrained(folder)
    assert len(set(json.loads((folder / streaming.INDEX_FILE).read_text())["weight_map"].values())) >= 2
    return host


def convert_cli(*args) -> int:
    return commands.main(["convert", *map(str, args), *SETTINGS])


def shard_files(folder) -> list:
    return sorted(set(json.loads((folder / streaming.INDEX_FILE).read_text())["weight_map"].values()))


def test_streamed_conversion_equals_the_in_memory_one(tmp_path, capsys):
    source = tmp_path / "src"
    sharded_source(source)
    assert convert_cli(source, tmp_path / "memory", "--no-streaming") == 0
    assert convert_cli(source, tmp_path / "streamed", "--streaming") == 0
    assert "max |difference| 0 " in capsys.readouterr().out
    streamed, memory = tmp_path / "streamed", tmp_path / "memory"

    # The host shards are the source's files, hard-linked; one new shard holds exactly the new parameters.
    host_shards, written = shard_files(source), shard_files(streamed)
    assert len(written) == len(host_shards) + 1
    for original, copy in zip(host_shards, written[:-1], strict=True):  # the last one is new
        assert os.path.samefile(source / original, streamed / copy)
    new = load_file(streamed / written[-1])
    assert new and all(any(f".{m}." in name for m in NEW_PARAMETER_MODULES) for name in new)
    index = json.loads((streamed / streaming.INDEX_FILE).read_text())
    stored = sum(
        tensor.numel() * tensor.element_size() for shard in written for tensor in load_file(streamed / shard).values()
    )
    assert index["metadata"]["total_size"] == stored

    # Same config, same code, same weights, same logits as the in-memory conversion.
    assert json.loads((streamed / "config.json").read_text()) == json.loads((memory / "config.json").read_text())
    assert {p.name for p in streamed.glob("*.py")} == {p.name for p in memory.glob("*.py")}
    assert (streamed / "tokenizer.json").is_file() and (streamed / "generation_config.json").is_file()
    a = AutoModelForCausalLM.from_pretrained(memory, trust_remote_code=True).eval()
    b = AutoModelForCausalLM.from_pretrained(streamed, trust_remote_code=True).eval()
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    ids = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def card_tables(text: str) -> dict[str, str]:
    """`{key: value}` of the rows of a model card's tables."""
    return {key: value for key, value in re.findall(r"^\| (.+?) \| (.+?) \|$", text, re.MULTILINE) if key != "---"}


def test_streamed_conversion_writes_the_model_card_of_the_in_memory_one(tmp_path):
    """Both conversions of the same source write the same card: metadata, usage snippet, settings and summary."""
    source = tmp_path / "src"
    sharded_source(source)
    (source / "README.md").write_text("---\nbase_model: org/tiny-llama\n---\nA tiny Llama.\n")
    cards = {}
    for how in ("memory", "streamed"):
        output = tmp_path / how / "tiny-hybrid"  # the same folder name: the snippet loads it
        convert_checkpoint(source, output, streaming=how == "streamed", max_span=8, ramp=4, hybrid_layers=[0, 2])
        cards[how] = ModelCard.load(output / "README.md")
    memory, streamed = cards["memory"], cards["streamed"]
    assert streamed.data.to_dict() == memory.data.to_dict()
    assert card_tables(streamed.text) == card_tables(memory.text)
    assert streamed.text == memory.text

    assert streamed.data.base_model == "org/tiny-llama" and "llama" in streamed.data.tags
    rows = card_tables(streamed.text)
    assert rows["layers made hybrid"] == "2 of 3" and rows["hybrid_layers"] == "[0, 2]" and rows["max_span"] == "8"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed" / "tiny-hybrid", trust_remote_code=True)
    new = sum(p.numel() for n, p in model.named_parameters() if any(f".{m}." in n for m in NEW_PARAMETER_MODULES))
    assert rows["parameters added"] == str(new)
    assert 'model_id = "tiny-hybrid"' in streamed.text


def test_streamed_folder_loads_in_a_clean_process(tmp_path):
    """Loaded where `hybrid_hf` cannot be imported, the streamed folder gives the host's logits."""
    source = tmp_path / "src"
    host = sharded_source(source, "qwen3")
    assert convert_cli(source, tmp_path / "out", "--streaming") == 0
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))
    script = textwrap.dedent(
        """
        import sys, torch, transformers
        sys.modules["hybrid_hf"] = None
        model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
        with torch.no_grad():
            torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
        """
    )
    torch.save(ids, tmp_path / "ids.pt")
    result = subprocess.run(
        [sys.executable, "-c", script, tmp_path / "out", tmp_path / "ids.pt", tmp_path / "l.pt"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "l.pt"), host(ids).logits)


@pytest.mark.parametrize("model_type", ["gpt2", "gemma3_text"])
def test_streamed_conversion_of_other_layouts(model_type, tmp_path):
    """GPT-2 (`transformer.h.N.attn`, tied head) and Gemma 3 (sliding and full layers, `layer_types`), bfloat16:
    the shards keep their dtype, the new parameters take it, and the logits are the host's."""
    source = tmp_path / "src"
    sharded_source(source, model_type, dtype=torch.bfloat16)
    host = AutoModelForCausalLM.from_pretrained(source).eval()  # loaded as the hybrid model is (bfloat16 buffers)
    report = convert_checkpoint(source, tmp_path / "out", streaming=True, max_span=8, ramp=4, hybrid_layers=[0, 2])
    assert report.layers_converted == 2 and report.max_difference == 0.0
    new_shard = shard_files(tmp_path / "out")[-1]
    assert {t.dtype for t in load_file(tmp_path / "out" / new_shard).values()} == {torch.bfloat16}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    assert model.dtype == torch.bfloat16 and len(hybrid_layers(model)) == 2
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, host(ids).logits)


def test_bfloat16_host_converts_exactly_in_memory_and_streamed(tmp_path):
    """A bfloat16 host keeps its rotary tables in float32; both conversions keep them so and give its logits."""
    source = tmp_path / "src"
    sharded_source(source, "qwen3", dtype=torch.bfloat16)
    host = AutoModelForCausalLM.from_pretrained(source).eval()
    in_memory = convert(host, max_span=8, ramp=4)
    assert {b.dtype for b in in_memory.buffers()} == {b.dtype for b in host.buffers()} == {torch.float32}
    convert_checkpoint(source, tmp_path / "out", streaming=True, max_span=8, ramp=4)
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = host(ids).logits
        assert torch.equal(in_memory(ids).logits, expected) and torch.equal(streamed(ids).logits, expected)


@pytest.mark.parametrize("verify", ["slice", "full"])
def test_wrong_new_parameters_fail_verification_and_nothing_is_written(verify, tmp_path, monkeypatch):
    source = tmp_path / "src"
    sharded_source(source)
    reset = streaming.reset_hybrid_parameters

    def off_identity(module):
        reset(module)
        with torch.no_grad():
            module.mix.weight.add_(0.1)

    monkeypatch.setattr(streaming, "reset_hybrid_parameters", off_identity)
    with pytest.raises(VerificationError, match="differ"):
        convert_checkpoint(source, tmp_path / "out", streaming=True, verify=verify, max_span=8, ramp=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_shards_are_copied_where_they_cannot_be_linked(tmp_path, monkeypatch):
    source = tmp_path / "src"
    sharded_source(source)

    def no_link(*args):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(streaming.os, "link", no_link)
    convert_checkpoint(source, tmp_path / "out", streaming=True, max_span=8, ramp=4)
    for original, copy in zip(shard_files(source), shard_files(tmp_path / "out")[:-1], strict=True):
        assert not os.path.samefile(source / original, tmp_path / "out" / copy)
        assert (source / original).read_bytes() == (tmp_path / "out" / copy).read_bytes()


def test_single_file_and_pickle_sources(tmp_path, caplog):
    """A single `model.safetensors` becomes the first of two shards; a pickle-only source is converted in memory,
    with a message saying why."""
    host = tiny_host("llama")
    host.save_pretrained(tmp_path / "single")
    assert convert_cli(tmp_path / "single", tmp_path / "a", "--streaming") == 0
    assert len(shard_files(tmp_path / "a")) == 2 and not (tmp_path / "a" / "model.safetensors").exists()

    host.config.save_pretrained(tmp_path / "pickle")
    torch.save(host.state_dict(), tmp_path / "pickle" / "pytorch_model.bin")
    assert convert_cli(tmp_path / "pickle", tmp_path / "b", "--streaming", "--allow-pickle") == 0
    assert "Converting in memory" in caplog.text and "no safetensors weights" in caplog.text
    assert (tmp_path / "b" / "model.safetensors").is_file()


def stored_dtypes(folder) -> dict[str, str]:
    """`{tensor name: safetensors dtype}` of every tensor of a folder's safetensors files, from their headers."""
    dtypes = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            dtypes.update({name: handle.get_slice(name).get_dtype() for name in handle.keys()})
    return dtypes


def test_local_safetensors_folders_are_converted_streamed_by_default(tmp_path, capsys, caplog):
    """No flag: the host shards are hard-linked (streamed); --no-streaming converts in memory; a pickle-only source
    is converted in memory without a warning."""
    source = tmp_path / "src"
    sharded_source(source)
    assert convert_cli(source, tmp_path / "default") == 0
    assert "weights:      float32, streamed" in capsys.readouterr().out
    for original, copy in zip(shard_files(source), shard_files(tmp_path / "default")[:-1], strict=True):
        assert os.path.samefile(source / original, tmp_path / "default" / copy)

    assert convert_cli(source, tmp_path / "memory", "--no-streaming") == 0
    assert "weights:      float32, converted in memory" in capsys.readouterr().out
    assert (tmp_path / "memory" / "model.safetensors").is_file()
    assert not (tmp_path / "memory" / streaming.INDEX_FILE).exists()

    host = tiny_host("llama")
    host.config.save_pretrained(tmp_path / "pickle")
    torch.save(host.state_dict(), tmp_path / "pickle" / "pytorch_model.bin")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hybrid_hf.checkpoint"):
        assert convert_cli(tmp_path / "pickle", tmp_path / "b", "--allow-pickle") == 0
    assert "no safetensors weights" in caplog.text and "WARNING" not in caplog.text
    assert (tmp_path / "b" / "model.safetensors").is_file()


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "in memory"])
def test_the_stored_dtype_is_written_unless_dtype_says_otherwise(streamed, tmp_path, capsys):
    """A bfloat16 checkpoint is written in bfloat16 (every tensor), and in float32 with --dtype float32 (in memory,
    verified); the logits are those of the host in the dtype written."""
    source = tmp_path / "src"
    sharded_source(source, dtype=torch.bfloat16)
    assert set(stored_dtypes(source).values()) == {"BF16"}
    flags = [] if streamed else ["--no-streaming"]
    assert convert_cli(source, tmp_path / "auto", *flags) == 0
    assert convert_cli(source, tmp_path / "f32", "--dtype", "float32", *flags) == 0
    out = capsys.readouterr().out
    assert "max |difference| 0 " in out and "verification: skipped" not in out
    assert f"weights:      bfloat16, {'streamed' if streamed else 'converted in memory'}" in out
    assert "weights:      float32, converted in memory" in out
    auto, f32 = stored_dtypes(tmp_path / "auto"), stored_dtypes(tmp_path / "f32")
    assert auto.keys() == f32.keys() > stored_dtypes(source).keys()  # the host's tensors and the new ones
    assert set(auto.values()) == {"BF16"} and set(f32.values()) == {"F32"}
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["dtype"] == "float32"
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for folder, dtype in (("auto", torch.bfloat16), ("f32", torch.float32)):
            host = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).eval()
            model = AutoModelForCausalLM.from_pretrained(tmp_path / folder, trust_remote_code=True).eval()
            assert model.dtype == dtype and torch.equal(model(ids).logits, host(ids).logits), folder


def test_dtype_is_checked_before_anything_is_loaded(tmp_path, capsys):
    source = tmp_path / "src"
    sharded_source(source)
    capsys.readouterr()
    assert convert_cli(source, tmp_path / "out", "--dtype", "int8") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: argument --dtype: invalid choice: 'int8'")
    assert "'auto', 'float32', 'bfloat16', 'float16'" in err
    with pytest.raises(UsageError, match=r"`dtype` must be one of auto, float32, bfloat16, float16, got 'int8'"):
        convert_checkpoint(source, tmp_path / "out", dtype="int8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_weights_float16_cannot_hold_are_refused(tmp_path, capsys):
    source = tmp_path / "src"
    host = sharded_source(source)
    host.lm_head.weight.data[0, 0] = 1e6  # beyond float16's 65504
    host.save_pretrained(source, max_shard_size="20KB")
    capsys.readouterr()
    assert convert_cli(source, tmp_path / "out", "--dtype", "float16") == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: `dtype` float16 (--dtype) cannot hold lm_head.weight: its values overflow; choose float32 or bfloat16"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_host_weights_are_refused_while_streaming(value, tmp_path, capsys, monkeypatch):
    """NaN or inf in a host shard: the one-line error of the in-memory loader, naming the tensor, from the streamed
    path (the in-memory loader is never called); nothing written."""
    source = tmp_path / "src"
    sharded_source(source)
    name = "model.layers.1.mlp.up_proj.weight"
    shard = source / json.loads((source / streaming.INDEX_FILE).read_text())["weight_map"][name]
    tensors = load_file(shard)
    tensors[name][3, 4] = value
    save_file(tensors, shard, metadata={"format": "pt"})
    capsys.readouterr()

    def not_in_memory(*args, **kwargs):
        raise AssertionError("loaded in memory")

    monkeypatch.setattr(checkpoint, "load_model", not_in_memory)
    assert convert_cli(source, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [
        f"error: the weights of {str(source)!r} hold NaN or infinite values ({name}): the file is damaged or the "
        "training that wrote it diverged"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_the_finite_check_reads_tensors_in_chunks(tmp_path, monkeypatch):
    """A tensor larger than a chunk is read in several, and a NaN in its last chunk is found."""
    monkeypatch.setattr(streaming, "CHUNK_BYTES", 64)
    tensors = {"a": torch.zeros(7, 9), "b": torch.ones(100, dtype=torch.bfloat16), "c": torch.arange(50)}
    save_file(tensors, tmp_path / "x.safetensors")
    streaming.check_finite(tmp_path, dict.fromkeys(tensors, "x.safetensors"), "src")
    tensors["b"][-1] = float("-inf")
    save_file(tensors, tmp_path / "x.safetensors")
    with pytest.raises(UsageError, match=r"hold NaN or infinite values \(b\)"):
        streaming.check_finite(tmp_path, dict.fromkeys(tensors, "x.safetensors"), "src")


def test_shapes_that_do_not_match_the_config_are_refused(tmp_path, capsys):
    source = tmp_path / "src"
    sharded_source(source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    assert convert_cli(source, tmp_path / "out", "--streaming") == 2
    assert "do not match its config.json" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_write_safetensors_in_turn_round_trips(tmp_path):
    generator = torch.Generator().manual_seed(3)
    tensors = {
        "a": torch.randn(3, 5, generator=generator),
        "b.weight": torch.randn(7, generator=generator).to(torch.bfloat16),
        "c": torch.randn(2, 2, 3, generator=generator).to(torch.float16),
    }
    layout = {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}
    written = streaming.write_safetensors_in_turn(tmp_path / "x.safetensors", layout, iter(tensors.items()))
    assert written == sum(t.numel() * t.element_size() for t in tensors.values())
    loaded = load_file(tmp_path / "x.safetensors")
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    with pytest.raises(RuntimeError, match="does not follow the header"):
        streaming.write_safetensors_in_turn(tmp_path / "y.safetensors", layout, iter(reversed(tensors.items())))


# --- big-model inference ----------------------------------------------------------------------------------------


def test_offloaded_generation_gives_the_tokens_of_the_loaded_model(tmp_path):
    """A streamed folder loaded with `device_map="auto"` and `max_memory` below its size (the rest offloaded to
    disk) generates the tokens the fully loaded model generates."""
    source = tmp_path / "src"
    sharded_source(source, num_hidden_layers=4)
    convert_checkpoint(source, tmp_path / "hybrid", streaming=True, max_span=8, ramp=4)
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "hybrid", trust_remote_code=True).eval()
    perturb(full)  # the local branch matters: save the perturbed model, then load it both ways
    full.save_pretrained(tmp_path / "trained", max_shard_size="20KB")
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "trained", trust_remote_code=True).eval()
    size = sum(p.numel() * p.element_size() for p in full.parameters())
    offloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "trained",
        trust_remote_code=True,
        device_map="auto",
        max_memory={"cpu": size // 2},
        offload_folder=tmp_path / "offload",
    ).eval()
    places = set(offloaded.hf_device_map.values())
    assert places == {"cpu", "disk"}, offloaded.hf_device_map
    on_cpu = sum(p.numel() * p.element_size() for p in offloaded.parameters() if p.device.type == "cpu")
    assert on_cpu <= size // 2
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(4))
    expected = full.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    actual = offloaded.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    assert torch.equal(actual, expected)


def sparse_checkpoint(folder, config, shards: int = 2) -> int:
    """A bfloat16 safetensors checkpoint of `config` (a Llama config) whose tensors are all zeros, written as sparse
    files (the header, then a hole): gigabytes in no time. Returns its size in bytes."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        shapes = {name: list(t.shape) for name, t in LlamaForCausalLM(config).state_dict().items()}
    names = sorted(shapes, key=lambda name: (name != "model.embed_tokens.weight", name == "lm_head.weight", name))
    weight_map, total = {}, 0
    for shard in range(shards):
        file = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in names[shard * len(names) // shards : (shard + 1) * len(names) // shards]:
            size = math.prod(shapes[name]) * 2
            header[name] = {"dtype": "BF16", "shape": shapes[name], "data_offsets": [offset, offset + size]}
            offset += size
            weight_map[name] = file
        encoded = json.dumps(header).encode()
        encoded += b" " * (-len(encoded) % 8)
        with open(folder / file, "wb") as handle:
            handle.write(struct.pack("<Q", len(encoded)) + encoded)
            handle.truncate(8 + len(encoded) + offset)
        total += offset
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / streaming.INDEX_FILE).write_text(json.dumps(index))
    config.save_pretrained(folder)
    return total


MEASURE = """
import resource, sys
import accelerate, transformers
from transformers import LlamaForCausalLM
from hybrid_hf.checkpoint import convert_checkpoint
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
report = convert_checkpoint(sys.argv[1], sys.argv[2], max_span=8, ramp=4)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(before * 1024, after * 1024, report.streamed, report.dtype)
"""


@pytest.mark.slow
def test_converting_a_large_checkpoint_takes_constant_memory(tmp_path):
    """A 2 GiB checkpoint (a Llama with a large vocabulary) is converted by default (streamed, NaN/inf checked, slice
    verified) with a peak resident memory that grows by less than 10% of its size (measured in a fresh process)."""
    from transformers import LlamaConfig

    source = tmp_path / "src"
    source.mkdir()
    config = LlamaConfig(
        vocab_size=2**19, hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=8, tie_word_embeddings=False, dtype="bfloat16",
    )  # fmt: skip
    size = sparse_checkpoint(source, config)
    assert size > 2 * 2**30
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's hybrid_hf
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, source, tmp_path / "out"], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    before, after, streamed, dtype = result.stdout.split()
    assert (streamed, dtype) == ("True", "bfloat16")
    assert int(after) - int(before) < 0.1 * size, f"peak RSS grew by {(int(after) - int(before)) / 2**20:.0f} MiB"
    for original, copy in zip(shard_files(source), shard_files(tmp_path / "out")[:-1], strict=True):
        assert os.path.samefile(source / original, tmp_path / "out" / copy)
