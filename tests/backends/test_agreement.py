"""hooks vs curvlinops vs BackPACK on every structure/kind they share.

curvlinops cannot mask (SEMANTICS §6): these comparisons use unpadded, fully labelled batches of
equal length; its kfac is compared as KFACLinearOperator restricted to the LoRA parameters."""

from __future__ import annotations

import pytest
import torch

import lalora_curv as lc
from tests.conftest import make_classifier, make_classifier_batch, make_lm_batch, make_tiny_lm, options_for
from tests.reference import rel_err

F64 = dict(factor_dtype=torch.float64, progress=False)
KINDS = ["ggn", "mc", "empirical"]


@pytest.fixture(scope="module")
def lm():
    model = make_tiny_lm()
    batches = [make_lm_batch(lengths=(6, 6), seed=s) for s in (21, 22)]
    return model, batches


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("structure", ["kfac", "dense", "diag", "lowrank", "diag_lowrank"])
def test_hooks_match_curvlinops_lm(lm, structure, kind):
    if kind == "mc" and structure != "kfac":
        pytest.skip("curvlinops' MC-Fisher matvec operator draws its own samples per matvec: same distribution, "
                    "different draws (its KFAC draws them like we do and is compared)")
    model, batches = lm
    opts = dict(structure=structure, kind=kind, **options_for(structure, kind, mc_samples=2, seed=5, rank=3), **F64)
    token = {} if structure == "kfac" else {"terms": "token"}
    ours = lc.fit_curvature(model, batches, backend="hooks", **token, **opts)
    theirs = lc.fit_curvature(model, batches, backend="curvlinops", **opts)
    # eager attention computes its softmax in fp32: agreement is to ~1e-7, not 1e-15
    assert rel_err(ours.to_dense(), theirs.to_dense()) < 1e-6
    assert theirs.info["backend"] == "curvlinops"


@pytest.fixture(scope="module")
def lm_all_linear():
    """LoRA on every linear layer: besides q,v also k, o_proj and the gated MLP (gate/up read the same
    normed hidden state, down_proj reads the SiLU-gated product)."""
    model = make_tiny_lm(targets=("all-linear",))
    batches = [make_lm_batch(lengths=(6, 6), seed=s) for s in (21, 22)]
    return model, batches


@pytest.mark.parametrize("targets", ["qv", "all-linear"])
@pytest.mark.parametrize("kind", KINDS)
def test_kfac_quadratic_forms_match_curvlinops_kfac_operator(lm, lm_all_linear, kind, targets):
    """Our kfac quadratic form vs curvlinops' own KFACLinearOperator matvec on LoRA params (q,v and
    all-linear: shared input factors of gate/up and of q/k/v must not change the operator)."""
    from curvlinops import KFACLinearOperator

    from lalora_curv.backends.curvlinops import as_curvlinops_data

    model, batches = lm if targets == "qv" else lm_all_linear
    lora = lc.LoRAParams.from_model(model)
    ours = lc.fit_curvature(model, batches, structure="kfac", kind=kind, **options_for("kfac", kind, mc_samples=1),
                            seed=7, **F64)
    model_func, data, bsf, _ = as_curvlinops_data(model, batches)
    fisher = {"ggn": "type-2", "mc": "mc", "empirical": "empirical"}[kind]
    op = KFACLinearOperator(model_func, torch.nn.CrossEntropyLoss(), lora.params, data, fisher_type=fisher,
                            seed=7, check_deterministic=False, batch_size_fn=bsf)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        d = torch.randn(lora.numel, generator=g, dtype=torch.float64)
        theirs = d @ (op @ d)
        assert abs(float(ours.quadratic_form(d) - theirs)) <= 1e-6 * abs(float(theirs))


def test_curvlinops_refuses_masked_batches(lm):
    model, _ = lm
    with pytest.raises(ValueError, match="cannot mask"):
        lc.fit_curvature(model, [make_lm_batch(lengths=(6, 3))], structure="kfac", backend="curvlinops",
                         progress=False)


@pytest.mark.parametrize("kind", ["mc", "empirical"])
@pytest.mark.parametrize("structure", ["diag", "dense", "lowrank"])
def test_hooks_match_backpack_per_sequence(structure, kind):
    model = make_tiny_lm()
    batches = [make_lm_batch(seed=31, prompt_len=1)]  # masked: BackPACK gets our masked backward vectors
    opts = dict(structure=structure, kind=kind, terms="sequence", **F64,
                **options_for(structure, kind, mc_samples=2, seed=1, rank=3))
    ours = lc.fit_curvature(model, batches, backend="hooks", **opts)
    theirs = lc.fit_curvature(model, batches, backend="backpack", **opts)
    assert rel_err(ours.to_dense(), theirs.to_dense()) < 1e-10


def test_hooks_match_backpack_classifier():
    model = make_classifier()
    batch = make_classifier_batch(N=6)
    for kind in KINDS:
        ours = lc.fit_curvature(model, [batch], structure="diag", kind=kind, backend="hooks", **F64)
        theirs = lc.fit_curvature(model, [batch], structure="diag", kind=kind, backend="backpack", **F64)
        assert rel_err(ours.diagonal(), theirs.diagonal()) < 1e-10


def test_backpack_refuses_kfac_with_reason():
    model = make_classifier()
    with pytest.raises(ValueError, match="second-order"):
        lc.fit_curvature(model, [make_classifier_batch()], structure="kfac", backend="backpack", progress=False)


def test_backpack_leaves_user_grads_alone():
    model = make_classifier()
    lora = lc.LoRAParams.from_model(model)
    for p in lora.params:
        p.grad = torch.full_like(p, 7.0)
    lc.fit_curvature(model, [make_classifier_batch()], structure="diag", backend="backpack", progress=False)
    lc.fit_curvature(model, [make_classifier_batch()], structure="kfac", backend="hooks", progress=False)
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in lora.params)
