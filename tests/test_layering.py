"""The layering rules hold on this checkout (sizes, cycles, core apart from the experiments, lazy
optional dependencies), and the checker in tests/layering.py finds each violation on a small tree."""

from __future__ import annotations

import sys
from pathlib import Path

from tests import layering

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ this checkout
def test_no_module_over_the_line_limit():
    assert layering.oversized_modules(REPO) == {}


def test_no_import_cycle_among_library_modules():
    assert layering.import_cycles(layering.import_graph(REPO)) == []


def test_the_core_never_imports_the_experiment_code():
    graph = layering.import_graph(REPO)
    assert "lalora_curv.experiments" in graph, "the experiment code lives in lalora_curv/experiments/"
    assert layering.core_imports_of_experiments(graph) == {}


def test_import_lalora_curv_loads_no_optional_dependency():
    assert layering.modules_loaded_by_import(REPO) == []


# ------------------------------------------------------------------------- the checker on small trees
def write_tree(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_checker_finds_a_cycle_hidden_in_a_function_local_relative_import(tmp_path):
    root = write_tree(tmp_path, {
        "lalora_curv/__init__.py": "from .sub import a\n",
        "lalora_curv/sub/__init__.py": "",
        "lalora_curv/sub/a.py": "from .b import helper\n",
        "lalora_curv/sub/b.py": "def helper():\n    from ..sub import a\n    return a\n",
        "lalora_curv/sub/c.py": "from . import a\nimport lalora_curv\n",
    })
    graph = layering.import_graph(root)
    assert graph["lalora_curv.sub.b"] == {"lalora_curv.sub.a"}  # `from ..sub import a` resolves to the submodule
    assert graph["lalora_curv.sub.c"] == {"lalora_curv.sub.a"}  # the top-level package is a parent: no edge
    assert layering.import_cycles(graph) == [["lalora_curv.sub.a", "lalora_curv.sub.b"]]


def test_checker_ignores_edges_into_the_top_level_package_and_own_parents(tmp_path):
    root = write_tree(tmp_path, {
        "lalora_curv/__init__.py": "from .x import f\n",
        "lalora_curv/x.py": "def f():\n    import lalora_curv\n    return lalora_curv\n",
        "lalora_curv/pkg/__init__.py": "from .y import g\n",
        "lalora_curv/pkg/y.py": "from lalora_curv.pkg import z\ndef g():\n    from . import z\n",
        "lalora_curv/pkg/z.py": "import lalora_curv.pkg\n",
    })
    assert layering.import_cycles(layering.import_graph(root)) == []


def test_checker_finds_a_longer_cycle_once(tmp_path):
    root = write_tree(tmp_path, {
        "lalora_curv/__init__.py": "",
        "lalora_curv/a.py": "from . import b\n",
        "lalora_curv/b.py": "from .c import x\n",
        "lalora_curv/c.py": "import lalora_curv.a\nx = 1\n",
        "lalora_curv/d.py": "from . import a, e\n",
        "lalora_curv/e.py": "from . import d\n",
    })
    assert layering.import_cycles(layering.import_graph(root)) == [
        ["lalora_curv.a", "lalora_curv.b", "lalora_curv.c"], ["lalora_curv.d", "lalora_curv.e"]]


def test_checker_finds_the_core_importing_experiments_but_not_the_cli(tmp_path):
    root = write_tree(tmp_path, {
        "lalora_curv/__init__.py": "",
        "lalora_curv/experiments/__init__.py": "",
        "lalora_curv/experiments/data.py": "from ..core import f\n",
        "lalora_curv/core.py": "def f():\n    from .experiments.data import load\n",
        "lalora_curv/cli.py": "from .experiments import data\n",
        "lalora_curv/__main__.py": "from .experiments.data import x\n",
        "lalora_curv/experimental.py": "import lalora_curv.core\n",  # a name that only starts alike
    })
    assert layering.core_imports_of_experiments(layering.import_graph(root)) == {
        "lalora_curv.core": ["lalora_curv.experiments.data"]}


def test_checker_counts_lines_of_library_and_benchmark_modules(tmp_path):
    root = write_tree(tmp_path, {
        "lalora_curv/ok.py": "x = 1\n" * 600,
        "lalora_curv/deep/big.py": "x = 1\n" * 601,
        "benchmarks/run/big.py": "x = 1\n" * 700,
        "tests/big.py": "x = 1\n" * 900,  # tests are not size-checked
    })
    assert layering.oversized_modules(root) == {"lalora_curv/deep/big.py": 601, "benchmarks/run/big.py": 700}


def test_checker_sees_an_optional_module_loaded_at_import(tmp_path):
    root = write_tree(tmp_path, {
        "fakepkg/__init__.py": "import csv\nfrom . import experiments\n",
        "fakepkg/experiments/__init__.py": "",
    })
    assert layering.modules_loaded_by_import(root, package="fakepkg", watched=("csv", "tomllib"),
                                             python=sys.executable) == ["csv", "fakepkg.experiments"]
