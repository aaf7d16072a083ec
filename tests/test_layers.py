"""The layering of the code: core/ imports nothing of ours; tasks/ and methods/ import core/ (methods also the task
and adapter interfaces), never runners/; runners/ sit on top; no import cycle among module-level imports."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "tasks", "methods", "runners", "slurm")
# what each layer may import of ours (package, or module for the task/adapter interfaces)
ALLOWED = {
    "core": {"core"},
    "tasks": {"core", "tasks"},
    "methods": {"core", "methods", "tasks.base", "tasks.adapters"},
    "runners": {"core", "tasks", "methods", "runners"},
    "slurm": {"core", "tasks", "methods", "runners", "slurm"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, pkg: str) -> list[tuple[str, bool]]:
    """(imported module of ours, whether the import runs at module level) for every import in ``path``, a module of
    package ``pkg`` (relative imports resolve against it)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(n) for n in tree.body}
    for node in tree.body:  # imports under a module-level `if` / `try` run at import time too (not TYPE_CHECKING)
        if isinstance(node, ast.Try) or (isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test)):
            top_level |= {id(n) for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for n in names:
            if n.split(".")[0] in PACKAGES:
                out.append((n, id(node) in top_level))
    return out


def package_of(path: Path) -> str:
    return module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]


def sources() -> list[Path]:
    return [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]


def known(name: str, modules: set[str]) -> str | None:
    """The longest module of ours that ``name`` names (``from x import y`` may name a function y of module x)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def test_no_upward_import():
    bad = []
    for path in sources():
        layer = module_name(path).split(".")[0]
        for name, _ in imports(path, package_of(path)):
            if not any(name == a or name.startswith(a + ".") for a in ALLOWED[layer]) and \
                    not any(a.startswith(name + ".") or a == name for a in ALLOWED[layer] if "." in a):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(sorted(set(bad)))


def test_no_import_cycle():
    modules = {module_name(p) for p in sources()}
    graph: dict[str, set[str]] = {}
    for path in sources():
        me = module_name(path)
        targets = {known(n, modules) for n, top in imports(path, package_of(path)) if top}
        graph[me] = {t for t in targets if t and t != me and not me.startswith(t + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_checker_sees_imports(tmp_path):
    src = tmp_path / "mod.py"
    src.write_text("import os\nfrom runners.record import RunRecord\n\n\ndef f():\n    from . import io\n")
    assert imports(src, "core") == [("runners.record", True), ("runners.record.RunRecord", True),
                                    ("core", False), ("core.io", False)]
    src.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import methods.base\n")
    assert imports(src, "core") == [("methods.base", False)]
