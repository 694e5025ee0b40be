"""The package runs one way: the layer contract holds, no import circle hides in a function, modules stay small.

``docs/architecture.md`` draws the layers; ``pyproject.toml``'s ``[tool.importlinter]``
writes them down, and ``lint-imports`` (the ``[test]`` extra installs import-linter)
checks every import, those inside functions too, so a back-arrow fails here.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("anode_plan", "planners")
OPTIONAL = {"matplotlib", "matplotlib.figure", "torch._dynamo.eval_frame"}
"""The only imports allowed inside a function: optional dependencies (the ``[plot]`` extra; TorchDynamo, which
importing eagerly would start for every user), each saying so where it is made."""
MAX_LINES = 500


def _modules() -> list[Path]:
    return sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py"))


def test_the_layer_contracts_hold():
    command = shutil.which("lint-imports") or os.path.join(os.path.dirname(sys.executable), "lint-imports")
    result = subprocess.run([command, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_a_back_arrow_breaks_the_contract(tmp_path):
    """The contract is live: the tree with one import from a lower layer up into a higher one fails it."""
    command = shutil.which("lint-imports") or os.path.join(os.path.dirname(sys.executable), "lint-imports")
    for name in (*PACKAGES, "pyproject.toml"):
        source = ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / name)
    with open(tmp_path / "anode_plan" / "ode" / "tableaus.py", "a", encoding="utf-8") as module:
        module.write("\nimport anode_plan.measure.chain  # a back-arrow\n")
    result = subprocess.run([command, "--no-cache"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode != 0
    assert "anode_plan.ode.tableaus -> anode_plan.measure.chain" in result.stdout


@pytest.mark.parametrize("path", _modules(), ids=lambda path: str(path.relative_to(ROOT)))
def test_imports_inside_functions_are_optional_dependencies_only(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = set(tree.body)
    lines = path.read_text(encoding="utf-8").splitlines()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and node not in top:
            names = [node.module] if isinstance(node, ast.ImportFrom) else [alias.name for alias in node.names]
            assert set(names) <= OPTIONAL, f"{path.name}:{node.lineno} imports {names} inside a function"
            assert "optional" in lines[node.lineno - 1] + lines[node.lineno - 2], (
                f"{path.name}:{node.lineno}: say why the import is inside the function (an optional dependency)")


@pytest.mark.parametrize("path", _modules(), ids=lambda path: str(path.relative_to(ROOT)))
def test_modules_hold_one_idea_in_at_most_500_lines(path):
    count = len(path.read_text(encoding="utf-8").splitlines())
    assert count <= MAX_LINES, f"{path.relative_to(ROOT)} has {count} lines; split it by idea"
