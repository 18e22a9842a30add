"""The code's layout as the README describes it: every module listed, imports only up the
layers (data_shards ← pretrain ← finetune), no private name imported from another module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("data_shards", "pretrain", "finetune")


def modules() -> list[Path]:
    return sorted(
        p for layer in LAYERS for p in (ROOT / layer).glob("*.py") if p.stem != "__init__"
    )


def imported(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every ``import``/``from`` in ``path``, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
    return found


def readme_modules() -> set[str]:
    """``package/module.py`` paths named in the README's layout table; a bare ``module.py``
    in a cell belongs to the package of the cell's first path."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## How the code is laid out", 1)[1].split("\n## ", 1)[0]
    named = set()
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cell = line.split("|")[1]
        package = None
        for name in re.findall(r"`([\w/]+\.py)`", cell):
            if "/" in name:
                package = name.split("/")[0]
                named.add(name)
            elif package:
                named.add(f"{package}/{name}")
    return named


def test_every_module_is_in_the_readme_layout_and_nothing_else():
    present = {str(path.relative_to(ROOT)) for path in modules()}
    named = readme_modules()
    assert present - named == set(), "modules missing from README's 'How the code is laid out'"
    assert named - present == set(), "README's layout names modules that do not exist"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_only_point_up_the_layers_and_take_no_private_names(path):
    layer = LAYERS.index(path.parent.name)
    for module, names in imported(path):
        top = module.split(".")[0]
        if top not in LAYERS:
            continue
        assert LAYERS.index(top) <= layer, (
            f"{path.name} imports {module}, from further down the layers"
        )
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        assert not private, f"{path.name} imports private {private} from {module}"


MAX_MODULE_LINES, MAX_CLASS_LINES = 800, 350


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_and_classes_stay_one_job_in_size(path):
    """A module past 800 lines or a class past 350 has taken on a second job: split it by
    job (as ``pretrain/tracking.py``'s run API and ``tracking_sender.py``'s thread are)."""
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{path.name}: over {MAX_MODULE_LINES}"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_CLASS_LINES, f"{path.name}: class {node.name} has {length} lines"
