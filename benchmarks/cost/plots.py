"""Plots of the cost benchmark, rendered from its result JSON."""

from __future__ import annotations

from pathlib import Path

from benchmarks import harness
from benchmarks.cost.config import PRETTY


def get_path(d, *keys):
    for k in keys:
        if d is None:
            return None
        d = d.get(k) if isinstance(d, dict) else None
    return d


def _method_rows(m: dict) -> list[tuple[str, dict, str]]:
    """(name, entry, kind) for the bar charts: our fits, backpack diag, curvlinops, GGN matvec, laplace."""
    rows = [(f"{f['structure']}" + ("" if f["kind"] == "empirical" else f"/{f['kind']}")
             + ("" if not f.get("variant") else " [" + ",".join(f"{v}" for v in f["variant"].values()) + "]"),
             f, "ours")
            for f in m.get("fits", [])]
    bp = get_path(m, "backpack", "diag_batchgrad")
    if bp:
        rows.append(("diag (backpack)", bp, "ours"))
    cl = get_path(m, "curvlinops", "kfac")
    if cl:
        rows.append(("curvlinops KFAC", cl, "theirs"))
    gm = get_path(m, "curvlinops", "ggn_matvec")
    if gm:
        rows.append(("curvlinops GGN mv", gm, "theirs"))
    for e in m.get("laplace_torch", []) or []:
        if e.get("ok"):
            rows.append((f"laplace {e['config'].split(' ')[0]}", e, "theirs"))
    return rows


def _short(m: dict) -> str:
    name = PRETTY.get(m["key"], m["key"])
    n = m.get("config", {}).get("num_hidden_layers")
    tag = "real" if not m.get("random_weights") else "random"
    return f"{name} ({tag}, {n}L)"


def _plain_log(ax) -> None:
    """Plain numbers (not 10^x) on a log/symlog y axis."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    if ax.get_yscale() == "log":
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def make_plots(result: dict, out_dir: Path, stem: str) -> list[Path]:
    plt = harness.plot_style()
    import numpy as np

    mi = result["machine"]
    foot = (f"preset {result['preset']}, {result['device']} ({mi.get('device_name')}), {result['dtype']}; "
            "random-weight models are for cost only")
    models = [m for m in result["models"] if "baseline" in m]
    paths = []

    # 1. fit time ratio per structure, curvlinops beside
    names = []
    for m in models:
        for n, _, _ in _method_rows(m):
            if n not in names:
                names.append(n)
    fig, ax = plt.subplots(figsize=(max(7, 0.75 * len(names) + 2), 4.2))
    width = 0.8 / max(1, len(models))
    x = np.arange(len(names))
    for i, m in enumerate(models):
        table = {n: (e, k) for n, e, k in _method_rows(m)}
        vals = [(table[n][0].get("paired_ratio") or table[n][0].get("ratio_fwd_bwd") or np.nan)
                if n in table and table[n][0].get("ok") else np.nan for n in names]
        bars = ax.bar(x + (i - (len(models) - 1) / 2) * width, vals, width, label=_short(m))
        for bar, n in zip(bars, names):
            if n in table and table[n][1] == "theirs":
                bar.set_hatch("//")
        harness.annotate_bars(ax, bars, vals, fontsize=6 if len(models) > 1 else 7)
    ax.axhline(1.15, color="k", ls="--", lw=1, label="target 1.15x (diag/kfac)")
    ax.axhline(1.0, color="0.5", lw=0.8)
    top = max([b.get_height() for b in ax.patches if np.isfinite(b.get_height())] or [1.0])
    if top > 6:
        ax.set_yscale("log")
        _plain_log(ax)
        ax.set_ylabel("time / one plain fwd+bwd (paired, log)")
    else:
        ax.set_ylim(0, top * 1.15)
        ax.set_ylabel("time / one plain fwd+bwd (paired)")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_title("Curvature fit time per batch, relative to fwd+bwd (hatched: other libraries)")
    ax.legend()
    paths.append(harness.save_figure(fig, out_dir / f"{stem}-fit_ratio.png", foot))

    # 2. memory per structure: state bytes and peak extra memory
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 1.2 * len(names) + 3), 4.2))
    for i, m in enumerate(models):
        table = {n: e for n, e, _ in _method_rows(m)}
        state = [(table[n].get("nbytes") or table[n].get("factor_bytes") or np.nan) / 2**20
                 if n in table and table[n].get("ok") else np.nan for n in names]
        peak = [(table[n].get("peak_delta_bytes") or np.nan) / 2**20 if n in table and table[n].get("ok") else np.nan
                for n in names]
        off = (i - (len(models) - 1) / 2) * width
        axes[0].bar(x + off, state, width, label=_short(m))
        axes[1].bar(x + off, peak, width, label=_short(m))
        fbp = (m["baseline"]["fwd_bwd"].get("peak_delta_bytes") or np.nan) / 2**20
        axes[1].axhline(fbp, color=f"C{i}", ls="--", lw=1)
    axes[0].set_yscale("log")
    _plain_log(axes[0])
    axes[0].set_ylabel("operator state (MiB, log)")
    axes[0].set_title("Curvature state: curv.nbytes / curvlinops factors")
    axes[1].set_ylabel("peak extra memory during the call (MiB)")
    axes[1].set_title("Peak memory (dashed: plain fwd+bwd of the same model)")
    for a in axes:
        a.set_xticks(x, names, rotation=30, ha="right")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(models), bbox_to_anchor=(0.5, 1.06))
    paths.append(harness.save_figure(fig, out_dir / f"{stem}-memory.png", foot))

    # 3. cost vs tokens
    sweep_m = next((m for m in models if m.get("seq_sweep")), None)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    if sweep_m:
        pts = sweep_m["seq_sweep"]["points"]
        tok = [p["tokens_per_batch"] for p in pts]
        series = {"fwd+bwd": [p["fwd_bwd"] for p in pts]}
        for s in ("diag", "kfac"):
            series[f"fit {s}"] = [p["fits"].get(s, {}) for p in pts]
        if any(p.get("curvlinops_kfac") for p in pts):
            series["curvlinops KFAC"] = [p.get("curvlinops_kfac") or {} for p in pts]
        for name, es in series.items():
            ls = "--" if "curvlinops" in name else "-"
            axes[0].plot(tok, [e.get("per_batch_s") or np.nan for e in es], marker="o", ls=ls, label=name)
            axes[1].plot(tok, [(e.get("peak_delta_bytes") or np.nan) / 2**20 for e in es], marker="o", ls=ls,
                         label=name)
        for a in axes:
            a.set_xscale("log", base=2)
            a.set_xlabel("tokens per batch")
        axes[0].set_yscale("log")
        _plain_log(axes[0])
        axes[0].set_ylabel("seconds per batch (log)")
        axes[1].set_ylabel("peak extra memory (MiB)")
        axes[0].set_title(f"Cost vs tokens: {_short(sweep_m)}, batch {sweep_m['seq_sweep']['batch_size']}")
        axes[1].set_title("Peak memory vs tokens")
        axes[0].legend()
    paths.append(harness.save_figure(fig, out_dir / f"{stem}-cost_vs_tokens.png", foot))

    # 4. cost vs rank
    rank_m = next((m for m in models if m.get("rank_sweep")), None)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.0))
    if rank_m:
        pts = rank_m["rank_sweep"]["points"]
        rs = [p["r"] for p in pts]
        for s in ("diag", "kfac"):
            axes[0].plot(rs, [p["fits"].get(s, {}).get("paired_ratio") or np.nan for p in pts], marker="o",
                         label=f"fit {s}")
            axes[1].plot(rs, [(p["fits"].get(s, {}).get("nbytes") or np.nan) / 2**20 for p in pts], marker="o",
                         label=s)
            axes[2].plot(rs, [next((q.get("penalty_pct_of_step") for q in p["penalty"] if q["structure"] == s),
                                   None) or np.nan for p in pts], marker="o", label=s)
        axes[0].axhline(1.15, color="k", ls="--", lw=1, label="target 1.15x")
        axes[2].axhline(3.0, color="k", ls="--", lw=1, label="target 3%")
        axes[0].set_ylabel("fit / fwd+bwd (paired)")
        axes[1].set_ylabel("curv.nbytes (MiB)")
        axes[2].set_ylabel("penalty, % of LoRA step")
        axes[0].set_title(f"Cost vs LoRA rank: {_short(rank_m)}")
        for a in axes:
            a.set_xlabel("LoRA rank r")
            a.set_xticks(rs)
            a.legend()
    paths.append(harness.save_figure(fig, out_dir / f"{stem}-cost_vs_rank.png", foot))

    # 5. penalty overhead
    structs = []
    for m in models:
        for p in m.get("penalty", []):
            if p["structure"] not in structs:
                structs.append(p["structure"])
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    xs = np.arange(len(structs))
    for i, m in enumerate(models):
        pens = {p["structure"]: p for p in m.get("penalty", []) if p.get("ok")}
        vals = [get_path(pens, s, "penalty_pct_of_step") or np.nan for s in structs]
        bars = ax.bar(xs + (i - (len(models) - 1) / 2) * width, vals, width, label=_short(m))
        harness.annotate_bars(ax, bars, vals, "{:.2g}%")
    ax.axhline(3.0, color="k", ls="--", lw=1, label="target 3% (diag, kfac)")
    ax.axhline(10.0, color="k", ls=":", lw=1, label="target 10% (kfac_tridiag)")
    ax.set_yscale("symlog", linthresh=1.0)
    top = max([b.get_height() for b in ax.patches if np.isfinite(b.get_height())] + [10.0])
    ax.set_ylim(0, top * 3)
    _plain_log(ax)
    ax.set_xticks(xs, structs, rotation=20, ha="right")
    ax.set_ylabel("penalty fwd+bwd, % of a plain LoRA step")
    ax.set_title("LaplacePenalty overhead per training step")
    ax.legend()
    paths.append(harness.save_figure(fig, out_dir / f"{stem}-penalty_overhead.png", foot))

    # 6. width
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    labels = [_short(m) for m in models]
    xm = np.arange(len(models))
    axes[0].bar(xm, [m["baseline"]["fwd_bwd"].get("per_batch_s") or np.nan for m in models], color="0.6")
    axes[0].set_ylabel("plain fwd+bwd, s per batch")
    axes[0].set_title("Width: baseline cost (see batch sizes in the table)")
    for j, (name, getter) in enumerate([
            ("diag", lambda m: next((f.get("paired_ratio") for f in m["fits"] if f["structure"] == "diag"
                                     and f["kind"] == "empirical" and f.get("ok") and not f.get("variant")), None)),
            ("kfac", lambda m: next((f.get("paired_ratio") for f in m["fits"] if f["structure"] == "kfac"
                                     and f["kind"] == "empirical" and f.get("ok") and not f.get("variant")), None)),
            ("curvlinops KFAC", lambda m: get_path(m, "curvlinops", "kfac", "paired_ratio"))]):
        vals = [getter(m) or np.nan for m in models]
        bars = axes[1].bar(xm + (j - 1) * 0.27, vals, 0.27, label=name, hatch="//" if "curvlinops" in name else None)
        harness.annotate_bars(axes[1], bars, vals)
    axes[1].axhline(1.15, color="k", ls="--", lw=1, label="target 1.15x")
    top = max([b.get_height() for b in axes[1].patches if np.isfinite(b.get_height())] or [1.0])
    axes[1].set_ylim(0, top * 1.35)
    axes[1].set_ylabel("fit / fwd+bwd (paired)")
    axes[1].set_title("Width: fit time ratio")
    axes[1].legend(loc="upper left", ncol=4, fontsize=7)
    for a in axes:
        a.set_xticks(xm, labels, rotation=15, ha="right")
    paths.append(harness.save_figure(fig, out_dir / f"{stem}-width.png", foot))
    return paths
