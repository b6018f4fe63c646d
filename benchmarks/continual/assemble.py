"""The continual result payload from its runs: seed-mean matrices, summary metrics and the methods'
settings. Shared by a finished run and by the merging of parts (:mod:`.merge`)."""

from __future__ import annotations

from benchmarks.continual.config import METHOD_SPECS, Config
from benchmarks.continual.metrics import (
    aggregate,
    mean_matrices,
    run_matrices,
    summary_metrics,
)
from benchmarks.harness import model_label


def assemble_payload(cfg: Config, names: list[str], runs: list[dict], calibration: dict, base: dict, *,
                     machine: dict, provenance: list[dict], data_info: dict, timing: dict, notes: list[str]) -> dict:
    """The JSON payload (keys as in the committed ``<preset>.json``) of ``runs`` (one per method and
    seed, task names ``names``); drops the per-item samples of every column after the first two."""
    methods = [m for m in dict.fromkeys(["seq_lora", *cfg.methods]) if any(r["method"] == m for r in runs)]
    matrices, summary = {}, {}
    for m in methods:
        mr = [r for r in runs if r["method"] == m]
        per_seed = [run_matrices(r, names) for r in mr]
        matrices[m] = mean_matrices(per_seed)
        metrics = [summary_metrics(pm, r, smoothed=METHOD_SPECS[m]["family"] == "smooth")
                   for pm, r in zip(per_seed, mr)]
        summary[m] = {k: aggregate([x[k] for x in metrics]) for k in metrics[0]}
    method_info = {}
    for m in methods:
        spec = METHOD_SPECS[m]
        base_spec = METHOD_SPECS.get(spec.get("of"), spec)
        info = {"label": spec["label"], "family": spec["family"]}
        if base_spec.get("structure"):
            s = base_spec["structure"]
            info.update(structure=s, dynamics=base_spec["dynamics"], kind=cfg.curvature_kind,
                        prior_precision=calibration["prior_precision"].get(s))
            if base_spec["dynamics"] == "identity":
                info["gamma"] = cfg.gamma
            else:
                info["process_noise_q"] = calibration["process_noise"].get(s)
        info["strength"] = calibration["strength"].get(spec.get("of", m))
        method_info[m] = info
    for r in runs:  # drop bulky per-item samples from all but the first columns
        for j, col in enumerate(r["columns"]):
            if j > 1:
                r["columns"][j] = {k: v for k, v in col.items() if k != "samples"}
    return {"benchmark": "continual", "preset": cfg.preset, "device": str(machine.get("device")).split(":")[0],
            "config": cfg.to_dict(),
            "model": model_label(cfg.model), "machine": machine, "provenance": provenance,
            "tasks": names, "data": data_info, "methods": method_info, "calibration": calibration,
            "base": dict(base), "matrices": matrices, "summary": summary,
            "runs": runs, "timing": timing, "notes": notes, "complete": True}
