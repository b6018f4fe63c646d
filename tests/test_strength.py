"""``lc.suggest_strength``: the growth-exponent fit, the extrapolation, an untouched model, and the
measured ratio to the benchmark's calibrated strength on the tiny Llama (2 seeds)."""

from __future__ import annotations

import math
import random

import pytest
import torch

import lalora_curv as lc
from lalora_curv.strength import StrengthSuggestion, fit_growth_exponent
from tests.conftest import make_lm_batch, make_tiny_lm


def test_suggest_strength_is_a_lazy_public_name():
    from lalora_curv import strength

    assert lc.suggest_strength is strength.suggest_strength and "suggest_strength" in lc.__all__


@pytest.mark.parametrize("true_exponent, expected", [(1.5, 1.5), (2.0, 2.0), (3.0, 2.0), (0.5, 1.0)])
def test_growth_exponent_is_the_log_log_slope_clipped(true_exponent, expected):
    quadratics = [0.37 * t ** true_exponent for t in range(1, 6)]
    quadratics[0] *= 5.0  # step 1 (Adam's sign step) is left out of the fit
    clipped, fitted = fit_growth_exponent(quadratics)
    assert fitted == pytest.approx(true_exponent, rel=1e-9) and clipped == pytest.approx(expected)


def test_growth_exponent_without_two_points_assumes_the_upper_end():
    clipped, fitted = fit_growth_exponent([0.2])
    assert clipped == 2.0 and math.isnan(fitted)
    with pytest.raises(ValueError, match="exponent_range"):
        fit_growth_exponent([1.0, 2.0], (2.0, 1.0))


def _tiny_setup():
    model = make_tiny_lm(init="gaussian")
    batches = [make_lm_batch(seed=s) for s in range(3)]
    curv = lc.fit_curvature(model, batches[:1], structure="diag", kind="empirical", progress=False)
    return model, batches, curv


def test_model_weights_grads_flags_and_rng_are_restored_exactly():
    model, batches, curv = _tiny_setup()
    model.train()
    model.base_model.model.model.layers[0].eval()  # a mixed train/eval state must come back as it was
    frozen = next(p for p in model.parameters() if not p.requires_grad)
    lora = lc.LoRAParams.from_model(model)
    lora.params[0].grad = torch.full_like(lora.params[0], 0.5)  # a gradient the user had accumulated
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    result = lc.suggest_strength(curv, model, batches, steps=30, lr=1e-2, pilot_steps=3)
    assert result.strength > 0 and len(result.pilot_quadratic) == 3
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and not frozen.requires_grad
    assert torch.equal(lora.params[0].grad, torch.full_like(lora.params[0], 0.5))
    assert all(p.grad is None for p in lora.params[1:])
    assert torch.equal(torch.get_rng_state(), rng)


def test_extrapolation_is_the_power_law_of_the_pilot_for_an_anchor_at_the_start():
    model, batches, curv = _tiny_setup()
    result = lc.suggest_strength(curv, model, batches, steps=40, lr=1e-2, pilot_steps=4, relative=3.0,
                                 prior_precision=1e-3)
    assert isinstance(result, StrengthSuggestion)
    expected_q = result.pilot_quadratic[-1] * (40 / 4) ** result.exponent
    assert result.quadratic == pytest.approx(expected_q, rel=1e-6)
    assert 1.0 <= result.exponent <= 2.0 and result.scale == pytest.approx(10 ** (result.exponent / 2))
    assert result.task_loss == pytest.approx(sum(result.pilot_task_loss) / 4)
    assert result.strength == pytest.approx(3.0 * 2 * result.task_loss / result.quadratic)
    assert result.lam_ratio1 == pytest.approx(result.strength / 3.0)


def test_an_anchor_away_from_the_start_adds_its_offset_before_the_quadratic():
    """Anchor = start - offset: q is measured at start + s * movement, from the anchor (larger)."""
    model, batches, curv = _tiny_setup()
    lora = lc.LoRAParams.from_model(model)
    at_start = lc.suggest_strength(curv, model, batches, steps=20, lr=1e-2, pilot_steps=2, prior_precision=1.0)
    anchor = {n: v - 0.3 for n, v in lora.snapshot().items()}
    offset = lc.suggest_strength(curv, model, batches, steps=20, lr=1e-2, pilot_steps=2, prior_precision=1.0,
                                 anchor=anchor)
    assert offset.pilot_quadratic == pytest.approx(at_start.pilot_quadratic)
    assert offset.quadratic > at_start.quadratic and offset.strength < at_start.strength


def test_bad_budgets_are_named():
    model, batches, curv = _tiny_setup()
    with pytest.raises(ValueError, match="pilot_steps must be between 1 and steps=10"):
        lc.suggest_strength(curv, model, batches, steps=10, lr=1e-2, pilot_steps=11)
    with pytest.raises(ValueError, match="steps"):
        lc.suggest_strength(curv, model, batches, steps=0, lr=1e-2)
    with pytest.warns(UserWarning, match="more than 10%"):
        lc.suggest_strength(curv, model, batches, steps=10, lr=1e-2, pilot_steps=3)


def test_a_pilot_that_does_not_move_is_an_error():
    model, batches, curv = _tiny_setup()
    with pytest.raises(ValueError, match="did not move"):
        lc.suggest_strength(curv, model, batches, steps=10, lr=0.0, pilot_steps=1)


# ------------------------------------------------------------------------------ the measurement
def _arithmetic_texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"{a}+{b}={a + b}" for a, b in ((rng.randint(0, 99), rng.randint(0, 99)) for _ in range(6)))
            for _ in range(n)]


PROXY_TEXTS = ["the quick brown fox jumps over the lazy dog and runs away into the forest " * 2,
               "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int\n    y: int\n"] * 4
BUDGET, PILOT, LR = 40, 4, 1e-3  # the forgetting benchmark's steps, lr and clipping; a 10 % pilot
#: suggested / calibrated must lie within this factor. Measured: 0.73 (seed 0) and 0.54 (seed 1), the
#: fitted exponents 1.76 / 1.88 over-estimating the slowing growth of q. A broken extrapolation falls
#: outside: none at all (q of the pilot taken as final) gives ~40 for both seeds, q ~ t (p = 1) ~4.
TOLERANCE = 3.0


@pytest.mark.parametrize("seed", [0, 1])
def test_suggested_strength_is_near_the_calibrated_one_on_the_tiny_llama(seed):
    """The benchmark's calibration (``rel * 2 * task / q`` at plain LoRA's final solution of the full
    budget, task = mean of its last 5 steps, q without prior) against the suggestion from a 10 %
    pilot, on a K-FAC curvature fitted at the same init (the benchmark's ``mc`` kind)."""
    from lalora_curv.experiments.batching import lm_batches
    from lalora_curv.experiments.models import add_lora, tiny_llama, tiny_tokenizer

    torch.set_num_threads(1)
    tokenizer = tiny_tokenizer()
    model = add_lora(tiny_llama(seed=seed), r=4, alpha=8, target_modules="all-linear", seed=seed)
    lora = lc.LoRAParams.from_model(model)
    init = lora.snapshot()
    curv = lc.fit_curvature(model, lm_batches(PROXY_TEXTS, tokenizer, batch_size=4, seq_len=64), structure="kfac",
                            kind="mc", seed=seed, progress=False)
    batches = lm_batches(_arithmetic_texts(seed, 64), tokenizer, batch_size=4, seq_len=96)
    options = dict(lr=LR, seed=seed, max_grad_norm=1.0)
    suggestion = lc.suggest_strength(curv, model, batches, steps=BUDGET, pilot_steps=PILOT, relative=1.0,
                                     **options)
    assert all(torch.equal(p, init[n]) for n, p in zip(lora.names, lora.params))

    full = lc.finetune(model, batches, steps=BUDGET, progress=False, lora=lora, **options)
    task = sum(h["task_loss"] for h in full.history[-5:]) / 5
    with torch.no_grad():
        q = float(lc.LaplacePenalty(curv, anchor=init, strength=1.0, lora=lora).quadratic())
    calibrated = 2 * task / q
    ratio = suggestion.strength / calibrated
    print(f"\nseed {seed}: suggested {suggestion.strength:.4g} (exponent {suggestion.exponent:.3f}, fitted "
          f"{suggestion.exponent_fitted:.3f}, q_extrapolated {suggestion.quadratic:.4g}, pilot task "
          f"{suggestion.task_loss:.4f}) vs calibrated {calibrated:.4g} (q {q:.4g}, task {task:.4f}): "
          f"ratio {ratio:.3f}")
    assert 1 / TOLERANCE < ratio < TOLERANCE


def test_a_delta_w_curvature_is_measured_at_the_extrapolated_point():
    """kfac_delta_w: q is the Delta-W quadratic, measured by the penalty at start + s * movement."""
    model, batches, _ = _tiny_setup()
    lora = lc.LoRAParams.from_model(model)
    start = lora.snapshot()
    curv = lc.fit_curvature(model, batches[:1], structure="kfac_delta_w", progress=False)
    result = lc.suggest_strength(curv, model, batches, steps=20, lr=1e-2, pilot_steps=2)
    assert all(torch.equal(p, start[n]) for n, p in zip(lora.names, lora.params))
    assert result.quadratic > result.pilot_quadratic[-1] > 0 and result.strength > 0
