"""Aggregation of the runs: seed means per grid point, forgetting evidence, best point at matched
target chosen on the validation half and reported on the test half with paired intervals.

Selection apart from reporting: where the runs carry ``_val`` / ``_test`` metrics (per-item scores
split once, :mod:`benchmarks.forgetting.items`), the tolerance line and each family's point are
chosen on ``_val`` and every reported number is ``_test``. Older results without the split are
summarized on the whole sets, and their tables say ``selection: "same items"``.
"""

from __future__ import annotations

import statistics

from benchmarks.forgetting.config import Config
from benchmarks.forgetting.items import METRICS as ITEM_METRICS
from benchmarks.forgetting.paired import paired_difference
from benchmarks.forgetting.runs import is_plain

# ============================================================================================
# Aggregation, tables, plots
# ============================================================================================

METRICS = tuple(ITEM_METRICS)
HALF_METRICS = tuple(f"{k}_{h}" for k in METRICS for h in ("val", "test"))
# what each table compares: (target metric, source metric, lower is better)
TABLES = {"nll": ("tgt_nll", "src_text_nll", True), "mcq_nll": ("tgt_nll", "src_mcq_nll", True),
          "acc": ("tgt_em", "src_mcq_acc", False)}


def _mean_sd(values: list) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def has_split(results: list[dict]) -> bool:
    """Whether every run carries per-half metrics and per-item scores."""
    return bool(results) and all("tgt_nll_val" in r["metrics"] and "items" in r for r in results)


def summarize(results: list[dict], base: dict, cfg: Config, splits: dict | None = None, *,
              n_boot: int = 2000) -> dict:
    """Seed-averaged grid points, the forgetting evidence and the best-at-matched-target tables.

    With ``splits`` (the result's ``data.splits``) and runs that carry the split, points are chosen
    on ``_val`` and reported on ``_test``, each table row with paired differences to plain LoRA and
    to L2's chosen point (:func:`benchmarks.forgetting.paired.paired_difference`)."""
    split = splits is not None and has_split(results)
    sel, rep = ("_val", "_test") if split else ("", "")
    groups: dict = {}
    for r in results:
        groups.setdefault((r["setting"], r["family"], r["point"]), []).append(r)
    points = []
    for (setting, family, point), rs in groups.items():
        p = {"setting": setting, "family": family, "point": point, "method": rs[0]["method"],
             "strength": rs[0].get("strength"), "relative": rs[0].get("relative"), "init": rs[0].get("init"),
             "seeds": [r["seed"] for r in rs], "strengths": [r.get("strength") for r in rs]}
        for k in METRICS + (HALF_METRICS if split else ()):
            p[k], p[k + "_sd"] = _mean_sd([r["metrics"].get(k) for r in rs])
        p["penalty_task_ratio_last"], _ = _mean_sd([(r.get("history") or {}).get("penalty_task_ratio_last")
                                                    for r in rs])
        p["cost_seconds"], _ = _mean_sd([(r.get("cost") or {}).get("seconds") for r in rs])
        points.append(p)
    order = {st["name"]: i for i, st in enumerate(cfg.settings)}
    points.sort(key=lambda p: order.get(p["setting"], len(order)))  # stable: runs' order within a setting

    evidence = {}
    for setting in cfg.settings:
        plain = [r for r in results if r["setting"] == setting["name"] and is_plain(r)]
        if not plain:
            continue
        ev = {"n_seeds": len(plain), "seeds": [r["seed"] for r in plain], "half": rep.strip("_") or "all"}
        for k in ("src_text_nll", "src_text_nll_wordnet", "src_text_nll_pydoc", "src_mcq_nll", "src_mcq_acc",
                  "proxy_text_nll", "proxy_mcq_nll", "proxy_mcq_acc", "tgt_nll", "tgt_em"):
            kr = k + rep
            if base.get(kr) is None or any(r["metrics"].get(kr) is None for r in plain):
                continue
            deltas = [r["metrics"][kr] - base[kr] for r in plain]
            mean, sd = _mean_sd(deltas)
            ev[k] = {"base": base[kr], "plain_mean": base[kr] + mean, "delta_mean": mean, "delta_sd": sd,
                     "deltas": deltas}
            if split:  # plain LoRA of every seed against the base model, on the same test items
                ev[k]["paired"] = paired_difference({r["seed"]: r["items"] for r in plain},
                                                    {r["seed"]: base["items"] for r in plain}, k, splits,
                                                    n_boot=n_boot)
        evidence[setting["name"]] = ev

    if split:
        add_paired_to_lora(points, results, splits, n_boot)
    tables = {}
    for setting in cfg.settings:
        pts = [p for p in points if p["setting"] == setting["name"]]
        plain = next((p for p in pts if p["family"] == "LoRA"), None)
        if plain is None or len(pts) < 2:
            continue
        tables[setting["name"]] = {}
        for name, (target, source, lower) in TABLES.items():
            tol = cfg.nll_tolerance if lower else cfg.acc_tolerance
            rows = best_at_matched_target(pts, plain, base, target, source, tol, lower=lower, select=sel, report=rep)
            if split:
                add_paired(rows, results, setting["name"], (target, source), splits, n_boot)
            tables[setting["name"]][name] = rows
    return {"points": points, "evidence": evidence, "tables": tables,
            "selection": "validation half, reported on the test half" if split else "same items"}


def items_of(results: list[dict], setting: str, family: str, point: str) -> dict[int, dict]:
    """``{seed: per-item scores}`` of one grid point (what :func:`paired_difference` pairs)."""
    return {r["seed"]: r["items"] for r in results
            if r["setting"] == setting and r["family"] == family and r["point"] == point}


#: what every grid point is compared on against plain LoRA of its setting (the ablation tables)
POINT_METRICS = ("tgt_em", "src_mcq_acc", "src_text_nll", "tgt_nll")


def add_paired_to_lora(points: list[dict], results: list[dict], splits: dict, n_boot: int) -> None:
    """Attach to every grid point ``paired_lora[metric]``: the point minus plain LoRA of the same
    setting, on the test half, paired by seed (None where they share no seed)."""
    for p in points:
        if p["family"] == "LoRA" and p["point"] == "-":
            continue
        plain = items_of(results, p["setting"], "LoRA", "-")
        mine = items_of(results, p["setting"], p["family"], p["point"])
        p["paired_lora"] = {m: paired_difference(mine, plain, m, splits, n_boot=n_boot) for m in POINT_METRICS}


def add_paired(rows: list[dict], results: list[dict], setting: str, metrics: tuple, splits: dict,
               n_boot: int) -> None:
    """Attach to each table row ``paired[ref][metric]``: the chosen point minus plain LoRA (``"LoRA"``)
    and minus L2's chosen point of the same table (``"L2"``), on the test half, paired by seed."""
    refs = {"LoRA": items_of(results, setting, "LoRA", "-")}
    l2 = next((r for r in rows if r["family"] == "L2"), None)
    if l2 is not None:
        refs["L2"] = items_of(results, setting, "L2", l2["point"])
    for row in rows:
        mine = items_of(results, setting, row["family"], row["point"])
        row["paired"] = {ref: {m: paired_difference(mine, other, m, splits, n_boot=n_boot) for m in metrics}
                         for ref, other in refs.items() if ref != row["family"]}


def best_at_matched_target(points: list[dict], plain: dict, base: dict, target: str, source: str, tol: float,
                           lower: bool, *, select: str = "", report: str = "") -> list[dict]:
    """Per family: the grid point with the best ``source`` score among those whose ``target`` score is
    within ``tol`` of plain LoRA's (NLL: ``<= plain + tol``; accuracy: ``>= plain - tol``).

    Scores with the suffix ``select`` (``"_val"``) choose the point; the row reports the suffix
    ``report`` (``"_test"``): its ``target``, ``source``, ``recovered`` (share of plain LoRA's
    forgetting undone on ``source``) and the other metrics. A family with no point within tolerance
    shows its point with the best ``select`` target score, marked ``within_tolerance: False``.
    """
    ts, ss = target + select, source + select
    if plain.get(ts) is None:
        return []
    rows = []
    families = list(dict.fromkeys(p["family"] for p in points))
    for family in families:
        fam = [p for p in points if p["family"] == family and p.get(ts) is not None and p.get(ss) is not None]
        if not fam:
            continue
        ok = [p for p in fam if (p[ts] <= plain[ts] + tol if lower else p[ts] >= plain[ts] - tol)]
        best = min(ok, key=lambda p: p[ss] if lower else -p[ss]) if ok else None
        chosen = best if best is not None else min(fam, key=lambda p: p[ts] if lower else -p[ts])
        tr, sr = target + report, source + report
        gap = None if plain.get(sr) is None or base.get(sr) is None else plain[sr] - base[sr]
        row = {"family": family, "within_tolerance": best is not None, "n_points": len(fam), "n_within": len(ok),
               "selected_on": select.strip("_") or "all", "reported_on": report.strip("_") or "all",
               "point": chosen["point"], "init": chosen["init"], "target": chosen.get(tr),
               "target_sd": chosen.get(tr + "_sd"), "source": chosen.get(sr), "source_sd": chosen.get(sr + "_sd"),
               "target_val": chosen[ts], "source_val": chosen[ss],
               "recovered": ((plain[sr] - chosen[sr]) / gap) if gap and chosen.get(sr) is not None else None,
               "seeds": len(chosen["seeds"]), "penalty_task_ratio_last": chosen.get("penalty_task_ratio_last"),
               "cost_seconds": chosen.get("cost_seconds")}
        for k in ("src_text_nll", "src_mcq_nll", "src_mcq_acc", "proxy_text_nll", "tgt_nll", "tgt_em"):
            row[k] = chosen.get(k + report)
        rows.append(row)
    return rows
