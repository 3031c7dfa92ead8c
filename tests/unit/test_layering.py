"""Lower layers never import higher ones: every import in `src/monosemantic` (module level or
inside a function, relative or absolute) goes to a layer of equal or lower rank.

The ranks follow the layout in STYLE.md. `toy` sits just below `train` so that a training run may
use toy data while the toy generator never depends on training. A new top-level module needs a
rank here before it can be imported anywhere.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "monosemantic"
RANK = {
    "utils": 0, "metrics": 0,
    "models": 1, "hooks": 1,
    "data": 2,
    "coders": 3,
    "toy": 4,
    "train": 5,
    "evaluate": 6,
    "decompile": 7,
    "circuits": 8,
    "describe": 9,
    "interventions": 10,
    "store": 11,
    "web": 12,
    "cli": 13,
}
TOP = ("__init__", "__main__")  # the package entry points may import anything


def layer_of(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def imported_layers(path: Path) -> list[tuple[int, str]]:
    """(line, top-level monosemantic module) for every import of the package in `path`."""
    here = path.relative_to(PACKAGE.parent).with_suffix("").parts  # ("monosemantic", "data", ...)
    package = here[:-1]  # the package a relative import starts from (for __init__ too)
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name.split(".") for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[:len(package) - node.level + 1])
                mod = base + (node.module.split(".") if node.module else [])
                # `from . import x` / `from .. import x`: x is the module imported
                names = [mod + [a.name] for a in node.names] if not node.module else [mod]
            else:
                names = [(node.module or "").split(".")]
        else:
            continue
        for parts in names:
            if parts[0] == "monosemantic" and len(parts) > 1:
                out.append((node.lineno, parts[1]))
    return out


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_rank():
    unknown = {layer_of(p) for p in sources()} - set(RANK) - set(TOP)
    assert not unknown, f"give {sorted(unknown)} a rank in RANK (tests/unit/test_layering.py)"


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_the_layers(path):
    layer = layer_of(path)
    if layer in TOP:
        return
    upward = [f"line {line}: imports {target} (rank {RANK.get(target)})"
              for line, target in imported_layers(path)
              if target not in TOP and RANK.get(target, 99) > RANK[layer]]
    assert not upward, f"{layer} (rank {RANK[layer]}) imports a higher layer: {upward}"


def test_the_import_walker_sees_relative_absolute_and_nested_imports(tmp_path, monkeypatch):
    fake = tmp_path / "monosemantic"
    (fake / "data").mkdir(parents=True)
    src = fake / "data" / "x.py"
    src.write_text("from ..models import a\nfrom . import tokens\nimport monosemantic.cli\n"
                   "def f():\n    from monosemantic.train.loop import b\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert sorted(t for _, t in imported_layers(src)) == ["cli", "data", "models", "train"]
