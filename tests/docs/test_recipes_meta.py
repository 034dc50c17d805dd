"""Rules for snippets/recipes/: included by a page, run by a test, no jpr inside.

A recipe is for pasting into someone else's project, so it may import only
the standard library and JAX, Flax, Optax, Orbax, NumPy and Grain; a recipe
that imports ``jpr`` must be named in ``MAY_IMPORT_JPR`` (none is). Each one
must be included by a docs page and *run* by tests/snippets/test_recipes.py:
its path is a constant there, and the ``runs`` fixture, which starts every
recipe's process, uses that constant.
"""

from __future__ import annotations

import ast
import sys

import pytest
from docs_tools import DOCS_DIR, REPO_ROOT, SNIPPETS_DIR
from docs_tools.markdown import parse_page

RECIPES_DIR = SNIPPETS_DIR / "recipes"
RECIPES = sorted(p for p in RECIPES_DIR.glob("*.py"))
TESTS = REPO_ROOT / "tests" / "snippets" / "test_recipes.py"

#: Recipes allowed to import jpr (relative paths). Keep it empty if you can.
MAY_IMPORT_JPR: frozenset[str] = frozenset()
#: What a recipe may import besides the standard library.
ALLOWED_PACKAGES = frozenset({"jax", "flax", "optax", "orbax", "numpy", "grain"})


def _rel(path) -> str:
    return path.relative_to(REPO_ROOT).as_posix()


def imported_packages(source: str) -> set[str]:
    """The top-level names a module imports (``import a.b`` and ``from a.b import c``: a)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            if node.args and isinstance(node.args[0], ast.Constant):
                found.add(str(node.args[0].value).split(".")[0])
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant)):
            found.add(str(node.args[0].value).split(".")[0])
    return found


def _run_by_the_tests() -> set[str]:
    """Recipe paths whose constant in test_recipes.py is used by its `runs` fixture."""
    tree = ast.parse(TESTS.read_text(encoding="utf-8"))
    constants = {
        node.targets[0].id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and len(node.targets) == 1
        and isinstance(node.targets[0], ast.Name) and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str) and node.value.value.startswith("snippets/recipes/")
    }
    runs = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "runs")
    used = {n.id for n in ast.walk(runs) if isinstance(n, ast.Name)}
    return {path for name, path in constants.items() if name in used}


def test_there_are_at_least_twelve_recipes():
    assert len(RECIPES) >= 12, [_rel(p) for p in RECIPES]


@pytest.mark.parametrize("recipe", RECIPES, ids=_rel)
def test_recipe_is_included_by_a_page(recipe):
    rel = _rel(recipe)
    pages = [p for p in DOCS_DIR.rglob("*.md") if rel in parse_page(p).includes]
    assert pages, f'{rel} is not included by any docs page (--8<-- "{rel}")'


@pytest.mark.parametrize("recipe", RECIPES, ids=_rel)
def test_recipe_is_run_by_a_test(recipe):
    rel = _rel(recipe)
    assert rel in _run_by_the_tests(), (
        f"{rel} is not run by {_rel(TESTS)}: give it a path constant there and start "
        "it in the `runs` fixture, then check what it prints"
    )


@pytest.mark.parametrize("recipe", RECIPES, ids=_rel)
def test_recipe_imports_no_jpr_and_only_the_allowed_packages(recipe):
    rel = _rel(recipe)
    imported = imported_packages(recipe.read_text(encoding="utf-8"))
    if rel not in MAY_IMPORT_JPR:
        assert "jpr" not in imported, f"{rel} imports jpr: recipes are for other projects"
    third_party = imported - set(sys.stdlib_module_names) - {"__future__", "jpr"}
    extra = sorted(third_party - ALLOWED_PACKAGES)
    assert not extra, f"{rel} imports {extra}: recipes use only {sorted(ALLOWED_PACKAGES)}"


def test_the_allow_list_names_real_recipes():
    assert {REPO_ROOT / p for p in MAY_IMPORT_JPR} <= set(RECIPES)


@pytest.mark.parametrize(
    ("source", "found"),
    [
        ("import jpr", {"jpr"}),
        ("import jpr.hashing as h", {"jpr"}),
        ("from jpr.rng import make_key", {"jpr"}),
        ("def f():\n    from jpr import train", {"jpr"}),
        ("importlib.import_module('jpr.data')", {"jpr"}),
        ("__import__('jpr')", {"jpr"}),
        ("from . import jpr", set()),  # relative: not the package
        ("import jax.numpy as jnp\nfrom flax import nnx", {"jax", "flax"}),
        ("jpr = 1", set()),
    ],
)
def test_imported_packages_finds_every_form(source, found):
    assert imported_packages(source) == found
