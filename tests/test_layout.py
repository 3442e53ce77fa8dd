"""The package layout is the data flow: a module imports only from its own stage or the stages before it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lora_study"

# Earlier stages first; a package may import any package to its left, never one to its right. `report` (what a
# question is, the chart style, the page) sits below `questions`, which it lays out without naming any.
STAGES = ("core", "study", "stats", "prepare", "training", "measure", "analysis", "report", "questions")


def imported_packages(source: Path) -> set[str]:
    """The lora_study sub-packages a module imports, at top level or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "lora_study" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_every_module_lives_in_a_stage_package() -> None:
    loose = sorted(path.name for path in PACKAGE.glob("*.py") if path.name != "__init__.py")
    assert not loose, f"modules outside a stage package: {loose}"
    packages = sorted(path.name for path in PACKAGE.iterdir() if (path / "__init__.py").exists())
    assert packages == sorted(STAGES)


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_imports_only_itself_and_earlier_stages(stage: str) -> None:
    allowed = set(STAGES[: STAGES.index(stage) + 1])
    upward = {
        str(module.relative_to(PACKAGE)): sorted(imported_packages(module) - allowed)
        for module in sorted((PACKAGE / stage).glob("*.py"))
    }
    assert not {module: later for module, later in upward.items() if later}, "imports of later stages"


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    module = tmp_path / "late.py"
    module.write_text("def f():\n    from lora_study.report import page\n    import lora_study.core.io\n")
    assert imported_packages(module) == {"report", "core"}
