"""Interop (to_scipy, to_curvlinops) and the exact trace / logdet of every structure, each against
the operator's dense matrix (``to_dense`` is itself tested against autograd references elsewhere)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import lalora_curv as lc
from lalora_curv.curvature import DenseTooLargeError, LowRankCurvature, SumCurvature
from lalora_curv.curvature.eigen_kfac import EigenKFACCurvature
from tests.conftest import make_lm_batch, make_tiny_lm, options_for

F64 = dict(factor_dtype=torch.float64, progress=False)
FITTED = ["dense", "diag", "kfac", "kfac_tridiag", "lowrank", "diag_lowrank", "kfac_delta_w"]
BUILT = ["kfac_at_B0", "eigen_kfac", "eigen_kfac_predicted", "sum_kfac_kfac", "sum_kfac_diag_dense",
         "lowrank_sum", "diag_lowrank_sum", "lowrank_skewed", "diag_lowrank_predicted", "sum_delta_w"]
CASES = FITTED + BUILT


@pytest.fixture(scope="module")
def operators():
    """Every structure fitted on the tiny Llama with non-zero B (non-trivial A-blocks), plus the
    structures built from fitted ones: sums, eigen_kfac, and K-FAC at B = 0 (zero blocks)."""
    model = make_tiny_lm()  # init="nonzero": random B
    batches = [make_lm_batch(seed=41), make_lm_batch(seed=42)]
    ops = {s: lc.fit_curvature(model, batches, structure=s, kind="empirical", **options_for(s, rank=5), **F64)
           for s in FITTED}
    mc = {s: lc.fit_curvature(model, batches, structure=s, kind="mc", seed=3, **options_for(s, rank=3), **F64)
          for s in ("kfac", "lowrank", "kfac_delta_w")}
    at_b0 = lc.fit_curvature(make_tiny_lm(init="gaussian"), batches, structure="kfac", kind="empirical", **F64)
    assert any(b["grad"] < 0 for b in at_b0.blocks), "K-FAC at B = 0 should have exactly-zero A-blocks"
    eig = EigenKFACCurvature.from_kfac(ops["kfac"])
    rank = ops["lowrank"].rank
    g = torch.Generator().manual_seed(3)
    skew = torch.eye(rank, dtype=torch.float64) + 0.7 * torch.randn(rank, rank, generator=g, dtype=torch.float64)
    ops.update({
        "kfac_at_B0": at_b0,
        "eigen_kfac": eig,
        # eigenvalues no longer outer products: a genuine eigen_kfac operator
        "eigen_kfac_predicted": eig.predict(0.05),
        "sum_kfac_kfac": ops["kfac"] + mc["kfac"],
        "sum_kfac_diag_dense": ops["kfac"] + ops["diag"] + 0.5 * ops["dense"],
        # stacked U: not orthonormal any more
        "lowrank_sum": ops["lowrank"] + mc["lowrank"],
        "diag_lowrank_sum": ops["diag_lowrank"] + mc["lowrank"],
        # U with non-unit, non-orthogonal columns (a hand-built operator, and a predict step's D^-1 U)
        "lowrank_skewed": LowRankCurvature(ops["lowrank"].U @ skew, ops["lowrank"].C, **ops["lowrank"]._common()),
        "diag_lowrank_predicted": ops["diag_lowrank"].predict(0.5),
        "sum_delta_w": ops["kfac_delta_w"] + 2.0 * mc["kfac_delta_w"],
    })
    assert isinstance(ops["sum_kfac_kfac"], SumCurvature) and isinstance(ops["lowrank_sum"], LowRankCurvature)
    assert isinstance(ops["eigen_kfac_predicted"], EigenKFACCurvature)
    assert ops["sum_delta_w"].space == "delta_w"
    lora = lc.LoRAParams.from_model(model)
    return ops, lora


def _dense(op) -> torch.Tensor:
    P = op.to_dense().to(torch.float64)
    return 0.5 * (P + P.T)


@pytest.mark.parametrize("case", CASES)
def test_eigsh_on_to_scipy_gives_the_dense_top_eigenvalues(operators, case):
    from scipy.sparse.linalg import LinearOperator, eigsh

    op = operators[0][case]
    lin = op.to_scipy()
    assert isinstance(lin, LinearOperator)
    assert lin.shape == (op.num_params, op.num_params) and lin.dtype == np.float64
    k = 6
    top = np.sort(eigsh(lin, k=k, which="LA", return_eigenvectors=False))[::-1]
    dense_top = torch.linalg.eigvalsh(_dense(op)).flip(0)[:k].numpy()
    assert np.allclose(top, dense_top, rtol=1e-8, atol=1e-10 * dense_top[0]), (top, dense_top)
    # symmetric: rmatvec is matvec; matmat of a block of vectors
    rng = np.random.default_rng(0)
    X = rng.standard_normal((op.num_params, 3))
    assert np.allclose(lin.matmat(X), _dense(op).numpy() @ X, rtol=1e-10, atol=1e-12)
    assert np.allclose(lin.rmatvec(X[:, 0]), lin.matvec(X[:, 0]))


@pytest.mark.parametrize("case", CASES)
def test_trace_is_the_dense_trace(operators, case):
    op = operators[0][case]
    P = _dense(op)
    assert op.trace().ndim == 0
    assert abs(float(op.trace()) - float(P.trace())) <= 1e-12 * float(P.trace())


@pytest.mark.parametrize("case", CASES)
def test_logdet_is_the_dense_slogdet(operators, case):
    op = operators[0][case]
    P = _dense(op)
    eye = torch.eye(op.num_params, dtype=torch.float64)
    for p in (1e-4, 0.3, 20.0):
        sign, expected = torch.linalg.slogdet(P + p * eye)
        assert sign == 1
        got = op.logdet(p)
        assert got.dtype == torch.float64 and got.ndim == 0
        assert abs(float(got) - float(expected)) <= 1e-9 * max(1.0, abs(float(expected))), (p, got, expected)


@pytest.mark.parametrize("case", ["kfac", "diag_lowrank", "lowrank_sum", "sum_kfac_kfac"])
def test_logdet_in_float64_from_a_float32_operator(operators, case):
    op = operators[0][case]
    low = op.to(dtype=torch.float32)
    got = low.logdet(0.3)
    assert got.dtype == torch.float64
    expected = float(op.logdet(0.3))
    assert abs(float(got) - expected) <= 1e-4 * abs(expected)


@pytest.mark.parametrize("case", CASES)
def test_to_curvlinops_matvec_equals_ours(operators, case):
    # curvlinops 3.0.1 exports its operator base class only from this module
    from curvlinops._torch_base import PyTorchLinearOperator

    op, lora = operators[0][case], operators[1]
    cl = op.to_curvlinops()
    assert isinstance(cl, PyTorchLinearOperator)
    assert cl.shape == (op.num_params, op.num_params)
    assert cl.dtype == op.dtype and cl.device == op.device
    g = torch.Generator().manual_seed(5)
    v = torch.randn(op.num_params, generator=g, dtype=torch.float64)
    V = torch.randn(op.num_params, 4, generator=g, dtype=torch.float64)
    assert torch.allclose(cl @ v, op @ v, rtol=1e-12, atol=1e-14)
    assert torch.allclose(cl @ V, op @ V, rtol=1e-12, atol=1e-14)
    # tensor-list format: shaped like the LoRA parameters (theta) or each layer's Delta W
    if op.space == "theta":
        shapes = [tuple(p.shape) for p in lora.params]
    else:
        shapes = [(layer.d_out, layer.d_in) for layer in lora.layers]
    parts = [x.reshape(s) for x, s in zip(v.split([math.prod(s) for s in shapes]), shapes, strict=True)]
    out = cl @ parts
    assert [tuple(o.shape) for o in out] == shapes
    assert torch.allclose(torch.cat([o.reshape(-1) for o in out]), op @ v, rtol=1e-12, atol=1e-14)
    # self-adjoint, as curvlinops' own to_scipy needs
    assert cl.adjoint() is cl


@pytest.mark.parametrize("case", ["kfac", "lowrank", "diag_lowrank", "kfac_delta_w", "sum_kfac_kfac"])
def test_curvlinops_tools_accept_the_operator(operators, case):
    """curvlinops' own estimators run on it: Hutchinson's trace and diagonal within their
    statistical error of the exact values, and curvlinops' to_scipy gives the same spectrum."""
    from curvlinops import hutchinson_diag, hutchinson_trace
    from scipy.sparse.linalg import eigsh

    op = operators[0][case]
    P = _dense(op)
    cl = op.to_curvlinops()
    m = op.num_params - 1  # curvlinops asks for fewer matvecs than the dimension
    torch.manual_seed(0)
    est = float(hutchinson_trace(cl, num_matvecs=m))
    # Rademacher Hutchinson: variance per sample 2 (||P||_F^2 - sum diag^2)
    std = math.sqrt(2 * (float((P * P).sum()) - float((P.diagonal() ** 2).sum())) / m)
    assert abs(est - float(op.trace())) <= 6 * std + 1e-12
    torch.manual_seed(1)
    diag_est = hutchinson_diag(cl, num_matvecs=m)
    assert diag_est.shape == (op.num_params,)
    # the mean of the diagonal estimate is the trace estimate of the same kind
    row_std = torch.sqrt(((P * P).sum(1) - P.diagonal() ** 2) / m)
    assert ((diag_est - P.diagonal()).abs() <= 6 * row_std + 1e-12).float().mean() > 0.99
    top = np.sort(eigsh(cl.to_scipy(np.float64), k=4, which="LA", return_eigenvectors=False))[::-1]
    assert np.allclose(top, torch.linalg.eigvalsh(P).flip(0)[:4].numpy(), rtol=1e-8)


def test_xtrace_is_exact_for_a_low_rank_operator(operators):
    """curvlinops' XTrace recovers a rank-k operator's trace exactly once its sketch spans the range."""
    from curvlinops import xtrace

    op = operators[0]["lowrank"]
    assert op.rank <= 5
    torch.manual_seed(0)
    est = float(xtrace(op.to_curvlinops(), num_matvecs=2 * op.rank + 4))
    assert abs(est - float(op.trace())) <= 1e-8 * float(op.trace())


def test_to_scipy_other_dtype(operators):
    op = operators[0]["kfac"]
    lin = op.to_scipy(np.float32)
    assert lin.dtype == np.float32
    x = np.ones(op.num_params, dtype=np.float32)
    y = lin.matvec(x)
    assert y.dtype == np.float32
    assert np.allclose(y, (op @ torch.ones(op.num_params, dtype=torch.float64)).numpy(), rtol=1e-5)
    with pytest.raises(TypeError, match="real floating dtype"):
        op.to_scipy(np.int64)


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan"), float("inf")])
def test_logdet_needs_a_positive_prior_precision(operators, bad):
    with pytest.raises(ValueError, match="prior_precision > 0"):
        operators[0]["kfac"].logdet(bad)


def test_logdet_rejects_non_numbers(operators):
    with pytest.raises(TypeError, match="prior_precision must be a number"):
        operators[0]["diag"].logdet(True)
    with pytest.raises(TypeError, match="prior_precision must be a number"):
        operators[0]["diag"].logdet("1")
    with pytest.raises(ValueError, match="scalar"):
        operators[0]["diag"].logdet(torch.ones(2))
    assert torch.isclose(operators[0]["diag"].logdet(torch.tensor(0.5)), operators[0]["diag"].logdet(0.5))
    # any real number type: numpy scalars included
    assert torch.isclose(operators[0]["diag"].logdet(np.float32(0.5)), operators[0]["diag"].logdet(0.5))


def test_logdet_without_closed_form_refuses_above_the_size_limit(operators):
    ops, lora = operators
    with pytest.raises(DenseTooLargeError, match=r"sum curvature .* max_dense=10"):
        ops["sum_kfac_kfac"].logdet(1.0, max_dense=10)
    first = lora.layers[0]
    size = first.rank * first.d_in + first.d_out * first.rank
    with pytest.raises(DenseTooLargeError, match=rf"layer {first.name} has a {size} x {size} block"):
        ops["kfac_tridiag"].logdet(1.0, max_dense=10)
    # structures with a closed form never build a dense matrix
    for case in ("kfac", "diag_lowrank", "lowrank_sum", "eigen_kfac", "kfac_delta_w"):
        assert torch.isfinite(ops[case].logdet(1.0, max_dense=1))
