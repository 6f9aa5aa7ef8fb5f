"""Checks of the code's shape that CI runs beside the tests (docs/development.md, "Layers").

- no function body (after its docstring) over MAX_BODY lines: a longer one hides several jobs;
- no name private to Typer (or the Click it bundles) anywhere in aecli/: the CLI stands on
  Typer's public API, so a Typer release cannot break it from inside;
- no package of aecli imports another that imports it back, at any depth, imports inside
  functions included (import-linter's layers contract says which way each may go; this says
  that no two packages form a circle, whatever the contract lists).

    python .ci/layout.py        # exit 1 with one line per problem
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

MAX_BODY = 80
ROOT = Path(__file__).resolve().parent.parent / "aecli"
# a Typer or Click attribute with a leading underscore, or Typer's internal modules
PRIVATE = re.compile(
    r"\b(?:typer|click)(?:\.\w+)*\._\w+|\._usage_display_name\b|display_type_rich|type_descriptor"
)


def body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = node.body
    first = body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and len(body) > 1:
        first = body[1]  # the docstring is not the body
    return node.end_lineno - first.lineno + 1


def package_of(module: str) -> str:
    """aecli.io.latents -> aecli.io; aecli.devices -> aecli.devices (a top-level module)."""
    parts = module.split(".")
    return ".".join(parts[:2])


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every aecli module this module imports, anywhere in it."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("aecli")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("aecli"):
                found.add(name)
    return found


def main() -> int:
    problems = []
    graph: dict[str, set[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        text = path.read_text()
        tree = ast.parse(text)
        name = module_name(path)
        where = path.relative_to(ROOT.parent)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = body_lines(node)
                if lines > MAX_BODY:
                    problems.append(f"{where}:{node.lineno}: {node.name}'s body is {lines} lines")
        for number, line in enumerate(text.splitlines(), 1):
            if PRIVATE.search(line):
                problems.append(f"{where}:{number}: a name private to Typer: {line.strip()}")
        source = package_of(name)
        for target in imported(tree, name, path.name == "__init__.py"):
            target = package_of(target)
            if target != source and target != "aecli" and source != "aecli":
                graph.setdefault(source, set()).add(target)
    problems += [f"import circle: {' -> '.join(circle)}" for circle in circles(graph)]
    for problem in problems:
        print(problem)
    return 1 if problems else 0


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle through each pair of packages that reach each other."""
    reach = {node: _reachable(graph, node) for node in graph}
    found, seen = [], set()
    for a in sorted(graph):
        for b in sorted(reach[a]):
            if a < b and a in reach.get(b, set()) and (a, b) not in seen:
                seen.add((a, b))
                found.append([a, b, a])
    return found


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    stack, seen = list(graph.get(start, ())), set()
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack += graph.get(node, ())
    return seen


if __name__ == "__main__":
    sys.exit(main())
