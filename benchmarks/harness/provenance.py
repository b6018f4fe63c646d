"""Provenance of one result part: which code (git commit, clean or dirty tree) ran which command, on
what device and library versions, from when to when.

A merged result keeps one record per part (``payload["provenance"]`` is a list), so a reader sees
every commit that produced it, not only the first part's.
"""

from __future__ import annotations

import datetime as _dt
import shlex
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness.gitstate import git_state
from benchmarks.harness.machine import device_name

#: libraries whose versions every part records (the full list is in ``machine["versions"]``)
CORE_PACKAGES = ("torch", "transformers", "peft")


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _versions() -> dict[str, str | None]:
    out = {}
    for name in CORE_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def command_line(argv: list[str]) -> str:
    """``argv`` shell-quoted, with a package's ``.../benchmarks/<name>/__main__.py`` shown as the
    ``python -m benchmarks.<name>`` that ran it."""
    if argv:
        path = Path(argv[0])
        if path.name == "__main__.py" and path.parent.parent.name == "benchmarks":
            return shlex.join(["python", "-m", f"benchmarks.{path.parent.name}", *argv[1:]])
    return shlex.join(argv)


class Provenance:
    """Started when a benchmark part starts (before it writes anything, so its own outputs do not
    make the tree look dirty); :meth:`record` gives the JSON record with the end time.

    Record keys: ``commit``, ``dirty``, ``dirty_code``, ``dirty_files``, ``versions`` (torch,
    transformers, peft), ``device``, ``device_name``, ``preset``, ``command`` (shell-quoted),
    ``argv``, ``started_utc``, ``finished_utc``, ``source`` (``"recorded"``).
    """

    def __init__(self, *, preset: str, device: torch.device | str, argv: list[str] | None = None):
        git = git_state() or {}
        argv = list(sys.argv if argv is None else argv)
        self._record: dict[str, Any] = {
            "commit": git.get("commit"), "dirty": git.get("dirty"), "dirty_code": git.get("dirty_code"),
            "dirty_files": git.get("dirty_files", []), "versions": _versions(), "device": str(torch.device(device)),
            "device_name": device_name(device), "preset": preset, "command": command_line(argv), "argv": argv,
            "started_utc": _now(), "finished_utc": None, "source": "recorded"}

    def record(self, finished: bool = True) -> dict[str, Any]:
        """The record; ``finished`` stamps the end time (now)."""
        out = dict(self._record)
        if finished:
            out["finished_utc"] = _now()
        return out


def legacy_provenance(payload: dict) -> list[dict[str, Any]]:
    """Provenance records of a result file written before per-part records existed: rebuilt from its
    ``machine`` block (git commit and dirty flag, argv, timestamp). A legacy *merged* file recorded only
    its first part's machine, so its record says so (``source``) and lists the merged folders."""
    m = payload.get("machine") or {}
    git = m.get("git") or {}
    argv = list(m.get("argv") or [])
    merged = payload.get("merged_from")
    rec = {"commit": git.get("commit"), "dirty": git.get("dirty"), "dirty_code": None, "dirty_files": None,
           "versions": {k: (m.get("versions") or {}).get(k) for k in CORE_PACKAGES}, "device": m.get("device"),
           "device_name": m.get("device_name"), "preset": payload.get("preset"),
           "command": shlex.join(argv) if argv else None, "argv": argv, "started_utc": None,
           "finished_utc": m.get("timestamp_utc"),
           "source": ("legacy file: machine block of the first of the merged parts " + ", ".join(map(str, merged))
                      if merged else "legacy file: machine block")}
    return [rec]
