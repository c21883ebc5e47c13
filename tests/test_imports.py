"""Imports run one way: core <- models <- methods <- train / eval / bench <- cli, and no private name is imported
from another package (docs/design.md)."""

import ast
from pathlib import Path

SRC = Path(__file__).parents[1] / "src" / "dyndepth"
LEVEL = {"core": 0, "models": 1, "methods": 2, "train": 3, "eval": 3, "bench": 3, "cli": 4, "demo": 4, "repro": 4}


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dyndepth."):
            yield node.module.split(".")[1], [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("dyndepth."):
                    yield a.name.split(".")[1], []


def test_imports_run_one_way_and_no_private_name_crosses_a_package():
    wrong = []
    for path in SRC.rglob("*.py"):
        part = path.relative_to(SRC).parts[0].removesuffix(".py")
        for target, names in _imports(path):
            if part in LEVEL and target in LEVEL and LEVEL[target] > LEVEL[part]:
                wrong.append(f"{path.relative_to(SRC)} imports dyndepth.{target}")
            if target != part and any(n.startswith("_") for n in names):
                wrong.append(f"{path.relative_to(SRC)} imports private {names} from dyndepth.{target}")
    assert not wrong, "\n".join(wrong)
