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


def test_recipes_read_on_every_python_the_package_declares():
    """Recipes are TOML, read with tomllib, which Python has only from 3.11 (runconfig falls back to tomli). The
    package declares requires-python >= 3.10 but not tomli, so `dyndepth train recipe.toml` on 3.10 stopped with
    ModuleNotFoundError: the dependency must be declared for the Pythons without tomllib."""
    import re

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the dependency this test asks for
        import tomli as tomllib

    project = tomllib.loads((SRC.parents[1] / "pyproject.toml").read_text())["project"]
    oldest = tuple(int(v) for v in re.match(r">=\s*(\d+)\.(\d+)", project["requires-python"]).groups())
    if oldest >= (3, 11):
        return
    tomli = [d for d in project["dependencies"] if re.match(r"tomli\b", d)]
    assert tomli and all(re.search(r"python_version\s*<\s*['\"]3\.11['\"]", d) for d in tomli), project["dependencies"]
