"""Markdown report of the cost benchmark, rendered from its result JSON."""

from __future__ import annotations

from pathlib import Path

from benchmarks import harness
from benchmarks.cost.measure import fit_name
from benchmarks.cost.plots import get_path, make_plots
from benchmarks.harness import fmt, fmt_bytes, markdown_table
from benchmarks.harness.report import provenance_markdown


# ============================================================================================ outputs
def _ms(s):
    return None if s is None else 1000 * s


def _err_cell(e: dict) -> str:
    if e.get("skipped"):
        return "skipped: " + e.get("reason", "")
    return e.get("error", "failed")


def render_markdown(result: dict) -> str:
    mi = result["machine"]
    lines = [f"# Cost benchmark: preset `{result['preset']}` on {result['device']} ({mi.get('device_name')})", ""]
    v = mi["versions"]
    lines.append(f"- dtype {result['dtype']}; torch {v.get('torch')}, transformers {v.get('transformers')}, peft "
                 f"{v.get('peft')}, curvlinops {v.get('curvlinops-for-pytorch')}, backpack "
                 f"{v.get('backpack-for-pytorch')}, laplace-torch {v.get('laplace-torch')}; "
                 f"{mi.get('cpu_count')} CPUs, torch threads {mi.get('torch_threads')}, model dtype {result['dtype']}")
    lines.append(f"- {result['config'].get('description', '')}")
    lines.append(f"- timing: {result['config']['warmup']} warmup + median of {result['config']['repeats']} repeats; "
                 "ratios `x fwd+bwd` are *paired* (each timed call right after a timed fwd+bwd, median of the "
                 "per-pair ratios) where available; memory = peak over the call minus memory at its start "
                 f"({'CUDA max_memory_allocated' if result['device'] == 'cuda' else 'sampled RSS'})")
    lines.append(f"- load average at start/end: {result.get('loadavg_start')} / {result.get('loadavg_end')}; "
                 f"wall time {result.get('wall_s', 0):.0f} s")
    lines.append(f"- {result['anchor']}")
    lines.append("")
    for m in result["models"]:
        lines.append(f"## {m['label']}")
        lines.append("")
        if not m.get("ok", True) and "baseline" not in m:
            lines.append(f"failed: `{m.get('error')}`\n")
            continue
        b = m["batch"]
        fb, st = m["baseline"]["fwd_bwd"], m["baseline"]["lora_step"]
        lines.append(f"batch {b['batch_size']} x {b['seq_len']} ({b['tokens_per_batch']} tokens, {b['batches']} "
                     f"batch(es)), LoRA r={m['lora']['r']} on {', '.join(m['lora']['target_modules'])} "
                     f"({m['lora']['numel']:,} params, {m['lora']['param_dtype']}), base {m['base_params']:,} params "
                     f"{m['dtype']}. fwd+bwd {fmt(fb.get('per_batch_s'))} s/batch (peak +"
                     f"{fmt_bytes(fb.get('peak_delta_bytes'))}), LoRA step {fmt(st.get('per_batch_s'))} s/batch.")
        lines.append("")
        rows = []
        for f in m["fits"]:
            name = fit_name(f) + ("" if f["backend"] == "hooks" else f" ({f['backend']})")
            if f.get("ok"):
                rows.append([name, f["per_batch_s"], f.get("paired_ratio"), f.get("ratio_fwd_bwd"),
                             fmt_bytes(f["nbytes"]), fmt_bytes(f.get("peak_delta_bytes")), f.get("mem_ratio_fwd_bwd")])
            else:
                rows.append([name, "failed", "-", "-", "-", "-", _err_cell(f)])
        bp = get_path(m, "backpack", "diag_batchgrad")
        if bp:
            if bp.get("ok"):
                rows.append(["diag/empirical (ours, backend=backpack)", bp["per_batch_s"], bp.get("paired_ratio"),
                             bp.get("ratio_fwd_bwd"), fmt_bytes(bp["nbytes"]), fmt_bytes(bp.get("peak_delta_bytes")),
                             bp.get("mem_ratio_fwd_bwd")])
            else:
                rows.append(["diag/empirical (ours, backend=backpack)", "failed", "-", "-", "-", "-", _err_cell(bp)])
        cl = get_path(m, "curvlinops", "kfac")
        if cl:
            if cl.get("ok"):
                rows.append(["curvlinops KFAC (empirical)", cl["per_batch_s"], cl.get("paired_ratio"),
                             cl.get("ratio_fwd_bwd"), fmt_bytes(cl["factor_bytes"]) + f" ({cl['factor_dtype']})",
                             fmt_bytes(cl.get("peak_delta_bytes")), cl.get("mem_ratio_fwd_bwd")])
            else:
                rows.append(["curvlinops KFAC (empirical)", "failed", "-", "-", "-", "-", _err_cell(cl)])
        gm = get_path(m, "curvlinops", "ggn_matvec")
        if gm:
            if gm.get("ok"):
                name = "curvlinops GGN matvec (1 vector)" + (" [eager attn]" if gm.get("first_attempt") else "")
                rows.append([name, gm["per_batch_s"], gm.get("paired_ratio"),
                             gm.get("ratio_fwd_bwd"), "-", fmt_bytes(gm.get("peak_delta_bytes")), None])
            else:
                rows.append(["curvlinops GGN matvec (1 vector)", "failed", "-", "-", "-", "-", _err_cell(gm)])
        for e in m.get("laplace_torch", []) or []:
            name = f"laplace-torch {e['config']}"
            if e.get("ok"):
                rows.append([name, e["per_batch_s"], e.get("paired_ratio"), e.get("ratio_fwd_bwd"), "-",
                             fmt_bytes(e.get("peak_delta_bytes")), None])
            else:
                rows.append([name, "failed" if not e.get("skipped") else "skipped", "-", "-", "-", "-", _err_cell(e)])
        lines.append(markdown_table(["method", "s/batch", "x fwd+bwd (paired)", "x fwd+bwd (medians)", "state",
                                     "peak mem +", "x fwd+bwd mem"], rows))
        cmp = get_path(m, "curvlinops", "ours_vs_curvlinops_kfac")
        if cmp:
            lines.append(f"**ours / curvlinops K-FAC**: time {fmt(cmp.get('time_ours_over_theirs_paired'))} (paired), "
                         f"{fmt(cmp.get('time_ours_over_theirs'))} (medians); state memory "
                         f"{fmt(cmp.get('memory_ours_over_theirs'))} ({fmt_bytes(cmp.get('state_bytes_ours'))} "
                         f"{cmp.get('ours_factor_dtype')} vs {fmt_bytes(cmp.get('state_bytes_theirs'))} "
                         f"{cmp.get('theirs_factor_dtype')}; {fmt(cmp.get('memory_ours_over_theirs_same_dtype'))} "
                         f"counting elements); peak memory during the fit "
                         f"{fmt(cmp.get('peak_delta_ours_over_theirs'))}.")
            lines.append("")
        if gm and gm.get("first_attempt"):
            lines.append(f"GGN matvec with `{gm['first_attempt'].get('attn_implementation')}` attention failed: "
                         f"`{str(gm['first_attempt'].get('error'))[:300]}`; timed again with eager attention.")
            lines.append("")
        prow = []
        for p in m.get("penalty", []):
            if p.get("ok"):
                prow.append([p["structure"], _ms(p.get("penalty_s")), p.get("penalty_pct_of_step"),
                             p.get("step_with_penalty_s"), p.get("step_overhead_pct")])
            else:
                prow.append([p["structure"], "failed", "-", "-", p.get("error", "")])
        if prow:
            lines.append("Penalty per LoRA step (LaplacePenalty forward+backward timed inside the step; plain step "
                         f"{fmt(st.get('per_batch_s'))} s):")
            lines.append("")
            lines.append(markdown_table(["structure", "penalty ms", "% of LoRA step", "step with penalty s",
                                         "step overhead % (noisy)"], prow))
        bpk = get_path(m, "backpack", "extend_converter_kfac")
        if bpk:
            lines.append(f"**BackPACK** `extend(model, use_converter=True)` + KFAC: "
                         f"{'works' if bpk.get('ok') else 'fails at ' + str(bpk.get('stage'))}"
                         f"{'' if bpk.get('ok') else ': `' + str(bpk.get('error'))[:400] + '`'}")
            lines.append("")
        if m.get("seq_sweep"):
            rows = []
            for p in m["seq_sweep"]["points"]:
                fbp = p["fwd_bwd"]
                row = [p["seq_len"], p["tokens_per_batch"], fbp.get("per_batch_s"),
                       fmt_bytes(fbp.get("peak_delta_bytes"))]
                for s in ("diag", "kfac"):
                    f = p["fits"].get(s, {})
                    row += [f.get("per_batch_s"), f.get("paired_ratio"), fmt_bytes(f.get("peak_delta_bytes"))]
                c = p.get("curvlinops_kfac") or {}
                row += [c.get("per_batch_s"), c.get("paired_ratio")]
                rows.append(row)
            lines.append("Sequence-length sweep (tokens):")
            lines.append("")
            lines.append(markdown_table(["seq", "tokens", "fwd+bwd s", "fwd+bwd mem+", "diag s", "diag x", "diag mem+",
                                         "kfac s", "kfac x", "kfac mem+", "curvlinops s", "curvlinops x"], rows))
        if m.get("rank_sweep"):
            rows = []
            for p in m["rank_sweep"]["points"]:
                row = [p["r"], p["lora_numel"], p["fwd_bwd"].get("per_batch_s"), p["lora_step"].get("per_batch_s")]
                for s in ("diag", "kfac"):
                    f = p["fits"].get(s, {})
                    pen = next((q for q in p["penalty"] if q["structure"] == s), {})
                    row += [f.get("paired_ratio"), fmt_bytes(f.get("nbytes")), pen.get("penalty_pct_of_step")]
                rows.append(row)
            lines.append("LoRA-rank sweep (alpha = 2r):")
            lines.append("")
            lines.append(markdown_table(["r", "LoRA params", "fwd+bwd s", "step s", "diag x", "diag state",
                                         "diag pen %", "kfac x", "kfac state", "kfac pen %"], rows))
    # width
    rows = []
    for m in result["models"]:
        if "baseline" not in m:
            continue
        fits = {f"{f['structure']}/{f['kind']}": f for f in m["fits"] if f.get("ok") and not f.get("variant")}
        cl = get_path(m, "curvlinops", "kfac") or {}
        cmp = get_path(m, "curvlinops", "ours_vs_curvlinops_kfac") or {}
        pens = {p["structure"]: p for p in m.get("penalty", []) if p.get("ok")}
        rows.append([m["label"], m["config"]["hidden_size"], m["batch"]["tokens_per_batch"],
                     m["baseline"]["fwd_bwd"].get("per_batch_s"), get_path(fits, "diag/empirical", "paired_ratio"),
                     get_path(fits, "kfac/empirical", "paired_ratio"), cl.get("paired_ratio"),
                     cmp.get("memory_ours_over_theirs"), get_path(pens, "diag", "penalty_pct_of_step"),
                     get_path(pens, "kfac", "penalty_pct_of_step")])
    lines.append("## Width (model size)")
    lines.append("")
    lines.append(markdown_table(["model", "hidden", "tokens", "fwd+bwd s", "diag x", "kfac x", "curvlinops x",
                                 "kfac mem ours/theirs", "diag pen %", "kfac pen %"], rows))
    lines.append("## Targets")
    lines.append("")
    rows = [[c["target"], c["model"], c["what"], c["value"], c["threshold"],
             "holds" if c["holds"] else "MISSED", c["conditions"]] for c in result.get("target_checks", [])]
    lines.append(markdown_table(["target", "model", "measured", "value", "threshold", "verdict", "conditions"], rows,
                                align=["l", "l", "l", "r", "r", "l", "l"]))
    lines += ["", provenance_markdown(result.get("provenance"))]
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, output_dir: str | Path) -> dict[str, Path]:
    """``<preset>-<device>.json``, ``.md`` and the PNG plots in ``output_dir``."""
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{result['preset']}-{result['device']}"
    paths = {"json": harness.write_json(out_dir / f"{stem}.json", result)}
    md = out_dir / f"{stem}.md"
    md.write_text(render_markdown(result))
    paths["md"] = md
    for p in make_plots(result, out_dir, stem):
        paths[p.stem.split("-", 2)[-1]] = p
    return paths
