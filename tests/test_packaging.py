import ast
import importlib.metadata
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import ROOT


def test_wheel_ships_every_preset(tmp_path):
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("aecli-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = sorted(p.name for p in (ROOT / "presets").glob("*.yaml"))
    assert len(presets) >= 7
    for preset in presets:
        assert f"aecli/presets/{preset}" in names
    assert "aecli/cli/train.py" in names
    assert any(name.endswith("entry_points.txt") for name in names)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """The top-level modules a file imports, each with whether the import runs when the module
    is imported (at module level, outside any try) rather than lazily or guarded."""
    tree = ast.parse(path.read_text())
    eager = set()
    for node in tree.body:  # module level, not inside a try, a function or an if
        if isinstance(node, ast.Import | ast.ImportFrom):
            eager.add(id(node))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(name.split(".")[0], id(node) in eager) for name in names]
    return found


def _declared() -> dict[str, set[str]]:
    """aecli's declared requirements, as read from its installed metadata: the normalised
    distribution name to the extras it is declared in ('' for a core dependency)."""
    declared: dict[str, set[str]] = {}
    for requirement in importlib.metadata.requires("aecli") or []:
        name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)", requirement)
        declared.setdefault(_normalised(name), set()).add(extra.group(1) if extra else "")
    return declared


def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def import_problems(package: Path) -> list[str]:
    """Each import in a package's files that a fresh install of aecli would not satisfy."""
    declared = _declared()
    providers = importlib.metadata.packages_distributions()
    problems = []
    for path in sorted(package.rglob("*.py")):
        where = path.relative_to(package.parent)
        for module, eager in _imports(path):
            if module in sys.stdlib_module_names or module == "aecli":
                continue
            names = {_normalised(d) for d in providers.get(module, [])}
            extras = set().union(*(declared.get(n, set()) for n in names)) if names else set()
            if not extras:
                problems.append(f"{where}: imports {module}, which no declared dependency provides")
            elif "" not in extras and eager:
                problems.append(f"{where}: imports {module} when it loads; it is only in extras "
                                f"{sorted(extras)}")  # fmt: skip
    return problems


def test_every_import_is_a_declared_dependency():
    """A fresh `pip install .` gives a working aecli: every third-party module aecli imports
    comes from a distribution it declares (Typer 0.26 stopped bringing Click, which aecli
    imported without declaring); one declared only in an extra is imported lazily or guarded,
    never when aecli's modules load."""
    problems = import_problems(ROOT / "aecli")
    assert not problems, "\n".join(problems)


def test_the_import_check_names_an_undeclared_or_eager_extra_import(tmp_path):
    """The check fails for the defects it guards against: a module-level import of a package
    aecli does not declare (`import click`, `import requests`), and a module-level import of
    one that only an extra brings; a lazy import of an extra passes."""
    package = tmp_path / "aecli"
    package.mkdir()
    (package / "cli.py").write_text(
        "import os\nimport click\nimport no_such_module_xyz\nimport lpips\n\n"
        "def perceptual():\n    import tensorboard\n"
    )
    problems = import_problems(package)
    assert "aecli/cli.py: imports no_such_module_xyz, which no declared dependency provides" in (
        problems
    )
    if importlib.metadata.packages_distributions().get("click"):  # where Click is installed
        assert "aecli/cli.py: imports click, which no declared dependency provides" in problems
    assert any(p.startswith("aecli/cli.py: imports lpips when it loads") for p in problems)
    assert not any("tensorboard" in p or " os" in p for p in problems)
