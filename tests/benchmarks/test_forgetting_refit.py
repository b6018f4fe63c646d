"""LaLoRA with the curvature refitted after a plain warm-up (``"refit_after": k``, benchmarks.forgetting.refit):
the phased training equals one uninterrupted training, the refit curvature is fitted at the warm-up
weights (K-FAC then has curvature on A), the relative strength uses the refit calibration, and a
refit that cannot be honoured is a clear error."""

from __future__ import annotations

import copy

import pytest
import torch

forgetting = pytest.importorskip("benchmarks.forgetting")
from benchmarks.forgetting.refit import calibration_key, train_in_phases  # noqa: E402
from benchmarks.forgetting.run import Benchmark  # noqa: E402

QUIET = dict(progress=False, log=lambda *_: None)
REFIT = {"method": "lalora", "structure": "kfac", "refit_after": 2}


# ------------------------------------------------------------------------------ the phased training
@pytest.fixture(scope="module")
def tiny_lora():
    """``make(seed)``: a fresh LoRA (q, v) on the tiny random Llama; 3 random token batches (an odd
    count, so that the batch after the warm-up is not the first one again)."""
    from benchmarks.harness import load_base_model
    from lalora_curv import LoRAParams
    from lalora_curv.experiments.models import add_lora

    base, _ = load_base_model("tiny", device=torch.device("cpu"), dtype="float32")
    for p in base.parameters():
        p.requires_grad_(False)
    vocab = base.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        ids = torch.randint(0, vocab, (2, 12), generator=gen)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})

    def make(seed=0):
        model = add_lora(copy.deepcopy(base), r=2, alpha=4, target_modules=("q_proj", "v_proj"), dropout=0.0,
                         seed=seed)
        return model, LoRAParams.from_model(model)

    return make, batches


def _refit_penalty(model, lora, batches, anchor, strength):
    from lalora_curv import LaplacePenalty, fit_curvature

    curv = fit_curvature(model, batches[:1], structure="kfac", kind="mc", progress=False, mc_samples=1, seed=0)
    return LaplacePenalty(curv, anchor=anchor, strength=strength, lora=lora, prior_precision=1e-3)


def test_refit_at_strength_zero_is_plain_lora(tiny_lora):
    """Warm-up, curvature refit, then the rest with the same AdamW state and the next batches: at
    strength 0 the final LoRA weights are plain LoRA's (one uninterrupted ``finetune``, same seed)."""
    from lalora_curv.training import finetune

    make, batches = tiny_lora
    kw = dict(lr=1e-2, seed=0, max_grad_norm=1.0)
    plain_model, plain_lora = make()
    plain = finetune(plain_model, batches, steps=5, progress=False, lora=plain_lora, **kw)

    model, lora = make()
    anchor = lora.snapshot()
    history, seconds, penalty = train_in_phases(
        model, batches, steps=5, lora=lora, switch_at={2: lambda: _refit_penalty(model, lora, batches, anchor, 0.0)},
        **kw)
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5] and seconds > 0
    assert penalty is not None and penalty.strength == 0.0
    for name, value in lora.snapshot().items():
        torch.testing.assert_close(value, plain.params[name], rtol=1e-5, atol=1e-7)
    assert [h["task_loss"] for h in history] == pytest.approx([h["task_loss"] for h in plain.history], rel=1e-5)

    # the comparison can fail: a fresh optimizer after the warm-up (state lost) ends elsewhere
    fresh_model, fresh_lora = make()
    finetune(fresh_model, batches, steps=2, progress=False, lora=fresh_lora, **kw)
    finetune(fresh_model, batches[2:] + batches[:2], steps=3, progress=False, lora=fresh_lora, **kw)
    assert any(not torch.allclose(v, plain.params[n], rtol=1e-5, atol=1e-7)
               for n, v in fresh_lora.snapshot().items())


def test_refit_penalty_switches_on_after_the_warm_up(tiny_lora):
    """With a positive strength: no penalty during the warm-up, a positive one after (the weights have
    left the init anchor), and the end point differs from plain LoRA's."""
    make, batches = tiny_lora
    model, lora = make()
    anchor = lora.snapshot()
    history, _, _ = train_in_phases(
        model, batches, steps=4, lr=1e-2, seed=0, lora=lora,
        switch_at={2: lambda: _refit_penalty(model, lora, batches, anchor, 100.0)})
    assert [h["penalty"] for h in history[:2]] == [0.0, 0.0]
    assert all(h["penalty"] > 0 for h in history[2:])


def test_phases_refuse_bad_switch_steps_and_dropout(tiny_lora):
    make, batches = tiny_lora
    model, lora = make()
    with pytest.raises(ValueError, match=r"switch steps \[4\] must lie strictly between 0 and steps=4"):
        train_in_phases(model, batches, steps=4, lr=1e-2, seed=0, lora=lora, switch_at={4: lambda: None})
    from benchmarks.harness import load_base_model
    from lalora_curv import LoRAParams
    from lalora_curv.experiments.models import add_lora

    base, _ = load_base_model("tiny", device=torch.device("cpu"), dtype="float32")
    dropped = add_lora(base, r=2, alpha=4, target_modules=("q_proj", "v_proj"), dropout=0.1, seed=0)
    with pytest.raises(ValueError, match="active dropout"):
        train_in_phases(dropped, batches, steps=4, lr=1e-2, seed=0, lora=LoRAParams.from_model(dropped),
                        switch_at={2: lambda: None})


# ------------------------------------------------------------------------------ the benchmark
@pytest.fixture(scope="module")
def refit_bench(tmp_path_factory):
    """The tiny preset at 4 steps: plain LoRA, LaLoRA-kfac refit@2 at strength 0 and rel 1, LaLoRA-kfac
    (init fit) at rel 1."""
    cfg = forgetting.make_config("tiny", overrides={"steps": 4, "methods": [
        {"method": "lora"}, {**REFIT, "strengths": [0.0], "relative_strengths": [1.0]},
        {"method": "lalora", "structure": "kfac", "relative_strengths": [1.0]}]})
    bench = Benchmark(cfg, tmp_path_factory.mktemp("refit"), torch.device("cpu"), **QUIET)
    payload = bench.run()
    runs = {(r["family"], r["point"]): r for r in payload["runs"]}
    return bench, payload, runs


def test_benchmark_refit_at_strength_zero_trains_like_plain_lora(refit_bench):
    _, _, runs = refit_bench
    plain, refit0 = runs[("LoRA", "-")], runs[("LaLoRA-kfac refit@2", "lam=0e0")]
    assert refit0["history"]["task_loss"] == pytest.approx(plain["history"]["task_loss"], rel=1e-5)
    for k in ("tgt_nll", "src_text_nll", "src_mcq_nll", "proxy_text_nll"):
        assert refit0["metrics"][k] == pytest.approx(plain["metrics"][k], rel=1e-5), k
    assert refit0["info"]["refit_after"] == 2 and refit0["history"]["steps"] == 4


def test_benchmark_refit_curvature_is_fitted_at_the_warm_up_weights(refit_bench):
    """At the B = 0 init K-FAC has zero curvature on every A entry; the refit fit (at plain LoRA's
    weights after 2 steps, which the refit run's warm-up reproduces) has curvature on A."""
    bench, payload, runs = refit_bench
    proxy_key = (bench.cfg.proxy_kind, bench.cfg.proxy_batches)
    init_key, refit_key = ("qv", 0, "kfac", proxy_key), ("qv", 0, "kfac", proxy_key, "refit@2")
    warm = bench.plain_snapshots[("qv", 0)][2]
    is_a = torch.cat([torch.full((v.numel(),), "lora_A" in n) for n, v in warm.items()])
    assert is_a.any() and not is_a.all()
    init_diag = bench.curv_cache[init_key].diagonal().float()
    refit_diag = bench.curv_cache[refit_key].diagonal().float()
    assert init_diag.shape == refit_diag.shape == is_a.shape
    assert (init_diag[is_a] == 0).all() and (init_diag[~is_a] > 0).any()
    assert (refit_diag[is_a] > 0).any()
    # fitted at the warm-up weights: plain LoRA's after 2 steps (B no longer 0)
    assert all(torch.equal(bench.refit_points[refit_key][n], v) for n, v in warm.items())
    assert any(("lora_B" in n) and v.abs().max() > 0 for n, v in warm.items())
    # every refit run uses that fit, and pays for it
    info_key = "|".join(map(str, refit_key))
    assert info_key in payload["curvature"]
    for point in ("lam=0e0", "rel=1"):
        run = runs[("LaLoRA-kfac refit@2", point)]
        assert run["info"]["curvature_key"] == info_key
        assert run["cost"]["curvature_fit"] == payload["curvature"][info_key]["fit_seconds"] > 0
    assert not any("differ" in note for note in payload["notes"])


def test_benchmark_refit_relative_strength_uses_the_refit_calibration(refit_bench):
    _, payload, runs = refit_bench
    cal = payload["calibration"]["qv/s0"]
    refit_cal, init_cal = cal[calibration_key("kfac", 2)], cal["kfac"]
    assert refit_cal["q"] > 0 and refit_cal["lam_ratio1"] == pytest.approx(2 * cal["task_loss_last"] / refit_cal["q"])
    refit1, init1 = runs[("LaLoRA-kfac refit@2", "rel=1")], runs[("LaLoRA-kfac", "rel=1")]
    assert refit1["strength"] == pytest.approx(refit_cal["lam_ratio1"])
    assert init1["strength"] == pytest.approx(init_cal["lam_ratio1"])
    assert refit_cal["lam_ratio1"] != pytest.approx(init_cal["lam_ratio1"])
    # no penalty during the warm-up, then the penalty anchored at the init
    assert refit1["history"]["penalty"][:2] == [0.0, 0.0] and refit1["history"]["penalty"][2] > 0


def test_resolve_strength_picks_the_refit_entry(tmp_path):
    cfg = forgetting.make_config("tiny", overrides={"steps": 4, "methods": [
        {"method": "lora"}, {**REFIT, "relative_strengths": [3.0]}]})
    bench = Benchmark(cfg, tmp_path, torch.device("cpu"), **QUIET)
    (run,) = [r for r in bench.runs if r["family"] == "LaLoRA-kfac refit@2"]
    bench.calibration = {"qv/s0": {"kfac": {"lam_ratio1": 2.0}, "kfac refit@2": {"lam_ratio1": 5.0}}}
    assert bench.resolve_strength(run) == 15.0
    bench.calibration = {"qv/s0": {"kfac": {"lam_ratio1": 2.0}}}
    with pytest.raises(RuntimeError, match="calibration of qv/s0 for 'kfac refit@2'"):
        bench.resolve_strength(run)


@pytest.mark.parametrize("overrides, message", [
    ({"steps": 4, "methods": [{"method": "lora"}, {**REFIT, "refit_after": 4, "strengths": [1.0]}]},
     r"refit_after=4 must be smaller than steps=4"),
    ({"steps": 4, "methods": [{"method": "lora"}, {**REFIT, "refit_after": 9, "strengths": [1.0]}]},
     r"refit_after=9 must be smaller than steps=4"),
    ({"steps": 4, "methods": [{"method": "l2", "refit_after": 2, "strengths": [1.0]}]},
     r"refit_after is an option of method 'lalora' only, not 'l2'"),
    ({"steps": 4, "methods": [{**REFIT, "refit_after": 0, "strengths": [1.0]}]},
     r"refit_after must be a positive integer"),
    ({"steps": 4, "dropout": 0.1, "methods": [{**REFIT, "strengths": [1.0]}]}, r"refit_after needs dropout=0"),
])
def test_refit_that_cannot_be_honoured_is_a_clear_error(tmp_path, overrides, message):
    cfg = forgetting.make_config("tiny", overrides=overrides)
    with pytest.raises(ValueError, match=message):
        Benchmark(cfg, tmp_path, torch.device("cpu"), **QUIET)


def test_kfac_gap_preset():
    cfg = forgetting.make_config("kfac_gap")
    runs, _ = forgetting.expand_runs(cfg, forgetting.try_baselines())
    families = {r["family"] for r in runs}
    assert {"LoRA", "LaLoRA-kfac", "LaLoRA-kfac refit@10", "LaLoRA-kfac_delta_w", "LaLoRA-diag"} <= families
    assert cfg.seeds == cfg.plain_seeds == (0, 1) and cfg.target_task == "chain_sum"
    refit = [r for r in runs if r["family"] == "LaLoRA-kfac refit@10"]
    assert sorted((r["seed"], r["point"]) for r in refit) == [(0, "rel=1"), (0, "rel=3"), (1, "rel=1"), (1, "rel=3")]
    assert all(r["spec"]["refit_after"] == 10 < cfg.steps for r in refit)
