"""Aggregation of the runs: seed means per grid point, forgetting evidence, best point at matched target."""

from __future__ import annotations

import statistics

from benchmarks.forgetting.config import Config
from benchmarks.forgetting.runs import is_plain

# ============================================================================================
# Aggregation, tables, plots
# ============================================================================================

METRICS = ("tgt_nll", "tgt_em", "src_text_nll", "src_text_nll_wordnet", "src_text_nll_pydoc", "src_mcq_nll",
           "src_mcq_acc", "src_mcq_acc_norm", "proxy_text_nll", "proxy_mcq_nll", "proxy_mcq_acc")


def _mean_sd(values: list) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(results: list[dict], base: dict, cfg: Config) -> dict:
    """Seed-averaged grid points, the forgetting evidence and the best-at-matched-target tables."""
    groups: dict = {}
    for r in results:
        groups.setdefault((r["setting"], r["family"], r["point"]), []).append(r)
    points = []
    for (setting, family, point), rs in groups.items():
        p = {"setting": setting, "family": family, "point": point, "method": rs[0]["method"],
             "strength": rs[0].get("strength"), "relative": rs[0].get("relative"), "init": rs[0].get("init"),
             "seeds": [r["seed"] for r in rs], "strengths": [r.get("strength") for r in rs]}
        for k in METRICS:
            p[k], p[k + "_sd"] = _mean_sd([r["metrics"].get(k) for r in rs])
        p["penalty_task_ratio_last"], _ = _mean_sd([(r.get("history") or {}).get("penalty_task_ratio_last")
                                                    for r in rs])
        points.append(p)
    order = {st["name"]: i for i, st in enumerate(cfg.settings)}
    points.sort(key=lambda p: order.get(p["setting"], len(order)))  # stable: runs' order within a setting

    evidence = {}
    for setting in cfg.settings:
        plain = [r for r in results if r["setting"] == setting["name"] and is_plain(r)]
        if not plain:
            continue
        ev = {"n_seeds": len(plain), "seeds": [r["seed"] for r in plain]}
        for k in ("src_text_nll", "src_text_nll_wordnet", "src_text_nll_pydoc", "src_mcq_nll", "src_mcq_acc",
                  "proxy_text_nll", "proxy_mcq_nll", "proxy_mcq_acc", "tgt_nll", "tgt_em"):
            if base.get(k) is None or any(r["metrics"].get(k) is None for r in plain):
                continue
            deltas = [r["metrics"][k] - base[k] for r in plain]
            mean, sd = _mean_sd(deltas)
            ev[k] = {"base": base[k], "plain_mean": base[k] + mean, "delta_mean": mean, "delta_sd": sd,
                     "deltas": deltas}
        evidence[setting["name"]] = ev

    tables = {}
    for setting in cfg.settings:
        pts = [p for p in points if p["setting"] == setting["name"]]
        plain = next((p for p in pts if p["family"] == "LoRA"), None)
        if plain is None or len(pts) < 2:
            continue
        tables[setting["name"]] = {
            "nll": best_at_matched_target(pts, plain, base, "tgt_nll", "src_text_nll", cfg.nll_tolerance, lower=True),
            "mcq_nll": best_at_matched_target(pts, plain, base, "tgt_nll", "src_mcq_nll", cfg.nll_tolerance,
                                              lower=True),
            "acc": best_at_matched_target(pts, plain, base, "tgt_em", "src_mcq_acc", cfg.acc_tolerance, lower=False),
        }
    return {"points": points, "evidence": evidence, "tables": tables}


def best_at_matched_target(points: list[dict], plain: dict, base: dict, target: str, source: str, tol: float,
                           lower: bool) -> list[dict]:
    """Per family: the grid point with the best ``source`` score among those whose ``target`` score is
    within ``tol`` of plain LoRA's (NLL: ``<= plain + tol``; accuracy: ``>= plain - tol``)."""
    if plain.get(target) is None:
        return []
    rows = []
    families = list(dict.fromkeys(p["family"] for p in points))
    for family in families:
        fam = [p for p in points if p["family"] == family and p.get(target) is not None and p.get(source) is not None]
        if not fam:
            continue
        ok = [p for p in fam if (p[target] <= plain[target] + tol if lower else p[target] >= plain[target] - tol)]
        better = (lambda p: p[source]) if lower else (lambda p: -p[source])
        best = min(ok, key=better) if ok else None
        row = {"family": family, "within_tolerance": best is not None,
               "n_points": len(fam), "n_within": len(ok)}
        chosen = best if best is not None else min(fam, key=(lambda p: p[target]) if lower else (lambda p: -p[target]))
        gap = plain[source] - base[source]
        row.update(point=chosen["point"], init=chosen["init"], target=chosen[target], target_sd=chosen[target + "_sd"],
                   source=chosen[source], source_sd=chosen[source + "_sd"],
                   recovered=((plain[source] - chosen[source]) / gap) if gap else None,
                   src_text_nll=chosen["src_text_nll"], src_mcq_nll=chosen["src_mcq_nll"],
                   src_mcq_acc=chosen["src_mcq_acc"], proxy_text_nll=chosen["proxy_text_nll"],
                   tgt_nll=chosen["tgt_nll"], tgt_em=chosen["tgt_em"], seeds=len(chosen["seeds"]),
                   penalty_task_ratio_last=chosen.get("penalty_task_ratio_last"))
        rows.append(row)
    return rows
