"""Operator interface: algebra, solves, diagonal, dtype/device, size limits — each against dense."""

from __future__ import annotations

import pytest
import torch

import lalora_curv as lc
from lalora_curv.curvature import (
    DenseCurvature,
    DenseTooLargeError,
    DiagCurvature,
    DiagLowRankCurvature,
    KFACCurvature,
    LowRankCurvature,
    SumCurvature,
)
from tests.conftest import make_lm_batch, make_tiny_lm, options_for
from tests.reference import rel_err

F64 = dict(factor_dtype=torch.float64, progress=False)
ALL = ["dense", "diag", "kfac", "kfac_tridiag", "lowrank", "diag_lowrank", "kfac_delta_w"]


@pytest.fixture(scope="module")
def fitted():
    model = make_tiny_lm()
    batches = [make_lm_batch(seed=41), make_lm_batch(seed=42)]
    ops = {s: lc.fit_curvature(model, batches, structure=s, kind="empirical", **options_for(s, rank=5), **F64)
           for s in ALL}
    ops2 = {s: lc.fit_curvature(model, batches, structure=s, kind="mc", **options_for(s, rank=3), seed=9, **F64)
            for s in ALL}
    return model, ops, ops2


@pytest.mark.parametrize("structure", ALL)
def test_interface_consistent_with_dense(fitted, structure):
    _, ops, _ = fitted
    op = ops[structure]
    P = op.matmat(torch.eye(op.num_params, dtype=torch.float64))  # not to_dense(), which symmetrizes
    assert P.shape == (op.num_params, op.num_params)
    assert torch.allclose(P, P.T, atol=1e-12)
    assert torch.allclose(op.to_dense(), P, atol=1e-12)
    assert torch.linalg.eigvalsh(P).min() > -1e-10 * P.norm()
    g = torch.Generator().manual_seed(1)
    v = torch.randn(op.num_params, generator=g, dtype=torch.float64)
    V = torch.randn(op.num_params, 3, generator=g, dtype=torch.float64)
    assert rel_err(op.matvec(v), P @ v) < 1e-10
    assert rel_err(op @ V, P @ V) < 1e-10
    assert abs(float(op.quadratic_form(v) - v @ P @ v)) < 1e-10 * abs(float(v @ P @ v))
    assert rel_err(op.diagonal(), P.diagonal()) < 1e-10
    assert op.nbytes > 0
    assert op.structure == structure and op.kind == "empirical"


@pytest.mark.parametrize("structure", ALL)
def test_quadratic_form_differentiable(fitted, structure):
    _, ops, _ = fitted
    op = ops[structure]
    d = torch.randn(op.num_params, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(op.quadratic_form(d), d)
    assert rel_err(grad, 2 * op.to_dense() @ d.detach()) < 1e-10


@pytest.mark.parametrize("structure", ALL)
def test_sum_and_scale_match_dense(fitted, structure):
    _, ops, ops2 = fitted
    a, b = ops[structure], ops2[structure]
    s = 0.7 * a + b * 2.0
    assert rel_err(s.to_dense(), 0.7 * a.to_dense() + 2.0 * b.to_dense()) < 1e-10
    expected_type = {"diag": DiagCurvature, "dense": DenseCurvature, "lowrank": LowRankCurvature,
                     "diag_lowrank": DiagLowRankCurvature}.get(structure, SumCurvature)
    assert isinstance(s, expected_type)
    assert sum([a, b]).num_params == a.num_params


def test_kfac_plus_kfac_is_exact_sum_not_merged(fitted):
    _, ops, ops2 = fitted
    s = ops["kfac"] + ops2["kfac"]
    assert isinstance(s, SumCurvature) and len(s.terms) == 2
    assert all(isinstance(t, KFACCurvature) for t in s.terms)


def test_mixed_sums(fitted):
    _, ops, _ = fitted
    dl = ops["diag"] + ops["lowrank"]
    assert isinstance(dl, DiagLowRankCurvature)
    assert rel_err(dl.to_dense(), ops["diag"].to_dense() + ops["lowrank"].to_dense()) < 1e-12
    mix = ops["kfac"] + ops["diag"] + ops["kfac_tridiag"]
    expected = ops["kfac"].to_dense() + ops["diag"].to_dense() + ops["kfac_tridiag"].to_dense()
    assert rel_err(mix.to_dense(), expected) < 1e-12
    with pytest.raises(ValueError, match="Delta-W"):
        ops["kfac_delta_w"] + ops["kfac"]
    with pytest.raises(ValueError, match="non-negative"):
        -1.0 * ops["diag"]


@pytest.mark.parametrize("structure", ["dense", "diag", "kfac", "diag_lowrank"])
def test_solve_inverts_damped_operator(fitted, structure):
    _, ops, _ = fitted
    op = ops[structure]
    v = torch.randn(op.num_params, dtype=torch.float64)
    damping = 0.1
    x = op.solve(v, damping=damping)
    A = op.to_dense() + damping * torch.eye(op.num_params, dtype=torch.float64)
    assert rel_err(A @ x, v) < 1e-8


def test_solve_refused_where_not_cheap(fitted):
    _, ops, _ = fitted
    with pytest.raises(NotImplementedError, match="solve"):
        ops["lowrank"].solve(torch.ones(ops["lowrank"].num_params, dtype=torch.float64))


def test_truncation_is_explicit_and_keeps_top_eigenpairs(fitted):
    _, ops, ops2 = fitted
    s = ops["diag_lowrank"] + ops2["diag_lowrank"]
    assert s.rank == 8
    t = s.truncated(4)
    assert t.rank == 4
    assert rel_err(t.diagonal(), s.diagonal()) < 1e-10  # rule: the dropped part's diagonal moves into D
    low = ops["lowrank"] + ops2["lowrank"]
    P = low.to_dense()
    evals = torch.linalg.eigvalsh(P)
    assert torch.allclose(torch.linalg.eigvalsh(low.truncated(2).to_dense())[-2:], evals[-2:], atol=1e-10)


def test_lowrank_matches_eigh_with_spectral_gap():
    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    evals = torch.tensor([50.0, 20.0, 10.0] + [0.1] * 27, dtype=torch.float64)
    from lalora_curv.curvature.lowrank import top_eigenpairs

    V = (Q * evals.sqrt()).T  # V^T V = Q diag(evals) Q^T
    top, U = top_eigenpairs(V, 3, 1.0)
    assert torch.allclose(top, evals[:3], rtol=1e-10)
    overlap = torch.linalg.svdvals(U.T @ Q[:, :3])
    assert torch.allclose(overlap, torch.ones(3, dtype=torch.float64), atol=1e-8)


def test_errors_name_the_problem(fitted):
    _, ops, _ = fitted
    op = ops["diag"]
    with pytest.raises(ValueError, match="acts on"):
        op.matvec(torch.ones(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating"):
        op.matvec(torch.ones(op.num_params, dtype=torch.long))
    with pytest.raises(ValueError, match="on meta"):
        op.matvec(torch.ones(op.num_params, device="meta"))
    with pytest.raises(DenseTooLargeError, match="max_params"):
        ops["kfac"].to_dense(max_params=10)


def test_to_dtype_and_device(fitted):
    _, ops, _ = fitted
    op32 = ops["kfac_tridiag"].to(dtype=torch.float32)
    assert op32.dtype == torch.float32
    assert rel_err(op32.to_dense().double(), ops["kfac_tridiag"].to_dense()) < 1e-6


def test_dense_structure_refuses_large_models():
    model = make_tiny_lm()
    with pytest.raises(DenseTooLargeError, match="max_dense"):
        lc.fit_curvature(model, [make_lm_batch()], structure="dense", max_dense=10, progress=False)


def test_kfac_shares_identical_input_factors():
    """q_proj and v_proj read the same hidden state: their A-blocks' input factor is stored once."""
    model = make_tiny_lm()
    op = lc.fit_curvature(model, [make_lm_batch()], structure="kfac", **F64)
    unshared = lc.fit_curvature(model, [make_lm_batch()], structure="kfac", share_inputs=False, **F64)
    assert len(op.input_factors) < len(unshared.input_factors)
    assert op.nbytes < unshared.nbytes
    assert rel_err(op.to_dense(), unshared.to_dense()) == 0
