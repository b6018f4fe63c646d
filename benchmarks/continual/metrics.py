"""Metrics of the continual benchmark from the score matrices ``R[i][j]`` (task ``i`` after
training task ``j``; ``j = 0``: base model). Definitions in :mod:`benchmarks.continual`."""

from __future__ import annotations

import math
import statistics


def run_matrices(run: dict, names: list[str]) -> dict:
    """``em[i][j]``, ``nll[i][j]`` (task i = 1..T as rows 0..T-1, column j = 0..T) and source rows."""
    cols = run["columns"]
    return {"em": [[c[f"{n}:em"] for c in cols] for n in names],
            "nll": [[c[f"{n}:nll"] for c in cols] for n in names],
            "mcq_acc": [c["mcq_acc"] for c in cols], "mcq_nll": [c["mcq_nll"] for c in cols],
            "src_text_nll": [c["src_text_nll"] for c in cols]}


def mean_matrices(per_seed: list[dict]) -> dict:
    def avg(xs):
        if isinstance(xs[0], list):
            return [avg([x[i] for x in xs]) for i in range(len(xs[0]))]
        return statistics.fmean(xs)

    return {k: avg([m[k] for m in per_seed]) for k in per_seed[0]}


def summary_metrics(M: dict, run: dict, smoothed: bool = False) -> dict:
    """Scalar metrics of one run's matrices (module docstring). For smoothed rows (column t = smoothed
    adapter of task t) the learning metrics (plasticity, NLL drop, forward transfer, training loss,
    penalty ratios) do not apply and are None."""
    em, nll = M["em"], M["nll"]
    T = len(em)
    fin = [em[i][T] for i in range(T)]
    out = {
        "avg_final_em": statistics.fmean(fin),
        "avg_final_nll": statistics.fmean(nll[i][T] for i in range(T)),
        "bwt_em": statistics.fmean(em[i][T] - em[i][i + 1] for i in range(T - 1)) if T > 1 else 0.0,
        "bwt_nll": statistics.fmean(nll[i][T] - nll[i][i + 1] for i in range(T - 1)) if T > 1 else 0.0,
        "task_aware_em": statistics.fmean(em[i][i + 1] for i in range(T)),
        "task_aware_nll": statistics.fmean(nll[i][i + 1] for i in range(T)),
    }
    new = range(1, T)  # tasks 2..T (0-based rows): where the methods differ
    if T > 1:
        out.update(
            plasticity_em=statistics.fmean(em[t][t + 1] for t in new),
            plasticity_nll=statistics.fmean(nll[t][t + 1] for t in new),
            plasticity_nll_drop=statistics.fmean(nll[t][t] - nll[t][t + 1] for t in new),
            fwt_em=statistics.fmean(em[t][t] - em[t][0] for t in new),
            fwt_nll=statistics.fmean(nll[t][t] - nll[t][0] for t in new),
            train_loss_mean=statistics.fmean(h["loss_mean"] for h in run["histories"][1:]),
            train_loss_last=statistics.fmean(h["loss_last"] for h in run["histories"][1:]),
            penalty_task_ratio_last=statistics.fmean(h["penalty_task_ratio_last"] for h in run["histories"][1:]),
            penalty_task_ratio_mean=statistics.fmean(h["penalty_task_ratio_mean"] for h in run["histories"][1:]),
        )
    if smoothed:
        out.update({k: None for k in ("plasticity_em", "plasticity_nll", "plasticity_nll_drop", "fwt_em", "fwt_nll",
                                      "train_loss_mean", "train_loss_last", "penalty_task_ratio_last",
                                      "penalty_task_ratio_mean")})
    out.update(src_text_nll_final=M["src_text_nll"][-1],
               src_text_nll_delta=M["src_text_nll"][-1] - M["src_text_nll"][0],
               src_text_nll_worst=max(M["src_text_nll"][1:]),
               mcq_acc_final=M["mcq_acc"][-1], mcq_acc_delta=M["mcq_acc"][-1] - M["mcq_acc"][0],
               mcq_nll_final=M["mcq_nll"][-1], mcq_nll_delta=M["mcq_nll"][-1] - M["mcq_nll"][0])
    return out


def aggregate(values: list[float]) -> dict:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": None, "sd": None, "values": []}
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "values": values}
