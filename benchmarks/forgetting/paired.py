"""Paired comparisons of two grid points on the test half: the mean over seeds of the per-seed
difference, with a 95 % bootstrap interval over seeds and items.

Pairing: method ``a`` of seed ``s`` is compared with reference ``b`` of the same seed ``s`` (same
LoRA init, data order and test items), so the seed-to-seed spread that both share cancels.

Bootstrap (``n_boot`` replicates, percentile interval): each replicate draws the seeds with
replacement from the seeds both points ran, and, independently, the test items of every set the
metric reads with replacement; the same item draw is used for every seed and for both points (the
items are shared, so item difficulty is paired too). The replicate's value is the mean over the
drawn seeds of ``metric(a_s) - metric(b_s)`` on the drawn items. With one seed the interval
reflects item noise only, which the result says (``n_seeds``).
"""

from __future__ import annotations

import numpy as np

from benchmarks.forgetting.items import metric_values, sets_of


def paired_difference(a_runs: dict[int, dict], b_runs: dict[int, dict], metric: str, splits: dict, *,
                      half: str = "test", n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict | None:
    """``metric(a) - metric(b)`` on ``half``, paired by seed.

    ``a_runs`` / ``b_runs``: ``{seed: per-item scores}`` (a run's ``items``). Returns ``{"mean",
    "lo", "hi", "n_seeds", "seeds", "n_items", "significant"}`` (``significant``: the interval
    excludes 0), or ``None`` where the points share no seed or a set is not scored.
    """
    seeds = sorted(set(a_runs) & set(b_runs))
    sets = sets_of(metric)
    if not seeds or any(s not in a_runs[k] or s not in b_runs[k] for k in seeds for s in sets):
        return None
    halves = {s: np.asarray(splits[s][half]) for s in sets}
    full = [metric_values(a_runs[k], metric, halves) - metric_values(b_runs[k], metric, halves) for k in seeds]
    rng = np.random.default_rng(seed)
    draws = {s: idx[rng.integers(len(idx), size=(n_boot, len(idx)))] for s, idx in halves.items()}
    per_seed = np.stack([metric_values(a_runs[k], metric, draws) - metric_values(b_runs[k], metric, draws)
                         for k in seeds])                                    # (S, n_boot)
    seed_draw = rng.integers(len(seeds), size=(n_boot, len(seeds)))          # (n_boot, S)
    replicates = per_seed[seed_draw, np.arange(n_boot)[:, None]].mean(axis=1)
    lo, hi = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": float(np.mean(full)), "lo": float(lo), "hi": float(hi), "n_seeds": len(seeds), "seeds": seeds,
            "n_items": {s: len(idx) for s, idx in halves.items()}, "significant": bool(lo > 0 or hi < 0),
            "level": level, "n_boot": n_boot}
