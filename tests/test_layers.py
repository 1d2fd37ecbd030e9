"""Imports run one way only: mop -> data_prep -> pretrain -> eval -> slurm; demo and bench on top.

Every import statement of every production module is read (module level and inside functions,
since a lazy import is still a dependency), and one that reaches a higher layer fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["mop", "data_prep", "pretrain", "eval", "slurm"]
ON_TOP = ["demo", "bench"]  # may import any layer; no layer may import them
PROJECT = set(LAYERS) | set(ON_TOP)


def imported_packages(path: Path) -> set[str]:
    """Top-level project packages imported anywhere in a file (absolute imports)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        out |= {n.split(".")[0] for n in names} & PROJECT
    return out


def allowed(package: str) -> set[str]:
    if package in ON_TOP:
        return PROJECT
    return set(LAYERS[: LAYERS.index(package) + 1])


def upward_imports(root: Path) -> list[str]:
    found = []
    for package in LAYERS + ON_TOP:
        for path in sorted((root / package).rglob("*.py")):
            for bad in sorted(imported_packages(path) - allowed(package)):
                found.append(f"{path.relative_to(root)} imports {bad}")
    return found


def test_no_upward_imports():
    assert upward_imports(REPO) == []


@pytest.mark.parametrize(
    ("package", "source", "culprit"),
    [
        ("mop", "from data_prep.shards import ShardReader\n", "data_prep"),
        ("data_prep", "def f():\n    import pretrain.model\n", "pretrain"),
        ("pretrain", "from eval.results import x\n", "eval"),
        ("eval", "import slurm.submit as s\n", "slurm"),
        ("slurm", "from demo.samples import x\n", "demo"),
    ],
)
def test_an_upward_import_is_caught(tmp_path, package, source, culprit):
    for p in LAYERS + ON_TOP:
        (tmp_path / p).mkdir()
    (tmp_path / package / "bad.py").write_text(source)
    assert upward_imports(tmp_path) == [f"{package}/bad.py imports {culprit}"]


def test_production_packages_hold_no_sample_data_writers():
    # Generated hub-schema files and benchmark fixtures live with the demo (or under tests/).
    for package in LAYERS:
        for path in (REPO / package).rglob("*.py"):
            assert path.name not in {"samples.py", "fixtures.py"}, path
