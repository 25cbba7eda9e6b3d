"""What a new user meets first: saved folders that load without prompts, short console lines, Hub-ready model cards
and configs, a demo that re-runs, no stray warnings, cached weights with ordinary file modes.

Tiny random Llama models and a word-level tokenizer (from `test_training`); no hub.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from test_training import TEXT, make_hybrid, make_text, make_tokenizer
from tiny_models import tiny_llama
from transformers import TrainerCallback
from transformers.integrations import integration_utils

from hybrid_hf.cards import write_model_card
from hybrid_hf.checkpoint import convert_checkpoint
from hybrid_hf.examples import assets, demo
from hybrid_hf.finetuning import finetune
from hybrid_hf.lora import get_lora_model

MAX_LINE = 200
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


pytestmark = pytest.mark.usefixtures("one_thread")


def console_lines(text: str) -> list[str]:
    """The lines a terminal shows: progress bars redraw with carriage returns."""
    return [line for line in re.split(r"[\r\n]", text) if line.strip()]


def assert_short_lines(text: str) -> None:
    longest = max(console_lines(text), key=len)
    assert len(longest) <= MAX_LINE, longest


#: layers of the tiny Llama whose per-layer values on one line would exceed the limit
DEEP = 8


@pytest.fixture(scope="module")
def host_folder(tmp_path_factory) -> Path:
    """A local host folder whose name looks like a Hub id, with a config carrying a GGUF file's name field."""
    folder = tmp_path_factory.mktemp("models") / "conv1"
    host = tiny_llama(layers=DEEP)
    host.config._model_name_or_path = "Smollm2 135M 8k Lc100K Mix1 Ep2"  # what a GGUF load leaves in the config
    host.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def assert_hub_ready(folder: Path, *local_names: str) -> None:
    """No path of this machine and no local folder name in the card and config.json; only Hub metadata."""
    config_text = (folder / "config.json").read_text()
    config = json.loads(config_text)
    assert config["use_cache"] is True
    assert "_model_name_or_path" not in config and "_name_or_path" not in config
    texts = {"config.json": config_text}
    if (folder / "README.md").is_file():
        texts["README.md"] = (folder / "README.md").read_text()
        data = ModelCard.load(folder / "README.md").data.to_dict()
        assert data.get("base_model") in (None, HUB_ID)
        assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
        assert not {key for key, value in data.items() if value in (None, "", [], "-")}
    for name, text in texts.items():
        for forbidden in (str(Path.home()), str(folder.parent), "/tmp/", *local_names):
            assert forbidden not in text, (name, forbidden)


# --- loading a saved folder ----------------------------------------------------------------------------------

CARD_SNIPPET_RUNNER = textwrap.dedent(
    """
    import sys, time
    sys.modules["hybrid_hf"] = None  # the package is not importable here
    started = time.perf_counter()
    exec(sys.argv[1])
    assert type(tokenizer).__module__.startswith("transformers."), type(tokenizer)
    assert type(model).__module__.startswith("transformers_modules."), type(model)
    print(f"loaded and generated in {time.perf_counter() - started:.1f} s")
    """
)


def test_the_cards_snippet_loads_the_folder_without_prompts_or_the_package(tmp_path):
    output = tmp_path / "tuned"
    finetune(
        tiny_llama(), output, tokenizer=make_tokenizer(), texts=[TEXT], steps=1, seq_len=32, use_cpu=True, quiet=True
    )
    tokenizer_config = json.loads((output / "tokenizer_config.json").read_text())
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    assert "auto_map" not in tokenizer_config  # the tokenizer is a library class, no code from the folder
    assert tokenizer_class_from_name(tokenizer_config["tokenizer_class"]) is not None
    card = (output / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", card, re.DOTALL).group(1)
    assert 'model_id = "tuned"' in snippet
    result = subprocess.run(
        [sys.executable, "-c", CARD_SNIPPET_RUNNER, snippet],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for unwanted in ("custom code", "[y/N]", "to instantiate a model of type", "trust_remote_code"):
        assert unwanted not in result.stderr + result.stdout, unwanted


# --- console and report_to ----------------------------------------------------------------------------------


class Recorder(TrainerCallback):
    """A `report_to` integration: records what its `on_log` receives."""

    seen: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        Recorder.seen.append(dict(logs))


def test_console_shows_means_and_report_to_gets_every_layer(tmp_path, capfd, monkeypatch):
    monkeypatch.setitem(integration_utils.INTEGRATION_TO_CALLBACK, "recorder", Recorder)
    Recorder.seen = []
    finetune(
        tiny_llama(layers=DEEP),
        tmp_path / "out",
        tokenizer=make_tokenizer(),
        texts=[TEXT],
        steps=3,
        seq_len=32,
        logging_steps=1,
        report_to="recorder",
        use_cpu=True,
    )
    console = capfd.readouterr()
    assert_short_lines(console.out + console.err)
    logged = [line for line in console_lines(console.out + console.err) if "'loss'" in line]
    assert len(logged) == 3
    assert all("span/mean" in line and "temperature/mean" in line and "learning_rate" in line for line in logged)
    assert not any("layer_" in line for line in logged)
    train_logs = [entry for entry in Recorder.seen if "loss" in entry]
    assert len(train_logs) == 3
    for entry in train_logs:
        assert {f"span/layer_{i:02d}" for i in range(8)} | {f"temperature/layer_{i:02d}" for i in range(8)} <= set(
            entry
        )


def test_lora_raises_no_deprecation_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_lora_model(make_hybrid())


# --- Hub-ready folders ----------------------------------------------------------------------------------------


def test_convert_and_finetune_outputs_are_hub_ready(host_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(host_folder.parent)  # "conv1" is a folder here, not a Hub id
    converted = tmp_path / "conv2"
    convert_checkpoint(str(host_folder), converted, max_span=8, ramp=4)
    assert_hub_ready(converted, "Smollm2")
    card = ModelCard.load(converted / "README.md")
    assert "base_model" not in card.data.to_dict()  # a local folder is no Hub id
    assert "| max_span | 8 |" in card.text and "none yet" in card.text

    text = tmp_path / "train.txt"
    text.write_text(TEXT)
    tuned = tmp_path / "tuned"
    finetune("conv1", tuned, data_files=[text], steps=1, seq_len=32, lora=True, use_cpu=True, quiet=True)
    assert_hub_ready(tuned, "conv1", "Smollm2")
    assert "base_model" not in ModelCard.load(tuned / "README.md").data.to_dict()

    # A local folder whose own card names its Hub base model passes that name on.
    write_model_card(converted, base_model=HUB_ID, settings={}, training_summary={})
    again = tmp_path / "again"
    finetune(str(converted), again, data_files=[text], steps=1, seq_len=32, use_cpu=True, quiet=True)
    assert_hub_ready(again, "conv2")
    assert ModelCard.load(again / "README.md").data.base_model == HUB_ID


# --- the demo -----------------------------------------------------------------------------------------------


def run_demo(host_folder: Path, text: Path, out: Path, *extra: str) -> None:
    demo.main(
        [
            "--model",
            str(host_folder),
            "--text",
            str(text),
            "--out",
            str(out),
            "--steps",
            "2",
            "--seq-len",
            "32",
            "--batch-size",
            "2",
            "--eval-tokens",
            "64",
            "--max-span",
            "8",
            "--ramp",
            "4",
            *extra,
        ]
    )


def test_demo_runs_twice_with_short_lines_and_a_hub_ready_folder(host_folder, tmp_path, capfd):
    text = tmp_path / "plays.txt"
    text.write_text(make_text(300, seed=3))
    out = tmp_path / "demo_output"
    run_demo(host_folder, text, out)
    first = (out / "report.md").read_text()
    console = capfd.readouterr()
    assert_short_lines(console.out + console.err)
    assert all(f"[{i}/6]" in console.out for i in range(1, 7))
    assert "perplexity, original" in console.err  # the stages' progress bars

    (out / "stale.txt").write_text("left by hand")
    run_demo(host_folder, text, out)  # replaces its own previous output
    assert not (out / "stale.txt").exists() and (out / "report.md").read_text().startswith(demo.REPORT_TITLE)
    assert first.startswith(demo.REPORT_TITLE)
    assert_hub_ready(out, "conv1", "Smollm2")
    assert str(tmp_path) not in (out / "report.md").read_text()
    assert {"model.safetensors", "config.json", "modeling_hybrid.py", "tokenizer.json", "plots"} <= {
        p.name for p in out.iterdir()
    }
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".demo_output")]  # no staging folder left


def test_demo_refuses_a_folder_it_did_not_write(host_folder, tmp_path):
    text = tmp_path / "plays.txt"
    text.write_text(TEXT)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists; pass --force"):
        run_demo(host_folder, text, other)
    with pytest.raises(FileExistsError, match="not a demo output or a model folder"):
        run_demo(host_folder, text, other, "--force")
    assert (other / "todo.txt").read_text() == "mine"


# --- cached weights ----------------------------------------------------------------------------------------


def test_dequantized_smollm2_folder_has_the_modes_of_the_umask(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRID_HF_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    monkeypatch.setattr(assets, "install_asset", lambda key: tmp_path)

    def save_tiny(folder, gguf_file, out):  # `save_pretrained` writes model.safetensors with mode 0600
        tiny_llama().save_pretrained(out)
        make_tokenizer().save_pretrained(out)

    monkeypatch.setattr(assets, "_convert_gguf", save_tiny)
    previous = os.umask(0o022)
    try:
        folder = assets.smollm2_folder()
    finally:
        os.umask(previous)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in folder.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes


# --- installing -----------------------------------------------------------------------------------------------


def make_install_commands(*variables: str) -> str:
    """The commands `make` would run to set up a fresh environment (a dry run: nothing is installed)."""
    venv = "/nonexistent/venv"
    result = subprocess.run(
        ["make", "-n", "-B", f"VENV={venv}", *variables, f"{venv}/.installed"],
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.skipif(not shutil.which("make"), reason="needs make")
def test_cpu_only_torch_is_an_option_not_the_default():
    assert "download.pytorch.org" not in make_install_commands()
    cpu = make_install_commands("TORCH=cpu").splitlines()
    torch_line = [i for i, line in enumerate(cpu) if "--index-url https://download.pytorch.org/whl/cpu" in line]
    package_line = [i for i, line in enumerate(cpu) if '-e ".[dev]"' in line]
    assert torch_line and package_line and torch_line[0] < package_line[0]  # torch first, then the rest from PyPI
