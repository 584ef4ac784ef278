"""The notebooks must keep working against the library: their code cells compile, and
every name they import from the project exists."""

import ast
import importlib
import json

import pytest

from tests.conftest import REPO_ROOT

NOTEBOOKS = sorted((REPO_ROOT / "colab").glob("*.ipynb"))


def _code(path):
    cells = json.loads(path.read_text())["cells"]
    lines = []
    for cell in cells:
        if cell["cell_type"] == "code":
            # Shell and magic lines (!pip, %cd) are not Python.
            lines += [l for l in cell["source"] if not l.lstrip().startswith(("!", "%"))]
            lines.append("\n")
    return "".join(lines)


def test_notebooks_exist():
    assert NOTEBOOKS, "colab/ has no notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_code_compiles_and_imports(path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    tree = ast.parse(_code(path), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module.split(".")[0] in ("adaptive_jax", "configs"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name) or importlib.util.find_spec(
                    f"{node.module}.{alias.name}"
                ), f"{path.name} imports {node.module}.{alias.name}, which does not exist"
