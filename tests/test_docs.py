"""The docs build (mkdocs --strict) and name every public API entry, so they cannot rot."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lalora_curv as lc

ROOT = Path(__file__).resolve().parents[1]


def test_api_reference_names_every_public_symbol():
    text = (ROOT / "docs" / "api.md").read_text()
    missing = [name for name in lc.__all__ if name not in text]
    assert not missing, f"docs/api.md does not mention: {missing}"


def test_mkdocs_build_strict(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    if mkdocs is None:
        pytest.fail("mkdocs is not installed: install the docs extra (scripts/setup_env.sh does)")
    result = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_links_resolve():
    """Every relative link and image of README.md (not built by mkdocs, so not checked by --strict) names
    a file or folder of the repository, and an anchor into a page names one of its headings."""
    import re

    readme = ROOT / "README.md"
    missing = []
    for link in re.findall(r"\]\(([^)\s]+)\)", readme.read_text()):
        if link.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = link.partition("#")
        target = ROOT / path if path else readme
        if not target.exists():
            missing.append(link)
        elif anchor and target.suffix == ".md":
            headings = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                        for h in re.findall(r"^#+ (.+)$", target.read_text(), flags=re.M)}
            if anchor not in headings:
                missing.append(link)
    assert not missing, f"README.md links to what is not there: {missing}"
