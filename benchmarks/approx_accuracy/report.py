"""Markdown report and plots of the approximation-accuracy benchmark, from its result JSON."""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks import harness
from benchmarks.approx_accuracy.inputs import median, pct
from benchmarks.harness import fmt, fmt_bytes, markdown_table
from benchmarks.harness.report import provenance_markdown

# ---------------------------------------------------------------------------------- outputs

_DIR_COLS = ["random", "target_grad", "source_grad", "finetune_disp"]


def _qf_table(rows: list[dict], extra_cols=()) -> str:
    headers = ["fit", "vs", "terms", *extra_cols, "random (median abs)", "random (median signed)", "target grad",
               "source grad", "finetune disp", "state"]
    body = []
    for r in rows:
        s = r["summary"]
        body.append([r["label"], r["reference"].upper(), r.get("terms") or "-",
                     *[fmt(r.get(c)) if not isinstance(r.get(c), str) else r.get(c) for c in extra_cols],
                     pct(s.get("random")), pct(s.get("random_signed")), pct(s.get("target_grad")),
                     pct(s.get("source_grad")), pct(s.get("finetune_disp")), fmt_bytes(r.get("nbytes"))])
    return markdown_table(headers, body, align=["l", "l", "l"] + ["r"] * (len(headers) - 3))


def write_markdown(result: dict, path: Path, plots: dict[str, Path]) -> Path:
    cfg = result["config"]
    m = result["machine"]
    lines = [f"# Approximation accuracy ({result['preset']} preset)", "",
             f"{result['description']}.", "",
             f"Device: {m['device']} ({m.get('device_name')}), torch {m['versions'].get('torch')}, "
             f"transformers {m['versions'].get('transformers')}, peft {m['versions'].get('peft')}, curvlinops "
             f"{m['versions'].get('curvlinops-for-pytorch')}; {m['timestamp_utc']}; total "
             f"{result['timings'].get('total_s', 0):.0f} s.", "",
             f"Model: {result['model']['name']}, vocab {result['model']['vocab_size']}, "
             f"{result['model']['attn_implementation']} attention, {result['model']['dtype']}. LoRA r={cfg['r']}, "
             f"alpha={cfg['alpha']}; lowrank/diag_lowrank rank {cfg['rank']}.", "",
             "Numbers are signed relative errors `d^T P d / d^T G d - 1` (negative = underestimates the "
             "reference), with G the **exact** token-level GGN (for kind mc/ggn) or the exact token-level "
             "empirical Fisher (for kind empirical), both exact, computed from Jacobian-vector products (see "
             "below) on the same packed (unpadded, fully labelled) proxy batches as the fits. `random` = over "
             "random Gaussian directions (`median abs` = median of |error|). "
             f"Directions: gradients at theta0 of the target loss ({cfg['target']['task']} SFT batch) and of the "
             "source loss (held-out source text), and the displacement theta_t - theta0 of a short LoRA fine-tune "
             f"on {cfg['target']['task']} from the same anchor. `state` = the operator's `nbytes`.", ""]
    for note in result["notes"]:
        lines.append(f"- {note}")
    lines.append("")
    if result["crosscheck"]:
        lines += ["## How the exact references are computed", "",
                  "`d^T G d` for the full LoRA (and Delta-W) space comes from one Jacobian-vector product per "
                  "direction and batch (`torch.func.jvp` vmapped over directions, as curvlinops' "
                  "`JacobianLinearOperator`; forward-mode AD through the whole model): with `z = J d` per term, "
                  "`d^T GGN d = mean_m z^T (diag p - p p^T) z` and `d^T EF d = "
                  "mean_m ((p - e_y)^T z)^2`, the same numbers as `d^T (GGNLinearOperator @ d)` / `EFLinearOperator` "
                  "without their transposed-Jacobian pass, and both from one JVP. Cross-check against the "
                  "curvlinops operators (matvecs) on a few directions:", ""]
        body = [[c["combo"], c["space"], c["num_dirs"], fmt(c["ggn_max_rel_diff"]), fmt(c["ef_max_rel_diff"]),
                 fmt(c["ggn_seconds_per_batch_matvec"]), fmt(c["ef_seconds_per_batch_matvec"])]
                for c in result["crosscheck"]]
        lines += [markdown_table(["combo", "space", "directions", "GGN max rel. diff", "EF max rel. diff",
                                  "s per GGN matvec", "s per EF matvec"], body), ""]
    if result["qf"]:
        lines += ["## Quadratic forms along directions, full LoRA", "",
                  "diag and lowrank rows are read off the diag_lowrank fit of the same kind (same vectors and MC "
                  "draws; `diag(P) = diag(G-hat)` and `U C U^T` are exactly what `structure=\"diag\"` / "
                  "`\"lowrank\"` store).", ""]
        for key, info in result["combos"].items():
            rows = [r for r in result["qf"] if r["combo"] == key]
            ref = info["reference"]
            dirs = info["directions"]
            lines += [f"### {key}: {info['label']}", "",
                      f"{info['lora_numel']:,} LoRA parameters in {info['num_layers']} layers; proxy "
                      f"{cfg['proxy']['num_batches']} batches x {cfg['proxy']['batch_size']}x{cfg['proxy']['seq_len']} "
                      f"tokens. Exact references: {ref['seconds_per_batch_jvp']:.2f} s per batch and direction "
                      f"(one JVP gives both). Fine-tune: {cfg['finetune']['steps']} "
                      f"steps, loss {dirs['finetune_losses'][0]:.3f} -> {dirs['finetune_losses'][-1]:.3f}, "
                      f"|theta_t - theta0| = {dirs['finetune_disp_norm']:.3g}"
                      + (f"; ||s B A|| / ||W|| = {info['delta_w_rel_norm']:.3f}" if "delta_w_rel_norm" in info else "")
                      + ".", "", _qf_table(rows), ""]
        if "qf" in plots:
            lines += [f"![quadratic-form errors]({plots['qf'].name})", ""]
    if result["delta_w"]:
        lines += ["## kfac_delta_w in Delta-W space", "",
                  "kfac_delta_w acts on Delta W = s B A, not on theta (its penalty is quartic in (A, B)), so it "
                  "is compared with the exact GGN / EF of the frozen **base weights** of the adapted layers: the "
                  "loss depends on W + Delta W, so that is exactly the Delta-W curvature. Directions: random in "
                  "Delta-W space, the loss gradients w.r.t. W (= w.r.t. Delta W), and s(B_t A_t - B_0 A_0) of the "
                  "same fine-tune.", ""]
        for key, ref in result["delta_w_reference"].items():
            lines.append(f"- {key}: {ref['num_params']:,} Delta-W parameters, exact references "
                         f"{ref['seconds_per_batch_jvp']:.2f} s per batch and direction")
        lines += ["", _qf_table(result["delta_w"], extra_cols=("combo",)), ""]
    if result["terms"]:
        lines += ["## terms=\"sequence\" vs terms=\"token\"", "",
                  "On a few tokens (token-level fitting back-propagates once per token and sample), each fit "
                  "against the exact references on the same tokens. With kind=mc the per-sequence estimate is "
                  "unbiased for the token-level GGN; with kind=empirical it is the per-sequence EF, a different "
                  "matrix than the token-level EF reference.", "",
                  _qf_table(result["terms"], extra_cols=("combo", "num_tokens")), ""]
    if result["kfac_memory"]:
        lines += ["## Accuracy cost of K-FAC memory savings", "",
                  "kind=empirical (deterministic): differences are the variant's own. `max |rel diff|` = largest "
                  "relative change of a quadratic form vs the default (fp32, shared input factors).", ""]
        body = [[r["combo"], r["structure"], r["variant"], fmt_bytes(r["nbytes"]), fmt(r["nbytes_vs_default"]),
                 fmt(r["max_abs_rel_diff_vs_default"]), pct(r["vs_exact_ef"].get("random")),
                 pct(r["vs_exact_ef"].get("finetune_disp"))] for r in result["kfac_memory"]]
        lines += [markdown_table(["combo", "structure", "variant", "state", "vs default", "max |rel diff|",
                                  "vs exact EF: random", "vs exact EF: finetune disp"], body,
                                 align=["l", "l", "l", "r", "r", "r", "r", "r"]), ""]
    st = result.get("stabilization")
    if st:
        ns = st["num_batches"]
        lines += ["## Stabilization with the number of proxy batches", "",
                  f"{st['combo']}: fits on the first n proxy batches ({st['batch_shape'][0]}x{st['batch_shape'][1]} "
                  f"tokens each). Median over all directions of |rel. error| of the quadratic forms vs the fit on "
                  f"{max(ns)} batches and vs the exact curvature on the union of the {max(ns)} batches. The "
                  "`exact on n batches` rows show how much the true curvature itself moves with the data.", ""]
        body = []
        for c in st["curves"]:
            body.append([c["label"], c["reference"].upper()]
                        + ([pct(_summary_all(s)) for s in c["vs_full_fit"]] if c["vs_full_fit"] else ["-"] * len(ns))
                        + [pct(_summary_all(s)) for s in c["vs_union"]])
        headers = (["fit", "ref"] + [f"vs {max(ns)}-batch fit, n={n}" for n in ns]
                   + [f"vs exact union, n={n}" for n in ns])
        lines += [markdown_table(headers, body, align=["l", "l"] + ["r"] * (2 * len(ns))), ""]
        if "stab" in plots:
            lines += [f"![stabilization]({plots['stab'].name})", ""]
    dl = result.get("dense_layer")
    if dl:
        lines += ["## One layer, dense", "",
                  f"LoRA on `{dl['module']}` only. Dense references: the exact token-level GGN (computed as "
                  "`(1/M) sum_m J_u^T W^T (diag p - p p^T) W J_u`, with `J_u` the Jacobian of the last hidden "
                  "state by forward-mode AD and W the linear output head: exact, no sampling) and the exact "
                  "token-level EF (`fit_curvature(structure='dense', kind='empirical', terms='token')`). Both are "
                  "cross-checked against curvlinops matvecs. `overlap` = mean squared cosine of the principal "
                  f"angles between the top-{dl['k']} eigenspaces. `oracle` rows = the best diag / rank-{dl['rank']} "
                  "/ diag+rank built from the exact matrix (structure error alone, no estimation error).", ""]
        for setting, s in dl["settings"].items():
            lines += [f"### {setting}: {s['label']}", "",
                      f"{s['num_params']:,} parameters (A {s['A_params']}, B {s['B_params']}), {s['num_terms']} "
                      f"terms. Exact GGN in {s['ggn_seconds']:.0f} s (max rel. diff vs curvlinops matvecs "
                      f"{s['check_vs_curvlinops_max_rel_diff']['ggn']:.1e}), EF in {s['ef_seconds']:.0f} s "
                      f"({s['check_vs_curvlinops_max_rel_diff']['ef']:.1e}). GGN block norms: "
                      + ", ".join(f"{k} {v:.3g}" for k, v in s["ggn_block_norms"].items()) + ".", ""]
            body = [[r["label"], r["reference"].upper(), fmt(r["rel_frobenius"]), fmt(r["rel_frobenius_AA"]),
                     fmt(r["rel_frobenius_BB"]), fmt(r["rel_frobenius_AB"]), fmt(r["topk_overlap"]),
                     pct(r["qf_random_median_signed_rel_err"]), fmt_bytes(r.get("nbytes"))] for r in s["rows"]]
            lines += [markdown_table(["fit", "vs", "rel. Frobenius", "AA", "BB", "AB",
                                      f"top-{dl['k']} overlap", "random qf (median signed)", "state"], body,
                                     align=["l", "l"] + ["r"] * 7), ""]
        if "dense" in plots:
            lines += [f"![dense layer]({plots['dense'].name})", ""]
    if result["skipped"]:
        lines += ["## Skipped", ""] + [f"- {s['where']}: {s.get('structure')} {s.get('fit', '')} "
                                       f"{s.get('terms', '')}: {s['error']}" for s in result["skipped"]] + [""]
    lines += ["## Timings", "", markdown_table(["phase", "seconds"], [[k, v] for k, v in result["timings"].items()]),
              ""]
    lines += ["", provenance_markdown(result.get("provenance"))]
    path.write_text("\n".join(lines))
    return path


def _summary_all(s: dict) -> float | None:
    """Median over all directions of |rel err| from a direction summary."""
    vals = [s.get("random")] + [abs(v) for k, v in s.items() if k not in ("random", "random_signed") and v is not None]
    return median(vals)


def make_plots(result: dict, out_dir: Path, stem: str) -> dict[str, Path]:
    plt = harness.plot_style()
    m = result["machine"]
    foot = (f"approx_accuracy, preset {result['preset']}, {m['device']} ({m.get('device_name')}), "
            f"{result['model']['name']}")
    paths: dict[str, Path] = {}
    keys = list(result["combos"])
    if result["qf"] and keys:
        fig, axes = plt.subplots(len(keys), 1, figsize=(11, 3.4 * len(keys)), squeeze=False)
        for ax, key in zip(axes[:, 0], keys):
            rows = [r for r in result["qf"] if r["combo"] == key]
            labels = [r["label"] for r in rows]
            width = 0.8 / len(_DIR_COLS)
            for j, col in enumerate(_DIR_COLS):
                vals = [abs(r["summary"].get(col)) if r["summary"].get(col) is not None else float("nan")
                        for r in rows]
                vals = [max(v, 1e-4) for v in vals]
                ax.bar([i + (j - (len(_DIR_COLS) - 1) / 2) * width for i in range(len(rows))], vals, width,
                       label=col.replace("_", " "))
            ax.set_yscale("log")
            ax.axhline(1.0, color="0.4", lw=0.8, ls="--")
            ax.set_xticks(range(len(rows)))
            ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=7)
            ax.set_ylabel("|d'Pd / d'Gd - 1|")
            ax.set_title(f"{key}: {result['combos'][key]['label']} (vs exact GGN; empirical vs exact EF)")
            ax.legend(ncol=4, loc="upper left")
        fig.tight_layout()
        paths["qf"] = harness.save_figure(fig, out_dir / f"{stem}-qf.png", foot)
    st = result.get("stabilization")
    if st:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        ns = st["num_batches"]
        for c in st["curves"]:
            ls = "--" if c["label"].startswith("exact") else "-"
            for ax, key in zip(axes, ("vs_full_fit", "vs_union")):
                if c[key] is None:
                    continue
                ys = [max(_summary_all(s) or 0, 1e-4) for s in c[key]]
                ax.plot(ns, ys, ls, marker="o", label=c["label"])
        axes[0].set_title(f"vs the fit on {max(ns)} batches")
        axes[1].set_title(f"vs exact GGN/EF on the union of {max(ns)} batches")
        for ax in axes:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(ns)
            ax.set_xticklabels([str(n) for n in ns])
            ax.set_xlabel("proxy batches")
        axes[0].set_ylabel("median |rel. error| of d'Pd")
        axes[1].legend(fontsize=7)
        fig.suptitle(f"Stabilization, {st['combo']}")
        fig.tight_layout()
        paths["stab"] = harness.save_figure(fig, out_dir / f"{stem}-stabilization.png", foot)
    dl = result.get("dense_layer")
    if dl and dl["settings"]:
        settings = list(dl["settings"])
        fig, axes = plt.subplots(len(settings), 1, figsize=(11, 3.6 * len(settings)), squeeze=False)
        for ax, setting in zip(axes[:, 0], settings):
            rows = dl["settings"][setting]["rows"]
            x = range(len(rows))
            ax.bar([i - 0.2 for i in x], [min(r["rel_frobenius"], 10) for r in rows], 0.4, label="rel. Frobenius error")
            ax.bar([i + 0.2 for i in x], [r["topk_overlap"] for r in rows], 0.4, label=f"top-{dl['k']} overlap")
            ax.set_xticks(list(x))
            ax.set_xticklabels([f"{r['label']} [{r['reference'].upper()}]" for r in rows], rotation=40, ha="right",
                               fontsize=7)
            ax.axhline(1.0, color="0.4", lw=0.8, ls="--")
            ax.set_title(f"one layer ({dl['module']}), {dl['settings'][setting]['label']}")
            ax.legend(loc="upper right")
        fig.tight_layout()
        paths["dense"] = harness.save_figure(fig, out_dir / f"{stem}-dense_layer.png", foot)
    return paths


def write_outputs(result: dict, output_dir: str | Path) -> dict[str, Path]:
    """``<preset>-<device>.json``, ``.md`` and PNG plots in ``output_dir``."""
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{result['preset']}-{torch.device(result['machine']['device']).type}"
    paths = {"json": harness.write_json(out_dir / f"{stem}.json", result)}
    plots = make_plots(result, out_dir, stem)
    paths.update(plots)
    paths["md"] = write_markdown(result, out_dir / f"{stem}.md", plots)
    return paths
