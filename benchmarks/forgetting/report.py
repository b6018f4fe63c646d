"""Outputs of the forgetting benchmark from its results: ``results.json``, ``summary.md`` and the
Pareto plots."""

from __future__ import annotations

from pathlib import Path

from benchmarks.forgetting.config import Config
from benchmarks.forgetting.summary import TABLES, summarize
from benchmarks.harness import (
    fmt,
    markdown_table,
    model_label,
    plot_style,
    save_figure,
    write_json,
)
from benchmarks.harness.report import provenance_markdown


def write_outputs(out: Path, cfg: Config, *, final: bool, machine: dict, provenance: list[dict], notes: list,
                  data: dict, timing: dict, base: dict, curvature: dict, calibration: dict, runs: list[dict],
                  extra: dict | None = None) -> dict:
    """Summarize ``runs`` and write ``results.json`` (and, if ``final``, ``summary.md`` and the plots).
    ``provenance``: one record per part (process) that produced ``runs``."""
    summary = summarize(runs, base, cfg, (data or {}).get("splits"))
    payload = {
        "benchmark": "forgetting", "preset": cfg.preset, "device": str(machine.get("device")).split(":")[0],
        "complete": final,
        "model": model_label(cfg.model),
        "machine": machine, "provenance": provenance, "config": cfg.to_dict(), "config_digest": cfg.digest(),
        "notes": notes, "data": data, "timing": timing, "base": base,
        "curvature": curvature, "calibration": calibration, **(extra or {}),
        "forgetting_evidence": summary["evidence"], "points": summary["points"], "tables": summary["tables"],
        "selection": summary["selection"],
        "runs": runs,
    }
    write_json(out / "results.json", payload)
    if final:
        figs = plot_pareto(summary, base, cfg, out, footnote=plot_footnote(payload))
        payload["figures"] = [str(p.name) for p in figs]
        (out / "summary.md").write_text(render_markdown(payload, summary))
        write_json(out / "results.json", payload)
    return payload


def brief(m: dict) -> str:
    em = m.get("tgt_em")
    return (f"tgt_nll={m['tgt_nll']:.3f} tgt_em={'-' if em is None else f'{em:.3f}'} "
            f"src_text_nll={m['src_text_nll']:.3f} src_mcq_nll={m['src_mcq_nll']:.3f} "
            f"src_mcq_acc={m['src_mcq_acc']:.3f} proxy_nll={m['proxy_text_nll']:.3f}")


def plot_footnote(payload: dict) -> str:
    """Model, preset, every host the result's processes ran on, versions: the line under each plot."""
    m = payload["machine"]
    ran_on = ", ".join(hosts(payload) or [m["device_name"]])
    return (f"{payload['model']}; preset {payload['preset']}; {ran_on} ({m['device']}); "
            f"torch {m['versions'].get('torch')}, peft {m['versions'].get('peft')}")


def target_label(cfg: Config, metric: str) -> str:
    """Axis label of a target metric (``tgt_nll`` / ``tgt_em``), naming the task that was learned."""
    what = {"tgt_nll": "NLL", "tgt_em": "exact match"}[metric]
    held_out = "held-out templates" if cfg.target_task == "gsm_symbolic" else "held-out items"  # see data.py
    return f"target {what} ({cfg.target_task}, {held_out}) {'↓' if metric == 'tgt_nll' else '↑'}"


def _family_style(families: list[str]) -> dict:
    from benchmarks.harness import COLORS

    markers = "osD^v<>pPX*hd"
    if len(families) <= len(COLORS):
        colors = list(COLORS)
    else:  # more families than the house palette: tab20 keeps every curve distinguishable
        import matplotlib

        cmap = matplotlib.colormaps["tab20"]
        colors = [cmap(i % 20) for i in range(len(families))]
    return {f: (colors[i % len(colors)], markers[i % len(markers)]) for i, f in enumerate(families)}


def plot_pareto(summary: dict, base: dict, cfg: Config, out: Path, footnote: str | None = None) -> list[Path]:
    """``pareto_nll.png`` (target NLL vs held-out source text NLL and MCQ NLL) and ``pareto_acc.png``
    (target exact match vs MCQ accuracy), one curve per method family across its grid, base as a star.
    Settings other than the first get a ``_<setting>`` suffix."""
    plt = plot_style()
    figures = []
    for i, setting in enumerate(cfg.settings):
        pts = [p for p in summary["points"] if p["setting"] == setting["name"]]
        if not pts:
            continue
        suffix = "" if i == 0 else f"_{setting['name']}"
        families = list(dict.fromkeys(p["family"] for p in pts))
        style = _family_style(families)
        panels = {
            "nll": [("tgt_nll", "src_text_nll", target_label(cfg, "tgt_nll"), "held-out source text NLL ↓"),
                    ("tgt_nll", "src_mcq_nll", target_label(cfg, "tgt_nll"), "WordNet MCQ: NLL of correct word ↓")],
            "acc": [("tgt_em", "src_mcq_acc", target_label(cfg, "tgt_em"), "WordNet MCQ accuracy ↑"),
                    ("tgt_nll", "src_mcq_acc", target_label(cfg, "tgt_nll"), "WordNet MCQ accuracy ↑")],
        }
        half = "_test" if summary.get("selection", "").startswith("validation") else ""
        panels = {kind: [(xk + half, yk + half, xl + (" [test half]" if half else ""), yl) for xk, yk, xl, yl in spec]
                  for kind, spec in panels.items()}
        for kind, axes_spec in panels.items():
            if kind == "acc" and base.get("tgt_em" + half) is None and all(p.get("tgt_em" + half) is None
                                                                            for p in pts):
                axes_spec = axes_spec[1:]
            fig, axes = plt.subplots(1, len(axes_spec), figsize=(6.2 * len(axes_spec), 4.6), squeeze=False)
            for ax, (xk, yk, xl, yl) in zip(axes[0], axes_spec):
                off = [p for p in pts if _off_scale(p, base, (xk, yk))]
                for family in families:
                    fam = [p for p in pts if p["family"] == family and p.get(xk) is not None and p.get(yk) is not None
                           and p not in off]
                    if not fam:
                        continue
                    fam.sort(key=lambda p: (p.get("relative") is None and p["strength"] is None,
                                            p.get("relative") or p["strength"] or 0, p["point"]))
                    color, marker = style[family]
                    xs, ys = [p[xk] for p in fam], [p[yk] for p in fam]
                    xe = [p.get(xk + "_sd") or 0 for p in fam]
                    ye = [p.get(yk + "_sd") or 0 for p in fam]
                    big = family == "LoRA"
                    ax.errorbar(xs, ys, xerr=xe, yerr=ye, color=color, marker=marker, ms=9 if big else 5,
                                lw=1.2, capsize=2, label=family, zorder=4 if big else 3,
                                ls="-" if len(fam) > 1 else "none")
                if base.get(xk) is not None and base.get(yk) is not None:
                    shown = [p for p in pts if p not in off and p.get(xk) is not None and p.get(yk) is not None]
                    _draw_base(ax, base[xk], base[yk], [p[xk] for p in shown], [p[yk] for p in shown])
                ax.set_xlabel(xl)
                ax.set_ylabel(yl)
                if off:  # diverged runs would squash every other point into a corner: listed instead
                    ax.text(0.01, 0.01, "off scale (diverged): " + "; ".join(
                        f"{p['family']} {p['point']} ({xk} {p[xk]:.2f}, {yk} {p[yk]:.2f})" for p in off),
                        transform=ax.transAxes, fontsize=6, va="bottom", ha="left", color="0.3")
            # outside the axes: inside, "best" still hid points (plain LoRA on the kfac_gap accuracy plot)
            # (the union of the panels' entries: the base model may be a star in one and a line in another)
            entries = {}
            for ax in axes[0]:
                for handle, label in zip(*ax.get_legend_handles_labels()):
                    entries.setdefault(label, handle)
            axes[0][-1].legend(entries.values(), entries.keys(), loc="upper left", bbox_to_anchor=(1.01, 1.0),
                               fontsize=7, frameon=False)
            fig.suptitle(f"Learning vs forgetting — {setting['name']} LoRA, preset {cfg.preset} "
                         f"(seed means; bars = sd over seeds)", fontsize=10)
            fig.tight_layout()
            figures.append(save_figure(fig, out / f"pareto_{kind}{suffix}.png", footnote=footnote))
    return figures


def far_from(value: float, values: list[float], factor: float = 3.0) -> bool:
    """Whether ``value`` lies more than ``factor`` times the spread of ``values`` outside their range
    (the base model's target NLL of 2.9 beside methods at 0.55-0.7 would squash every curve into a sliver)."""
    if not values:
        return False
    lo, hi = min(values), max(values)
    span = max(hi - lo, 1e-12)
    return value < lo - factor * span or value > hi + factor * span


def _draw_base(ax, x: float, y: float, xs: list[float], ys: list[float]) -> None:
    """The base model as a star, or, where it is far off the methods' range on one axis, as a dashed
    line at its value on the other axis (labelled with the far value), so the curves keep the scale."""
    far_x, far_y = far_from(x, xs), far_from(y, ys)
    style = dict(color="black", lw=0.9, ls="--", zorder=2)
    if far_x and far_y:
        ax.text(0.99, 0.99, f"base model off scale ({x:.3g}, {y:.3g})", transform=ax.transAxes, fontsize=7,
                ha="right", va="top", color="0.3")
    elif far_x:
        ax.axhline(y, label=f"base model (x = {x:.3g}, off scale)", **style)
    elif far_y:
        ax.axvline(x, label=f"base model (y = {y:.3g}, off scale)", **style)
    else:
        ax.scatter([x], [y], marker="*", s=220, color="black", zorder=5, label="base model")


def _off_scale(point: dict, base: dict, keys: tuple, factor: float = 1.5) -> bool:
    """An NLL more than ``factor`` times the base model's (a diverged run)."""
    return any("nll" in k and point.get(k) is not None and base.get(k) and point[k] > factor * base[k]
               for k in keys)


def _pm(mean, sd, digits=3) -> str:
    if mean is None:
        return "-"
    return f"{mean:+.{digits}f} ± {sd:.{digits}f}" if sd is not None else f"{mean:+.{digits}f}"


def hosts(payload: dict) -> list[str]:
    """The CPU/GPU names the result's processes ran on (``provenance``), in order of first use."""
    names = [p.get("device_name") for p in payload.get("provenance") or []]
    return list(dict.fromkeys(n for n in names if n))


def runs_time(payload: dict) -> str:
    """The summed time of a result's runs (training and evaluation, each run once, reused runs
    included), as "5.5 h" or "12.3 min": for a resumed or merged result, unlike the last process's wall time."""
    seconds = sum(r.get("seconds") or 0 for r in payload["runs"])
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def render_markdown(payload: dict, summary: dict) -> str:
    cfg = payload["config"]
    base = payload["base"]
    machine = payload["machine"]
    # a resumed or merged result ran in several processes, possibly on several hosts (provenance)
    processes = payload.get("provenance") or []
    ran_on = hosts(payload) or [machine["device_name"]]
    wall = payload["timing"].get("total_s", 0) / 60
    lines = [f"# Forgetting benchmark — preset `{payload['preset']}`", "",
             f"Model: **{payload['model']}**. Device: {', '.join(ran_on)} ({machine['device']}), "
             f"torch {machine['versions'].get('torch')}, transformers {machine['versions'].get('transformers')}, "
             f"peft {machine['versions'].get('peft')}. "
             + (f"Total wall time {wall:.1f} min." if len(processes) <= 1 else
                f"Ran in {len(processes)} processes (resumes and parts, see `provenance`); its runs took "
                f"{runs_time(payload)} (training and evaluation, each run once, runs reused from earlier results "
                "included).")
             + (" Run seconds (cost) are comparable only between runs of the same host." if len(ran_on) > 1 else ""),
             ""]
    if payload["notes"]:
        lines += ["Notes: " + "; ".join(payload["notes"]), ""]
    split = payload.get("selection", "").startswith("validation")
    half = "_test" if split else ""
    if split:
        n_items = (payload["data"] or {}).get("splits", {})
        lines += ["Selection apart from reporting: every evaluation set is split once into a validation and a "
                  "test half; grid points and the tolerance line are chosen on validation, every number below is "
                  "the test half. Items per half: " + ", ".join(f"{k} {len(v['val'])}/{len(v['test'])}"
                                                               for k, v in n_items.items()) + ".", ""]
    else:
        lines += ["Selection and reporting on the same items (result written before the validation/test split).",
                  ""]
    lines += [f"## Forgetting evidence (plain LoRA − base; mean ± sd over seeds{'; test half' if split else ''})",
              ""]
    rows = []
    for setting, ev in payload["forgetting_evidence"].items():
        for k in ("src_text_nll", "src_text_nll_wordnet", "src_text_nll_pydoc", "src_mcq_nll", "src_mcq_acc",
                  "proxy_text_nll", "proxy_mcq_nll", "proxy_mcq_acc", "tgt_nll", "tgt_em"):
            if k in ev:
                rows.append([setting, k, ev[k]["base"], ev[k]["plain_mean"],
                             _pm(ev[k]["delta_mean"], ev[k]["delta_sd"]), str(ev["n_seeds"])])
    lines.append(markdown_table(["setting", "metric", "base", "plain LoRA", "Δ (plain − base)", "seeds"], rows))
    titles = {"nll": ("Best held-out source text NLL at target NLL ≤ plain LoRA + "
                      f"{cfg['nll_tolerance']}", "src text NLL"),
              "mcq_nll": (f"Best MCQ NLL(correct) at target NLL ≤ plain LoRA + {cfg['nll_tolerance']}", "MCQ NLL"),
              "acc": (f"Best MCQ accuracy at target exact match ≥ plain LoRA − {cfg['acc_tolerance'] * 100:g} pp",
                      "MCQ acc")}
    src_metric = {"nll": "src_text_nll", "mcq_nll": "src_mcq_nll", "acc": "src_mcq_acc"}
    for setting, tables in payload["tables"].items():
        for key, rows_t in tables.items():
            if len(rows_t) < 2:  # e.g. exact match measured for plain LoRA only: nothing to compare
                continue
            title, src_name = titles[key]
            tgt_name = "target EM" if key == "acc" else "target NLL"
            lines += ["", f"## {title} — `{setting}`", "",
                      f"Base: {tgt_name} {fmt(base.get(('tgt_em' if key == 'acc' else 'tgt_nll') + half))}, "
                      f"{src_name} {fmt(base.get(src_metric[key] + half))}. "
                      "`recovered` = share of plain LoRA's forgetting undone on that source metric. "
                      "Rows marked `no` had no grid point within the tolerance (the point with the best target "
                      "score is shown instead).", ""]
            trs = []
            for r in rows_t:
                trs.append([r["family"], r["point"], r["init"] or "-", "yes" if r["within_tolerance"] else "no",
                            _pmv(r["target"], r["target_sd"]), _pmv(r["source"], r["source_sd"]),
                            "-" if r["recovered"] is None else f"{100 * r['recovered']:.0f}%",
                            r["src_text_nll"], r["src_mcq_nll"], r["src_mcq_acc"], r["proxy_text_nll"],
                            r["tgt_em"], r["penalty_task_ratio_last"], _seconds(r.get("cost_seconds")),
                            str(r["seeds"])])
            lines.append(markdown_table(
                ["method", "point", "init", "within tol", tgt_name, src_name, "recovered", "src text NLL",
                 "MCQ NLL", "MCQ acc", "in-proxy text NLL", "target EM", "pen/task (end)", "cost (s)", "seeds"],
                trs))
            if any(r.get("paired") for r in rows_t):
                lines += ["", paired_markdown(rows_t, TABLES[key][:2], tgt_name, src_name)]
    lines += ["", f"## All grid points (seed means{'; test half' if split else ''})", ""]
    cols = [k + half for k in ("tgt_nll", "tgt_em", "src_text_nll", "src_mcq_nll", "src_mcq_acc", "proxy_text_nll",
                               "proxy_mcq_nll", "proxy_mcq_acc")]
    prow = [[p["setting"], p["family"], p["point"], p["init"] or "-", *(p.get(k) for k in cols),
             p["penalty_task_ratio_last"], str(len(p["seeds"]))] for p in payload["points"]]
    prow.insert(0, ["-", "base model", "-", "-", *(base.get(k) for k in cols), None, "-"])
    lines.append(markdown_table(["setting", "method", "point", "init", "tgt NLL", "tgt EM", "src text NLL",
                                 "src MCQ NLL", "src MCQ acc", "in-proxy text NLL", "in-proxy MCQ NLL",
                                 "in-proxy MCQ acc", "pen/task (end)", "seeds"], prow))
    if payload.get("calibration"):
        lines += ["", "## Lambda calibration (at plain LoRA's final weights)", "",
                  "`q = d^T P d` of plain LoRA's displacement from its init under each curvature; `lam_ratio1 = "
                  "2 * task_loss / q` is the strength at which that solution's penalty equals its final task loss.", ""]
        crow = []
        for key, cal in payload["calibration"].items():
            for s, v in cal.items():
                if isinstance(v, dict):
                    crow.append([key, s, v["q"], v["lam_ratio1"]])
        lines.append(markdown_table(["run", "penalty", "q", "lam_ratio1"], crow))
    for fig in payload.get("figures", []):
        lines += ["", f"![{fig}]({fig})"]
    lines += ["", provenance_markdown(payload.get("provenance"))]
    return "\n".join(lines) + "\n"


def paired_cell(d: dict | None, scale: float = 1.0, digits: int = 3) -> str:
    """``+0.012 [-0.003, +0.027]``, bold where the interval excludes 0; ``-`` where not measured."""
    if not d:
        return "-"
    cell = f"{scale * d['mean']:+.{digits}f} [{scale * d['lo']:+.{digits}f}, {scale * d['hi']:+.{digits}f}]"
    return f"**{cell}**" if d["significant"] else cell


def paired_markdown(rows: list[dict], metrics: tuple[str, str], tgt_name: str, src_name: str) -> str:
    """The chosen points against plain LoRA and L2 of the same seeds, test half, 95 % intervals."""
    target, source = metrics
    pct = {m: (100.0, 1) if m.endswith(("_acc", "_em")) else (1.0, 3) for m in metrics}
    out = []
    for r in rows:
        p = r.get("paired") or {}
        out.append([r["family"], r["point"], str(r["seeds"])]
                   + [paired_cell((p.get(ref) or {}).get(m), *pct[m])
                      for ref in ("LoRA", "L2") for m in (source, target)])
    unit = {m: " (pp)" if pct[m][0] == 100.0 else "" for m in metrics}
    note = ("Paired by seed, test half: mean over seeds of (method − reference) with a 95 % bootstrap interval "
            "over seeds and items; **bold**: the interval excludes 0.")
    return note + "\n\n" + markdown_table(
        ["method", "point", "seeds", f"Δ {src_name}{unit[source]} vs LoRA", f"Δ {tgt_name}{unit[target]} vs LoRA",
         f"Δ {src_name}{unit[source]} vs L2", f"Δ {tgt_name}{unit[target]} vs L2"], out)


def _seconds(x) -> str:
    """A cost in whole seconds (training + curvature fit + the calibration a relative strength needs)."""
    return "-" if x is None else f"{x:.0f}"


def _pmv(mean, sd) -> str:
    if mean is None:
        return "-"
    return f"{fmt(mean)} ± {fmt(sd)}" if sd is not None else fmt(mean)
