"""The cost benchmark's run: models, per-model measurement, sweeps, the preset loop, target checks
and the merging of parts run separately (``--models``)."""

from __future__ import annotations

import copy
import os
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from benchmarks import harness
from benchmarks.cost.config import (
    ANCHOR,
    FULL_DEPTH,
    PENALTY_STRUCTURES,
    PRESETS,
    PRETTY,
    TARGETS,
    WIDTH_PENALTIES,
)
from benchmarks.cost.measure import (
    Ctx,
    backpack_kfac_check,
    curvlinops_kfac,
    error_record,
    fit_entry,
    fit_plan,
    fwd_bwd_fn,
    ggn_matvec,
    laplace_torch_fits,
    lora_step_fn,
    penalty_overheads,
    ratio,
    restore,
    snapshot,
    strip_result,
    zero_grads,
)


# ============================================================================================ models
def model_label(spec: dict, config) -> str:
    name = PRETTY.get(spec["key"], spec["key"])
    n = config.num_hidden_layers
    if spec["source"] == "gguf":
        return f"{name}-Instruct (real weights, GGUF Q4_1 dequantized), {n} layers"
    if spec["source"] == "tiny":
        return f"{spec['key']} (random weights, hidden {config.hidden_size}, {n} layers)"
    full = FULL_DEPTH.get(spec["key"])
    depth = f"{n} of {full} layers" if full and n != full else f"{n} layers"
    return f"{name} shape (random weights, {depth})"


def build_base_model(spec: dict, cfg: dict, device: torch.device, dtype: torch.dtype):
    """The base causal LM (no LoRA yet), in eval mode, on ``device`` in ``dtype``: the packaged GGUF
    (``source="gguf"``), a tiny Llama of ``cfg["tiny_configs"]`` (``"tiny"``), or a random-weight model
    with a public shape, truncated to ``spec["layers"]`` decoder layers when given (``"random"``)."""
    if spec["source"] == "gguf":
        model, _ = harness.load_base_model("smollm2", device=device, dtype=dtype)
        return model
    if spec["source"] == "tiny":
        from lalora_curv.experiments.models import tiny_llama

        tc = dict(cfg["tiny_configs"][spec["key"]])
        return tiny_llama(tc.pop("vocab_size"), tc.pop("hidden_size"), tc.pop("num_layers"), seed=0, dtype=dtype,
                          **tc).to(device)
    return harness.random_shape_llama(spec["key"], device=device, dtype=dtype, layers=spec.get("layers"))


def add_lora(model, r: int, alpha: float, targets):
    from lalora_curv.experiments.models import add_lora as _add_lora

    return _add_lora(model, r=r, alpha=alpha, target_modules=tuple(targets))


def make_batches(vocab: int, batch: int, seq: int, n: int, device, seed: int = 0) -> list[dict]:
    """Unpadded, fully labelled batches of random token ids (curvlinops cannot mask, SEMANTICS §6)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def measure_model(spec: dict, ctx: Ctx, sweeps: dict) -> dict:
    """All measurements of one model config (plus the sweeps that name it). Returns a JSON-able dict."""
    cfg, device, dtype = ctx.cfg, ctx.device, ctx.dtype
    from lalora_curv import LoRAParams, fit_curvature

    t_start = time.perf_counter()
    base = build_base_model(spec, cfg, device, dtype)
    config = base.config
    vocab = config.vocab_size
    n_base = sum(p.numel() for p in base.parameters())
    model = add_lora(base, cfg["r"], cfg["alpha"], cfg["target_modules"])
    model.eval()
    lora = LoRAParams.from_model(model)
    nb = int(cfg["fit_batches"])
    batches = make_batches(vocab, spec["batch"], spec["seq"], nb, device)
    full = spec["scope"] == "all"
    extras = spec["key"] in cfg.get("extras_models", [])
    rec: dict[str, Any] = {
        "key": spec["key"], "label": model_label(spec, config), "source": spec["source"],
        "random_weights": spec["source"] != "gguf", "scope": spec["scope"],
        "config": {k: getattr(config, k, None) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                         "num_hidden_layers", "num_attention_heads",
                                                         "num_key_value_heads", "tie_word_embeddings")},
        "base_params": n_base, "dtype": str(dtype),
        "lora": {"r": cfg["r"], "alpha": cfg["alpha"], "target_modules": list(cfg["target_modules"]),
                 "numel": lora.numel, "layers": len(lora.layers), "param_dtype": str(lora.params[0].dtype)},
        "batch": {"batch_size": spec["batch"], "seq_len": spec["seq"], "batches": nb,
                  "tokens_per_batch": spec["batch"] * spec["seq"], "data": "random token ids, unpadded, "
                                                                            "labels = input_ids"},
        "load_s": time.perf_counter() - t_start, "loadavg_start": _loadavg(),
    }

    # ---- baselines
    fwd_bwd = fwd_bwd_fn(model, batches)
    zero = lambda: zero_grads(lora.params)  # noqa: E731
    fb = ctx.timed("fwd+bwd", fwd_bwd, setup=zero, nb=nb)
    zero_grads(lora.params)
    opt = torch.optim.AdamW(lora.params, lr=1e-5)
    snap = snapshot(lora.params)
    step = ctx.timed("LoRA step", lora_step_fn(model, batches, opt), nb=nb)
    restore(lora.params, snap)
    rec["baseline"] = {"fwd_bwd": strip_result(fb), "lora_step": strip_result(step)}
    fb_s, step_s = fb.get("per_batch_s"), step.get("per_batch_s")

    # ---- our fits
    fits, curvs = [], {}
    for structure, kind, variant in fit_plan(full, dtype):
        # the preset's rank where the structure has one; a variant's own option is passed unfiltered
        opts = {**harness.fit_options_for(structure, kind, rank=cfg["lowrank_rank"]), **variant}
        res = ctx.timed(f"fit {structure}/{kind}" + (f" {variant}" if variant else ""),
                        lambda s=structure, k=kind, o=opts: fit_curvature(model, batches, structure=s, kind=k,
                                                                          progress=False, lora=lora, **o),
                        reference=fwd_bwd, setup=zero, nb=nb)
        entry = fit_entry(res, fb, structure, kind)
        if variant:
            entry["variant"] = {k: str(v).replace("torch.", "") for k, v in variant.items()}
        fits.append(entry)
        if res.get("ok") and kind == "empirical" and not variant:
            curvs[structure] = res["_result"]
        zero_grads(lora.params)
    rec["fits"] = fits

    # ---- curvlinops
    cl = curvlinops_kfac(ctx, model, lora, batches, fwd_bwd)
    ours = next((f for f in fits if f["structure"] == "kfac" and f["kind"] == "empirical" and f.get("ok")
                 and not f.get("variant")), None)
    if cl.get("ok"):
        cl["ratio_fwd_bwd"] = ratio(cl["per_batch_s"], fb_s)
        cl["mem_ratio_fwd_bwd"] = ratio(cl.get("peak_delta_bytes"), fb.get("peak_delta_bytes"))
    cmp = {}
    if ours is not None and cl.get("ok"):
        ours_elems = sum(t.numel() for t in curvs["kfac"].state_tensors().values()) if "kfac" in curvs else None
        cmp = {"time_ours_over_theirs": ratio(ours["per_batch_s"], cl["per_batch_s"]),
               "time_ours_over_theirs_paired": ratio(ours.get("paired_ratio"), cl.get("paired_ratio")),
               "state_bytes_ours": ours["nbytes"], "state_bytes_theirs": cl["factor_bytes"],
               "memory_ours_over_theirs": ratio(ours["nbytes"], cl["factor_bytes"]),
               "memory_ours_over_theirs_same_dtype": ratio(ours_elems, cl["factor_elements"]),
               "ours_factor_dtype": str(curvs["kfac"].dtype) if "kfac" in curvs else None,
               "theirs_factor_dtype": cl.get("factor_dtype"),
               "peak_delta_ours_over_theirs": ratio(ours.get("peak_delta_bytes"), cl.get("peak_delta_bytes"))}
    rec["curvlinops"] = {"kfac": cl, "ours_vs_curvlinops_kfac": cmp}
    zero_grads(lora.params)
    if extras:
        gm = ggn_matvec(ctx, model, lora, batches, fwd_bwd)
        if gm.get("ok"):
            gm["ratio_fwd_bwd"] = ratio(gm["per_batch_s"], fb_s)
        rec["curvlinops"]["ggn_matvec"] = gm
        zero_grads(lora.params)

        # ---- laplace-torch
        lap = laplace_torch_fits(ctx, model, batches, fwd_bwd, vocab, fb_s)
        for e in lap:
            if e.get("ok"):
                e["ratio_fwd_bwd"] = ratio(e["per_batch_s"], fb_s)
        rec["laplace_torch"] = lap
        zero_grads(lora.params)
        harness.release_memory(device)

    # ---- penalty overhead
    rec["penalty"] = penalty_overheads(ctx, model, lora, batches, opt, curvs,
                                PENALTY_STRUCTURES if full else WIDTH_PENALTIES, step_s)
    rec["penalty_note"] = ("penalty_pct_of_step = median time of LaplacePenalty()+backward inside the step / "
                           "plain LoRA step; step_overhead_pct = (step with penalty / plain step - 1) * 100, noisier")
    del curvs
    harness.release_memory(device)

    # ---- seq-length sweep (same model)
    if sweeps.get("seq") and sweeps["seq"]["model"] == spec["key"]:
        with ctx.sweep_repeats():
            rec["seq_sweep"] = _seq_sweep(ctx, model, lora, vocab, spec, sweeps["seq"], rec)
        harness.release_memory(device)

    # ---- BackPACK (last: our backpack backend leaves (inactive) BackPACK hooks on the LoRA modules)
    if extras:
        bp = {"extend_converter_kfac": backpack_kfac_check(ctx, model, batches)}
        res = ctx.timed("fit diag/empirical backpack",
                        lambda: fit_curvature(model, batches, structure="diag", kind="empirical", backend="backpack",
                                              progress=False, lora=lora), reference=fwd_bwd, setup=zero, nb=nb)
        bp["diag_batchgrad"] = fit_entry(res, fb, "diag", "empirical", backend="backpack")
        rec["backpack"] = bp
        zero_grads(lora.params)

    # ---- rank sweep (re-wraps the base model; last)
    if sweeps.get("rank") and sweeps["rank"]["model"] == spec["key"]:
        del opt, lora
        with ctx.sweep_repeats():
            rec["rank_sweep"] = _rank_sweep(ctx, model, spec, batches, sweeps["rank"], rec)
    rec["loadavg_end"] = _loadavg()
    rec["wall_s"] = time.perf_counter() - t_start
    return rec


def _seq_sweep(ctx, model, lora, vocab, spec, sweep, main: dict) -> dict:
    from lalora_curv import fit_curvature

    points = []
    for seq in sweep["seqs"]:
        if seq == spec["seq"]:  # the main measurement: same model, batches and settings
            fits = {f["structure"]: f for f in main["fits"] if f["kind"] == "empirical"}
            points.append({"seq_len": seq, "tokens_per_batch": spec["batch"] * seq, "reused_main": True,
                           "fwd_bwd": main["baseline"]["fwd_bwd"],
                           "fits": {s: fits[s] for s in sweep["structures"] if s in fits},
                           "curvlinops_kfac": main["curvlinops"]["kfac"] if sweep.get("curvlinops") else None})
            continue
        batches = make_batches(vocab, spec["batch"], seq, int(ctx.cfg["fit_batches"]), ctx.device, seed=seq)
        nb = len(batches)
        fwd_bwd = fwd_bwd_fn(model, batches)
        zero = lambda lora=lora: zero_grads(lora.params)  # noqa: E731
        fb = ctx.timed(f"seq {seq}: fwd+bwd", fwd_bwd, setup=zero, nb=nb)
        p = {"seq_len": seq, "tokens_per_batch": spec["batch"] * seq, "fwd_bwd": strip_result(fb), "fits": {}}
        for s in sweep["structures"]:
            opts = harness.fit_options_for(s, "empirical", rank=ctx.cfg["lowrank_rank"])  # as the main fits
            res = ctx.timed(f"seq {seq}: fit {s}",
                            lambda s=s, batches=batches, opts=opts: fit_curvature(
                                model, batches, structure=s, kind="empirical", progress=False, lora=lora, **opts),
                            reference=fwd_bwd, setup=zero, nb=nb)
            p["fits"][s] = fit_entry(res, fb, s, "empirical")
        if sweep.get("curvlinops"):
            cl = curvlinops_kfac(ctx, model, lora, batches, fwd_bwd)
            if cl.get("ok"):
                cl["ratio_fwd_bwd"] = ratio(cl["per_batch_s"], fb.get("per_batch_s"))
            p["curvlinops_kfac"] = cl
        zero_grads(lora.params)
        points.append(p)
    return {"model": spec["key"], "batch_size": spec["batch"], "points": points}


def _rank_sweep(ctx, model, spec, batches, sweep, main: dict) -> dict:
    from lalora_curv import LoRAParams, fit_curvature

    cfg = ctx.cfg
    base = model.unload()  # peft: the base model without LoRA layers (not merged)
    del model
    harness.release_memory(ctx.device)
    points = []
    nb = len(batches)
    for r in sweep["ranks"]:
        if r == cfg["r"] and 2 * r == cfg["alpha"]:  # the main measurement
            fits = {f["structure"]: f for f in main["fits"] if f["kind"] == "empirical"}
            points.append({"r": r, "alpha": 2 * r, "lora_numel": main["lora"]["numel"], "reused_main": True,
                           "fwd_bwd": main["baseline"]["fwd_bwd"], "lora_step": main["baseline"]["lora_step"],
                           "fits": {s: fits[s] for s in sweep["structures"] if s in fits},
                           "penalty": [p for p in main["penalty"] if p["structure"] in sweep["structures"]]})
            continue
        model = add_lora(base, r, 2 * r, cfg["target_modules"])
        model.eval()
        lora = LoRAParams.from_model(model)
        fwd_bwd = fwd_bwd_fn(model, batches)
        zero = lambda lora=lora: zero_grads(lora.params)  # noqa: E731
        fb = ctx.timed(f"rank {r}: fwd+bwd", fwd_bwd, setup=zero, nb=nb)
        opt = torch.optim.AdamW(lora.params, lr=1e-5)
        snap = snapshot(lora.params)
        st = ctx.timed(f"rank {r}: LoRA step", lora_step_fn(model, batches, opt), nb=nb)
        restore(lora.params, snap)
        p = {"r": r, "alpha": 2 * r, "lora_numel": lora.numel, "fwd_bwd": strip_result(fb),
             "lora_step": strip_result(st), "fits": {}}
        curvs = {}
        for s in sweep["structures"]:
            opts = harness.fit_options_for(s, "empirical", rank=cfg["lowrank_rank"])  # as the main fits
            res = ctx.timed(f"rank {r}: fit {s}",
                            lambda s=s, model=model, lora=lora, opts=opts: fit_curvature(
                                model, batches, structure=s, kind="empirical", progress=False, lora=lora, **opts),
                            reference=fwd_bwd, setup=zero, nb=nb)
            p["fits"][s] = fit_entry(res, fb, s, "empirical")
            if res.get("ok"):
                curvs[s] = res["_result"]
        p["penalty"] = penalty_overheads(ctx, model, lora, batches, opt, curvs, sweep["structures"],
                                         st.get("per_batch_s"))
        points.append(p)
        del curvs, opt, lora, zero
        base = model.unload()
        del model
        harness.release_memory(ctx.device)
    return {"model": spec["key"], "batch_size": spec["batch"], "seq_len": spec["seq"], "alpha": "2r (scaling 2)",
            "points": points}


def _loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


# ============================================================================================ run
def resolve_dtype_cfg(cfg: dict) -> torch.dtype:
    return harness.resolve_dtype(cfg.get("_dtype") or cfg["dtype"])


def _count_measurements(cfg: dict) -> int:
    n = 0
    for spec in cfg["models"]:
        full = spec["scope"] == "all"
        n += 2 + len(fit_plan(full, resolve_dtype_cfg(cfg))) + 1 + len(
            PENALTY_STRUCTURES if full else WIDTH_PENALTIES)
        if spec["key"] in cfg.get("extras_models", []):
            n += 2 + 5 + 2  # ggn matvec (+ eager retry), laplace configs, backpack check + backpack diag
        seq = cfg.get("seq_sweep")
        if seq and seq["model"] == spec["key"]:
            n += len([t for t in seq["seqs"] if t != spec["seq"]]) * (
                1 + len(seq["structures"]) + (1 if seq.get("curvlinops") else 0))
        rank = cfg.get("rank_sweep")
        if rank and rank["model"] == spec["key"]:
            n += len([r for r in rank["ranks"] if not (r == cfg["r"] and 2 * r == cfg["alpha"])]) * (
                2 + 2 * len(rank["structures"]))
    return n


def run_benchmark(preset: str | dict = "small", device: str | None = None, dtype: str | None = None,
                  progress: bool = True, models: list[str] | None = None, threads: int | None = None) -> dict:
    """Run a preset (name or config dict); returns the JSON-able result (no files written).

    ``device``/``dtype`` override the preset's; ``models`` keeps only these model keys; ``threads``
    sets ``torch.set_num_threads`` for the run (CPU; restored afterwards).
    """
    if threads:
        saved_threads = torch.get_num_threads()
        torch.set_num_threads(int(threads))
        try:
            return run_benchmark(preset, device, dtype, progress, models, None)
        finally:
            torch.set_num_threads(saved_threads)
    cfg = copy.deepcopy(PRESETS[preset] if isinstance(preset, str) else preset)
    name = preset if isinstance(preset, str) else cfg.get("name", "custom")
    cfg["name"] = name
    dev = harness.resolve_device(device or cfg["device"])
    dt = harness.resolve_dtype(dtype or cfg["dtype"])
    if models:
        cfg["models"] = [m for m in cfg["models"] if m["key"] in models]
    cfg["_dtype"] = str(dt).replace("torch.", "")
    cfg["_device"] = dev.type
    provenance = harness.Provenance(preset=name, device=dev)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=_count_measurements(cfg), desc=f"cost [{name}]", unit="meas")
    ctx = Ctx(cfg, dev, dt, bar)
    sweeps = {"seq": cfg.get("seq_sweep"), "rank": cfg.get("rank_sweep")}
    result: dict[str, Any] = {
        "benchmark": "cost", "preset": name, "device": dev.type, "dtype": str(dt).replace("torch.", ""),
        "machine": harness.machine_info(dev), "config": {k: v for k, v in cfg.items()},
        "targets": TARGETS, "anchor": ANCHOR, "loadavg_start": _loadavg(), "models": [],
    }
    try:
        for spec in cfg["models"]:
            try:
                rec = measure_model(spec, ctx, sweeps)
            except Exception as exc:  # e.g. out of memory while loading: keep the other models
                rec = {"key": spec["key"], "label": spec["key"], **error_record(exc),
                       "traceback": traceback.format_exc()[-4000:]}
            result["models"].append(rec)
            harness.release_memory(dev)
    finally:
        if bar is not None:
            bar.close()
    result["loadavg_end"] = _loadavg()
    result["wall_s"] = time.perf_counter() - t0
    result["target_checks"] = check_targets(result)
    result["provenance"] = [provenance.record()]
    return result


def merge_results(parts: list[str | Path]) -> dict:
    """One result from parts of a preset run separately (e.g. ``--models`` per process or machine).

    The parts must agree on everything but their model list (same preset, device, dtype, settings);
    a model measured in two parts is refused (which one would count?). Models keep the parts' order;
    the targets are checked again on the union; ``wall_s`` is the sum of the parts' wall times.
    """
    def combine(payloads: list[dict]) -> dict:
        for p in payloads[1:]:
            for key in ("device", "dtype"):
                if p[key] != payloads[0][key]:
                    raise ValueError(f"cannot merge: {key} differs ({p[key]!r} vs {payloads[0][key]!r})")
        merged = copy.deepcopy(payloads[0])
        keys = [m["key"] for p in payloads for m in p["models"]]
        duplicated = sorted({k for k in keys if keys.count(k) > 1})
        if duplicated:
            raise ValueError(f"cannot merge: models {duplicated} were measured in more than one part")
        merged["models"] = [m for p in payloads for m in p["models"]]
        merged["config"]["models"] = [s for p in payloads for s in p["config"]["models"]]
        merged["wall_s"] = sum(p["wall_s"] for p in payloads)
        merged["loadavg_end"] = payloads[-1].get("loadavg_end")
        merged["target_checks"] = check_targets(merged)
        return merged

    return harness.merge_parts(parts, combine, may_differ=("models",))


def check_targets(result: dict) -> list[dict]:
    """Each target vs each model's measurement (value, threshold, holds), with its applicability."""
    gpu_bf16 = result["device"] == "cuda" and result["dtype"] == "bfloat16"
    cond = "bf16 on GPU" if gpu_bf16 else f"{result['dtype']} on {result['device']} (target is stated for bf16 GPU)"
    out = []
    for m in result["models"]:
        if not m.get("fits"):
            continue
        label = m["label"]
        for f in m["fits"]:
            if (f["structure"] in TARGETS["fit_ratio"]["structures"] and f["kind"] == "empirical" and f.get("ok")
                    and not f.get("variant")):
                v = f.get("paired_ratio") or f.get("ratio_fwd_bwd")
                out.append({"target": "fit_ratio", "model": label, "what": f"{f['structure']} fit / fwd+bwd",
                            "value": v, "threshold": TARGETS["fit_ratio"]["max"], "holds": v is not None and v <= 1.15,
                            "conditions": cond})
        cmp = m.get("curvlinops", {}).get("ours_vs_curvlinops_kfac") or {}
        if cmp:
            v = cmp.get("time_ours_over_theirs_paired") or cmp.get("time_ours_over_theirs")
            out.append({"target": "faster_than_curvlinops", "model": label, "what": "our kfac time / curvlinops KFAC",
                        "value": v, "threshold": 1.0, "holds": v is not None and v < 1.0, "conditions": cond})
            v = cmp.get("memory_ours_over_theirs")
            out.append({"target": "kfac_memory", "model": label, "what": "our kfac nbytes / curvlinops factor bytes",
                        "value": v, "threshold": 0.5, "holds": v is not None and v <= 0.5,
                        "conditions": f"ours {cmp.get('ours_factor_dtype')}, theirs {cmp.get('theirs_factor_dtype')}"})
        for p in m.get("penalty", []):
            lim = TARGETS["penalty"]["limits"].get(p["structure"])
            if lim is not None and p.get("ok"):
                v = p.get("penalty_pct_of_step")
                out.append({"target": "penalty", "model": label, "what": f"{p['structure']} penalty % of LoRA step",
                            "value": v, "threshold": lim, "holds": v is not None and v <= lim, "conditions": cond})
    return out
