"""Per-item scores, the validation/test split, paired bootstrap intervals and selection on validation
(benchmarks.forgetting.items / paired / summary), against direct computations."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("benchmarks.forgetting")

from benchmarks.forgetting.config import make_config  # noqa: E402
from benchmarks.forgetting.items import make_splits, metric_values, metrics_from_scores  # noqa: E402
from benchmarks.forgetting.paired import paired_difference  # noqa: E402
from benchmarks.forgetting.summary import best_at_matched_target, summarize  # noqa: E402


def _scores(rng, n_mcq=40, n_text=30, p_correct=0.5):
    return {"src_mcq": {"correct": (rng.random(n_mcq) < p_correct).astype(int).tolist(),
                        "correct_norm": rng.integers(0, 2, n_mcq).tolist(), "nll": rng.random(n_mcq).tolist()},
            "src_text_wordnet": {"nll_sum": (rng.random(n_text) * 50).tolist(),
                                 "tokens": rng.integers(5, 40, n_text).tolist()},
            "src_text_pydoc": {"nll_sum": (rng.random(n_text) * 80).tolist(),
                               "tokens": rng.integers(5, 60, n_text).tolist()}}


def _sizes(scores):
    return {k: len(next(iter(v.values()))) for k, v in scores.items()}


def test_split_is_fixed_disjoint_and_complete():
    a = make_splits({"src_mcq": 11, "tgt": 4}, seed=0)
    assert a == make_splits({"src_mcq": 11, "tgt": 4}, seed=0)          # same for every run
    assert a != make_splits({"src_mcq": 11, "tgt": 4}, seed=1)
    for name, n in (("src_mcq", 11), ("tgt", 4)):
        val, test = a[name]["val"], a[name]["test"]
        assert not set(val) & set(test) and sorted(val + test) == list(range(n))
        assert len(val) == n // 2
    with pytest.raises(ValueError, match="'tgt' has 1 item"):
        make_splits({"tgt": 1}, seed=0)


def test_metrics_on_halves_equal_direct_computation():
    rng = np.random.default_rng(0)
    scores = _scores(rng)
    splits = make_splits(_sizes(scores), seed=3)
    m = metrics_from_scores(scores, splits)
    for half in ("val", "test"):
        idx = splits["src_mcq"][half]
        assert m[f"src_mcq_acc_{half}"] == pytest.approx(np.mean([scores["src_mcq"]["correct"][i] for i in idx]))
        ratios = []
        for kind in ("wordnet", "pydoc"):
            s, ix = scores[f"src_text_{kind}"], splits[f"src_text_{kind}"][half]
            ratios.append(sum(s["nll_sum"][i] for i in ix) / sum(s["tokens"][i] for i in ix))
        assert m[f"src_text_nll_{half}"] == pytest.approx(np.mean(ratios))
    assert m["src_mcq_acc"] == pytest.approx(np.mean(scores["src_mcq"]["correct"]))
    assert m["n_items"]["src_mcq"] == {"all": 40, "val": 20, "test": 20}
    assert "tgt_nll" not in m  # a set not scored gives no metric
    bad = {**scores, "src_mcq": {**scores["src_mcq"], "nll": scores["src_mcq"]["nll"][:-1]}}
    with pytest.raises(ValueError, match="fields of different lengths"):
        metrics_from_scores(bad, splits)


def test_metric_values_vectorized_over_resamples():
    rng = np.random.default_rng(1)
    scores = _scores(rng)
    draws = {k: rng.integers(0, n, size=(7, n)) for k, n in _sizes(scores).items()}
    many = metric_values(scores, "src_text_nll", draws)
    one = [metric_values(scores, "src_text_nll", {k: v[b] for k, v in draws.items()}) for b in range(7)]
    assert many.shape == (7,) and np.allclose(many, one)


def test_paired_difference_direct_and_significance():
    rng = np.random.default_rng(2)
    base = {s: _scores(np.random.default_rng(10 + s), n_mcq=400) for s in range(3)}
    splits = make_splits(_sizes(base[0]), seed=0)
    same = paired_difference(base, base, "src_mcq_acc", splits, n_boot=300)
    assert same["mean"] == 0 and same["lo"] == 0 and same["hi"] == 0 and not same["significant"]
    # b = a with 40 % of the wrong test answers made right: a clear, paired gain
    better = {}
    for s, sc in base.items():
        correct = list(sc["src_mcq"]["correct"])
        for i in splits["src_mcq"]["test"]:
            if not correct[i] and rng.random() < 0.4:
                correct[i] = 1
        better[s] = {**sc, "src_mcq": {**sc["src_mcq"], "correct": correct}}
    d = paired_difference(better, base, "src_mcq_acc", splits, n_boot=500)
    direct = np.mean([np.mean(np.array(better[s]["src_mcq"]["correct"])[splits["src_mcq"]["test"]])
                      - np.mean(np.array(base[s]["src_mcq"]["correct"])[splits["src_mcq"]["test"]]) for s in range(3)])
    assert d["mean"] == pytest.approx(direct) and d["lo"] <= d["mean"] <= d["hi"]
    assert d["significant"] and d["lo"] > 0 and d["n_seeds"] == 3 and d["n_items"] == {"src_mcq": 200}
    # unpaired noise of the same size as the gain: no significance claimed
    noise = {s: _scores(np.random.default_rng(50 + s), n_mcq=400) for s in range(3)}
    assert not paired_difference(noise, base, "src_mcq_acc", splits, n_boot=500)["significant"]
    # only common seeds are paired; none in common: no comparison
    assert paired_difference({0: base[0]}, base, "src_mcq_acc", splits, n_boot=50)["seeds"] == [0]
    assert paired_difference({5: base[0]}, base, "src_mcq_acc", splits, n_boot=50) is None


def test_selection_on_validation_reports_test():
    """A point that looks best on the test half but not on validation is not chosen."""
    def point(family, name, tgt_val, src_val, src_test, tgt_test=None):
        return {"family": family, "point": name, "init": "-", "seeds": [0], "tgt_nll_val": tgt_val,
                "tgt_nll_test": tgt_test if tgt_test is not None else tgt_val, "src_text_nll_val": src_val,
                "src_text_nll_test": src_test}

    plain = point("LoRA", "-", 0.5, 2.5, 2.6)
    pts = [plain, point("A", "lam=1", 0.5, 2.2, 2.4), point("A", "lam=2", 0.5, 2.3, 2.0),
           point("A", "lam=3", 0.9, 1.9, 1.9)]
    base = {"src_text_nll_test": 2.1, "src_text_nll_val": 2.0}
    rows = best_at_matched_target(pts, plain, base, "tgt_nll", "src_text_nll", 0.02, lower=True,
                                  select="_val", report="_test")
    a = next(r for r in rows if r["family"] == "A")
    assert a["point"] == "lam=1" and a["source"] == 2.4 and a["source_val"] == 2.2
    assert a["recovered"] == pytest.approx((2.6 - 2.4) / (2.6 - 2.1)) and a["reported_on"] == "test"


def test_summarize_with_split_attaches_paired_intervals():
    cfg = make_config("tiny")
    rng = np.random.default_rng(4)
    runs, base_items = [], _scores(rng)
    base_items["tgt"] = {"nll_sum": (rng.random(20) * 10).tolist(), "tokens": [5] * 20}
    splits = make_splits(_sizes(base_items), seed=0)
    for seed in (0, 1):
        for family, point, shift in (("LoRA", "-", 0.0), ("L2", "rel=1", 0.1), ("LaLoRA-kfac", "rel=1", 0.3)):
            items = {k: {f: list(v) for f, v in fs.items()} for k, fs in base_items.items()}
            items["src_text_wordnet"]["nll_sum"] = [x * (1.2 - shift) for x in items["src_text_wordnet"]["nll_sum"]]
            items["tgt"]["nll_sum"] = [x * 0.5 for x in items["tgt"]["nll_sum"]]
            metrics = metrics_from_scores(items, splits)
            runs.append({"setting": "qv", "family": family, "point": point, "seed": seed,
                         "method": "lora" if family == "LoRA" else "l2", "init": "-", "metrics": metrics,
                         "items": items, "spec": {"method": "lora"} if family == "LoRA" else {"method": "l2"}})
    base = {**metrics_from_scores(base_items, splits), "items": base_items}
    summary = summarize(runs, base, cfg, splits, n_boot=200)
    assert summary["selection"].startswith("validation")
    rows = {r["family"]: r for r in summary["tables"]["qv"]["nll"]}
    kfac = rows["LaLoRA-kfac"]["paired"]
    assert kfac["LoRA"]["src_text_nll"]["mean"] < 0 and kfac["LoRA"]["src_text_nll"]["significant"]
    assert kfac["LoRA"]["tgt_nll"]["mean"] == pytest.approx(0) and not kfac["LoRA"]["tgt_nll"]["significant"]
    assert kfac["L2"]["src_text_nll"]["mean"] < 0 and "L2" not in rows["L2"]["paired"]
    ev = summary["evidence"]["qv"]["src_text_nll"]
    assert ev["paired"]["n_seeds"] == 2 and ev["paired"]["mean"] == pytest.approx(ev["delta_mean"])
    # every grid point against plain LoRA of its setting (the ablation tables): the point's test mean
    # minus plain LoRA's, per seed, averaged
    points = {p["family"]: p for p in summary["points"]}
    assert "paired_lora" not in points["LoRA"]
    for family in ("L2", "LaLoRA-kfac"):
        d = points[family]["paired_lora"]["src_text_nll"]
        assert d["n_seeds"] == 2
        assert d["mean"] == pytest.approx(points[family]["src_text_nll_test"] - points["LoRA"]["src_text_nll_test"])
        assert d["significant"] and d["hi"] < 0
    assert points["LaLoRA-kfac"]["paired_lora"]["tgt_nll"]["mean"] == pytest.approx(0)
    # older results without per-item scores: summarized on the same items, and say so
    legacy = [{**r, "metrics": {k: v for k, v in r["metrics"].items() if not k.endswith(("_val", "_test"))}}
              for r in runs]
    for r in legacy:
        del r["items"]
    assert summarize(legacy, base, cfg, splits)["selection"] == "same items"


def test_length_sorted_scoring_gives_the_same_rows_with_less_padding():
    """Re-batching rows by length changes the time, not the per-row scores, which go back in order."""
    import torch

    from benchmarks.forgetting.evaluation import length_sorted, unsort
    from lalora_curv.experiments import data as D
    from lalora_curv.experiments import evaluation as E
    from lalora_curv.experiments.models import tiny_llama, tiny_tokenizer

    tok, model = tiny_tokenizer(), tiny_llama(seed=3)
    texts = ["a b", "a much longer text than the others here", "mid length text", "xy z", "another long one, yes",
             "q"  * 3]
    batches = D.lm_batches(texts, tok, batch_size=3, seq_len=64, pad_to_longest=True)
    sorted_batches, order = length_sorted(batches, 3)
    assert sorted(order) == list(range(6))
    padding = [sum(int((b["attention_mask"] == 0).sum()) for b in bs) for bs in (batches, sorted_batches)]
    assert padding[1] < padding[0]
    plain = E.row_scores(model, batches)
    again = unsort(E.row_scores(model, sorted_batches), order)
    for (s1, c1, g1), (s2, c2, g2) in zip(plain, again):
        assert c1 == c2 and g1 == g2 and abs(s1 - s2) < 1e-4
    left = {k: v.clone() for k, v in batches[0].items()}
    left["attention_mask"] = torch.flip(left["attention_mask"], [1])
    with pytest.raises(ValueError, match="right-padded"):
        length_sorted([left], 2)
