"""Merging parts of one continual preset run separately, split by method (``--set methods=[...]``).

Every part runs plain sequential LoRA first (it calibrates the strengths on the first seed), so the
parts must agree on it exactly, and on everything but their method lists (same seeds, tasks, data,
base-model scores, calibration). The merged payload is what one run of all the methods gives; every
part's provenance is kept.
"""

from __future__ import annotations

import math
from pathlib import Path

from benchmarks.continual.assemble import assemble_payload
from benchmarks.continual.config import config_from_settings
from benchmarks.continual.metrics import run_matrices
from benchmarks.harness import merge_parts

_CALIBRATION_TABLES = ("mean_diag_C1", "prior_precision", "process_noise", "strength", "penalty_at_plain_theta2")


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _merge_calibration(payloads: list[dict]) -> dict:
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in payloads[0]["calibration"].items()}
    for p in payloads[1:]:
        cal = p["calibration"]
        for key in ("rule", "calibrated_on_seed", "plain_task2_loss"):
            if key in cal and key in merged and not _same(cal[key], merged[key]):
                raise ValueError(f"cannot merge: calibration {key} differs ({cal[key]!r} vs {merged[key]!r})")
        for table in _CALIBRATION_TABLES:
            for name, value in cal.get(table, {}).items():
                have = merged.setdefault(table, {}).get(name)
                if have is not None and not _same(have, value):
                    raise ValueError(f"cannot merge: calibration {table}[{name!r}] differs ({value} vs {have})")
                merged[table][name] = value
        for key, value in cal.items():
            merged.setdefault(key, value)
    return merged


def merge_results(parts: list[str | Path], *, name: str | None = None) -> dict:
    """The merged payload of ``parts`` (result files or folders; ``name``: the JSON inside a folder,
    e.g. ``small.json``)."""
    def combine(payloads: list[dict]) -> dict:
        first = payloads[0]
        names = first["tasks"]
        for p in payloads[1:]:
            if p["tasks"] != names:
                raise ValueError(f"cannot merge: task sequences differ ({p['tasks']} vs {names})")
            for key in ("src_text_nll", "mcq_acc", "mcq_nll"):
                if not _same(float(p["base"][key]), float(first["base"][key])):
                    raise ValueError(f"cannot merge: base-model {key} differs ({p['base'][key]} vs "
                                     f"{first['base'][key]})")
        runs, seen = [], {}
        for p in payloads:
            for r in p["runs"]:
                key = (r["method"], r["seed"])
                if key in seen:  # plain sequential LoRA, run by every part: deterministic, so it must agree
                    if run_matrices(seen[key], names) != run_matrices(r, names):
                        raise ValueError(f"cannot merge: {r['method']} seed {r['seed']} is in more than one part "
                                         "with different scores")
                    continue
                seen[key] = r
                runs.append(r)
        methods = list(dict.fromkeys(m for p in payloads for m in p["config"]["methods"]))
        cfg = config_from_settings({**first["config"], "methods": methods})
        timing = {"total_s": max(p["timing"].get("total_s", 0.0) for p in payloads),
                  "parts": [p["timing"] for p in payloads]}
        notes = list(dict.fromkeys(n for p in payloads for n in p["notes"]))
        notes.append(f"merged from {len(payloads)} parts run separately (split by method)")
        return assemble_payload(cfg, names, runs, _merge_calibration(payloads), first["base"],
                                machine=first["machine"], provenance=[], data_info=first["data"], timing=timing,
                                notes=notes)

    return merge_parts(parts, combine, name=name, may_differ=("methods",))
