"""Renderers of the marked tables: each takes the repository root and returns markdown built only
from committed result JSON (read through :func:`benchmarks.harness.load_result`).

Every table opens with one caption line naming its result file, preset, device and what ran (kind,
rank kept), so a reader can trace each number. Selections (the forgetting headline: per method the
best point within tolerance) are the ones the benchmark itself computed and stored in the JSON
(``tables``, from :func:`benchmarks.forgetting.summary.best_at_matched_target`); nothing is picked here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from benchmarks.harness import fmt_bytes, load_result, markdown_table

FORGETTING = "benchmarks/results/forgetting/small/results.json"
COST = "benchmarks/results/cost/small-cpu.json"
APPROX = "benchmarks/results/approx_accuracy/small-cpu.json"
CONTINUAL = "benchmarks/results/continual/small.json"
CONTINUAL_2SEEDS = "benchmarks/results/continual/small_2seeds/small.json"
#: where ``lalora-curv demo --output-dir benchmarks/results/demo`` writes its JSON
DEMO = "benchmarks/results/demo/demo.json"


def _device(payload: dict) -> str:
    machine = payload.get("machine") or {}
    return payload.get("device") or machine.get("device") or "?"


def _caption(path: str, payload: dict, extra: str = "") -> str:
    return (f"<sub>From `{path}`: preset `{payload.get('preset')}`, device `{_device(payload)}`"
            + (f"; {extra}" if extra else "") + ".</sub>\n\n")


def _num(x, decimals: int) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{decimals}f}"


def _pm(mean, sd, decimals: int) -> str:
    return _num(mean, decimals) + (f" ± {sd:.{decimals}f}" if sd is not None and mean is not None else "")


def _share(x) -> str:
    """A share of forgetting undone, in whole percent (``recovered``)."""
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.0f} %".replace("-", "−")


def _pct(x, signed: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    v = 100 * x
    digits = 2 if abs(v) < 10 else 3
    text = f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"
    if signed and v > 0:
        text = "+" + text
    return text.replace("-", "−") + " %"


# ============================================================================================ forgetting
def _forgetting_rows(payload: dict, setting: str) -> tuple[list[dict], dict]:
    tables = payload["tables"].get(setting)
    if tables is None:
        raise KeyError(f"{FORGETTING}: no best-at-matched-target tables for setting {setting!r}")
    mcq = {r["family"]: r for r in tables["mcq_nll"]}
    return tables["nll"], mcq


def _forgetting_caption(payload: dict, setting: str) -> str:
    cfg = payload["config"]
    st = next((s for s in cfg["settings"] if s["name"] == setting), {})
    modules = st.get("target_modules", setting)
    modules = modules if isinstance(modules, str) else ", ".join(modules)
    return _caption(FORGETTING, payload,
                    f"setting `{setting}` (LoRA r={st.get('r', cfg['r'])} on {modules}, lr {st.get('lr', cfg['lr'])}, "
                    f"{cfg['steps']} steps); curvature kind `{cfg['curvature_kind']}`; "
                    f"target-NLL tolerance {cfg['nll_tolerance']}")


def forgetting_headline(root: Path, setting: str = "qv") -> str:
    """README: per method the point with the best held-out text NLL within tolerance (and, in the MCQ
    columns, the point with the best MCQ NLL), as stored in ``tables[setting]``."""
    payload = load_result(root / FORGETTING)
    nll, mcq = _forgetting_rows(payload, setting)
    base = payload["base"]
    rows = [["base model", _num(base["tgt_nll"], 3), _num(base["src_text_nll"], 3), "-", _num(base["src_mcq_nll"], 2),
             "-", "-"]]
    for r in nll:
        m = mcq.get(r["family"], {})
        label = r["family"] if r["point"] == "-" else f"{r['family']} ({r['point']})"
        if not r["within_tolerance"]:
            label += " (no point within tolerance: best target shown)"
        rows.append([label, _pm(r["target"], r["target_sd"], 3), _pm(r["source"], r["source_sd"], 3),
                     _share(r["recovered"]), _pm(m.get("source"), m.get("source_sd"), 2), _share(m.get("recovered")),
                     str(r["seeds"])])
    return _forgetting_caption(payload, setting) + markdown_table(
        [f"method ({setting}, best point)", "target NLL ↓", "held-out text NLL ↓", "recovered",
         "MCQ NLL of the correct word ↓ (its best point)", "recovered", "seeds"], rows)


def _evidence_line(payload: dict, setting: str) -> str:
    """The base model's scores and plain LoRA − base (mean ± sd over its seeds) for ``setting``."""
    base, ev = payload["base"], payload["forgetting_evidence"][setting]

    def delta(key: str, decimals: int, scale: float = 1.0) -> str:
        d = ev[key]
        sd = "" if d["delta_sd"] is None else f" ± {scale * d['delta_sd']:.{decimals}f}"
        return f"{scale * d['delta_mean']:+.{decimals}f}{sd}"

    return (f"Base model: target NLL {base['tgt_nll']:.3f}, held-out text NLL {base['src_text_nll']:.3f}, MCQ NLL "
            f"{base['src_mcq_nll']:.2f}, MCQ acc {100 * base['src_mcq_acc']:.1f} %. Plain LoRA − base "
            f"({ev['n_seeds']} seeds, mean ± sd): target NLL {delta('tgt_nll', 3)}, text NLL "
            f"{delta('src_text_nll', 3)}, MCQ NLL {delta('src_mcq_nll', 2)}, MCQ acc "
            f"{delta('src_mcq_acc', 1, 100)} pp.\n\n")


def forgetting_best(root: Path, setting: str) -> str:
    """docs/benchmarks/forgetting.md: the base and plain LoRA's forgetting, then the same selection as
    the headline with the chosen points and MCQ accuracy."""
    payload = load_result(root / FORGETTING)
    nll, mcq = _forgetting_rows(payload, setting)
    rows = []
    for r in nll:
        m = mcq.get(r["family"], {})
        rows.append([r["family"], r["point"], "yes" if r["within_tolerance"] else "no",
                     _pm(r["target"], r["target_sd"], 3), _pm(r["source"], r["source_sd"], 3), _share(r["recovered"]),
                     m.get("point", "-"), _pm(m.get("source"), m.get("source_sd"), 2), _share(m.get("recovered")),
                     _pct(r["src_mcq_acc"]), str(r["seeds"])])
    return _forgetting_caption(payload, setting) + _evidence_line(payload, setting) + markdown_table(
        ["method", "best point (text NLL)", "within tolerance", "target NLL ↓", "held-out text NLL ↓", "recovered",
         "best point (MCQ NLL)", "MCQ NLL ↓", "recovered", "MCQ acc (text-NLL point)", "seeds"], rows)


# ============================================================================================ cost
def _fit_label(fit: dict, cfg: dict) -> str:
    label = f"{fit['structure']} / {fit['kind']}"
    if fit["structure"] in ("diag_lowrank", "lowrank"):
        kept = (fit.get("info") or {}).get("rank")
        label += f" (rank {kept} kept)" if kept is not None else f" (rank {cfg.get('lowrank_rank')} asked)"
    if fit.get("backend", "hooks") != "hooks":
        label += f", backend={fit['backend']}"
    return label


def _cost_model(payload: dict) -> dict:
    model = payload["models"][0]
    if not model.get("fits"):
        raise ValueError(f"{COST}: first model {model.get('label')!r} has no fits")
    return model


def cost_headline(root: Path) -> str:
    """README: fit time over one fwd+bwd (paired: median, and min-max over the repeats where the JSON
    has them), state, penalty share of a LoRA step (hooks fits of every kind)."""
    payload = load_result(root / COST)
    model = _cost_model(payload)
    penalty = {p["structure"]: p for p in model.get("penalty") or [] if p.get("ok")}
    rows = []

    def spread(entry: dict) -> str:
        lo, hi = entry.get("paired_ratio_min"), entry.get("paired_ratio_max")
        return "-" if lo is None else f"{_num(lo, 2)}-{_num(hi, 2)}"

    for f in model["fits"]:
        if not f.get("ok") or f.get("backend", "hooks") != "hooks":
            continue
        p = penalty.get(f["structure"], {}) if f["kind"] == "empirical" else {}
        rows.append([_fit_label(f, payload["config"]), _num(f.get("paired_ratio"), 2), spread(f),
                     fmt_bytes(f["nbytes"]),
                     _pct(p.get("penalty_pct_of_step") / 100) if p.get("penalty_pct_of_step") is not None else "-"])
    kfac = (model.get("curvlinops") or {}).get("kfac")
    if kfac and kfac.get("ok"):
        rows.append(["curvlinops KFAC / empirical (same batch)", _num(kfac.get("paired_ratio"), 2), spread(kfac),
                     fmt_bytes(kfac["factor_bytes"]), "-"])
    b = model["batch"]
    repeats = payload["config"].get("repeats")
    return _caption(COST, payload, f"{model['label']}, batch {b['batch_size']}x{b['seq_len']}, LoRA r="
                    f"{model['lora']['r']} on {', '.join(model['lora']['target_modules'])}, {model['dtype']}, "
                    f"{repeats} timed repeats") + \
        markdown_table(["method (structure / kind)", "fit / one fwd+bwd (paired, median)", "min-max", "state",
                        "penalty, % of a LoRA step"], rows)


def cost_methods(root: Path) -> str:
    """docs/benchmarks/cost.md: every fit of the first model incl. the other libraries."""
    payload = load_result(root / COST)
    model = _cost_model(payload)
    rows = []

    def add(label: str, entry: dict | None, state: str) -> None:
        if not entry:
            return
        if entry.get("ok"):
            rows.append([label, _num(entry.get("paired_ratio"), 2), state, fmt_bytes(entry.get("peak_delta_bytes"))])
        else:
            rows.append([label, "skipped" if entry.get("skipped") else "failed", "-", "-"])

    for f in model["fits"]:
        add(_fit_label(f, payload["config"]), f, fmt_bytes(f.get("nbytes")))
    add("diag / empirical, backend=backpack", (model.get("backpack") or {}).get("diag_batchgrad"),
        fmt_bytes(((model.get("backpack") or {}).get("diag_batchgrad") or {}).get("nbytes")))
    curvlinops = model.get("curvlinops") or {}
    kfac = curvlinops.get("kfac")
    add("curvlinops KFAC (empirical)", kfac, fmt_bytes((kfac or {}).get("factor_bytes")))
    ggn = curvlinops.get("ggn_matvec")
    eager = ", eager attention" if (ggn or {}).get("first_attempt") else ""
    add(f"curvlinops GGN matvec (1 vector{eager})", ggn, "-")
    for e in model.get("laplace_torch") or []:
        add(f"laplace-torch {e['config']}", e, "-")
    b = model["batch"]
    return _caption(COST, payload, f"{model['label']}, batch {b['batch_size']}x{b['seq_len']}, {model['dtype']}") + \
        markdown_table(["method", "x fwd+bwd (paired)", "state", "peak mem +"], rows)


def _paired(model: dict, structure: str):
    fit = next((f for f in model["fits"] if f.get("ok") and f["structure"] == structure and f["kind"] == "empirical"
                and not f.get("variant") and f.get("backend", "hooks") == "hooks"), {})
    return fit.get("paired_ratio")


def cost_width(root: Path) -> str:
    """docs/benchmarks/cost.md: every model of the run (real and truncated random-weight shapes)."""
    payload = load_result(root / COST)
    rows = []
    for m in payload["models"]:
        if "baseline" not in m:
            continue
        curvlinops = m.get("curvlinops") or {}
        pens = {p["structure"]: p for p in m.get("penalty") or [] if p.get("ok")}
        b = m["batch"]
        rows.append([f"{m['label']}, {b['batch_size']} x {b['seq_len']}",
                     _num(m["baseline"]["fwd_bwd"].get("per_batch_s"), 2), _num(_paired(m, "diag"), 2),
                     _num(_paired(m, "kfac"), 2), _num((curvlinops.get("kfac") or {}).get("paired_ratio"), 2),
                     _num((curvlinops.get("ours_vs_curvlinops_kfac") or {}).get("memory_ours_over_theirs"), 2),
                     _num((pens.get("kfac") or {}).get("penalty_pct_of_step"), 1)])
    return _caption(COST, payload, "fits of kind `empirical`, ratios paired") + markdown_table(
        ["model, batch", "fwd+bwd s", "diag x", "kfac x", "curvlinops x", "kfac mem ours/theirs", "kfac penalty %"],
        rows)


def cost_targets(root: Path) -> str:
    """docs/benchmarks/cost.md: each target's measured value and verdict per model, as the run judged."""
    payload = load_result(root / COST)
    checks = payload.get("target_checks") or []
    models = list(dict.fromkeys(c["model"] for c in checks))
    grouped: dict = {}
    for c in checks:
        grouped.setdefault((c["what"], c["threshold"]), {})[c["model"]] = c
    rows = []
    for (what, threshold), per_model in grouped.items():
        cells = [per_model.get(m) for m in models]
        rows.append([f"{what} ≤ {threshold:g}", " / ".join("-" if c is None else _num(c["value"], 2) for c in cells),
                     " / ".join("-" if c is None else ("holds" if c["holds"] else "**missed**") for c in cells)])
    conditions = "; ".join(dict.fromkeys(c["conditions"] for c in checks))
    return _caption(COST, payload, f"models in this order: {' / '.join(models)}; {conditions}") + markdown_table(
        ["target", "measured (per model)", "verdict (per model)"], rows, align=["l", "l", "l"])


# ============================================================================================ approx
def approx_qf(root: Path) -> str:
    """docs/benchmarks/approx_accuracy.md: signed relative error of every fitted structure per direction."""
    payload = load_result(root / APPROX)
    asked = payload["config"].get("rank")
    rows = []
    for r in payload["qf"]:
        if "terms" not in r:  # the exact-EF-vs-GGN reference row, not a fit
            continue
        s = r["summary"]
        structure = r["structure"]
        if structure in ("diag_lowrank", "lowrank"):
            kept = (r.get("info") or {}).get("rank")
            structure += f" (rank {kept} kept)" if kept is not None else f" (rank {asked} asked)"
        kind = r["kind"] + (f" x{r['mc_samples']}" if r["kind"] == "mc" and r.get("mc_samples") else "")
        rows.append([f'{r["combo"]}: {payload["combos"][r["combo"]]["label"]}', structure, kind, _pct(s.get("random")),
                     _pct(s.get("target_grad"), True), _pct(s.get("source_grad"), True),
                     _pct(s.get("finetune_disp"), True), fmt_bytes(r.get("nbytes"))])
    return _caption(APPROX, payload, f"model {payload['model']['name']}, LoRA r={payload['config']['r']}") + \
        markdown_table(["LoRA, anchor", "structure", "kind", "random (median abs)", "target grad", "source grad",
                        "fine-tune displacement", "state"], rows, align=["l", "l", "l"] + ["r"] * 5)


# ============================================================================================ continual
def _mean(summary: dict, method: str, key: str):
    return (summary[method].get(key) or {}).get("mean")


def _seed_values(summary: dict, method: str, key: str) -> list:
    return (summary[method].get(key) or {}).get("values") or []


def _signed(x, decimals: int = 3) -> str:
    return "-" if x is None else f"{x:+.{decimals}f}".replace("-", "−")


def continual_summary(root: Path) -> str:
    """docs/benchmarks/continual.md: the summary table of the seed-0 run."""
    payload = load_result(root / CONTINUAL)
    s = payload["summary"]
    rows = []
    for m in payload["matrices"]:
        rows.append([payload["methods"][m]["label"], _num(_mean(s, m, "avg_final_em"), 3),
                     _signed(_mean(s, m, "bwt_em")), _num(_mean(s, m, "avg_final_nll"), 3),
                     _signed(_mean(s, m, "bwt_nll")), _num(_mean(s, m, "plasticity_em"), 3),
                     _num(_mean(s, m, "plasticity_nll"), 3), _num(_mean(s, m, "plasticity_nll_drop"), 3),
                     _num(_mean(s, m, "train_loss_mean"), 3), _signed(_mean(s, m, "src_text_nll_delta")),
                     _signed(_mean(s, m, "mcq_acc_delta"), 2), _num(_mean(s, m, "penalty_task_ratio_last"), 2)])
    cfg = payload["config"]
    return _caption(CONTINUAL, payload, f"seeds {list(cfg['seeds'])}, curvature kind `{cfg['curvature_kind']}`") + \
        markdown_table(["method", "avg final EM ↑", "BWT EM", "avg final NLL ↓", "BWT NLL ↓", "plast. EM ↑",
                        "plast. NLL ↓", "NLL drop ↑", "train loss ↓", "Δ src text NLL ↓", "Δ MCQ acc",
                        "pen/task (end)"], rows)


def continual_seeds(root: Path) -> str:
    """docs/benchmarks/continual.md: per-seed values of the two-seed run (seed a / seed b)."""
    payload = load_result(root / CONTINUAL_2SEEDS)
    s = payload["summary"]

    def per_seed(m: str, key: str, fmt_one: Callable) -> str:
        values = _seed_values(s, m, key)
        return " / ".join(fmt_one(v) for v in values) if values else "-"

    rows = [[payload["methods"][m]["label"], per_seed(m, "avg_final_nll", lambda v: _num(v, 3)),
             per_seed(m, "bwt_nll", _signed), per_seed(m, "avg_final_em", lambda v: _num(v, 3)),
             per_seed(m, "task_aware_nll", lambda v: _num(v, 3)), per_seed(m, "src_text_nll_delta", _signed)]
            for m in payload["matrices"]]
    cfg = payload["config"]
    return _caption(CONTINUAL_2SEEDS, payload, f"seeds {list(cfg['seeds'])} (per seed, in this order)") + \
        markdown_table(["method", "avg final NLL ↓", "BWT NLL ↓", "avg final EM ↑", "task-aware NLL ↓",
                        "Δ src text NLL"], rows)


def continual_headline(root: Path) -> str:
    """README: BWT (NLL) and plasticity per method, seed 0, and BWT per seed of the two-seed run."""
    one, two = load_result(root / CONTINUAL), load_result(root / CONTINUAL_2SEEDS)
    rows = []
    for m in one["matrices"]:
        bwt2 = _seed_values(two["summary"], m, "bwt_nll") if m in two["summary"] else []
        rows.append([one["methods"][m]["label"], _signed(_mean(one["summary"], m, "bwt_nll")),
                     _num(_mean(one["summary"], m, "plasticity_nll"), 3),
                     " / ".join(_signed(v) for v in bwt2) or "-"])
    return _caption(CONTINUAL, one, f"second column set from `{CONTINUAL_2SEEDS}` (seeds "
                    f"{list(two['config']['seeds'])})") + \
        markdown_table(["method", "BWT NLL (> 0 forgets)", "plasticity NLL ↓", "BWT NLL per seed (2-seed run)"], rows)


def continual_nll_matrices(root: Path, methods: tuple[str, ...] = ("seq_lora", "ewc_kfac")) -> str:
    """docs/benchmarks/continual.md: NLL of every task (rows; row 0 = source text) after training task
    j (columns), for ``methods`` side by side; the base model's column once."""
    payload = load_result(root / CONTINUAL)
    names = payload["tasks"]
    mats = {m: payload["matrices"][m] for m in methods}
    first = mats[methods[0]]
    rows = [["0 source text", _num(first["src_text_nll"][0], 3)]
            + [_num(v, 3) for m in methods for v in mats[m]["src_text_nll"][1:]]]
    for i, name in enumerate(names):
        rows.append([f"{i + 1} {name}", _num(first["nll"][i][0], 3)]
                    + [_num(v, 3) for m in methods for v in mats[m]["nll"][i][1:]])
    headers = ["task (NLL ↓)", "base"] + [f"{payload['methods'][m]['label']}: after {j}" if j == 1 else f"{j}"
                                          for m in methods for j in range(1, len(names) + 1)]
    return _caption(CONTINUAL, payload, "rows: task evaluated; columns: after training task j") + \
        markdown_table(headers, rows)


def continual_adapter_means(root: Path,
                            methods: tuple[str, ...] = ("seq_lora", "filter_dlr", "filter_dlr+smooth")) -> str:
    """docs/benchmarks/continual.md: each adapter's EM / NLL averaged over tasks 1..T (column t of the
    matrices; for a smoothing method column t is the smoothed m_t^s)."""
    payload = load_result(root / CONTINUAL)
    T = len(payload["tasks"])
    rows = []
    for m in methods:
        mat = payload["matrices"][m]
        cells = []
        for j in range(1, T + 1):
            em = sum(mat["em"][i][j] for i in range(T)) / T
            nll = sum(mat["nll"][i][j] for i in range(T)) / T
            cells.append(f"{em:.3f} / {nll:.3f}")
        rows.append([payload["methods"][m]["label"]] + cells)
    return _caption(CONTINUAL, payload, f"mean over tasks 1-{T}, EM / NLL") + \
        markdown_table(["method"] + [f"after {j}" + (" (final)" if j == T else "") for j in range(1, T + 1)], rows)


# ============================================================================================ demo
def demo_table(root: Path) -> str:
    """README: the demo's table, from the JSON ``lalora-curv demo --output-dir benchmarks/results/demo`` writes."""
    from lalora_curv.experiments.pipeline import METRICS

    path = root / DEMO
    if not path.is_file():
        raise FileNotFoundError(f"no committed demo result at {path}: run `lalora-curv demo --output-dir "
                                f"{Path(DEMO).parent}` and commit its demo.json")
    payload = json.loads(path.read_text())
    rows_in = payload["rows"]
    keys = [k for k in METRICS if any(k in r for r in rows_in.values())]
    rows = [[name] + ["-" if r.get(k) is None else (f"{100 * r[k]:.1f} %" if METRICS[k][1] else f"{r[k]:.4f}")
                      for k in keys] for name, r in rows_in.items()]
    lam = payload.get("lam")
    prov = payload.get("provenance") or {}
    dirty = prov.get("dirty_code", prov.get("dirty"))  # results written beside the demo's are not code
    made = f"commit `{prov['commit'][:12]}`{' (dirty)' if dirty else ''}, " if prov.get("commit") else ""
    note = (f"<sub>From `{DEMO}`: {made}structure `{payload.get('structure')}`, strength "
            f"{'-' if lam is None else f'{lam:.3g}'} ({payload.get('lam_source')}), {payload.get('model_note')}, "
            f"{payload.get('seconds', 0):.0f} s.</sub>\n\n")
    return note + markdown_table(["model"] + [METRICS[k][0] + (" ↑" if METRICS[k][1] else " ↓") for k in keys], rows)


#: the main q,v setting with matched seeds and a validation/test split (``--preset main``)
FORGETTING_MAIN = "benchmarks/results/forgetting/main/results.json"


def _main_table(table: str) -> Callable[[Path], str]:
    from benchmarks.report.paired_blocks import forgetting_paired

    return lambda root: forgetting_paired(root, FORGETTING_MAIN, "qv", table)


def _paired_of(preset: str, table: str) -> Callable[[Path], str]:
    """The matched-target ``table`` of a preset's q,v setting (each family's point chosen on validation)."""
    from benchmarks.report.paired_blocks import forgetting_paired

    return lambda root: forgetting_paired(root, f"benchmarks/results/forgetting/{preset}/results.json", "qv", table)


def _main_lr(root: Path) -> str:
    from benchmarks.report.paired_blocks import forgetting_lr_controls

    return forgetting_lr_controls(root, FORGETTING_MAIN, "qv")


def _main_verdicts(root: Path) -> str:
    from benchmarks.report.paired_blocks import forgetting_verdicts

    return forgetting_verdicts(root, FORGETTING_MAIN, "qv")


#: the paper's ablations and the K-FAC gap study, each its own result in the main setting
FORGETTING_ABLATIONS = ("ablation_proxy_batches", "ablation_proxy_text", "ablation_rank", "ablation_length",
                        "ablation_lambda", "kfac_gap")


def _points_table(preset: str) -> Callable[[Path], str]:
    from benchmarks.report.paired_blocks import forgetting_points

    return lambda root: forgetting_points(root, f"benchmarks/results/forgetting/{preset}/results.json")


def _gap_table(root: Path) -> str:
    from benchmarks.report.paired_blocks import forgetting_gap

    return forgetting_gap(root, "benchmarks/results/forgetting/kfac_gap/results.json")


def _transfer_table(root: Path) -> str:
    from benchmarks.report.paired_blocks import forgetting_transfer

    return forgetting_transfer(root, "benchmarks/results/forgetting/ablation_proxy_text/results.json")


RENDERERS: dict[str, Callable[[Path], str]] = {
    "forgetting-main-acc": _main_table("acc"),
    "forgetting-main-nll": _main_table("nll"),
    "forgetting-main-mcq-nll": _main_table("mcq_nll"),
    "forgetting-main-verdicts": _main_verdicts,
    "forgetting-main-lr": _main_lr,
    "forgetting-main-points": _points_table("main"),
    **{f"forgetting-{preset}": _points_table(preset) for preset in FORGETTING_ABLATIONS},
    "forgetting-kfac_gap-gap": _gap_table,
    "forgetting-kfac_gap-nll": _paired_of("kfac_gap", "nll"),
    "forgetting-ablation_proxy_text-transfer": _transfer_table,
    "forgetting-headline": forgetting_headline,
    "forgetting-best-qv": lambda root: forgetting_best(root, "qv"),
    "forgetting-best-all-linear": lambda root: forgetting_best(root, "all-linear"),
    "cost-headline": cost_headline,
    "cost-methods": cost_methods,
    "cost-width": cost_width,
    "cost-targets": cost_targets,
    "approx-qf": approx_qf,
    "continual-headline": continual_headline,
    "continual-summary": continual_summary,
    "continual-seeds": continual_seeds,
    "continual-nll-matrices": continual_nll_matrices,
    "continual-adapter-means": continual_adapter_means,
    "demo": demo_table,
}
