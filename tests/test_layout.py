"""The package's tiers, read from its import statements: the model code that travels with checkpoints, the library,
the commands, and the benchmarks and examples. Imports point down the tiers only, the model code imports nothing
but the standard library, torch, transformers and its siblings, and the core imports no optional dependency."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from core_check import OPTIONAL

PACKAGE = Path(__file__).resolve().parents[1] / "hybrid_hf"
TIERS = {"model": 0, "library": 1, "commands": 2, "benchmarks": 3, "examples": 3}


def _tier(module: str) -> int:
    """`hybrid_hf.model.modeling_hybrid` -> 0; `hybrid_hf.loading` -> 1; `hybrid_hf.commands.convert` -> 2 ..."""
    parts = module.split(".")
    if parts[1:2] == ["__main__"]:
        return TIERS["commands"]
    return TIERS.get(parts[1], TIERS["library"]) if len(parts) > 1 else TIERS["library"]


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(module: str, path: Path, top_level_only: bool = False) -> list[tuple[str, int]]:
    """(imported module, line) of every import in the file (absolute names; relative ones resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            found.append((name, node.lineno))
            if node.module is None:  # `from . import x`: x may be a module
                found += [(f"{name}.{alias.name}", node.lineno) for alias in node.names]
    return found


MODULES = _modules()


def test_every_module_is_in_a_tier():
    assert {_tier(name) for name in MODULES} == set(TIERS.values())
    assert len([name for name in MODULES if _tier(name) == 0]) == 4  # the three travelling files + __init__


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_tiers(module):
    upward = [
        f"line {line}: {name}"
        for name, line in _imports(module, MODULES[module])
        if name.startswith("hybrid_hf") and name in MODULES and _tier(name) > _tier(module)
    ]
    assert upward == [], f"{module} (tier {_tier(module)}) imports from a tier above it"


@pytest.mark.parametrize("module", sorted(name for name in MODULES if _tier(name) == 0))
def test_model_code_imports_only_torch_transformers_and_its_siblings(module):
    allowed = set(sys.stdlib_module_names) | {"torch", "transformers"}
    for name, line in _imports(module, MODULES[module]):
        if name.startswith("hybrid_hf."):
            # Relative imports of siblings only: transformers copies `from .sibling import x`, nothing else.
            assert name.rsplit(".", 1)[0] == "hybrid_hf.model", f"{module} line {line}: {name}"
        else:
            assert name.split(".")[0] in allowed, f"{module} line {line}: {name}"


@pytest.mark.parametrize("module", sorted(name for name in MODULES if _tier(name) <= 1))
def test_core_imports_no_optional_dependency_at_import_time(module):
    optional = [
        f"line {line}: {name}"
        for name, line in _imports(module, MODULES[module], top_level_only=True)
        if name.split(".")[0] in OPTIONAL
    ]
    assert optional == []


@pytest.mark.slow
def test_core_converts_and_saves_without_the_optional_dependencies(tmp_path):
    """In a process where importing any optional dependency fails, hybrid_hf converts a tiny Llama and saves it, and
    the folder loads back with remote code to the same logits (`make core` runs the same in a fresh core install)."""
    script = Path(__file__).with_name("core_check.py")
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "out"), "--block"],
        capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "converted, saved and loaded" in result.stdout
