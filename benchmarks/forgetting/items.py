"""Per-item scores of the forgetting benchmark, the fixed validation/test split of every evaluation
set, and the metrics computed from them (whole set, ``_val`` half, ``_test`` half, bootstrap resamples).

Every evaluation set is a list of items scored one by one (:data:`SETS`); a run stores its per-item
scores as ``{set: {field: [value per item]}}`` and every metric is a function of them
(:data:`METRICS`), so the same code gives the whole-set score, each half's score and the score of
any resample of items. Conventions:

* ``mean`` metrics average a field over items (MCQ accuracy, the NLL of the correct choice, exact match);
* ``ratio`` metrics pool tokens: ``sum(nll_sum) / sum(tokens)`` over the items (a token-mean NLL, as
  ``lm_scores`` computes it);
* ``src_text_nll`` is the plain mean of the WordNet and pydoc token-mean NLLs (each source weighs the same).

The split (:func:`make_splits`) is a seeded permutation of each set's item positions: the first
``n // 2`` (sorted) form ``val``, the rest ``test``. It depends only on the set's name, its size and
the data seed, so it is the same for every run, method and seed of a result; it is recorded in the
result's ``data.splits``.
"""

from __future__ import annotations

import random

import numpy as np

HALVES = ("val", "test")

# set name -> (per-item fields, what the set is)
SETS: dict[str, tuple[tuple[str, ...], str]] = {
    "src_mcq": (("correct", "correct_norm", "nll"), "WordNet MCQ, held-out synsets"),
    "proxy_mcq": (("correct", "correct_norm", "nll"), "WordNet MCQ, synsets of the proxy split"),
    "src_text_wordnet": (("nll_sum", "tokens"), "held-out WordNet texts"),
    "src_text_pydoc": (("nll_sum", "tokens"), "held-out pydoc texts"),
    "proxy_text": (("nll_sum", "tokens"), "rows of the curvature's own proxy batches"),
    "tgt": (("nll_sum", "tokens"), "held-out target items, teacher-forced"),
    "tgt_gen": (("em",), "held-out target items, greedy answer = reference"),
}

# metric -> ("mean", set, field) | ("ratio", set) | ("avg", (metric, metric))
METRICS: dict[str, tuple] = {
    "src_mcq_acc": ("mean", "src_mcq", "correct"),
    "src_mcq_acc_norm": ("mean", "src_mcq", "correct_norm"),
    "src_mcq_nll": ("mean", "src_mcq", "nll"),
    "proxy_mcq_acc": ("mean", "proxy_mcq", "correct"),
    "proxy_mcq_nll": ("mean", "proxy_mcq", "nll"),
    "src_text_nll_wordnet": ("ratio", "src_text_wordnet"),
    "src_text_nll_pydoc": ("ratio", "src_text_pydoc"),
    "src_text_nll": ("avg", ("src_text_nll_wordnet", "src_text_nll_pydoc")),
    "proxy_text_nll": ("ratio", "proxy_text"),
    "tgt_nll": ("ratio", "tgt"),
    "tgt_em": ("mean", "tgt_gen", "em"),
}


def sets_of(metric: str) -> tuple[str, ...]:
    """The evaluation sets a metric reads."""
    spec = METRICS[metric]
    if spec[0] == "avg":
        return tuple(s for m in spec[1] for s in sets_of(m))
    return (spec[1],)


def make_splits(sizes: dict[str, int], seed: int) -> dict[str, dict[str, list[int]]]:
    """``{set: {"val": positions, "test": positions}}``: a fixed, disjoint halving of each set."""
    splits = {}
    for name, n in sizes.items():
        if n < 2:
            raise ValueError(f"evaluation set {name!r} has {n} item(s): a validation and a test half need at least 2")
        order = list(range(n))
        random.Random(f"split:{seed}:{name}:{n}").shuffle(order)
        splits[name] = {"val": sorted(order[:n // 2]), "test": sorted(order[n // 2:])}
    return splits


def check_scores(scores: dict, splits: dict) -> None:
    """Every set has its fields, all of one length, equal to the size the split was made for."""
    for name, fields in scores.items():
        if name not in SETS:
            raise ValueError(f"unknown evaluation set {name!r}; known: {sorted(SETS)}")
        lengths = {f: len(fields[f]) for f in SETS[name][0]}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"{name}: fields of different lengths {lengths}")
        n = next(iter(lengths.values()))
        if name in splits and len(splits[name]["val"]) + len(splits[name]["test"]) != n:
            raise ValueError(f"{name}: {n} scored items but the split covers "
                             f"{len(splits[name]['val']) + len(splits[name]['test'])}")


def metric_values(scores: dict, metric: str, index: dict[str, np.ndarray] | None = None):
    """``metric`` from per-item ``scores``, on the items ``index[set]`` (all items where absent).

    ``index[set]`` may be 1-D (``(n,)``: one subset) or 2-D (``(B, n)``: ``B`` resamples at once);
    the result is a float or an array ``(B,)`` accordingly. ``None`` if a set is not scored.
    """
    spec = METRICS[metric]
    if spec[0] == "avg":
        parts = [metric_values(scores, m, index) for m in spec[1]]
        return None if any(p is None for p in parts) else sum(parts) / len(parts)
    name = spec[1]
    if name not in scores:
        return None
    idx = None if index is None else index.get(name)

    def take(field):
        values = np.asarray(scores[name][field], dtype=np.float64)
        return values if idx is None else values[np.asarray(idx)]

    if spec[0] == "mean":
        out = take(spec[2]).mean(axis=-1)
    else:
        out = take("nll_sum").sum(axis=-1) / take("tokens").sum(axis=-1)
    return float(out) if np.ndim(out) == 0 else out


def metrics_from_scores(scores: dict, splits: dict) -> dict:
    """Every metric whose sets are scored, on the whole sets and on each half (``<metric>_val``,
    ``<metric>_test``), and ``n_items``: ``{set: {"all": n, "val": n, "test": n}}``."""
    check_scores(scores, splits)
    out: dict = {}
    for metric in METRICS:
        if any(s not in scores for s in sets_of(metric)):
            continue
        out[metric] = metric_values(scores, metric)
        for half in HALVES:
            out[f"{metric}_{half}"] = metric_values(scores, metric, {s: splits[s][half] for s in sets_of(metric)})
    out["n_items"] = {name: {"all": len(scores[name][SETS[name][0][0]]),
                             **{half: len(splits[name][half]) for half in HALVES}} for name in scores}
    return out


def rounded(scores: dict, digits: int = 5) -> dict:
    """Per-item scores as stored in the JSON (floats rounded; counts and 0/1 flags as ints)."""
    def conv(x):
        return int(x) if float(x).is_integer() else round(float(x), digits)

    return {name: {field: [conv(v) for v in values] for field, values in fields.items()}
            for name, fields in scores.items()}
