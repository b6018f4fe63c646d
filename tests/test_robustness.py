"""Robustness sweep (issue 7): each handled case has a test that fails without its handling."""

from __future__ import annotations

import pytest
import torch

import lalora_curv as lc
from tests.conftest import make_classifier, make_classifier_batch, make_lm_batch, make_tiny_lm
from tests.reference import rel_err


def test_empty_batch_iterator():
    model = make_tiny_lm()
    for structure in ("kfac", "diag"):
        with pytest.raises(ValueError, match="iterator was empty or every label is -100"):
            lc.fit_curvature(model, iter([]), structure=structure, progress=False)


def test_every_label_ignored():
    model = make_tiny_lm()
    batch = make_lm_batch()
    batch["labels"][:] = -100
    for structure in ("kfac", "diag"):
        with pytest.raises(ValueError, match="every label is -100"):
            lc.fit_curvature(model, [batch], structure=structure, progress=False)


def test_batches_with_some_empty_ones_are_skipped():
    model = make_tiny_lm()
    good = make_lm_batch(seed=3)
    empty = make_lm_batch(seed=4)
    empty["labels"][:] = -100
    a = lc.fit_curvature(model, [good, empty], structure="kfac", factor_dtype=torch.float64, progress=False)
    b = lc.fit_curvature(model, [good], structure="kfac", factor_dtype=torch.float64, progress=False)
    assert a.info["num_terms"] == b.info["num_terms"]
    assert rel_err(a.to_dense(), b.to_dense()) < 1e-12


def test_batch_dtype_mismatch_is_named():
    model = make_classifier(dtype=torch.float64)
    X, y = make_classifier_batch(dtype=torch.float32)
    with pytest.raises(TypeError, match="float32.*float64"):
        lc.fit_curvature(model, [(X, y)], structure="diag", progress=False)
    batch = make_lm_batch()
    batch["input_ids"] = batch["input_ids"].float()
    with pytest.raises(TypeError, match="input_ids must be an integer"):
        lc.fit_curvature(make_tiny_lm(), [batch], structure="diag", progress=False)


def test_unknown_options_and_choices_are_named():
    model = make_tiny_lm()
    with pytest.raises(ValueError, match="unknown structure 'kfack'"):
        lc.fit_curvature(model, [make_lm_batch()], structure="kfack")
    with pytest.raises(ValueError, match="unknown kind"):
        lc.fit_curvature(model, [make_lm_batch()], kind="fisher")
    with pytest.raises(TypeError, match="does not take \\['rnak'\\]: 'rnak' is not an option"):
        lc.fit_curvature(model, [make_lm_batch()], structure="lowrank", rnak=3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_keeps_fp32_factors(dtype):
    ref_model = make_tiny_lm(dtype=torch.float32)
    batches = [make_lm_batch(seed=5), make_lm_batch(seed=6)]
    ref = lc.fit_curvature(ref_model, batches, structure="kfac", progress=False)
    half = make_tiny_lm(dtype=dtype)
    op = lc.fit_curvature(half, batches, structure="kfac", progress=False)
    assert op.dtype == torch.float32
    assert rel_err(op.to_dense(), ref.to_dense()) < 0.05
    diag = lc.fit_curvature(half, batches, structure="diag", progress=False)
    assert diag.dtype == torch.float32
    assert rel_err(diag.diagonal(), lc.fit_curvature(ref_model, batches, structure="diag",
                                                      progress=False).diagonal()) < 0.1


def test_non_finite_strength_rejected():
    model = make_tiny_lm()
    lora = lc.LoRAParams.from_model(model)
    op = lc.fit_curvature(model, [make_lm_batch()], structure="diag", progress=False)
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="strength"):
            lc.LaplacePenalty(op, anchor=lora.snapshot(), strength=bad, lora=lora)
    pen = lc.LaplacePenalty(op, anchor=lora.snapshot(), strength=1.0, lora=lora)
    with pytest.raises(ValueError, match="strength"):
        pen.strength = float("inf")


def test_lora_layers_changed_between_fit_and_penalty():
    from peft import LoraConfig

    model = make_tiny_lm()
    lora = lc.LoRAParams.from_model(model)
    op = lc.fit_curvature(model, [make_lm_batch()], structure="kfac", progress=False)
    pen = lc.LaplacePenalty(op, anchor=lora.snapshot(), strength=1.0, lora=lora)
    pen()
    model.add_adapter("second", LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.set_adapter("second")
    model.base_model.delete_adapter("default")
    with pytest.raises(lc.LoRADiscoveryError, match="changed since the registry was built"):
        pen()


def test_ddp_wrapped_model_has_the_bare_model_registry():
    from torch.nn.parallel import DataParallel

    model = make_tiny_lm()
    assert lc.LoRAParams.from_model(DataParallel(model)).names == lc.LoRAParams.from_model(model).names


def test_options_a_structure_or_backend_does_not_use_are_refused():
    """Defect 7: options are honoured or refused by name, never silently ignored."""
    model = make_tiny_lm()
    batches = [make_lm_batch()]
    with pytest.raises(TypeError, match="'terms' applies to dense, diag, lowrank, diag_lowrank"):
        lc.fit_curvature(model, batches, structure="kfac", terms="token", progress=False)
    with pytest.raises(TypeError, match="'rank' applies to lowrank, diag_lowrank"):
        lc.fit_curvature(model, batches, structure="diag", rank=4, progress=False)
    with pytest.raises(TypeError, match="mc_samples applies to kind='mc' only"):
        lc.fit_curvature(model, batches, structure="diag", kind="empirical", mc_samples=3, progress=False)
    with pytest.raises(ValueError, match="curvlinops' gives token-level curvature only"):
        lc.fit_curvature(model, batches, structure="diag", backend="curvlinops", terms="sequence", progress=False)
    with pytest.raises(ValueError, match="cannot provide \\['cross'\\]"):
        lc.fit_curvature(model, [make_lm_batch(lengths=(6, 6, 6))], structure="kfac_tridiag", backend="curvlinops",
                         progress=False)


def test_rank_beyond_the_attainable_rank_is_reported():
    """Defect 7: lowrank keeps at most the numerical rank of the data and says so in info."""
    model = make_tiny_lm()
    batch = make_lm_batch()  # 3 sequences: per-sequence empirical rows have rank <= 3
    with pytest.warns(UserWarning, match="rank=50 requested but the fitted curvature has numerical rank 3"):
        low = lc.fit_curvature(model, [batch], structure="lowrank", rank=50, progress=False)
    assert low.info["rank_requested"] == 50 and low.info["rank"] == 3 == low.rank


def test_lowrank_fit_draws_nothing_from_the_global_generator():
    """Defect 10: no random basis completion (the old code drew from torch's global generator)."""
    model = make_tiny_lm()
    batch = make_lm_batch()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    lc.fit_curvature(model, [batch], structure="diag_lowrank", rank=8, progress=False)
    assert torch.equal(before, torch.random.get_rng_state())


def test_curvlinops_backend_refuses_bf16_by_name():
    """Defect 8: curvlinops computes in the model's dtype; we refuse instead of accumulating in bf16."""
    model = make_tiny_lm(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="backend='curvlinops' computes in the model's dtype \\(torch.bfloat16\\)"):
        lc.fit_curvature(model, [make_lm_batch(lengths=(6, 6, 6))], structure="kfac", backend="curvlinops",
                         progress=False)


def test_curvlinops_backend_refuses_batch_keys_it_would_drop():
    """Defect 3 for the curvlinops backend: it calls the model with input_ids/attention_mask only, so
    a position_ids key (packed sequences) would be silently dropped; it is refused by name."""
    batch = dict(make_lm_batch(lengths=(6, 6, 6)), position_ids=torch.arange(6).repeat(3, 1))
    with pytest.raises(ValueError, match="also has \\['position_ids'\\]"):
        lc.fit_curvature(make_tiny_lm(), [batch], structure="kfac", backend="curvlinops", progress=False)
