"""ARCHITECTURE.md rule 1: models/ and data/ never import torch.distributed."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "cybertron"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_models_and_data_do_not_import_torch_distributed():
    offenders = []
    files = list((PACKAGE / "models").glob("*.py")) + list((PACKAGE / "data").glob("*.py"))
    assert len(files) >= 6
    for path in files:
        if any(name.startswith("torch.distributed") for name in _imports(path)):
            offenders.append(path.name)
    assert offenders == []
