"""Tables and plots of the continual benchmark, rendered from its result JSON only
(``--render-only`` re-draws them from a committed file)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from benchmarks.continual.config import METHOD_SPECS
from benchmarks.harness import (
    COLORS,
    annotate_bars,
    fmt,
    load_result,
    markdown_table,
    plot_style,
    save_figure,
    write_json,
)
from benchmarks.harness.report import provenance_markdown


def write_outputs(payload: dict, out: Path) -> None:
    """``<preset>.json``, ``<preset>.md``, one heatmap PNG per method and the summary PNG in ``out``."""
    out, p = Path(out), payload["preset"]
    out.mkdir(parents=True, exist_ok=True)
    footnote = (f"{payload['model']}; preset {p}; {len(payload['config']['seeds'])} seed(s); "
                f"{payload['machine']['device_name']}")
    figures = [save_heatmap(payload, m, out / f"{p}_heatmap_{_safe(m)}.png", footnote)
               for m in payload["matrices"]]
    figures.append(save_summary_plot(payload, out / f"{p}_summary.png", footnote))
    payload["figures"] = [f.name for f in figures]
    write_json(out / f"{p}.json", payload)
    (out / f"{p}.md").write_text(render_markdown(payload))


def rerender(output_dir: str | Path, preset: str) -> dict:
    """Re-write the markdown and the plots of a finished run from its JSON (no model, no training)."""
    out = Path(output_dir)
    payload = load_result(out / f"{preset}.json")
    write_outputs(payload, out)
    return payload


def _safe(name: str) -> str:
    return name.replace("+", "_")


def _heat(ax, rows: list[list[float]], row_labels, col_labels, cmap: str, vmin: float, vmax: float, title: str,
          digits: int = 2):
    import numpy as np

    data = np.array([[np.nan if v is None else v for v in r] for r in rows], dtype=float)
    im = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=30, ha="right")
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.grid(False)
    span = (vmax - vmin) or 1.0
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            v = data[i, j]
            if np.isfinite(v):
                light = (v - vmin) / span
                dark_bg = light < 0.5 if not cmap.endswith("_r") else light > 0.5
                ax.text(j, i, f"{v:.{digits}f}", ha="center", va="center", fontsize=7,
                        color="white" if dark_bg else "black")
    ax.axhline(0.5, color="white", lw=2)
    ax.set_title(title, fontsize=9)
    return im


def _ranges(payload: dict) -> dict:
    em = [v for M in payload["matrices"].values() for r in M["em"] for v in r] + \
         [v for M in payload["matrices"].values() for v in M["mcq_acc"]]
    nll = [v for M in payload["matrices"].values() for r in M["nll"] for v in r] + \
          [v for M in payload["matrices"].values() for v in M["src_text_nll"]]
    return {"em": (0.0, max(1e-6, max(em))), "nll": (min(nll), max(nll))}


def save_heatmap(payload: dict, method: str, path: Path, footnote: str) -> Path:
    """One PNG per method: exact-match matrix (row 0 = WordNet MCQ accuracy) and NLL matrix
    (row 0 = held-out source text NLL), columns = base model and after each task."""
    plt = plot_style()
    M = payload["matrices"][method]
    names = payload["tasks"]
    smooth = METHOD_SPECS[method]["family"] == "smooth"
    cols = ["base"] + [(f"m{j}^s ({n[:10]})" if smooth else f"after {j} ({n[:10]})")
                       for j, n in enumerate(names, start=1)]
    rows_em = ["0 source: MCQ acc"] + [f"{i} {n}" for i, n in enumerate(names, start=1)]
    rows_nll = ["0 source: text NLL"] + [f"{i} {n}" for i, n in enumerate(names, start=1)]
    rng = _ranges(payload)
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 1.2 + 0.55 * len(rows_em)))
    im0 = _heat(axes[0], [M["mcq_acc"]] + M["em"], rows_em, cols, "viridis", *rng["em"],
                "exact match ↑ (greedy)")
    im1 = _heat(axes[1], [M["src_text_nll"]] + M["nll"], rows_nll, cols, "viridis_r", *rng["nll"],
                "teacher-forced NLL per answer token ↓")
    fig.colorbar(im0, ax=axes[0], fraction=0.04)
    fig.colorbar(im1, ax=axes[1], fraction=0.04)
    s = payload["summary"][method]
    fig.suptitle(f"{payload['methods'][method]['label']} — avg final EM {s['avg_final_em']['mean']:.3f}, "
                 f"BWT EM {s['bwt_em']['mean']:+.3f}, avg final NLL {s['avg_final_nll']['mean']:.3f}, "
                 f"BWT NLL {s['bwt_nll']['mean']:+.3f}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, footnote=footnote)


SUMMARY_PANELS = [
    ("avg_final_em", "avg final exact match ↑"), ("bwt_em", "BWT exact match (↑; <0 = forgetting)"),
    ("plasticity_em", "plasticity: EM on new task ↑"), ("mcq_acc_final", "source: WordNet MCQ acc (final) ↑"),
    ("avg_final_nll", "avg final NLL ↓"), ("bwt_nll", "BWT NLL (↓; >0 = forgetting)"),
    ("plasticity_nll_drop", "plasticity: NLL drop on new task ↑"), ("src_text_nll_final", "source: text NLL (final) ↓"),
]


def save_summary_plot(payload: dict, path: Path, footnote: str) -> Path:
    plt = plot_style()
    methods = list(payload["matrices"])
    fig, axes = plt.subplots(2, 4, figsize=(16, 7.2))
    base = payload["base"]
    for ax, (key, title) in zip(axes.flat, SUMMARY_PANELS):
        means = [payload["summary"][m][key]["mean"] for m in methods]
        sds = [payload["summary"][m][key]["sd"] or 0.0 for m in methods]
        vals = [v if v is not None else float("nan") for v in means]
        colors = [COLORS[i % len(COLORS)] for i in range(len(methods))]
        bars = ax.bar(range(len(methods)), vals, yerr=sds if any(sds) else None, color=colors, capsize=2)
        annotate_bars(ax, bars, vals, "{:.3f}")
        ax.set_xticks(range(len(methods)), methods, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        if key == "mcq_acc_final":
            ax.axhline(base["mcq_acc"], color="black", ls="--", lw=1, label="base model")
            ax.legend(fontsize=7)
        if key == "src_text_nll_final":
            ax.axhline(base["src_text_nll"], color="black", ls="--", lw=1, label="base model")
            ax.legend(fontsize=7)
        finite = [v for v in vals if math.isfinite(v)]
        ref = {"mcq_acc_final": base["mcq_acc"], "src_text_nll_final": base["src_text_nll"]}.get(key)
        if finite and key in ("src_text_nll_final", "avg_final_nll", "mcq_acc_final"):
            lo, hi = min(finite + ([ref] if ref is not None else [])), max(finite + ([ref] if ref is not None else []))
            pad = 0.2 * ((hi - lo) or abs(hi) or 1.0)
            ax.set_ylim(lo - pad, hi + pad)
        if key.startswith("bwt"):
            ax.axhline(0, color="black", lw=0.8)
    fig.suptitle(f"Continual LoRA on {' → '.join(payload['tasks'])} — preset {payload['preset']} "
                 f"({len(payload['config']['seeds'])} seed(s); bars = mean, whiskers = sd over seeds)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, footnote=footnote)


def _pm(s: dict, digits: int = 3, signed: bool = False) -> str:
    if s is None or s.get("mean") is None:
        return "-"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f.format(s["mean"]) + (f" ± {s['sd']:.{digits}f}" if s.get("sd") is not None else "")


def render_markdown(payload: dict) -> str:
    cfg, mach = payload["config"], payload["machine"]
    names = payload["tasks"]
    T = len(names)
    lines = [f"# Continual-learning benchmark — preset `{payload['preset']}`", "",
             f"Model: **{payload['model']}**, LoRA r={cfg['r']} alpha={cfg['alpha']} on "
             f"{', '.join(cfg['target_modules'])}. Tasks: {' → '.join(names)} (task 0 = source scores). "
             f"{cfg['steps']} steps × batch {cfg['train_batch_size']} per task, lr {cfg['lr']}, "
             f"{cfg['n_eval']} eval items per task, greedy max_new_tokens={cfg['max_new_tokens']}, "
             f"seeds {list(cfg['seeds'])}. Curvature: kind `{cfg['curvature_kind']}` on each task's first "
             f"{cfg['proxy_batches']}×{cfg['proxy_batch_size']} training items. "
             f"Device: {mach['device_name']} ({mach['device']}, {mach['torch_threads']} torch threads), torch "
             f"{mach['versions'].get('torch')}, transformers {mach['versions'].get('transformers')}, peft "
             f"{mach['versions'].get('peft')}. Wall time {payload['timing']['total_s'] / 60:.1f} min.", ""]
    lines += ["Notes: " + " ".join(payload["notes"]), ""]
    lines += ["## Summary", "",
              "EM = exact match of the greedy answer; NLL = teacher-forced NLL per answer token of the reference "
              "answer. BWT = mean over tasks 1..T-1 of (final − right after training it): EM < 0 and NLL > 0 mean "
              "forgetting. Plasticity = score on each new task right after training it (tasks 2..T); NLL drop = "
              "its NLL before − after its training. Source Δ = final − base.", ""]
    S = payload["summary"]
    rows = []
    for m in payload["matrices"]:
        s = S[m]
        rows.append([m, _pm(s["avg_final_em"]), _pm(s["bwt_em"], signed=True), _pm(s["plasticity_em"]),
                     _pm(s["task_aware_em"]), _pm(s["avg_final_nll"]), _pm(s["bwt_nll"], signed=True),
                     _pm(s["plasticity_nll"]), _pm(s["plasticity_nll_drop"]), _pm(s["train_loss_mean"]),
                     _pm(s["src_text_nll_delta"], signed=True), _pm(s["mcq_acc_delta"], signed=True),
                     _pm(s["mcq_nll_delta"], signed=True), _pm(s["penalty_task_ratio_last"], 2)])
    lines.append(markdown_table(["method", "avg final EM ↑", "BWT EM ↑", "plast. EM ↑", "task-aware EM ↑",
                                 "avg final NLL ↓", "BWT NLL ↓", "plast. NLL ↓", "NLL drop ↑", "train loss (mean) ↓",
                                 "Δ src text NLL ↓", "Δ MCQ acc ↑", "Δ MCQ NLL ↓", "pen/task (end)"], rows))
    lines += ["", "## Methods and strengths", ""]
    mrows = []
    for m, info in payload["methods"].items():
        mrows.append([m, info["label"], info.get("structure", "-"), info.get("dynamics", "-"), info.get("gamma"),
                      info.get("process_noise_q"), info.get("prior_precision"), info.get("strength")])
    lines.append(markdown_table(["method", "description", "structure", "dynamics", "gamma", "process noise q",
                                 "prior precision", "strength"], mrows, align=["l"] * 4 + ["r"] * 4))
    cal = payload["calibration"]
    lines += ["", f"Calibration: {cal['rule']} (plain LoRA task-2 loss L2_plain = {fmt(cal.get('plain_task2_loss'))}; "
              f"penalty at strength 1: " + ", ".join(f"{k} {fmt(v)}" for k, v in cal["penalty_at_plain_theta2"].items())
              + "). Process noise q = q_rel / mean diag(Λ₁) with q_rel = " + f"{cfg['q_rel']}; prior precision = "
              f"{cfg['prior_rel']} × mean diag(C₁).", ""]
    tv = cal.get("tridiag_vs_kfac") or {}
    if tv:
        lines += ["kfac_tridiag vs kfac at the trained task-1 adapter "
                  f"(‖B‖ = {fmt(tv['lora_B_norm_at_task1_anchor'])}): "
                  + "; ".join(f"{k}: dᵀPd kfac {fmt(v['kfac'])}, tridiag {fmt(v['kfac_tridiag'])} "
                              f"(relative difference {fmt(v['relative_difference'])})"
                              for k, v in tv.items() if isinstance(v, dict)) + ".", ""]
    for m, M in payload["matrices"].items():
        smooth = METHOD_SPECS[m]["family"] == "smooth"
        head = ["task \\ " + ("smoothed adapter of" if smooth else "after task"), "base"] + \
               [f"{j} {n}" for j, n in enumerate(names, start=1)]
        lines += ["", f"## `{m}` — {payload['methods'][m]['label']}", ""]
        for key, src_key, title in (("em", "mcq_acc", "exact match (row 0: WordNet MCQ accuracy)"),
                                    ("nll", "src_text_nll", "NLL per answer token (row 0: held-out source text NLL)")):
            rows = [["0 source"] + [f"{v:.3f}" for v in M[src_key]]]
            rows += [[f"{i} {n}"] + [f"{v:.3f}" for v in M[key][i - 1]] for i, n in enumerate(names, start=1)]
            lines += [f"{title}:", "", markdown_table(head, rows)]
        lines += ["MCQ NLL(correct word): " + ", ".join(f"{v:.3f}" for v in M["mcq_nll"]), ""]
    lines += ["## Each adapter averaged over all tasks", "",
              "Mean over tasks 1..T of each column (one adapter used for every task): for trained methods the "
              "adapter after task j, for smoothing rows the smoothed adapter of task j (the last column is the "
              "filter's final adapter).", ""]
    rows = []
    for m, M in payload["matrices"].items():
        em_cols = [statistics.fmean(r[j] for r in M["em"]) for j in range(T + 1)]
        nll_cols = [statistics.fmean(r[j] for r in M["nll"]) for j in range(T + 1)]
        rows.append([m] + [f"{e:.3f} / {n:.3f}" for e, n in zip(em_cols, nll_cols)])
    lines.append(markdown_table(["method (EM / NLL)", "base"] + [f"{j} {n}" for j, n in enumerate(names, start=1)],
                                rows))
    smooth_runs = [r for r in payload["runs"] if r.get("smoothing")]
    if smooth_runs:
        lines += ["## Smoothing: how far each smoothed adapter moved", "",
                  "`fraction` = projection of m_t^s − m_t on m_{t+1}^s − m_t (0: stays at the filtered adapter, "
                  "1: adopts the later smoothed one).", ""]
        rows = []
        for r in smooth_runs:
            for mv in r["smoothing"]:
                rows.append([r["method"], str(r["seed"]), f"{mv['task']} {names[mv['task'] - 1]}",
                             mv["smoothed_minus_filtered_norm"], mv["next_minus_filtered_norm"],
                             mv["fraction_moved_towards_later"]])
        lines.append(markdown_table(["method", "seed", "task", "‖m^s − m‖", "‖m_next − m‖", "fraction"], rows))
    lines += ["", "## Training (per task, first seed)", ""]
    rows = []
    seen = set()
    for r in payload["runs"]:
        if r["seed"] != cfg["seeds"][0] or r.get("smoothing") or r["method"] in seen:
            continue
        seen.add(r["method"])
        for j, h in enumerate(r["histories"], start=1):
            rows.append([r["method"], f"{j} {h['task']}", h["loss_first"], h["loss_last"], h["loss_mean"],
                         h["penalty_last"], h["penalty_task_ratio_last"], r.get("strength")])
    lines.append(markdown_table(["method", "task", "loss step 1", "loss end", "loss mean", "penalty end",
                                 "pen/task end", "strength"], rows))
    t = payload["timing"]
    lines += ["", "Timing (s): " + ", ".join(f"{k} {v:.0f}" for k, v in t.items() if isinstance(v, (int, float))), ""]
    for f in payload.get("figures", []):
        lines.append(f"![{f}]({f})")
    lines += ["", provenance_markdown(payload.get("provenance"))]
    return "\n".join(lines) + "\n"
