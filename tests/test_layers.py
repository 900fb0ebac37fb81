"""The package's layers: the leaves (errors, version, imaging, outputs, environment, progress) import no
other synthaug module; cache and data import nothing above them; mixing
imports nothing of generation, finetune, evaluation, benchmarks or the CLI; only the CLI and
``__main__`` import the CLI; and reading a cache does not pull in the heavy libraries."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, Set

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "synthaug"

# a package -> the synthaug packages/modules it must never import (directly or in a function)
FORBIDDEN = {
    "cache": {"data", "mixing", "adapter", "builtin", "generation", "finetune", "evaluation", "benchmarks", "cli"},
    "data": {"cache", "mixing", "adapter", "builtin", "generation", "finetune", "evaluation", "benchmarks", "cli"},
    "mixing": {"data", "adapter", "builtin", "generation", "finetune", "evaluation", "benchmarks", "cli"},
}
# the leaves: standard library, numpy and PIL only; any module may import them
_ALL = {"adapter", "builtin", "cache", "data", "mixing", "generation", "finetune", "evaluation", "benchmarks", "cli"}
for _leaf in ("errors", "version", "imaging", "outputs", "environment", "progress"):
    FORBIDDEN[_leaf] = _ALL | ({"errors", "version", "imaging", "outputs", "environment", "progress"} - {_leaf})


def _synthaug_imports(path: Path) -> Set[str]:
    """The ``synthaug.<first part>`` names a module imports, wherever the import stands."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if path.name == "__init__.py":
        package += ".__init__"
    found: Set[str] = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: -node.level]
                names = [".".join(base + ([node.module] if node.module else []))]
            else:
                names = [node.module or ""]
            if names[0] == "synthaug":
                names = [f"synthaug.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "synthaug" and len(parts) > 1:
                found.add(parts[1])
    return found


def _modules() -> Dict[str, Set[str]]:
    return {
        str(path.relative_to(PACKAGE.parent)): _synthaug_imports(path)
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def test_the_scan_sees_imports_of_every_form(tmp_path):
    probe = PACKAGE / "cache" / "codec.py"  # known to import synthaug.errors at the top
    assert "errors" in _synthaug_imports(probe)
    assert "cache" in _synthaug_imports(PACKAGE / "mixing" / "dataset.py")
    assert "cli" in _synthaug_imports(PACKAGE / "__main__.py")


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_lower_layer_imports_nothing_above_it(layer):
    bad = {}
    for module, imports in _modules().items():
        parts = Path(module).with_suffix("").parts  # ("synthaug", layer, ...)
        if parts[1] != layer:
            continue
        wrong = imports & FORBIDDEN[layer]
        if wrong:
            bad[module] = sorted(wrong)
    assert not bad, f"{layer} imports a higher layer: {bad}"


def test_nothing_outside_the_command_line_imports_it():
    bad = [
        module
        for module, imports in _modules().items()
        if "cli" in imports and Path(module).parts[1] not in ("cli", "__main__.py")
    ]
    assert not bad, f"these modules import synthaug.cli: {bad}"


def test_reading_a_cache_imports_no_heavy_library(tmp_path):
    code = (
        "import sys, synthaug\n"
        f"cache = synthaug.SyntheticCache({str(tmp_path / 'c.lmdb')!r})\n"
        "cache.close()\n"
        "heavy = [m for m in ('torch', 'diffusers', 'peft', 'transformers', 'matplotlib') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "", f"import synthaug + SyntheticCache imported {out.stdout.strip()}"


def test_building_the_command_line_imports_no_heavy_library():
    code = (
        "import sys\n"
        "from synthaug.cli import build_parser\n"
        "build_parser()\n"
        "heavy = [m for m in ('torch', 'torchvision', 'diffusers', 'peft', 'transformers', 'matplotlib', 'lpips') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "", f"synthaug --help imported {out.stdout.strip()}"
