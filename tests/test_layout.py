"""The size limits that keep each part of ssecfs readable on its own: no module over 500
lines, no function over 60, no class with more than 30 methods (the layers themselves are
checked by lint-imports, pyproject.toml [tool.importlinter])."""

import ast
import pathlib

from helpers import REPO

SOURCES = sorted((pathlib.Path(REPO) / "ssecfs").rglob("*.py"))
MODULE_MAX, FUNCTION_MAX, METHODS_MAX = 500, 60, 30


def over_limits(path: pathlib.Path) -> list[str]:
    text = path.read_text()
    found = []
    if len(text.splitlines()) > MODULE_MAX:
        found.append(f"{path.name}: {len(text.splitlines())} lines")
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > FUNCTION_MAX:
                found.append(f"{node.name}: {n} lines")
        elif isinstance(node, ast.ClassDef):
            n = sum(isinstance(b, (ast.FunctionDef, ast.AsyncFunctionDef)) for b in node.body)
            if n > METHODS_MAX:
                found.append(f"class {node.name}: {n} methods")
    return found


def test_the_limits_are_checked_on_every_module():
    assert len(SOURCES) > 40 and all(p.suffix == ".py" for p in SOURCES)
    assert over_limits(pathlib.Path(REPO) / "tests" / "test_cache.py"), \
        "the check must see a module over the limits"


def test_every_module_within_limits():
    over = {str(p.relative_to(REPO)): over_limits(p) for p in SOURCES}
    assert {p: found for p, found in over.items() if found} == {}
