"""The git state of the checkout: commit, and whether tracked files differ from it (the provenance
of the demo's result and, through ``benchmarks.harness``, of every benchmark part)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

#: result files under this folder are benchmark outputs, not code: a tree dirty only there counts as
#: clean code (``dirty_code``); the raw ``dirty`` flag is kept as well
RESULTS_PREFIX = "benchmarks/results/"
_MAX_LISTED = 50


def git_state(path: str | Path | None = None) -> dict[str, Any] | None:
    """Commit and dirty state of the checkout holding ``path`` (default: this package's folder); None
    outside git (an installed wheel).

    ``dirty``: some tracked file differs from the commit; ``dirty_code``: the same, ignoring files
    under ``benchmarks/results/`` (outputs); ``dirty_files``: the changed paths (at most 50).
    """
    cwd = Path(path or Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    files = [line[3:].strip() for line in status.stdout.splitlines() if line.strip()]
    return {"commit": commit.stdout.strip(), "dirty": bool(files),
            "dirty_code": any(not f.startswith(RESULTS_PREFIX) for f in files), "dirty_files": files[:_MAX_LISTED]}
