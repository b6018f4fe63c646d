"""Every structure x kind against its definition built densely from per-term Jacobians (float64)."""

from __future__ import annotations

import pytest
import torch

import lalora_curv as lc
from tests.conftest import make_classifier, make_classifier_batch, make_lm_batch, make_tiny_lm, options_for
from tests.reference import block_mask, dense_curvature, lora_blocks, rel_err

F64 = dict(factor_dtype=torch.float64, progress=False)
KINDS = ["ggn", "mc", "empirical"]


@pytest.fixture(scope="module")
def lm_case():
    model = make_tiny_lm()
    lora = lc.LoRAParams.from_model(model)
    batches = [make_lm_batch(seed=1, prompt_len=1), make_lm_batch(seed=2, lengths=(3, 6, 6))]
    refs = {(k, t): dense_curvature(model, lora.params, batches, k, terms=t, mc_samples=2, seed=3)
            for k in KINDS for t in ("token", "sequence") if not (k == "ggn" and t == "sequence")}
    return model, lora, batches, refs


@pytest.fixture(scope="module")
def clf_case():
    model = make_classifier()
    lora = lc.LoRAParams.from_model(model)
    batches = [make_classifier_batch(seed=2), make_classifier_batch(N=3, seed=4)]
    refs = {k: dense_curvature(model, lora.params, batches, k, mc_samples=2, seed=3) for k in KINDS}
    return model, lora, batches, refs


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("terms", ["token", "sequence"])
def test_gradient_structures_lm(lm_case, kind, terms):
    model, lora, batches, refs = lm_case
    if kind == "ggn" and terms == "sequence":
        with pytest.raises(ValueError, match="terms='token'"):
            lc.fit_curvature(model, batches, structure="diag", kind=kind, terms=terms, **F64)
        return
    G = refs[(kind, terms)]
    opts = dict(kind=kind, terms=terms, **options_for("dense", kind, mc_samples=2, seed=3), **F64)
    dense = lc.fit_curvature(model, batches, structure="dense", **opts)
    assert rel_err(dense.to_dense(), G) < 1e-6
    diag = lc.fit_curvature(model, batches, structure="diag", **opts)
    assert rel_err(diag.diagonal(), G.diagonal()) < 1e-6
    evals, evecs = torch.linalg.eigh(G)
    k = 4
    low = lc.fit_curvature(model, batches, structure="lowrank", rank=k, **opts)
    top = evecs[:, -k:] @ torch.diag(evals[-k:]) @ evecs[:, -k:].T
    assert rel_err(low.to_dense(), top) < 1e-6
    dl = lc.fit_curvature(model, batches, structure="diag_lowrank", rank=k, **opts)
    expected = top + torch.diag(G.diagonal() - top.diagonal())
    assert rel_err(dl.to_dense(), expected) < 1e-6
    assert rel_err(dl.diagonal(), G.diagonal()) < 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_structures_classifier(clf_case, kind):
    model, lora, batches, refs = clf_case
    G = refs[kind]
    for terms in ("token", "sequence"):  # a classifier's term is a sample: both coincide
        dense = lc.fit_curvature(model, batches, structure="dense", kind=kind, terms=terms,
                                 **options_for("dense", kind, mc_samples=2, seed=3), **F64)
        assert rel_err(dense.to_dense(), G) < 1e-6


def test_lowrank_full_rank_is_exact(lm_case):
    model, lora, batches, refs = lm_case
    G = refs[("empirical", "sequence")]
    low = lc.fit_curvature(model, batches, structure="lowrank", kind="empirical", rank=lora.numel, **F64)
    assert rel_err(low.to_dense(), G) < 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_kfac_family_exact_for_one_sample(kind):
    """With a single data point K-FAC's rank-one factors are exact: kfac equals the dense GGN's
    per-matrix diagonal blocks, kfac_tridiag the per-layer blocks (cross blocks included)."""
    model = make_classifier()
    lora = lc.LoRAParams.from_model(model)
    batch = make_classifier_batch(N=1, seed=5)
    G = dense_curvature(model, lora.params, [batch], kind, mc_samples=3, seed=1)
    mats, layers = lora_blocks(lora)
    opts = dict(kind=kind, **options_for("kfac", kind, mc_samples=3, seed=1), **F64)
    kfac = lc.fit_curvature(model, [batch], structure="kfac", **opts).to_dense()
    mask = block_mask(mats, lora.numel)
    assert rel_err(kfac, G * mask) < 1e-6
    tri = lc.fit_curvature(model, [batch], structure="kfac_tridiag", **opts).to_dense()
    mask = block_mask(layers, lora.numel)
    assert rel_err(tri, G * mask) < 1e-6
    cross = G[mats[0][0]:mats[0][1], mats[1][0]:mats[1][1]]
    assert cross.norm() > 1e-3 * G.norm(), "non-zero B must give non-zero A-B cross blocks"


@pytest.mark.parametrize("kind", KINDS)
def test_kfac_delta_w_exact_for_one_sample(kind):
    """Delta-W K-FAC equals the dense GGN w.r.t. the base weights for one data point."""
    model = make_classifier()
    lora = lc.LoRAParams.from_model(model)
    batch = make_classifier_batch(N=1, seed=6)
    bases = [layer.base.weight for layer in lora.layers]
    for w in bases:
        w.requires_grad_(True)
    try:
        G = dense_curvature(model, bases, [batch], kind, mc_samples=2, seed=1)
    finally:
        for w in bases:
            w.requires_grad_(False)
    dw = lc.fit_curvature(model, [batch], structure="kfac_delta_w", kind=kind,
                          **options_for("kfac_delta_w", kind, mc_samples=2, seed=1), **F64)
    assert dw.num_params == sum(w.numel() for w in bases)
    ranges, offset = [], 0
    for w in bases:
        ranges.append((offset, offset + w.numel()))
        offset += w.numel()
    assert rel_err(dw.to_dense(), G * block_mask(ranges, dw.num_params)) < 1e-6


def test_b_zero_init_a_blocks_vanish_and_tridiag_equals_kfac():
    model = make_tiny_lm(init="default")  # peft default: B = 0
    lora = lc.LoRAParams.from_model(model)
    batches = [make_lm_batch(seed=3)]
    kfac = lc.fit_curvature(model, batches, structure="kfac", kind="empirical", **F64)
    tri = lc.fit_curvature(model, batches, structure="kfac_tridiag", kind="empirical", **F64)
    dense_k, dense_t = kfac.to_dense(), tri.to_dense()
    assert rel_err(dense_t, dense_k) < 1e-12
    mats, _ = lora_blocks(lora)
    lo, hi = mats[0]  # first A matrix
    assert dense_k[lo:hi, lo:hi].abs().max() == 0
    assert dense_k[mats[1][0]:mats[1][1], mats[1][0]:mats[1][1]].abs().max() > 0


def test_tridiag_symmetric_psd_and_blocks_match_kfac():
    model = make_tiny_lm()
    batches = [make_lm_batch(seed=3), make_lm_batch(seed=4)]
    for kind in ("empirical", "mc"):
        op = lc.fit_curvature(model, batches, structure="kfac_tridiag", kind=kind, **F64)
        tri = op.matmat(torch.eye(op.num_params, dtype=torch.float64))  # un-symmetrized: a real symmetry test
        kfac = lc.fit_curvature(model, batches, structure="kfac", kind=kind, **F64).to_dense()
        assert torch.allclose(tri, tri.T, atol=1e-14)
        assert torch.linalg.eigvalsh(tri).min() > -1e-10 * tri.norm()
        lora = lc.LoRAParams.from_model(model)
        mats, _ = lora_blocks(lora)
        mask = block_mask(mats, lora.numel)
        assert rel_err(tri * mask, kfac) < 1e-12
        assert (tri * ~mask).norm() > 1e-3 * tri.norm()


@pytest.mark.parametrize("structure", ["kfac", "kfac_tridiag", "kfac_delta_w", "dense", "diag"])
def test_padding_and_masked_labels_are_not_terms(structure):
    """A right-padded batch gives the same curvature as its sequences fed unpadded, one by one."""
    model = make_tiny_lm()
    padded = make_lm_batch(lengths=(6, 4), seed=7)
    singles = []
    for i, n in enumerate((6, 4)):
        singles.append({k: v[i:i + 1, :n] for k, v in padded.items()})
    kw = dict(structure=structure, kind="empirical", **options_for(structure, terms="token"), **F64)
    a = lc.fit_curvature(model, [padded], **kw).to_dense()
    b = lc.fit_curvature(model, singles, **kw).to_dense()
    assert rel_err(a, b) < 1e-6


def test_mc_fisher_converges_to_ggn():
    model = make_classifier()
    batch = make_classifier_batch(N=4, seed=8)
    ggn = lc.fit_curvature(model, [batch], structure="dense", kind="ggn", **F64).to_dense()
    few = lc.fit_curvature(model, [batch], structure="dense", kind="mc", mc_samples=4, seed=0, **F64).to_dense()
    many = lc.fit_curvature(model, [batch], structure="dense", kind="mc", mc_samples=4000, seed=0, **F64).to_dense()
    assert rel_err(many, ggn) < 0.1
    assert rel_err(many, ggn) < rel_err(few, ggn)


def test_gradient_checkpointing_does_not_double_count():
    model = make_tiny_lm()
    batches = [make_lm_batch(seed=9)]
    ref = {s: lc.fit_curvature(model, batches, structure=s, kind="empirical", **F64).to_dense()
           for s in ("kfac", "diag")}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # HF only checkpoints in training mode; fitting must still run dropout-free
    try:
        for s, expected in ref.items():
            got = lc.fit_curvature(model, batches, structure=s, kind="empirical", **F64).to_dense()
            assert rel_err(got, expected) < 1e-10, s
    finally:
        model.gradient_checkpointing_disable()
