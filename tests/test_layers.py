"""The floors of the house (DESIGN.md): imports point down only.

    recipe layer   align.cli, align.recipes, eval.studies (a study trains through the recipes: it is one)
    built on core  reward_models, eval
    core           align (everything else)

Every module is parsed, not imported, and every import statement counts, at any depth: an import inside a function
crosses a floor as surely as one at the top, only later.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("align", "reward_models", "eval")
RECIPE_LAYER = ("align.cli", "align.recipes", "eval.studies")


def _within(module: str, packages) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def floor(module: str) -> str | None:
    """The floor of an importable name: "recipe", "reward_models", "eval", "core", or None (outside the project)."""
    if _within(module, RECIPE_LAYER):
        return "recipe"
    if _within(module, ("reward_models",)):
        return "reward_models"
    if _within(module, ("eval",)):
        return "eval"
    if _within(module, ("align",)):
        return "core"
    return None


#: floor → the floors it must not import.
FORBIDDEN = {
    "core": {"recipe", "reward_models", "eval"},
    "reward_models": {"recipe", "eval"},
    "eval": {"recipe"},
    "recipe": set(),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path):
    """(line, statement as written, the names it imports) for every import in the file."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    return imports_in(path.read_text(), package, str(path))


def imports_in(source: str, package: str, filename: str = "<source>"):
    """`imports` of module source whose package is `package` (relative imports resolve against it). `from a import
    b` imports `a` and, when b is a submodule, `a.b`: both count."""
    nodes = [node for node in ast.walk(ast.parse(source, filename)) if isinstance(node, (ast.Import, ast.ImportFrom))]
    for node in sorted(nodes, key=lambda node: node.lineno):  # ast.walk goes breadth first: report in file order
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, f"import {alias.name}", [alias.name]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                parts = package.split(".")
                base = ".".join([*parts[:len(parts) - node.level + 1], *([base] if base else [])])
            names = [alias.name for alias in node.names]
            yield node.lineno, f"from {base} import {', '.join(names)}", [base, *(f"{base}.{n}" for n in names)]


def project_modules():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield path


def violations() -> list[str]:
    found = []
    for path in project_modules():
        module = module_name(path)
        here = floor(module)
        for line, statement, names in imports(path):
            crossed = sorted({there for there in map(floor, names) if there in FORBIDDEN[here]})
            if crossed:
                found.append(f"{path.relative_to(ROOT)}:{line}: {statement}  ({here} module {module} imports "
                             f"{' and '.join(crossed)})")
    return found


def test_every_package_is_scanned():
    names = {module_name(path) for path in project_modules()}
    assert {"align.config", "align.cli", "reward_models.ensemble", "eval.bon"} <= names


def test_imports_at_any_depth_and_relative_ones_are_seen():
    source = ("import torch\n"
              "def build():\n"
              "    if True:\n"
              "        from reward_models.ensemble import RewardEnsemble\n"
              "class A:\n"
              "    def f(self):\n"
              "        from ..recipes import train\n")
    assert list(imports_in(source, "align.references")) == [
        (1, "import torch", ["torch"]),
        (4, "from reward_models.ensemble import RewardEnsemble",
         ["reward_models.ensemble", "reward_models.ensemble.RewardEnsemble"]),
        (7, "from align.recipes import train", ["align.recipes", "align.recipes.train"]),
    ]


@pytest.mark.parametrize("name, expected", [
    ("align.cli", "recipe"), ("align.recipes.train", "recipe"), ("eval.studies.common", "recipe"),
    ("align.config", "core"), ("align.references.base", "core"), ("align.recipesx", "core"),
    ("reward_models.reward", "reward_models"), ("eval.bon", "eval"), ("evaluate", None), ("torch", None),
])
def test_floor(name, expected):
    assert floor(name) == expected


def exists(module: str) -> bool:
    path = ROOT.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_project_imports_name_existing_modules():
    """A module moved to another floor leaves no importer behind (the floor check cannot see a name that no longer
    exists: `align.train` would count as core)."""
    missing = []
    for path in project_modules():
        for line, statement, names in imports(path):
            module = names[0]  # `import a.b` → a.b; `from a import b` → a (b may be any attribute)
            if floor(module) is not None and not exists(module):
                missing.append(f"{path.relative_to(ROOT)}:{line}: {statement}  ({module} does not exist)")
    assert not missing, "imports of project modules that do not exist:\n" + "\n".join(missing)


def test_imports_point_down_only():
    found = violations()
    assert not found, "imports that point up a floor (DESIGN.md, 'Floors of the house'):\n" + "\n".join(found)
