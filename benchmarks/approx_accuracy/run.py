"""The approximation-accuracy run: each LoRA config x anchor setting ('combo'), its parts, and the
preset driver."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks import harness
from benchmarks.approx_accuracy.config import EMP, PRESETS
from benchmarks.approx_accuracy.dense import run_dense_layer
from benchmarks.approx_accuracy.inputs import (
    direction_summary,
    fit_label,
    load_base,
    log,
    make_directions,
    make_lora_model,
    packed_batches,
    qf_matrix,
    rel_error,
)
from benchmarks.approx_accuracy.references import (
    fit_rows,
    fit_structures,
    matvec_forms,
    qf_row,
    reference_forms,
    reference_of,
)

# ---------------------------------------------------------------------------------- one combo


def run_combo(base, tok, cfg: dict, config_name: str, setting: str, device, vocab: int, progress: bool,
              result: dict) -> None:
    """Quadratic-form fidelity (+ delta_w, terms, kfac_memory, stabilization where configured)."""
    combo = [config_name, setting]
    key = f"{config_name}/{setting}"
    want_dw = combo in cfg["delta_w"]["combos"]
    want_terms = combo in cfg["terms"]["combos"]
    want_mem = combo in cfg["kfac_memory"]["combos"]
    stab = cfg["stabilization"]
    want_stab = combo == stab["combo"]
    log(f"=== {key}: building model", progress)
    model, lora, info = make_lora_model(base, cfg, cfg["lora_configs"][config_name], setting)
    info.update(config=config_name, targets=cfg["lora_configs"][config_name])
    result["combos"][key] = info
    px = cfg["proxy"]
    n_proxy = max(px["num_batches"], max(stab["num_batches"]) if want_stab else 0)
    proxy = packed_batches(tok, cfg, "proxy", px["batch_size"], px["seq_len"], n_proxy, cfg["seed"])
    main_batches = proxy[: px["num_batches"]]
    dirs = make_directions(model, lora, tok, cfg, device, want_dw, progress)
    names, D = dirs["names"], dirs["D"]
    info["directions"] = {k: v for k, v in dirs.items() if k not in ("D", "DW")}

    # exact references on every proxy batch (the main experiment uses the first num_batches of them)
    t0 = time.perf_counter()
    refs = reference_forms(model, lora.params, proxy, D, cfg["ref_chunk"])
    nb = px["num_batches"]
    q_ref = {"ggn": refs["ggn"][:nb].mean(0), "ef": refs["ef"][:nb].mean(0)}
    info["reference"] = {"method": "torch.func.jvp (one JVP per direction and batch; centred z^T H z, float64)",
                         "seconds_per_batch_jvp": refs["seconds_per_batch_jvp"], "num_batches": len(proxy),
                         "per_batch_q_ggn": refs["ggn"], "per_batch_q_ef": refs["ef"],
                         "q_ggn": q_ref["ggn"], "q_ef": q_ref["ef"]}
    log(f"{key}: exact GGN+EF forms on {len(proxy)} batches in {time.perf_counter() - t0:.0f}s "
         f"({refs['seconds_per_batch_jvp']:.2f}s per batch-JVP)", progress)
    if cfg.get("crosscheck") and not result["crosscheck"]:
        run_crosscheck(model, lora.params, main_batches[:1], D, cfg, key, "theta", refs, result, progress)
    result["qf"].append(qf_row(key, setting, "ggn", "exact EF (token)", {"kind": "empirical"}, names, q_ref["ef"],
                             q_ref["ggn"], extra={"label": "exact EF vs GGN", "nbytes": None}))

    # fitted structures vs the exact references
    fits = cfg["fits"] + [f for f in cfg.get("extra_fits", {}).get(key, []) if f not in cfg["fits"]]
    result["qf"] += fit_rows(model, lora, main_batches, cfg["structures"], fits, D, names, q_ref, cfg, key,
                              setting, vocab, result, "qf")
    log(f"{key}: fitted structures done", progress)
    if want_mem:
        run_kfac_memory(model, lora, main_batches, D, names, q_ref["ef"], cfg, key, result)
        log(f"{key}: kfac memory variants done", progress)
    if want_stab:
        run_stabilization(model, lora, proxy, refs, D, names, cfg, key, result, progress)
    if want_dw:
        run_delta_w(model, lora, main_batches, dirs["DW"], names, cfg, key, setting, vocab, result, progress)
    if want_terms:
        run_terms(model, lora, tok, cfg, key, setting, D, names, result, progress)
    del model, lora, dirs, D
    harness.release_memory(device)


def run_crosscheck(model, params, batches, D, cfg, key, space, refs, result, progress) -> None:
    """The JVP-based references against curvlinops' GGN/EF operators (matvecs) on a few directions."""
    k = max(1, int(cfg["crosscheck"]))
    out = {"combo": key, "space": space, "num_dirs": k, "num_batches": len(batches)}
    for kind in ("ggn", "ef"):
        t0 = time.perf_counter()
        qm = matvec_forms(model, params, batches, D[:, :k], kind, k).mean(0)
        out[f"{kind}_seconds_per_batch_matvec"] = (time.perf_counter() - t0) / (k * len(batches))
        qj = refs[kind][: len(batches)].mean(0)[:k]
        out[f"{kind}_max_rel_diff"] = max(abs(float(a) / float(b) - 1) for a, b in zip(qj, qm))
    result["crosscheck"].append(out)
    log(f"{key}: cross-check vs curvlinops operators: GGN {out['ggn_max_rel_diff']:.1e}, EF "
         f"{out['ef_max_rel_diff']:.1e} ({out['ggn_seconds_per_batch_matvec']:.1f}s per GGN batch-matvec)", progress)


def run_kfac_memory(model, lora, batches, D, names, q_ef, cfg, key, result) -> None:
    """Memory-saving variants of the K-FAC family (deterministic kind="empirical", so every
    difference is the variant's own): shared input factors (the default) vs not shared, and bf16
    factors (used as stored, i.e. bf16 arithmetic, and upcast to fp32 after fitting)."""
    for structure in ("kfac", "kfac_tridiag"):
        variants = [("fp32, shared inputs (default)", {}), ("fp32, unshared inputs", {"share_inputs": False}),
                    ("bf16 factors", {"factor_dtype": torch.bfloat16})]
        if structure == "kfac_tridiag":
            variants = [v for v in variants if "unshared" not in v[0]]  # stacked factors, nothing shared
        base = None
        for label, extra in variants:
            try:
                (curv, secs), = fit_structures(model, lora, batches, [structure], EMP, cfg, **extra).values()
            except Exception as err:  # noqa: BLE001
                result["skipped"].append({"where": f"kfac_memory {key}", "structure": structure, "variant": label,
                                          "error": f"{type(err).__name__}: {err}"})
                continue
            outs = [(label, qf_matrix(curv, D), curv.nbytes)]
            if "bf16" in label:
                outs.append(("bf16 factors, upcast to fp32 for use", qf_matrix(curv.to(dtype=torch.float32), D),
                             curv.nbytes))
            for lab, q, nbytes in outs:
                if base is None:
                    base = (q, nbytes)
                vs_default = [rel_error(float(a), float(b)) for a, b in zip(q, base[0])]
                result["kfac_memory"].append({
                    "combo": key, "structure": structure, "variant": lab, "nbytes": nbytes,
                    "nbytes_vs_default": nbytes / base[1],
                    "max_abs_rel_diff_vs_default": max(abs(x) for x in vs_default if x is not None),
                    "vs_exact_ef": direction_summary(names, [rel_error(float(a), float(b)) for a, b in zip(q, q_ef)]),
                    "fit_seconds": secs})


def run_terms(model, lora, tok, cfg, key, setting, D, names, result, progress) -> None:
    """terms="sequence" vs terms="token" on a few tokens, each against the exact references on them."""
    tc = cfg["terms"]
    batches = packed_batches(tok, cfg, "proxy", tc["batch_size"], tc["seq_len"], tc["num_batches"], cfg["seed"] + 3)
    refs = reference_forms(model, lora.params, batches, D, cfg["ref_chunk"])
    q_ref = {k: refs[k].mean(0) for k in ("ggn", "ef")}
    ntok = sum(b["input_ids"].shape[0] * (b["input_ids"].shape[1] - 1) for b in batches)
    for terms in ("sequence", "token"):
        t0 = time.perf_counter()
        result["terms"] += fit_rows(model, lora, batches, tc["structures"], tc["fits"], D, names, q_ref,
                                     dict(cfg, auto_ggn=False), key, setting, 0, result, "terms", terms=terms,
                                     extra_row={"num_tokens": ntok})
        log(f"{key}: terms={terms} fits on {ntok} tokens done in {time.perf_counter() - t0:.0f}s", progress)


def run_stabilization(model, lora, proxy, refs, D, names, cfg, key, result, progress) -> None:
    """Fits on the first n of the proxy batches, n in num_batches, vs the fit on all of them and vs the
    exact GGN / EF on the union (also: the exact curvature on the first n batches vs the union)."""
    stab = cfg["stabilization"]
    ns = stab["num_batches"]
    nmax = max(ns)
    union = {k: refs[k][:nmax].mean(0) for k in ("ggn", "ef")}
    out = {"combo": key, "num_batches": ns, "batch_shape": [cfg["proxy"]["batch_size"], cfg["proxy"]["seq_len"]],
           "curves": []}
    for kind in ("ggn", "ef"):
        if not any(reference_of(f) == kind for f in stab["fits"]):
            continue
        per_n = []
        for n in ns:
            qn = refs[kind][:n].mean(0)
            per_n.append(direction_summary(names, [rel_error(float(a), float(b)) for a, b in zip(qn, union[kind])]))
        out["curves"].append({"label": f"exact {kind.upper()} on n batches", "reference": kind, "vs_union": per_n,
                              "vs_full_fit": None})
    for fit in stab["fits"]:
        ref = reference_of(fit)
        qs: dict[str, list[Tensor]] = {}
        for n in ns:
            t0 = time.perf_counter()
            for structure, (curv, _) in fit_structures(model, lora, proxy[:n], stab["structures"], fit, cfg).items():
                qs.setdefault(structure, []).append(qf_matrix(curv, D))
            log(f"{key}: stabilization {fit_label('*', fit)} n={n} done in {time.perf_counter() - t0:.0f}s",
                 progress)
        for structure, qlist in qs.items():
            vs_full = [direction_summary(names, [rel_error(float(a), float(b)) for a, b in zip(q, qlist[-1])])
                       for q in qlist]
            vs_union = [direction_summary(names, [rel_error(float(a), float(b)) for a, b in zip(q, union[ref])])
                        for q in qlist]
            out["curves"].append({"label": fit_label(structure, fit), "structure": structure, "fit": fit,
                                  "reference": ref, "q": [q.tolist() for q in qlist], "vs_full_fit": vs_full,
                                  "vs_union": vs_union})
    out["union_q"] = {k: v.tolist() for k, v in union.items()}
    result["stabilization"] = out


def run_delta_w(model, lora, batches, DW, names, cfg, key, setting, vocab, result, progress) -> None:
    """kfac_delta_w vs the exact GGN/EF of the base weights (= the Delta-W GGN/EF) in Delta-W space."""
    dc = cfg["delta_w"]
    weights = [layer.base.weight for layer in lora.layers]
    t0 = time.perf_counter()
    refs = reference_forms(model, weights, batches, DW, dc["ref_chunk"])
    q_ref = {k: refs[k].mean(0) for k in ("ggn", "ef")}
    result["delta_w_reference"][key] = {"num_params": int(DW.shape[0]),
                                        "seconds_per_batch_jvp": refs["seconds_per_batch_jvp"],
                                        "q_ggn": q_ref["ggn"], "q_ef": q_ref["ef"]}
    if cfg.get("crosscheck") and not any(c["space"] == "delta_w" for c in result["crosscheck"]):
        run_crosscheck(model, weights, batches[:1], DW, cfg, key, "delta_w", refs, result, progress)
    result["delta_w"].append(qf_row(key, setting, "ggn", "exact EF (token)", {"kind": "empirical"}, names,
                                  q_ref["ef"], q_ref["ggn"], extra={"label": "exact EF vs GGN", "space": "delta_w"}))
    result["delta_w"] += fit_rows(model, lora, batches, ["kfac_delta_w"], dc["fits"], DW, names, q_ref, cfg, key,
                                   setting, vocab, result, "delta_w", extra_row={"space": "delta_w"})
    log(f"{key}: kfac_delta_w vs exact Delta-W references done in {time.perf_counter() - t0:.0f}s "
         f"({DW.shape[0]:,} Delta-W parameters)", progress)


# ---------------------------------------------------------------------------------- driver


def resolve_config(preset: str | dict, **overrides) -> dict:
    cfg = copy.deepcopy(PRESETS[preset] if isinstance(preset, str) else preset)
    cfg["preset"] = preset if isinstance(preset, str) else cfg.get("preset", "custom")
    for k, v in overrides.items():
        if v is not None:
            cfg[k] = v
    return cfg


def run_benchmark(preset: str | dict = "small", device: str | None = None, progress: bool = True,
                  model_path: str | None = None, parts: list[str] | None = None, **overrides) -> dict:
    """Run the benchmark and return the result dict (see module docstring).

    ``parts``: subset of ``["qf", "dense"]`` (default both; ``qf`` includes delta_w, terms,
    kfac_memory and stabilization as configured in the preset).
    """
    cfg = resolve_config(preset, **overrides)
    dev = harness.resolve_device(device or cfg["device"])
    parts = parts or ["qf", "dense"]
    provenance = harness.Provenance(preset=cfg["preset"], device=dev)
    torch.manual_seed(cfg["seed"])
    t_start = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "approx_accuracy", "preset": cfg["preset"], "description": cfg["description"],
        "device": dev.type, "machine": harness.machine_info(dev), "config": cfg, "parts": parts,
        "combos": {}, "crosscheck": [], "qf": [], "delta_w": [], "delta_w_reference": {}, "terms": [],
        "kfac_memory": [], "stabilization": None, "dense_layer": None, "skipped": [], "timings": {}, "notes": [],
    }
    log(f"loading model ({cfg['model']}) on {dev}", progress)
    t0 = time.perf_counter()
    base, tok = load_base(cfg, dev, model_path)
    vocab = base.config.vocab_size
    result["model"] = {"name": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)" if cfg["model"] == "smollm2"
                       else "tiny random Llama", "vocab_size": vocab, "num_layers": base.config.num_hidden_layers,
                       "hidden_size": base.config.hidden_size, "attn_implementation": "eager",
                       "dtype": str(next(base.parameters()).dtype), "path": model_path}
    result["timings"]["load_s"] = time.perf_counter() - t0
    if vocab > 4096:
        result["notes"].append(f"kind='ggn' fits skipped: one backward per class at vocab {vocab} "
                               "(the exact GGN references use curvlinops matvecs instead)")
    if "qf" in parts:
        for config_name, setting in cfg["combos"]:
            t0 = time.perf_counter()
            run_combo(base, tok, cfg, config_name, setting, dev, vocab, progress, result)
            result["timings"][f"combo {config_name}/{setting}_s"] = time.perf_counter() - t0
            log(f"{config_name}/{setting} done in {time.perf_counter() - t0:.0f}s", progress)
    if "dense" in parts:
        t0 = time.perf_counter()
        run_dense_layer(base, tok, cfg, dev, vocab, progress, result)
        result["timings"]["dense_layer_s"] = time.perf_counter() - t0
    result["timings"]["total_s"] = time.perf_counter() - t_start
    result["provenance"] = [provenance.record()]
    return result


_LIST_SECTIONS = ("crosscheck", "qf", "delta_w", "terms", "kfac_memory", "skipped")
_SINGLE_SECTIONS = ("stabilization", "dense_layer")


def merge_results(parts: list[str | Path]) -> dict:
    """One result from parts of a preset run separately (``--parts qf`` and ``--parts dense``, e.g. on
    two cores). The parts must have the same settings and model, and each part (``qf`` / ``dense``) may
    come from one of them only; lists of rows are concatenated, the timings add up."""
    def combine(payloads: list[dict]) -> dict:
        ran = [name for p in payloads for name in p["parts"]]
        twice = sorted({name for name in ran if ran.count(name) > 1})
        if twice:
            raise ValueError(f"cannot merge: part(s) {twice} ran in more than one of the given results")
        for p in payloads[1:]:
            if p["model"] != payloads[0]["model"]:
                raise ValueError(f"cannot merge: the model differs ({p['model']} vs {payloads[0]['model']})")
        merged = copy.deepcopy(payloads[0])
        merged["parts"] = ran
        for p in payloads[1:]:
            for key in _LIST_SECTIONS:
                merged[key] = merged.get(key, []) + p.get(key, [])
            for key in ("combos", "delta_w_reference"):
                merged[key] = {**merged.get(key, {}), **p.get(key, {})}
            for key in _SINGLE_SECTIONS:
                if p.get(key) is not None:
                    merged[key] = p[key]
            merged["notes"] = list(dict.fromkeys(merged.get("notes", []) + p.get("notes", [])))
            for key, seconds in p.get("timings", {}).items():
                merged["timings"][key] = merged["timings"].get(key, 0.0) + seconds
        return merged

    return harness.merge_parts(parts, combine)
