"""Result files: JSON writing, reading (old committed files included) and merging of parts.

Schema: every result is one JSON object with at least ``benchmark`` and ``preset``. Since the
harness, it also holds ``provenance``: a list with one record per part that produced it (see
:class:`benchmarks.harness.provenance.Provenance`); a merged result lists every part's record.
Files written before carry no ``provenance``; :func:`load_result` rebuilds it from their
``machine`` block (marked ``source: "legacy file: ..."``), so readers see one form.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness.provenance import legacy_provenance


def to_jsonable(obj: Any) -> Any:
    """Turn tensors, dtypes, devices, paths, numpy scalars and NaN/inf into JSON values."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return to_jsonable(obj.item())
    return repr(obj)


def write_json(path: str | Path, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(data), indent=1) + "\n")
    return path


def load_result(path: str | Path, *, name: str | None = None) -> dict:
    """Read a result JSON (a file, or ``name`` inside a folder) and make sure it has ``provenance``.

    Raises ``FileNotFoundError`` naming the path, ``ValueError`` when the file is not a benchmark
    result (no ``benchmark`` key).
    """
    path = Path(path)
    if path.is_dir():
        if name is None:
            candidates = sorted(path.glob("*.json"))
            if len(candidates) != 1:
                names = [c.name for c in candidates]
                raise FileNotFoundError(f"{path}: expected exactly one result JSON, found {names}")
            path = candidates[0]
        else:
            path = path / name
    if not path.is_file():
        raise FileNotFoundError(f"no result file at {path}")
    payload = json.loads(path.read_text())
    if not isinstance(payload, dict) or "benchmark" not in payload:
        raise ValueError(f"{path} is not a benchmark result (no 'benchmark' key)")
    if not payload.get("provenance"):
        payload["provenance"] = legacy_provenance(payload)
    return payload


def provenance_of(payloads: Iterable[dict]) -> list[dict]:
    """Every part's provenance record, in order (a merged part contributes all of its records)."""
    out: list[dict] = []
    for p in payloads:
        out.extend(p.get("provenance") or legacy_provenance(p))
    return out


def check_mergeable(payloads: Sequence[dict], *, may_differ: Iterable[str] = ()) -> None:
    """Refuse to merge results of different benchmarks or presets, or whose ``config`` differs
    outside ``may_differ``; the error names what differs."""
    if not payloads:
        raise ValueError("nothing to merge: no parts given")
    first = payloads[0]
    may_differ = set(may_differ)
    for p in payloads[1:]:
        for key in ("benchmark", "preset"):
            if p.get(key) != first.get(key):
                raise ValueError(f"cannot merge: {key} differs ({p.get(key)!r} vs {first.get(key)!r})")
        a = {k: v for k, v in (first.get("config") or {}).items() if k not in may_differ}
        b = {k: v for k, v in (p.get("config") or {}).items() if k not in may_differ}
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff:
            raise ValueError(f"cannot merge: configs differ in {diff}")


def merge_parts(parts: Sequence[str | Path], combine: Callable[[list[dict]], dict], *,
                name: str | None = None, may_differ: Iterable[str] = ()) -> dict:
    """Load the result of each part (file or folder), check they belong together, ``combine`` them
    (benchmark-specific) and give the merged payload every part's provenance and ``merged_from``."""
    payloads = [load_result(p, name=name) for p in parts]
    check_mergeable(payloads, may_differ=may_differ)
    merged = combine(payloads)
    merged["provenance"] = provenance_of(payloads)
    merged["merged_from"] = [str(p) for p in parts]
    return merged
