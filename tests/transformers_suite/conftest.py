"""transformers' own model tests, run on hybrid model classes (`make transformers-tests`).

The tests come from the source distribution of the installed transformers on PyPI, downloaded with pip on first use
and kept under `~/.cache/hybrid_hf/transformers-tests/<version>/transformers_tests` (the sdist's `tests` folder under
an importable name). The sdist ships `test_modeling_common.py` but not `generation/` or `exporters/`, which it
imports: where those are missing, empty mixins take their place, so `ModelTesterMixin` runs without the export
tests and `GenerationTesterMixin` adds nothing. `TRANSFORMERS_TESTS=/path/to/transformers/tests` (a git checkout of
the installed version) runs the full mixins instead.

The tests that cannot pass by design are deselected here, in `DESELECTED`, each with its reason.
"""

from __future__ import annotations

import fnmatch
import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

import hybrid_hf

#: host model types whose hybrid classes the suite tests
HOST_TYPES = ("llama", "gpt2", "bert", "bart", "t5")

#: test name (a shell pattern, for parameterized tests) -> why it cannot pass on a hybrid model
DESELECTED = {
    # A hybrid model's `config._attn_implementation` is always "hybrid" (its attention function); the implementation
    # asked for runs the global branch and is `config.global_attn_implementation`. These tests assert the former.
    "test_can_set_attention_dynamically": "asserts config._attn_implementation == the implementation set",
    "test_sdpa_can_dispatch_non_composite_models": "asserts config._attn_implementation == 'sdpa'",
}

#: what replaces a module of the test sources that the sdist lacks
STAND_INS = {
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
}


def _cache_root() -> Path:
    return Path(os.environ.get("HYBRID_HF_CACHE", Path.home() / ".cache" / "hybrid_hf")) / "transformers-tests"


def _download_tests(version: str, package: Path) -> None:
    """The `tests` folder of transformers' sdist `version`, from PyPI, written as `package`."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                f"transformers=={version}",
                "--no-binary",
                ":all:",
                "--no-deps",
                "-d",
                tmp,
            ],
            check=True,
        )
        (archive,) = Path(tmp).glob("transformers-*.tar.gz")
        staging = Path(tmp) / "tests"
        with tarfile.open(archive) as tar:
            prefix = f"{tar.getnames()[0].split('/')[0]}/tests/"
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for member in members:
                member.name = member.name.removeprefix(prefix)
            tar.extractall(staging, members=members, filter="data")
        package.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(staging, package)


def transformers_tests() -> Path:
    """The folder to put on `sys.path` for `import transformers_tests` (the test sources of this transformers)."""
    given = os.environ.get("TRANSFORMERS_TESTS")
    if given:  # a checkout's full `tests` folder, used where it is
        root = _cache_root() / "checkout"
        link = root / "transformers_tests"
        root.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(Path(given).resolve(), target_is_directory=True)
        return root
    root = _cache_root() / transformers.__version__
    package = root / "transformers_tests"
    if not (package / "test_modeling_common.py").exists():
        _download_tests(transformers.__version__, package)
    for folder in [package, *{(package / path).parent for path in STAND_INS}]:
        folder.mkdir(exist_ok=True)
        (folder / "__init__.py").touch()
    for path, text in STAND_INS.items():
        if not (package / path).exists():
            (package / path).write_text(text)
    return root


def _list_hybrid_classes(module) -> None:
    """transformers' tests recognise a head by its class name in the Auto tables (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`
    and the like) that they import; give `module` copies of those tables that list each hybrid class beside its
    host (transformers' own tables are left as they are)."""
    for name, table in list(vars(module).items()):
        if name.endswith("_MAPPING_NAMES") and isinstance(table, dict):
            hybrid = {f"hybrid_{t}": f"Hybrid{table[t]}" for t in HOST_TYPES if isinstance(table.get(t), str)}
            setattr(module, name, {**table, **hybrid})


sys.path.insert(0, str(transformers_tests()))
for _host_type in HOST_TYPES:  # saved hybrid folders load through the Auto classes, as transformers' own models do
    hybrid_hf.register_model_type(_host_type)
for _module in ("transformers_tests.test_modeling_common", "transformers_tests.generation.test_utils"):
    _list_hybrid_classes(importlib.import_module(_module))


def pytest_collection_modifyitems(config, items):
    deselected = [item for item in items if any(fnmatch.fnmatchcase(item.name, name) for name in DESELECTED)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item not in deselected]
