"""The boundaries between components, read from the source with `ast` (every import,
module level or inside a function): scheduling/ is pure, the wire contract sits below the
processes that use it, nothing at runtime imports the CLI, and neither files nor folders
import each other in a circle."""

from __future__ import annotations

import ast
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Folder at the repository root -> its import name (pyproject's package-dir mapping).
PACKAGES = {"alignedserve": "alignedserve", "cluster": "alignedserve.cluster",
            "deployments": "alignedserve.deployments", "global_queue": "alignedserve.global_queue",
            "prefetch_workers": "alignedserve.prefetch_workers",
            "kv_store": "alignedserve.kv_store", "engine": "alignedserve.engine",
            "model_zoo": "alignedserve.model_zoo", "scheduling": "alignedserve.scheduling",
            "sim": "alignedserve.sim", "loadgen": "alignedserve.loadgen"}
RUNTIME = ("scheduling", "engine", "kv_store", "global_queue", "prefetch_workers",
           "deployments")


def _python_files(root: Path) -> list[Path]:
    """*.py under root, not descending into virtualenvs (the vLLM peer's sits in loadgen/)."""
    out = []
    for here, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".venv")]
        out += [Path(here) / f for f in files if f.endswith(".py")]
    return out


def _modules() -> dict[str, Path]:
    """Import name -> file, for every project module (generated protobuf code excluded)."""
    out = {}
    for folder, pkg in PACKAGES.items():
        for path in _python_files(ROOT / folder):
            if "_pb2" in path.name:
                continue
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if folder == "alignedserve" and parts and parts[0] in PACKAGES:
                continue
            out[".".join([pkg, *parts])] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Absolute names `name` imports (relative imports resolved), including lazy ones."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                                + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return found


IMPORTS = {name: _imports(name, path) for name, path in MODULES.items()}


def _folder(module: str) -> str | None:
    for folder, pkg in sorted(PACKAGES.items(), key=lambda kv: -len(kv[1])):
        if module == pkg or module.startswith(pkg + "."):
            return folder
    return None


def _project_edges(name: str) -> set[str]:
    return {m for m in IMPORTS[name] if m in MODULES and m != name}


def test_the_rules_see_the_project():
    assert len(MODULES) > 50 and "alignedserve.scheduling.aligned" in MODULES
    assert "alignedserve.scheduling.request" in _project_edges("alignedserve.scheduling.aligned")


def test_scheduling_is_pure_python_and_self_contained():
    for name in MODULES:
        if _folder(name) != "scheduling":
            continue
        for m in IMPORTS[name]:
            top = m.split(".")[0]
            assert top not in ("torch", "ray", "redis", "numpy"), f"{name} imports {m}"
            if m.startswith("alignedserve."):
                assert _folder(m) == "scheduling", f"{name} imports {m}"


def test_prefetch_workers_do_not_import_deployments():
    for name in MODULES:
        if _folder(name) == "prefetch_workers":
            bad = [m for m in IMPORTS[name] if _folder(m) == "deployments"]
            assert not bad, f"{name} imports {bad}"


def test_no_runtime_package_imports_the_cli():
    for name in MODULES:
        if _folder(name) in RUNTIME:
            bad = [m for m in IMPORTS[name] if _folder(m) in ("cluster", "loadgen", "sim")]
            assert not bad, f"{name} imports {bad}"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph`, or None (iterative DFS, colours)."""
    colour = dict.fromkeys(graph, 0)
    for start in graph:
        if colour[start]:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        colour[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            elif colour.get(nxt) == 0:
                colour[nxt] = 1
                stack.append((nxt, iter(sorted(graph[nxt]))))
                path.append(nxt)
    return None


def test_no_import_cycles_between_files():
    graph = {name: _project_edges(name) - {p for p in _parents(name)} for name in MODULES}
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph) or [])}"


def test_no_two_folders_import_each_other():
    graph: dict[str, set[str]] = {f: set() for f in PACKAGES}
    for name in MODULES:
        src = _folder(name)
        for m in _project_edges(name):
            dst = _folder(m)
            if dst != src and src != "alignedserve" and dst is not None:
                graph[src].add(dst)
    assert _cycle(graph) is None, f"folders in a circle: {' -> '.join(_cycle(graph) or [])}"


def test_a_cycle_is_found_when_there_is_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _parents(name: str) -> list[str]:
    """A module's packages: importing `a.b.c` runs `a.b`'s __init__, not a cycle edge."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]
