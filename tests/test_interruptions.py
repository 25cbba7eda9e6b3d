"""Commands that are killed, interrupted, run twice at once, or diverge; and model folders that ship code.

- `finetune --save-steps N` killed with SIGKILL resumes (`--resume`) to the weights of an uninterrupted run;
- SIGTERM stops a command like Ctrl-C: exit status 2, "interrupted", no temporary folder left;
- temporary folders a killed run left beside OUTPUT are removed by the next run of a command writing OUTPUT, but not
  while another process holds OUTPUT's lock (it fails cleanly instead); an old OUTPUT that a `--force` replacement
  killed between its two renames had moved aside is moved back first, never deleted;
- two commands writing the same OUTPUT at once: one wins, the other fails cleanly, the output is complete;
- a diverging fine-tune stops with the step, the loss and the learning rate;
- code a model folder ships runs only with `--trust-remote-code`.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tiny_models import TEXT, tiny_host, word_tokenizer
from transformers import AutoModelForCausalLM

from hybrid_hf import commands, convert

# Writes the file PWNED beside itself when imported (transformers imports a copy from its module cache: the path is
# written in): a model folder whose code runs unasked would leave it behind.
EVIL_CODE = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
TRAIN = ["--steps", "40", "--seq-len", "16", "--batch-size", "2", "--lr", "1e-2", "--logging-steps", "5", "--cpu"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    tokenizer = word_tokenizer()
    for name, model in (("host", tiny_host("llama")), ("hybrid", convert(tiny_host("llama"), max_span=8, ramp=4))):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    (root / "text.txt").write_text(TEXT * 4)
    return {"host": root / "host", "hybrid": root / "hybrid", "text": root / "text.txt"}


def _command(*args) -> list[str]:
    return [sys.executable, "-m", "hybrid_hf", *map(str, args)]


def _finetune(sources, output, *extra) -> list[str]:
    return _command("finetune", sources["host"], output, "--data", sources["text"], *TRAIN, *extra)


def _wait_for_checkpoint(process: subprocess.Popen, folder: Path, timeout: float = 300) -> Path:
    """The first complete checkpoint (its trainer_state.json is written last) under `folder`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = sorted(folder.glob("checkpoint-*/trainer_state.json"))
        if done:
            return done[0].parent
        assert process.poll() is None, "the run ended before its first checkpoint: " + process.stderr.read()
        time.sleep(0.005)
    process.kill()
    raise AssertionError("no checkpoint in time")


def _hidden(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_killed_finetune_resumes_to_the_weights_of_an_uninterrupted_run(sources, tmp_path):
    reference = subprocess.run(_finetune(sources, tmp_path / "reference"), env=ENV, capture_output=True, text=True,
                               timeout=600)  # fmt: skip
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "out"
    checkpoints = tmp_path / "out.checkpoints"
    process = subprocess.Popen(_finetune(sources, out, "--save-steps", "5"), env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    first = _wait_for_checkpoint(process, checkpoints)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not out.exists() and first.is_dir()
    step = max(
        int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*") if (p / "trainer_state.json").exists()
    )
    assert 5 <= step < 40

    resumed = subprocess.run(_finetune(sources, out, "--save-steps", "5", "--resume"), capture_output=True, text=True,
                             env={**ENV, "TRANSFORMERS_VERBOSITY": "info"}, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Loading model from {checkpoints / f'checkpoint-{step}'}." in resumed.stderr  # the Trainer's log line
    assert not checkpoints.exists() and _hidden(tmp_path, "out") == []
    expected, actual = load_file(tmp_path / "reference" / "model.safetensors"), load_file(out / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_resume_takes_the_model_path_in_any_spelling_and_refuses_a_lost_optimizer(
    sources, tmp_path, capsys, monkeypatch
):
    """A run whose last checkpoint is kept (as when killed just before writing OUTPUT) resumes with the model path
    spelled relative instead of absolute, to the same weights; without the checkpoint's optimizer.pt it is refused
    with one line naming the file, and nothing runs."""
    import hybrid_hf.finetuning

    monkeypatch.setattr(hybrid_hf.finetuning, "shutil", SimpleNamespace(rmtree=lambda *args, **kwargs: None))
    out, checkpoints = tmp_path / "out", tmp_path / "out.checkpoints"
    train = ["--data", str(sources["text"]), *TRAIN[:6], "--steps", "2", "--save-steps", "2"]
    assert commands.main(["finetune", str(sources["host"]), str(out), *train]) == 0, capsys.readouterr().err
    capsys.readouterr()
    out.rename(tmp_path / "reference")
    monkeypatch.chdir(sources["host"].parent)

    optimizer = checkpoints / "checkpoint-2" / "optimizer.pt"
    optimizer.rename(tmp_path / "optimizer.pt")
    before = sorted(tmp_path.rglob("*"))
    assert commands.main(["finetune", "host", str(out), *train, "--resume"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        f"error: cannot resume from {checkpoints / 'checkpoint-2'}: optimizer.pt (the optimizer's state) is missing, "
        f"so the run would not continue where it stopped; remove {checkpoints} to start over"
    ]
    assert sorted(tmp_path.rglob("*")) == before

    (tmp_path / "optimizer.pt").rename(optimizer)
    assert commands.main(["finetune", "host", str(out), *train, "--resume"]) == 0, capsys.readouterr().err
    expected, actual = load_file(tmp_path / "reference" / "model.safetensors"), load_file(out / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)


#: what a writer raises on a full disk: safetensors' own error (not an OSError), and the system's
FULL_DISK = {
    "SafetensorError": SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
    "ENOSPC": OSError(errno.ENOSPC, "No space left on device"),
}


def _full_disk(monkeypatch, error: Exception, after: int = 0) -> None:
    """Saving weights fails as on a full disk, half a file written, from the call after the first `after` on."""
    import transformers.modeling_utils

    save, calls = transformers.modeling_utils.safe_save_file, []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) <= after:
            return save(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(b"\0" * 64)
        raise error

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)


def _error_line(capsys) -> str:
    """The command's one error line: the last line of stderr (progress bars come before it), without a traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0] and "Traceback" not in err, err[-3000:]
    return errors[0]


@pytest.mark.parametrize("error", FULL_DISK)
@pytest.mark.parametrize("command", ["convert", "finetune", "finetune --save-steps"])
def test_a_full_disk_is_one_line_and_leaves_nothing(command, error, sources, tmp_path, capsys, monkeypatch):
    _full_disk(monkeypatch, FULL_DISK[error])
    out = tmp_path / "out"
    argv = {
        "convert": ["convert", sources["host"], out, "--max-span", "8", "--ramp", "4", "--no-streaming"],
        "finetune": ["finetune", sources["host"], out, "--data", sources["text"], *TRAIN[:6], "--steps", "2"],
        "finetune --save-steps": ["finetune", sources["host"], out, "--data", sources["text"], *TRAIN[:6],
                                  "--steps", "4", "--save-steps", "2"],
    }[command]  # fmt: skip
    assert commands.main([str(arg) for arg in argv]) == 2
    line = _error_line(capsys)
    assert line.startswith("error: could not write") and "No space left on device" in line, line
    if command == "finetune --save-steps":
        assert "out.checkpoints" in line and "no checkpoint was kept" in line, line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("writer", ["write_safetensors_in_turn", "_link_or_copy"])
def test_a_full_disk_while_streaming_is_one_line_and_leaves_nothing(writer, sources, tmp_path, capsys, monkeypatch):
    """`convert --streaming` writes the new shard itself and links or copies the host's: either failing on a full
    disk, half a file written, is the same one line as the other commands' writes."""
    import hybrid_hf.streaming

    def fails(*args, **kwargs):
        Path(args[-1] if writer == "_link_or_copy" else args[0]).write_bytes(b"\0" * 64)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hybrid_hf.streaming, writer, fails)
    argv = ["convert", str(sources["host"]), str(tmp_path / "out"), "--max-span", "8", "--ramp", "4", "--streaming"]
    assert commands.main(argv) == 2
    line = _error_line(capsys)
    assert line.startswith("error: could not write") and "out" in line and "No space left on device" in line, line
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_after_a_checkpoint_keeps_it_and_resumes_to_the_same_weights(
    sources, tmp_path, capsys, monkeypatch
):
    train = ["--data", str(sources["text"]), *TRAIN[:6], "--steps", "4", "--save-steps", "2"]
    assert commands.main(["finetune", str(sources["host"]), str(tmp_path / "reference"), *train]) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        _full_disk(patch, FULL_DISK["SafetensorError"], after=1)  # checkpoint-2 is written, checkpoint-4 is not
        assert commands.main(["finetune", str(sources["host"]), str(out), *train]) == 2
    line = _error_line(capsys)
    assert "--resume continues from checkpoint-2 once there is room" in line, line
    assert sorted(p.name for p in (tmp_path / "out.checkpoints").iterdir()) == ["checkpoint-2", "finetune_run.json"]
    assert commands.main(["finetune", str(sources["host"]), str(out), *train, "--resume"]) == 0
    expected, actual = load_file(tmp_path / "reference" / "model.safetensors"), load_file(out / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("fault", ["full disk", "read-only file system"])
def test_inspect_on_a_full_or_read_only_disk_is_one_line_and_leaves_nothing(fault, sources, tmp_path, capsys,
                                                                            monkeypatch):  # fmt: skip
    import matplotlib.figure

    import hybrid_hf.publishing

    if fault == "full disk":

        def savefig(figure, path, **kwargs):
            Path(path).write_bytes(b"\x89PNG")
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    else:

        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(hybrid_hf.publishing, "open", read_only, raising=False)
    status = commands.main(
        ["inspect", str(sources["hybrid"]), "--prompt", "the cat sat", "--out", str(tmp_path / "plots")]
    )
    assert status == 2
    line = _error_line(capsys)
    reason = "No space left on device" if fault == "full disk" else "Read-only file system"
    assert "plots" in line and reason in line, line
    assert list(tmp_path.iterdir()) == []


def test_sigterm_stops_like_ctrl_c(sources, tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen(_finetune(sources, out, "--save-steps", "5", "--steps", "100000"), env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    _wait_for_checkpoint(process, tmp_path / "out.checkpoints")
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 2, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]  # after it, progress bars close
    assert errors == ["error: interrupted"] and "Traceback" not in stderr
    assert not out.exists() and _hidden(tmp_path, "out") == []  # no temporary folder, no lock file
    assert list((tmp_path / "out.checkpoints").glob("checkpoint-*"))  # kept for --resume


def _stale(parent: Path, name: str) -> list[Path]:
    """What a run killed while writing `name` leaves: its temporary folder (as large as the weights) and the folder
    made to move an old output aside into, killed before the move."""
    folders = [parent / f".{name}.tmp-k1ll3d", parent / f".{name}.old-k1ll3d"]
    for folder in folders:
        folder.mkdir(parents=True)
    (folders[0] / "model.safetensors").write_bytes(b"\0" * 4096)
    return folders


@pytest.mark.parametrize("command", ["convert", "finetune"])
def test_a_later_run_removes_stale_temporary_folders(command, sources, tmp_path, capsys):
    _stale(tmp_path, "out")
    _stale(tmp_path, "other")  # another output's: not ours to remove
    (tmp_path / ".outer.tmp-1").mkdir()  # a name that only starts like ours
    if command == "convert":
        argv = ["convert", sources["host"], tmp_path / "out", "--max-span", "8", "--ramp", "4"]
    else:
        argv = ["finetune", sources["host"], tmp_path / "out", "--data", sources["text"], *TRAIN[:6], "--steps", "2"]
    status = commands.main([str(arg) for arg in argv])
    assert status == 0, capsys.readouterr().err
    assert any((tmp_path / "out").glob("model*.safetensors"))
    assert _hidden(tmp_path, "out") == []
    assert _hidden(tmp_path, "other") == [".other.old-k1ll3d", ".other.tmp-k1ll3d"]
    assert (tmp_path / ".outer.tmp-1").is_dir()


def _killed_between_renames(sources, parent: Path) -> Path:
    """What a `--force` replacement of `parent/out` killed between its two renames leaves: no OUTPUT, the old output
    moved aside into `.out.old-*/old` (marked with old.txt) and the finished new one in `.out.tmp-*`."""
    old, new = parent / ".out.old-k1ll3d" / "old", parent / ".out.tmp-k1ll3d"
    for folder in (old, new):
        folder.mkdir(parents=True)
        for path in sources["hybrid"].iterdir():
            (folder / path.name).write_bytes(path.read_bytes())
    (old / "old.txt").write_text("the only copy")
    return parent / "out"


@pytest.mark.parametrize("command", ["convert", "finetune", "inspect"])
def test_a_replacement_killed_between_its_renames_is_undone(command, sources, tmp_path, capsys):
    """The next run into OUTPUT moves the old output back before it removes what the killed run left; without
    --force it then finds OUTPUT there and refuses, as it would have before the killed run."""
    out = _killed_between_renames(sources, tmp_path)
    argv = {
        "convert": ["convert", sources["host"], out],
        "finetune": ["finetune", sources["host"], out, "--data", sources["text"]],
        "inspect": ["inspect", sources["hybrid"], "--prompt", "the cat sat", "--out", out],
    }[command]
    status = commands.main([str(arg) for arg in argv])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and lines[-1] == f"error: output {str(out)!r} already exists; pass --force to replace it"
    assert (out / "old.txt").read_text() == "the only copy"
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == "HybridLlamaForCausalLM"
    assert _hidden(tmp_path, "out") == []


def test_a_replacement_killed_between_its_renames_is_replaced_with_force(sources, tmp_path, capsys):
    out = _killed_between_renames(sources, tmp_path)
    argv = ["convert", sources["host"], out, "--max-span", "4", "--ramp", "2", "--force"]
    assert commands.main([str(arg) for arg in argv]) == 0, capsys.readouterr().err
    assert not (out / "old.txt").exists() and json.loads((out / "config.json").read_text())["max_span"] == 4
    assert _hidden(tmp_path, "out") == []


@pytest.mark.parametrize("command", ["convert", "finetune", "demo", "inspect"])
def test_an_output_being_written_is_refused_and_its_folders_kept(command, sources, tmp_path, capsys):
    stale = _stale(tmp_path, "out")
    out = str(tmp_path / "out")
    argv = {
        "convert": ["convert", str(sources["host"]), out],
        "finetune": ["finetune", str(sources["host"]), out, "--data", str(sources["text"])],
        "demo": ["demo", "--model", str(sources["host"]), "--out", out],
        "inspect": ["inspect", str(sources["hybrid"]), "--prompt", "the cat", "--out", out],
    }[command]
    with open(tmp_path / ".out.lock", "a") as lock:  # as another process writing OUTPUT holds it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        status = commands.main(argv)
    err = capsys.readouterr().err
    assert status == 2 and err.strip().splitlines() == [
        f"error: another process is writing {str(tmp_path / 'out')!r} (it holds .out.lock); wait for it to finish"
    ]
    assert not (tmp_path / "out").exists() and all(folder.is_dir() for folder in stale)


@pytest.mark.parametrize("command", ["convert", "finetune"])
def test_two_runs_into_one_output_one_wins(command, sources, tmp_path):
    out = tmp_path / "out"
    if command == "convert":
        argv = _command("convert", sources["host"], out, "--max-span", "8", "--ramp", "4")
    else:
        argv = _finetune(sources, out, "--steps", "3")
    runs = [subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"]
    results = [(run.wait(timeout=600), run.stderr.read()) for run in runs]
    assert sorted(status for status, _ in results) == [0, 2], results
    loser = next(err for status, err in results if status == 2).strip().splitlines()
    assert "Traceback" not in "".join(loser)
    assert "another process is writing" in loser[-1] or "already exists" in loser[-1], loser
    loaded = AutoModelForCausalLM.from_pretrained(out)  # complete: it loads, in-process classes, no remote code
    assert type(loaded).__name__ == "HybridLlamaForCausalLM"
    assert _hidden(tmp_path, "out") == []


def test_diverging_finetune_names_the_step_the_loss_and_the_learning_rate(sources, tmp_path, capsys):
    status = commands.main(["finetune", str(sources["host"]), str(tmp_path / "out"), "--data", str(sources["text"]),
                       *TRAIN[:6], "--lr", "1e6", "--steps", "20"])  # fmt: skip
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and lines[-1].startswith("error: training diverged at step ")
    assert "the loss is nan" in lines[-1] or "the loss is inf" in lines[-1], lines[-1]
    assert "learning rate (lr 1e+06)" in lines[-1] and "nothing was written" in lines[-1]
    assert list(tmp_path.iterdir()) == []


def _ships_code(folder: Path, target: Path) -> Path:
    """A copy of `folder` whose config's auto_map points at code shipped with it: Llama's classes, and a PWNED file
    written beside it when the code runs."""
    target.mkdir()
    for path in folder.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    (target / "shipped.py").write_text(
        EVIL_CODE.format(marker=str(target / "PWNED"))
        + "from transformers import LlamaConfig as Config, LlamaForCausalLM as Model\n"
    )
    config = json.loads((target / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "shipped.Config", "AutoModelForCausalLM": "shipped.Model"}
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("kind", ["host", "hybrid"])
def test_shipped_code_does_not_run_unasked(kind, sources, tmp_path, capsys):
    folder = _ships_code(sources[kind], tmp_path / f"ships-code-{kind}")  # one name per module cache entry
    text = ["--data", str(sources["text"]), *TRAIN[:6], "--steps", "1"]
    assert commands.main(["finetune", str(folder), str(tmp_path / "out"), *text]) == 0, capsys.readouterr().err
    if kind == "hybrid":
        status = commands.main(["inspect", str(folder), "--prompt", "the cat sat", "--out", str(tmp_path / "plots")])
        assert status == 0, capsys.readouterr().err
    assert not (folder / "PWNED").exists()  # the built-in and registered classes were used
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "out")).__name__ == "HybridLlamaForCausalLM"


def test_shipped_code_runs_with_trust_remote_code(sources, tmp_path):
    """In a process of its own: transformers marks classes loaded as remote code for good
    (`register_for_auto_class`)."""
    folder = _ships_code(sources["host"], tmp_path / "ships-code-trusted")
    command = _command("finetune", folder, tmp_path / "out", "--data", sources["text"], *TRAIN[:6], "--steps", "1",
                       "--trust-remote-code")  # fmt: skip
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (folder / "PWNED").read_text() == "ran"
