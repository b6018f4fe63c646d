"""lalora_curv.continual.filtering against dense linear algebra: online accumulation and the
predict step (P^{-1} + Q)^{-1} of every structure that has one. Everything float64."""

from __future__ import annotations

import pytest
import torch

import lalora_curv as lc
from lalora_curv.continual import EigenKFACCurvature, accumulate, predict, with_isotropic
from lalora_curv.curvature import (
    DenseCurvature,
    DiagCurvature,
    DiagLowRankCurvature,
    KFACTridiagCurvature,
    SumCurvature,
)

from ..helpers_continual import (
    make_batches,
    make_model,
    single_thread,  # noqa: F401  (autouse fixture: one torch thread)
)
from .operators import KFAC_SHAPES, P_KFAC, block_constant_noise, dense_predict, gen, make_operator

assert KFAC_SHAPES


@pytest.mark.parametrize("structure, result_type", [("diag", DiagCurvature), ("diag_lowrank", DiagLowRankCurvature),
                                                    ("dense", DenseCurvature), ("kfac", SumCurvature)])
def test_accumulate_equals_dense(structure, result_type):
    P_old, P_new = make_operator(structure, 1), make_operator(structure, 2)
    gamma = 0.7
    out = accumulate(P_old, P_new, gamma)
    assert isinstance(out, result_type)
    if structure == "diag_lowrank":
        assert out.rank == P_old.rank + P_new.rank  # exact: stacked, never truncated silently
    torch.testing.assert_close(out.to_dense(), gamma * P_old.to_dense() + P_new.to_dense(), rtol=1e-12, atol=1e-12)
    assert accumulate(None, P_new, gamma) is P_new
    with pytest.raises(ValueError):
        accumulate(P_old, P_new, -0.1)


@pytest.mark.parametrize("structure", ["diag", "diag_lowrank", "lowrank", "dense", "kfac"])
def test_predict_equals_dense(structure):
    P = make_operator(structure, 3)
    n = P.num_params
    q = block_constant_noise(4) if structure == "kfac" else torch.rand(n, generator=gen(4), dtype=torch.float64)
    out = predict(P, q)
    Pd = P.to_dense()
    # reference without inverting P (lowrank is singular): P (I + Q P)^{-1}
    reference = Pd @ torch.linalg.inv(torch.eye(n, dtype=torch.float64) + torch.diag(q) @ Pd)
    torch.testing.assert_close(out.to_dense(), 0.5 * (reference + reference.T), rtol=1e-10, atol=1e-10)
    if structure != "lowrank":
        torch.testing.assert_close(out.to_dense(), dense_predict(Pd, q), rtol=1e-9, atol=1e-10)
    expected_type = {"kfac": EigenKFACCurvature}.get(structure, type(P))
    assert type(out) is expected_type
    if structure in ("diag_lowrank", "lowrank"):
        assert out.rank == P.rank  # exact with the rank unchanged
    # the noise really changed something (a test that cannot fail otherwise)
    assert (out.to_dense() - Pd).abs().max() > 1e-3
    # diagonal() and quadratic_form of the result agree with its dense form
    v = torch.randn(n, generator=gen(5), dtype=torch.float64)
    torch.testing.assert_close(out.diagonal(), out.to_dense().diagonal(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.quadratic_form(v), v @ out.to_dense() @ v, rtol=1e-10, atol=1e-12)


def test_predict_scalar_noise_and_singular_diag():
    P = make_operator("diag", 6, pd=False)  # three zero entries: precision 0 stays 0
    out = predict(P, 0.5)
    assert torch.equal(out.diag[:3], torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(out.diag, P.diag / (1 + 0.5 * P.diag))
    out_iso = predict(make_operator("dense", 6), 0.5)
    torch.testing.assert_close(out_iso.to_dense(), dense_predict(make_operator("dense", 6).to_dense(),
                                                                  torch.full((30,), 0.5, dtype=torch.float64)))


def test_predict_eigen_kfac_is_closed_and_isotropic_fold_is_exact(tmp_path):
    P = make_operator("kfac", 8)
    q1, q2 = block_constant_noise(9), block_constant_noise(10)
    twice = predict(predict(with_isotropic(P, 0.2), q1), q2)
    reference = dense_predict(dense_predict(P.to_dense() + 0.2 * torch.eye(P_KFAC, dtype=torch.float64), q1), q2)
    assert isinstance(twice, EigenKFACCurvature)
    torch.testing.assert_close(twice.to_dense(), reference, rtol=1e-9, atol=1e-10)
    v = torch.randn(P_KFAC, generator=gen(1), dtype=torch.float64)
    torch.testing.assert_close(twice.solve(v, damping=0.1),
                               torch.linalg.solve(reference + 0.1 * torch.eye(P_KFAC, dtype=torch.float64), v))
    # eigen_kfac saves and loads through the generic curvature io
    twice.save(tmp_path / "eig.safetensors")
    loaded = lc.load_curvature(tmp_path / "eig.safetensors")
    assert isinstance(loaded, EigenKFACCurvature)
    a, b = twice.state_tensors(), loaded.state_tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(loaded.to_dense(), twice.to_dense())


def test_kfac_predict_with_noise_varying_inside_a_block():
    """Exact only for block-constant Q; the eigenbasis-diagonal approximation is opt-in, and its
    measured error must beat ignoring the noise altogether."""
    P = make_operator("kfac", 11)
    q = 0.5 * torch.rand(P_KFAC, generator=gen(12), dtype=torch.float64)
    with pytest.raises(ValueError, match="varies within"):
        predict(P, q)
    approx = predict(P, q, kfac_noise="eigenbasis_diagonal").to_dense()
    exact = dense_predict(P.to_dense(), q)
    err = float(torch.linalg.norm(approx - exact) / torch.linalg.norm(exact))
    err_no_predict = float(torch.linalg.norm(P.to_dense() - exact) / torch.linalg.norm(exact))
    err_mean_noise = float(torch.linalg.norm(predict(P, float(q.mean())).to_dense() - exact) / torch.linalg.norm(exact))
    print(f"eigenbasis-diagonal K-FAC predict: relative Frobenius error {err:.3e} (no predict: {err_no_predict:.3e}, "
          f"isotropic mean noise: {err_mean_noise:.3e})")
    assert err < err_no_predict
    assert err < err_mean_noise


def test_predict_without_closed_form_refuses_or_falls_back_to_dense():
    model = make_model(0)
    lora = lc.LoRAParams.from_model(model)
    tri = lc.fit_curvature(model, make_batches(2, seed=1), structure="kfac_tridiag", progress=False,
                           factor_dtype=torch.float64)
    assert isinstance(tri, KFACTridiagCurvature)
    with pytest.raises(NotImplementedError, match="kfac_tridiag"):
        predict(tri, 0.1)
    q = torch.full((lora.numel,), 0.1, dtype=torch.float64)
    dense = predict(tri, q, dense_fallback=True)
    T = tri.to_dense()
    reference = T @ torch.linalg.inv(torch.eye(lora.numel, dtype=torch.float64) + 0.1 * T)
    torch.testing.assert_close(dense.to_dense(), 0.5 * (reference + reference.T), rtol=1e-9, atol=1e-10)
    with pytest.raises(NotImplementedError):
        predict(make_operator("kfac", 1) + make_operator("kfac", 2), block_constant_noise(3))

