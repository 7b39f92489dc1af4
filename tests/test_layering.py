"""The package's rooms import only downwards, read from the source's own import statements.

Each room of ``fraglm`` has a floor; a module may import from its own room and from rooms
on lower floors, never from a room above (so the model cannot reach into training, nor the
data pipeline into serving). Imports are read with :mod:`ast`, inside functions too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fraglm"

FLOORS: dict[str, int] = {
    "errors": 0,
    "config": 1,
    "storage": 2,
    "attention": 2,
    "nn": 3,
    "device": 3,
    "parallel": 4,
    "data": 4,
    "runs": 5,
    "training": 6,
    "inference": 6,
    "export": 6,
    "tools": 7,
    "cli": 8,
    "__main__": 9,
}


def room_of(module: str) -> str:
    """``fraglm.nn.model`` -> ``nn``; ``fraglm.cli`` -> ``cli``."""
    return module.split(".")[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def fraglm_imports(path: Path) -> set[str]:
    """Every ``fraglm.*`` module the file imports (``from fraglm import x`` counts as x)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("fraglm.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "fraglm":
                found |= {f"fraglm.{alias.name}" for alias in node.names}
            elif node.module.startswith("fraglm."):
                found.add(node.module)
    return found


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_room_has_a_floor() -> None:
    rooms = {room_of(module_name(p)) for p in modules() if module_name(p) != "fraglm"}
    assert rooms <= FLOORS.keys(), f"rooms without a floor: {sorted(rooms - FLOORS.keys())}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: module_name(p))
def test_imports_go_down_or_stay_in_the_room(path: Path) -> None:
    name = module_name(path)
    if name == "fraglm":
        return
    room = room_of(name)
    upward = sorted(
        imported
        for imported in fraglm_imports(path)
        if room_of(imported) != room and FLOORS[room_of(imported)] >= FLOORS[room]
    )
    assert not upward, f"{name} (floor {FLOORS[room]}) imports from above or beside: {upward}"


def test_the_rule_catches_an_upward_import(tmp_path: Path) -> None:
    """A model module importing the trainer is found (the check can fail)."""
    source = tmp_path / "model.py"
    source.write_text("def f():\n    from fraglm.training.trainer import Trainer\n")
    assert fraglm_imports(source) == {"fraglm.training.trainer"}
    assert FLOORS[room_of("fraglm.training.trainer")] > FLOORS["nn"]
