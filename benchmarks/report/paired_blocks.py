"""Forgetting tables with paired intervals (results with a validation/test split): per method the
point the benchmark chose on validation, its test scores, and its paired differences to plain LoRA
and to L2 with 95 % bootstrap intervals, exactly as stored in the result's ``tables``."""

from __future__ import annotations

import math
from pathlib import Path

from benchmarks.forgetting.paired import paired_difference
from benchmarks.forgetting.report import hosts, paired_cell
from benchmarks.forgetting.summary import items_of
from benchmarks.harness import load_result, markdown_table

# table -> (target metric, source metric, target label, source label, percent?)
TABLES = {"acc": ("tgt_em", "src_mcq_acc", "target exact match", "WordNet MCQ accuracy", True),
          "nll": ("tgt_nll", "src_text_nll", "target NLL", "held-out text NLL", False),
          "mcq_nll": ("tgt_nll", "src_mcq_nll", "target NLL", "MCQ NLL of the correct word", False)}


def _value(x, sd, percent: bool) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    scale, digits = (100.0, 1) if percent else (1.0, 3)
    text = f"{scale * x:.{digits}f}" + (" %" if percent else "")
    return text + (f" ± {scale * sd:.{digits}f}" if sd is not None else "")


def _delta(d: dict | None, percent: bool) -> str:
    return paired_cell(d, 100.0, 1) if percent else paired_cell(d, 1.0, 3)


def _split_result(root: Path, path: str) -> dict:
    """The result at ``path``, which must have a validation/test split (every table here reads its test half)."""
    payload = load_result(root / path)
    if not str(payload.get("selection", "")).startswith("validation"):
        raise ValueError(f"{path}: not a result with a validation/test split (selection: {payload.get('selection')})")
    return payload


def caption(path: str, payload: dict, setting: str, note: str = "") -> str:
    cfg = payload["config"]
    st = next(s for s in cfg["settings"] if s["name"] == setting)
    modules = st["target_modules"] if isinstance(st["target_modules"], str) else ", ".join(st["target_modules"])
    splits = (payload.get("data") or {}).get("splits") or {}
    halves = ", ".join(f"{k} {len(v['val'])}/{len(v['test'])}" for k, v in splits.items()
                       if k in ("src_mcq", "src_text_wordnet", "src_text_pydoc", "tgt", "tgt_gen"))
    device = payload.get("device") or (payload.get("machine") or {}).get("device")
    return (f"<sub>From `{path}`: preset `{payload['preset']}`, device `{device}`; target `{cfg['target_task']}`; "
            f"LoRA r={st.get('r', cfg['r'])} on {modules}, lr {st.get('lr', cfg['lr'])}, "
            f"{st.get('steps', cfg['steps'])} steps; curvature kind `{cfg['curvature_kind']}`; points chosen on the "
            f"validation half, numbers from the test half (items val/test: {halves}); Δ = paired mean over seeds "
            f"with a 95 % bootstrap interval over seeds and items, **bold** where it excludes 0.{note}</sub>\n\n")


def _unchanged_note(payload: dict, setting: str, family: str, point: str) -> str:
    """The label suffix " (found no intruder dimension: the plain LoRA model)" where every run of this point is a
    post-hoc intruder reduction that changed nothing, so its scores are plain LoRA's by construction."""
    runs = [r for r in payload["runs"] if (r["setting"], r["family"], r["point"]) == (setting, family, point)]
    reports = [(r.get("info") or {}).get("intruder_report") for r in runs]
    if runs and all(rep is not None and rep.get("intruders") == 0 for rep in reports):
        return " (found no intruder dimension: the plain LoRA model)"
    return ""


def forgetting_paired(root: Path, path: str, setting: str, table: str) -> str:
    """The ``table`` ("acc" | "nll" | "mcq_nll") of ``setting`` in the result at ``path``."""
    payload = _split_result(root, path)
    target, source, tgt_label, src_label, percent = TABLES[table]
    rows_in = payload["tables"][setting][table]
    base = payload["base"]
    pct_target = percent and target.endswith("_em")
    rows = [["base model", "-", _value(base.get(target + "_test"), None, pct_target),
             _value(base.get(source + "_test"), None, percent), "-", "-", "-", "-", "-", "-"]]
    for r in rows_in:
        paired = r.get("paired") or {}
        label = r["family"] if r["point"] == "-" else f"{r['family']} ({r['point']})"
        label += _unchanged_note(payload, setting, r["family"], r["point"])
        rows.append([label, "yes" if r["within_tolerance"] else "no",
                     _value(r["target"], r["target_sd"], pct_target), _value(r["source"], r["source_sd"], percent),
                     _delta((paired.get("LoRA") or {}).get(source), percent),
                     _delta((paired.get("LoRA") or {}).get(target), pct_target),
                     _delta((paired.get("L2") or {}).get(source), percent),
                     _delta((paired.get("L2") or {}).get(target), pct_target),
                     "-" if r.get("cost_seconds") is None else f"{r['cost_seconds']:.0f}", str(r["seeds"])])
    unit = " (pp)" if percent else ""
    tunit = " (pp)" if pct_target else ""
    header = ["method (point)", "within tolerance", f"{tgt_label} (test)", f"{src_label} (test)",
              f"Δ {src_label}{unit} vs LoRA", f"Δ {tgt_label}{tunit} vs LoRA", f"Δ {src_label}{unit} vs L2",
              f"Δ {tgt_label}{tunit} vs L2", "cost (s)", "seeds"]
    note = ""
    if not any("L2" in (r.get("paired") or {}) for r in rows_in):  # no L2 in this result (kfac_gap): no columns
        for row in [header, *rows]:
            del row[6:8]
        note += " No L2 in this result: differences to plain LoRA only."
    ran_on = hosts(payload)
    if len(ran_on) > 1:  # seconds from machines of different speed would rank methods by their host
        header.pop(-2)
        for row in rows:
            row.pop(-2)
        note += (f" No cost column: the runs ran on {len(ran_on)} hosts of different speed ({', '.join(ran_on)}), "
                "so their seconds do not compare; the cost benchmark times the methods on one machine.")
    return caption(path, payload, setting, note) + markdown_table(header, rows)


def forgetting_points(root: Path, path: str) -> str:
    """Every grid point of every setting in the result at ``path`` (an ablation), on the test half,
    with its paired differences to plain LoRA of the same setting and seeds (no selection)."""
    payload = _split_result(root, path)
    cfg = payload["config"]
    base = payload["base"]
    reused = sum("reused_from" in r for r in payload["runs"])
    rows = [["-", "base model", _value(base.get("tgt_em_test"), None, True),
             _value(base.get("src_mcq_acc_test"), None, True), _value(base.get("src_text_nll_test"), None, False),
             "-", "-", "-", "-"]]
    for p in payload["points"]:
        paired = p.get("paired_lora") or {}
        st = next(s for s in cfg["settings"] if s["name"] == p["setting"])
        label = p["family"] if p["point"] == "-" else f"{p['family']} ({p['point']})"
        rows.append([f"{p['setting']} (r={st.get('r', cfg['r'])}, {st.get('steps', cfg['steps'])} steps)", label,
                     _value(p.get("tgt_em_test"), p.get("tgt_em_test_sd"), True),
                     _value(p.get("src_mcq_acc_test"), p.get("src_mcq_acc_test_sd"), True),
                     _value(p.get("src_text_nll_test"), p.get("src_text_nll_test_sd"), False),
                     _delta(paired.get("tgt_em"), True), _delta(paired.get("src_mcq_acc"), True),
                     _delta(paired.get("src_text_nll"), False), str(len(p["seeds"]))])
    device = payload.get("device") or (payload.get("machine") or {}).get("device")
    note = (f"<sub>From `{path}`: preset `{payload['preset']}`, device `{device}`; target `{cfg['target_task']}`, "
            f"lr {cfg['lr']}, curvature kind `{cfg['curvature_kind']}`, proxy {cfg['proxy_kind']} x "
            f"{cfg['proxy_batches']} batches unless the point says otherwise; every grid point, numbers from the "
            f"test half (mean ± sd over seeds); Δ = paired mean over seeds against plain LoRA of the same setting "
            f"with a 95 % bootstrap interval over seeds and items, **bold** where it excludes 0"
            + (f"; {reused} of {len(payload['runs'])} runs reused from identical runs of another result "
               f"(`reused_from`)" if reused else "") + ".</sub>\n\n")
    return note + markdown_table(
        ["setting", "method (point)", "target exact match (test)", "WordNet MCQ accuracy (test)",
         "held-out text NLL (test)", "Δ exact match (pp) vs LoRA", "Δ MCQ accuracy (pp) vs LoRA",
         "Δ text NLL vs LoRA", "seeds"], rows)


def _direction(d: dict | None, lower_is_better: bool) -> str:
    """"better" / "worse" where the paired interval excludes 0, else "no significant difference"."""
    if not d:
        return "not measured"
    if not d["significant"]:
        return "no significant difference"
    return "better" if (d["mean"] < 0) == lower_is_better else "worse"


def _verdict(source: str, target: str) -> str:
    """The read-out in words from the source's and the target's direction (see :func:`_direction`)."""
    if source == "better":
        return "trades target for source" if target == "worse" else "wins"
    if source == "worse":
        return "trades source for target" if target == "better" else "loses"
    return "does not win (learns less)" if target == "worse" else "does not win"


def forgetting_verdicts(root: Path, path: str, setting: str) -> str:
    """One line per method and read-out of the main result: its paired differences to plain LoRA
    (and, for LaLoRA, to L2) on the source and the target metric with their 95 % intervals, and in
    words whether it wins (source significantly better, target not significantly worse), trades
    (both significant, opposite ways) or does not win. Rendered from the same ``tables`` as the
    paired tables, so no number in it is typed by hand."""
    payload = _split_result(root, path)
    lines = []
    for table, (target, source, tgt_label, src_label, percent) in TABLES.items():
        pct_target = percent and target.endswith("_em")
        src_lower, tgt_lower = not percent, not pct_target
        read_out = f"at matched {tgt_label}, {src_label}"
        for r in payload["tables"][setting][table]:
            if r["family"] == "LoRA":  # the reference itself (its lr controls are families of their own)
                continue
            paired = r.get("paired") or {}
            label = r["family"] if r["point"] == "-" else f"{r['family']} ({r['point']})"
            label += _unchanged_note(payload, setting, r["family"], r["point"])
            parts = []
            for ref in ("LoRA", "L2") if r["family"].startswith("LaLoRA") else ("LoRA",):
                d = paired.get(ref) or {}
                src, tgt = d.get(source), d.get(target)
                if not src or not tgt:
                    continue
                s_dir, t_dir = _direction(src, src_lower), _direction(tgt, tgt_lower)
                verdict = _verdict(s_dir, t_dir)
                unit = " pp" if percent else ""
                tunit = " pp" if pct_target else ""
                seeds = f"{src['n_seeds']} seed" + ("s" if src["n_seeds"] != 1 else "")
                parts.append(f"vs {ref} ({seeds}) it **{verdict}**: source {_delta(src, percent)}{unit} "
                             f"({s_dir}), target {_delta(tgt, pct_target)}{tunit} ({t_dir})")
            if parts:
                within = "" if r["within_tolerance"] else " (no point within the target tolerance: its best target)"
                lines.append(f"- {read_out}: {label}{within}: " + "; ".join(parts) + ".")
    note = (f"<sub>From `{path}`, setting `{setting}`, test half: each method's point as chosen on validation for "
            f"that read-out; intervals and significance as in the tables above (Δ = method minus reference; "
            f"\"wins\" = source significantly better and target not significantly worse).</sub>\n\n")
    return note + "\n".join(lines) + "\n"


def _plain_lr(family: str, cfg: dict) -> float | None:
    """The learning rate of a plain LoRA family: ``LoRA`` runs at the config's lr, ``LoRA (lr=x)`` at x."""
    if family == "LoRA":
        return float(cfg["lr"])
    if family.startswith("LoRA (lr=") and family.endswith(")"):
        return float(family[len("LoRA (lr="):-1])
    return None


def forgetting_lr_controls(root: Path, path: str, setting: str) -> str:
    """Plain LoRA at every learning rate of the control grid: validation target scores (what the
    lr is chosen on), test scores and the paired difference to plain LoRA at the main lr, and in
    words which lr is best on validation (target exact match, ties by target NLL) and whether it is
    the main one, so that a smaller step is never read as forgetting mitigation."""
    payload = load_result(root / path)
    cfg = payload["config"]
    plain = sorted(((lr, p) for p in payload["points"] if p["setting"] == setting
                    for lr in [_plain_lr(p["family"], cfg)] if lr is not None and p["point"] == "-"),
                   key=lambda item: item[0])
    if not plain:
        raise ValueError(f"{path}: no plain LoRA point in setting {setting!r}")
    rows = []
    for lr, p in plain:
        paired = p.get("paired_lora") or {}
        rows.append([f"{lr:g}" + (" (main)" if p["family"] == "LoRA" else ""),
                     _value(p.get("tgt_em_val"), p.get("tgt_em_val_sd"), True),
                     _value(p.get("tgt_nll_val"), p.get("tgt_nll_val_sd"), False),
                     _value(p.get("tgt_em_test"), p.get("tgt_em_test_sd"), True),
                     _value(p.get("src_mcq_acc_test"), p.get("src_mcq_acc_test_sd"), True),
                     _value(p.get("src_text_nll_test"), p.get("src_text_nll_test_sd"), False),
                     _delta(paired.get("tgt_em"), True), _delta(paired.get("src_mcq_acc"), True),
                     _delta(paired.get("src_text_nll"), False), str(len(p["seeds"]))])
    scored = [(lr, p) for lr, p in plain if p.get("tgt_em_val") is not None and p.get("tgt_nll_val") is not None]
    main_lr = float(cfg["lr"])
    if len(scored) < 2:
        verdict = "the control grid has not run yet: whether the main lr is the tuned one is open"
    else:
        best_lr, best = max(scored, key=lambda item: (item[1]["tgt_em_val"], -item[1]["tgt_nll_val"]))
        seeds = sorted({s for _, p in scored for s in p["seeds"]})
        verdict = (f"best on validation: lr {best_lr:g}, "
                   + ("the main lr" if best_lr == main_lr else f"**not the main lr {main_lr:g}**")
                   + f" (target exact match {100 * best['tgt_em_val']:.1f} %, means over seeds {seeds})")
        if len({len(p["seeds"]) for _, p in scored}) > 1:
            verdict += "; the learning rates ran on different numbers of seeds"
    note = (f"<sub>From `{path}`, setting `{setting}`: plain LoRA at each learning rate of the control grid; "
            f"{verdict}. Δ = paired difference to plain LoRA at the main lr on the test half, 95 % interval "
            f"over seeds and items, **bold** where it excludes 0.</sub>\n\n")
    return note + markdown_table(
        ["lr", "target exact match (val)", "target NLL (val)", "target exact match (test)",
         "WordNet MCQ accuracy (test)", "held-out text NLL (test)", "Δ exact match (pp)", "Δ MCQ accuracy (pp)",
         "Δ text NLL", "seeds"], rows)


#: the K-FAC gap study: each remedy against plain LaLoRA-kfac and against LaLoRA-diag at its own strength
GAP_REFERENCES = ("LaLoRA-kfac", "LaLoRA-diag")
#: (metric, column label, percent?) of the gap table
GAP_METRICS = (("src_text_nll", "text NLL", False), ("tgt_nll", "target NLL", False),
               ("tgt_em", "exact match (pp)", True))


def forgetting_gap(root: Path, path: str, references: tuple[str, ...] = GAP_REFERENCES) -> str:
    """Does a remedy close the gap between LaLoRA-kfac and LaLoRA-diag (``--preset kfac_gap``)? Per LaLoRA
    family and strength: its paired differences to each reference family at the same grid point (same
    ``rel``), on the test half with a 95 % bootstrap interval over seeds and items
    (:func:`benchmarks.forgetting.paired.paired_difference`, computed here from the runs' per-item scores,
    deterministic). The last reference is the target of the comparison and gets no row of its own."""
    payload = _split_result(root, path)
    splits = payload["data"]["splits"]

    rows, verdicts = [], []
    for p in payload["points"]:
        if not p["family"].startswith("LaLoRA") or p["family"] == references[-1]:
            continue
        mine = items_of(payload["runs"], p["setting"], p["family"], p["point"])
        diffs = {}  # (reference, metric) -> paired difference (None: not run / not comparable)
        for ref in references:
            other = {} if ref == p["family"] else items_of(payload["runs"], p["setting"], ref, p["point"])
            for metric, _, _ in GAP_METRICS:
                diffs[ref, metric] = paired_difference(mine, other, metric, splits) if other else None
        label = f"{p['family']} ({p['point']})"
        rows.append([label, *(_delta(diffs[ref, metric], pct) if diffs[ref, metric] else "-"
                              for ref in references for metric, _, pct in GAP_METRICS), str(len(p["seeds"]))])
        verdict = _gap_verdict(p["family"], diffs, references)
        if verdict:
            verdicts.append(f"- {label}: {verdict}.")
    header = (["method (point)"] + [f"Δ {label} vs {ref}" for ref in references for _, label, _ in GAP_METRICS]
              + ["seeds"])
    note = (f"<sub>From `{path}`, test half: each LaLoRA variant minus {' and minus '.join(references)} at the same "
            f"strength (rel), paired by seed, with a 95 % bootstrap interval over seeds and items, **bold** where it "
            f"excludes 0. In words below (from the same intervals): a remedy **closes the gap** where its held-out "
            f"text NLL is significantly better than {references[0]}'s at a target NLL not significantly worse, and "
            f"not significantly worse than {references[-1]}'s. The same rel is not the same target: where a "
            f"difference trades target for source, the pareto plots beside the result compare the trade-offs."
            f"</sub>\n\n")
    return note + markdown_table(header, rows) + ("\n" + "\n".join(verdicts) + "\n" if verdicts else "")


def _gap_verdict(family: str, diffs: dict, references: tuple[str, ...]) -> str:
    """In words, from the paired intervals of held-out text NLL (source) and target NLL: the gap itself
    for the first reference (against the last), else whether the remedy closes it."""
    first, last = references[0], references[-1]

    def directions(ref):
        src, tgt = diffs.get((ref, "src_text_nll")), diffs.get((ref, "tgt_nll"))
        return None if not src or not tgt else (_direction(src, True), _direction(tgt, True))

    to_last = directions(last)
    if family == first:
        if to_last is None:
            return ""
        return (f"the gap: against {last} it **{_verdict(*to_last)}** (held-out text NLL {to_last[0]}, "
                f"target NLL {to_last[1]})")
    to_first = directions(first)
    if to_first is None:
        return ""
    words = f"against {first}, held-out text NLL {to_first[0]}, target NLL {to_first[1]}"
    if to_last is not None:
        words += f"; against {last}, held-out text NLL {to_last[0]}, target NLL {to_last[1]}"
    if to_first[0] != "better":
        return f"**does not close the gap** ({words})"
    if to_first[1] == "worse":
        return f"**trades target for source** against {first}, so it does not close the gap cleanly ({words})"
    if to_last is None:
        return f"**better than {first}**, {last} not run at this strength ({words})"
    if to_last[0] == "worse":
        return f"**narrows the gap** ({words})"
    return f"**closes the gap** ({words})"


#: proxy domain -> the held-out text metric of that domain (the transfer ablation's read-out)
DOMAIN_TEXT = {"wordnet": "src_text_nll_wordnet", "pydoc": "src_text_nll_pydoc"}


def forgetting_transfer(root: Path, path: str) -> str:
    """The proxy-text ablation (``--preset ablation_proxy_text``) read per source domain: each point's
    held-out WordNet and pydoc text NLL and their paired differences to plain LoRA, then, per domain,
    the curvature fitted on that domain's text (in-domain) minus the one fitted on the other domain's
    (transfer), paired by seed with the 95 % bootstrap over seeds and items, in numbers and words."""
    payload = _split_result(root, path)
    splits = payload["data"]["splits"]

    def point_of(domain: str) -> dict | None:
        return next((p for p in payload["points"] if p["family"].endswith(f"proxy_kind={domain}")), None)

    settings = [s["name"] for s in payload["config"]["settings"]]
    if len(settings) != 1:  # the table pairs every point with the one plain LoRA: a second setting would mix them
        raise ValueError(f"{path}: the transfer table reads a result with exactly one setting, got {settings}")
    setting = settings[0]
    plain = items_of(payload["runs"], setting, "LoRA", "-")
    metrics = [*DOMAIN_TEXT.values(), "src_mcq_acc", "tgt_nll"]
    rows = []
    for p in payload["points"]:
        mine = items_of(payload["runs"], setting, p["family"], p["point"])
        label = p["family"] if p["point"] == "-" else f"{p['family']} ({p['point']})"
        values = [_value(p.get(m + "_test"), p.get(m + "_test_sd"), m == "src_mcq_acc") for m in metrics[:3]]
        deltas = ["-" if p["family"] == "LoRA" else
                  _delta(paired_difference(mine, plain, m, splits), m == "src_mcq_acc") for m in metrics]
        rows.append([label, *values, *deltas, str(len(p["seeds"]))])
    lines = []
    for domain, metric in DOMAIN_TEXT.items():
        inside, others = point_of(domain), [d for d in DOMAIN_TEXT if d != domain]
        outside = point_of(others[0]) if others else None
        if inside is None or outside is None:
            continue
        d = paired_difference(items_of(payload["runs"], setting, inside["family"], inside["point"]),
                              items_of(payload["runs"], setting, outside["family"], outside["point"]), metric, splits)
        if d is None:
            continue
        words = {"better": "the in-domain curvature protects its domain better",
                 "worse": "the transferred curvature protects it better"}.get(_direction(d, True),
                                                                             "no significant difference")
        lines.append(f"- {domain} held-out text NLL, curvature from {domain} text (in-domain) minus from {others[0]} "
                     f"text (transfer): {_delta(d, False)}: {words} ({d['n_seeds']} seed"
                     f"{'s' if d['n_seeds'] != 1 else ''}).")
    header = ["method (point)", "WordNet text NLL (test)", "pydoc text NLL (test)", "WordNet MCQ accuracy (test)",
              "Δ WordNet text NLL vs LoRA", "Δ pydoc text NLL vs LoRA", "Δ MCQ accuracy (pp) vs LoRA",
              "Δ target NLL vs LoRA", "seeds"]
    note = (f"<sub>From `{path}`, test half (mean ± sd over seeds): the curvature's proxy text is WordNet, pydoc or "
            f"both (`proxy_kind`); Δ = paired difference, 95 % bootstrap interval over seeds and items, **bold** where "
            f"it excludes 0.</sub>\n\n")
    return note + markdown_table(header, rows) + ("\n" + "\n".join(lines) + "\n" if lines else "")
