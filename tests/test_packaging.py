"""Packaging: metadata in pyproject.toml only, one version string, a small core, extras that the
README's commands install in full with exact pins, a typed package with its console script."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import lalora_curv

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
NAME = canonicalize_name(PROJECT["name"])
#: what the core needs (issue 15): everything else is an extra
CORE = {"torch", "peft", "transformers", "safetensors", "tqdm", "numpy"}


def names(requirements) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def expand_extra(extra: str) -> set[str]:
    """The distributions an extra brings, its references to our own extras (``lalora-curv[x]``) expanded."""
    found = set()
    for text in PROJECT["optional-dependencies"][extra]:
        requirement = Requirement(text)
        if canonicalize_name(requirement.name) == NAME:
            for inner in requirement.extras:
                found |= expand_extra(inner)
        else:
            found.add(canonicalize_name(requirement.name))
    return found


def script_extras(script: str) -> set[str]:
    """The extras a script passes to setup_env.sh (``scripts/setup_env.sh a,b,c``)."""
    match = re.search(r"scripts/setup_env\.sh\s+([\w,-]+)", (REPO / "scripts" / script).read_text())
    assert match, f"scripts/{script} does not call scripts/setup_env.sh with its extras"
    return set(match.group(1).split(","))


def pins() -> dict[str, str]:
    found = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            found[canonicalize_name(name)] = version
    return found


def installed_source(distribution: importlib.metadata.Distribution) -> Path | None:
    """The project folder an installed distribution was built from: its ``direct_url.json`` (pip's
    record of a local install) or, for the ``*.egg-info`` that an editable install leaves in the
    project folder, that folder; None when unknown."""
    direct_url = json.loads(distribution.read_text("direct_url.json") or "{}")
    if direct_url.get("url", "").startswith("file://"):
        return Path(direct_url["url"].removeprefix("file://")).resolve()
    location = Path(str(distribution.locate_file(""))).resolve()
    return location if (location / "pyproject.toml").is_file() else None


# ------------------------------------------------------------------------------ one place, one version
def test_metadata_lives_in_pyproject_only_with_the_version_read_from_the_package():
    assert not (REPO / "setup.cfg").exists() and not (REPO / "setup.py").exists()
    assert "version" not in PROJECT and PROJECT["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "lalora_curv.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", lalora_curv.__version__)


def test_installed_distribution_has_the_package_version():
    assert importlib.metadata.version("lalora-curv") == lalora_curv.__version__


def test_core_requirements_are_the_short_list():
    assert names(PROJECT["dependencies"]) == CORE
    assert all(Requirement(r).specifier for r in PROJECT["dependencies"]), "every core requirement keeps a range"


def test_extras_hold_the_optional_stacks():
    extras = {extra: expand_extra(extra) for extra in PROJECT["optional-dependencies"]}
    assert extras["curvlinops"] == {"curvlinops-for-pytorch", "scipy"}
    assert extras["backpack"] == {"backpack-for-pytorch", "torchvision"}
    assert extras["experiments"] == {"gguf", "matplotlib", "reasoning-gym", "attrs"}
    assert extras["integrations"] == {"trl", "bitsandbytes", "accelerate"}
    assert extras["bench"] == extras["experiments"] | extras["curvlinops"] | extras["backpack"] | {"laplace-torch"}
    # the suite exercises every backend, the experiments, the benchmarks and the integrations
    assert extras["test"] >= extras["bench"] | extras["integrations"] | {"scipy", "pytest", "hypothesis", "ruff"}
    assert extras["docs"] == {"mkdocs"}
    assert not set().union(*extras.values()) & CORE, "a core requirement is not repeated in an extra"


def test_built_metadata_reads_the_version_statically_and_lists_the_core(tmp_path):
    """The metadata setuptools builds from a copy of the sources: same version and core list, and
    building it imports neither torch nor our package (the version attr is read from the source)."""
    source = tmp_path / "src"
    shutil.copytree(REPO / "lalora_curv", source / "lalora_curv", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    probe = (
        "import json, sys\n"
        "from setuptools import build_meta\n"
        f"info = build_meta.prepare_metadata_for_build_wheel({str(tmp_path / 'meta')!r})\n"
        "loaded = sorted(m for m in ('torch', 'lalora_curv') if m in sys.modules)\n"
        "print(json.dumps({'dist_info': info, 'loaded': loaded}))\n"
    )
    (tmp_path / "meta").mkdir()
    run = subprocess.run([sys.executable, "-c", probe], cwd=source, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["loaded"] == []
    metadata = importlib.metadata.PathDistribution(tmp_path / "meta" / result["dist_info"])
    assert metadata.version == lalora_curv.__version__
    core = [r for r in metadata.requires if Requirement(r).marker is None]
    assert names(core) == CORE
    assert set(metadata.metadata.get_all("Provides-Extra")) == set(PROJECT["optional-dependencies"])


def test_wheel_ships_py_typed_the_experiments_and_the_console_script(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(REPO / "lalora_curv", source / "lalora_curv", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    probe = f"from setuptools import build_meta\nprint(build_meta.build_wheel({str(tmp_path / 'dist')!r}))\n"
    (tmp_path / "dist").mkdir()
    run = subprocess.run([sys.executable, "-c", probe], cwd=source, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    with zipfile.ZipFile(tmp_path / "dist" / run.stdout.strip().splitlines()[-1]) as wheel:
        files = set(wheel.namelist())
        entry_points = next(wheel.read(f).decode() for f in files if f.endswith(".dist-info/entry_points.txt"))
    assert {"lalora_curv/py.typed", "lalora_curv/__main__.py", "lalora_curv/cli.py",
            "lalora_curv/experiments/__init__.py"} <= files
    assert not any(f.startswith(("tests/", "benchmarks/")) for f in files)
    assert "lalora-curv = lalora_curv.cli:main" in entry_points


def test_installed_requirements_match_pyproject_when_installed_from_this_checkout():
    """After scripts/setup_env.sh (CI's fresh clone), the environment's metadata is this pyproject's."""
    distribution = importlib.metadata.distribution("lalora-curv")
    source = installed_source(distribution)
    if source != REPO:
        pytest.skip(f"the lalora-curv metadata found comes from {source}, not from this checkout ({REPO})")
    core = [r for r in distribution.requires or () if Requirement(r).marker is None]
    assert names(core) == CORE


# --------------------------------------------------------------------------- the README's two commands
def test_scripts_install_every_extra_with_exact_pins():
    every_extra = set(PROJECT["optional-dependencies"])
    wanted = CORE | set().union(*(expand_extra(extra) for extra in every_extra))
    for script in ("demo.sh", "test.sh"):
        installed = CORE | set().union(*(expand_extra(extra) for extra in script_extras(script)))
        assert installed == wanted, f"scripts/{script} leaves out {sorted(wanted - installed)}"
    pinned = pins()
    assert sorted(wanted - set(pinned)) == [], "every requirement needs an exact pin in constraints.txt"
    requirements = [Requirement(r) for r in PROJECT["dependencies"]]
    requirements += [Requirement(r) for extra in every_extra for r in PROJECT["optional-dependencies"][extra]]
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        if name != NAME:
            assert requirement.specifier.contains(pinned[name], prereleases=True), \
                f"constraints.txt pins {name}=={pinned[name]} outside pyproject's {requirement}"


def test_test_command_lints_before_the_suite_and_ci_runs_exactly_it():
    test_sh = (REPO / "scripts" / "test.sh").read_text()
    lint, suite = test_sh.find(".venv/bin/ruff check ."), test_sh.find("-m pytest tests")
    assert 0 <= lint < suite and "set -euo pipefail" in test_sh  # a ruff finding stops the command
    assert "./scripts/test.sh" in (REPO / "README.md").read_text()
    ci_lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert ci_lines[-1] == "exec ./scripts/test.sh"
