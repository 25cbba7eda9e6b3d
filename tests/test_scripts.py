"""`scripts/convert_to_hybrid.py` and `scripts/finetune_hybrid.py` are `hybrid-hf convert` and `finetune`: the same
help, the same one-line errors, the same conversion."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_host

ROOT = Path(__file__).resolve().parent.parent


def _run(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("script,command", [("convert_to_hybrid.py", "convert"), ("finetune_hybrid.py", "finetune")])
def test_script_is_the_command(script, command, tmp_path):
    by_script = _run(str(ROOT / "scripts" / script), "--help", cwd=tmp_path)
    by_command = _run("-c", "import sys; from hybrid_hf.commands import main; sys.exit(main(sys.argv[1:]))", command,
                      "--help", cwd=tmp_path)  # fmt: skip
    assert by_script.returncode == by_command.returncode == 0
    assert by_script.stdout == by_command.stdout and f"hybrid-hf {command}" in by_script.stdout
    script = str(ROOT / "scripts" / script)
    missing = _run(script, str(tmp_path / "no-such-model"), str(tmp_path / "out"), cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and "Traceback" not in missing.stderr
    assert not (tmp_path / "out").exists()


def test_convert_script_writes_the_converted_model(tmp_path):
    source, output = tmp_path / "host", tmp_path / "hybrid"
    tiny_host("llama").save_pretrained(source)
    result = _run(str(ROOT / "scripts" / "convert_to_hybrid.py"), str(source), str(output), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    weights = {name: t for path in output.glob("*.safetensors") for name, t in load_file(path).items()}
    host = load_file(source / "model.safetensors")
    assert any(".mix." in name for name in weights)
    assert all(torch.equal(weights[name], tensor) for name, tensor in host.items())
