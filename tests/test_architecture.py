"""The layout stays as docs/ARCHITECTURE.md writes it down: every module of the package and every
source file of the extension has its line there, no line names a file that is gone, and the
package's imports have no cycle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ARCHITECTURE.md"


def _sources() -> set[str]:
    files = {p.relative_to(ROOT).as_posix() for p in (ROOT / "qlora_kernels").rglob("*.py")}
    files |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cpp", ".cu", ".cuh",
                                                                                                  ".h")}
    return {f for f in files if "__pycache__" not in f}


def test_every_module_has_its_line_and_no_line_is_stale():
    listed = set(re.findall(r"^\| `([^`]+)` \|", DOC.read_text(), re.M))
    sources = _sources()
    missing = sorted(sources - listed)
    stale = sorted(listed - sources)
    assert not missing, f"docs/ARCHITECTURE.md has no line for {missing}: say what each owns"
    assert not stale, f"docs/ARCHITECTURE.md names files that do not exist: {stale}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The qlora_kernels modules a file imports (anywhere in it, function-level imports too)."""
    tree = ast.parse(path.read_text())
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("qlora_kernels")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("qlora_kernels"):
                out.add(target)
                out |= {f"{target}.{a.name}" for a in node.names}
    return out


def test_the_package_has_no_import_cycle():
    files = [p for p in (ROOT / "qlora_kernels").rglob("*.py") if "__pycache__" not in p.parts]
    modules = {_module_name(p): p for p in files}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for target in _imports(path):
            while target and target not in modules:  # an imported name, not a module: its module
                target = target.rpartition(".")[0]
            # a package's __init__ re-exports; importing its submodules is what counts
            if target and target != name and not name.startswith(target + "."):
                deps.add(target)
        graph[name] = deps
    # packages (their __init__) re-export what is below them: leave their edges out of the cycle search
    packages = {n for n, p in modules.items() if p.name == "__init__.py"}
    edges = {n: {d for d in deps if d not in packages} for n, deps in graph.items() if n not in packages}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"
