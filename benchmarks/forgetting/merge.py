"""Merging finished parts of one preset (split with ``--only`` / ``--set``) into one result."""

from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks.forgetting.config import Config
from benchmarks.forgetting.report import runs_time, write_outputs
from benchmarks.forgetting.summary import METRICS
from benchmarks.harness import check_mergeable, load_result, provenance_of

_MERGE_MAY_DIFFER = ("methods", "seeds", "plain_seeds", "settings")


def _merge_calibrations(parts) -> dict:
    """Per (setting, seed): the union of the penalties each part calibrated (parts that ran different
    families calibrate different structures at the same plain LoRA solution)."""
    merged: dict = {}
    for calibration in parts:
        for key, cal in calibration.items():
            merged.setdefault(key, {}).update(cal)
    return merged


def _union_methods(a, b):
    """Union of two setting-level method selections ("all" | "plain" | list of names)."""
    if "all" in (a, b):
        return "all"
    names = [*([] if a == "plain" else a), *([] if b == "plain" else b)]
    return list(dict.fromkeys(names)) or "plain"


def _same_metrics(a: dict, b: dict, tol: float = 1e-6) -> bool:
    keys = [k for k in METRICS if a.get(k) is not None or b.get(k) is not None]
    return all(a.get(k) is not None and b.get(k) is not None and math.isclose(a[k], b[k], rel_tol=tol, abs_tol=tol)
               for k in keys)


def merge_results(parts: list[str | Path], output_dir: str | Path) -> dict:
    """Merge finished runs of the same preset made by separate processes or machines (e.g. split
    with ``--only`` and ``--set plain_seeds=...`` so that two CPU cores each run half of the grid).

    Every part's provenance (commit, clean/dirty, command, times) is kept, in order.
    The configs must agree on everything except ``methods``, ``seeds``, ``plain_seeds`` and
    ``settings`` (united; a setting of the same name must be identical), and the base-model scores
    must agree. A run id present in two parts (e.g. the plain LoRA run that each part needs for its
    strength calibration) must have the same scores there, else it is an error.
    """
    payloads = [load_result(part, name="results.json") for part in parts]  # old files too (legacy provenance)
    check_mergeable(payloads, may_differ=_MERGE_MAY_DIFFER)
    first = payloads[0]
    for p in payloads[1:]:
        for k in ("tgt_nll", "src_text_nll", "src_mcq_nll", "proxy_text_nll"):
            if not math.isclose(p["base"][k], first["base"][k], rel_tol=1e-4, abs_tol=1e-4):
                raise ValueError(f"cannot merge: base-model {k} differs ({p['base'][k]} vs {first['base'][k]})")
    settings: dict = {}
    for p in payloads:
        for st in p["config"]["settings"]:
            have = settings.setdefault(st["name"], dict(st))
            if {k: v for k, v in have.items() if k != "methods"} != {k: v for k, v in st.items() if k != "methods"}:
                raise ValueError(f"cannot merge: setting {st['name']!r} differs between parts")
            have["methods"] = _union_methods(have.get("methods", "all"), st.get("methods", "all"))
    methods, seen = [], set()
    for p in payloads:
        for m in p["config"]["methods"]:
            key = json.dumps(m, sort_keys=True)
            if key not in seen:
                seen.add(key)
                methods.append(m)
    cfg_dict = dict(first["config"], methods=methods, settings=list(settings.values()),
                    seeds=tuple(sorted({s for p in payloads for s in p["config"]["seeds"]})),
                    plain_seeds=tuple(sorted({s for p in payloads for s in p["config"]["plain_seeds"]})))
    cfg = Config(**cfg_dict)
    runs, by_id = [], {}
    for p in payloads:
        for r in p["runs"]:
            if r["id"] in by_id:
                # a plain LoRA run repeated by a part that needs its calibration: same seed, same code,
                # so it must give the same scores (deterministic CPU runs); anything else is a conflict
                if not _same_metrics(by_id[r["id"]]["metrics"], r["metrics"]):
                    raise ValueError(f"cannot merge: run {r['id']} is in more than one part with different scores")
                continue
            by_id[r["id"]] = r
            runs.append(r)
    notes = list(dict.fromkeys(n for p in payloads for n in p["notes"]))
    # a part's timing.total_s is its last process's wall time only (parts are resumed): name the runs' time
    notes.append(f"merged from {len(payloads)} parts run in parallel (their runs took "
                 + ", ".join(runs_time(p) for p in payloads) + ")")
    timing = {"total_s": max(p["timing"].get("total_s", 0) for p in payloads),
              "parts": [p["timing"] for p in payloads]}
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = dict(first["base"])
    return write_outputs(out, cfg, final=True, machine=first["machine"], provenance=provenance_of(payloads),
                         notes=notes, data=first["data"],
                         timing=timing, base=base,
                         curvature={k: v for p in payloads for k, v in p["curvature"].items()},
                         calibration=_merge_calibrations(p["calibration"] for p in payloads), runs=runs,
                         extra={"merged_from": [str(x) for x in parts],
                                "part_configs": [p["config"] for p in payloads]})
