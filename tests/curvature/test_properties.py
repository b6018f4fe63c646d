"""Property-based operator invariants (hypothesis) on random small operators of every structure."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lalora_curv.curvature import (
    DenseCurvature,
    DiagCurvature,
    DiagLowRankCurvature,
    KFACCurvature,
    KFACTridiagCurvature,
    LowRankCurvature,
)

COMMON = dict(kind="empirical")


def _psd(g, n):
    X = torch.randn(n, n + 1, generator=g, dtype=torch.float64)
    return X @ X.T / n



def build(structure: str, seed: int, r: int, d_in: int, d_out: int):
    g = torch.Generator().manual_seed(seed)
    p = r * d_in + d_out * r
    if structure == "dense":
        return DenseCurvature(_psd(g, p), **COMMON)
    if structure == "diag":
        return DiagCurvature(torch.rand(p, generator=g, dtype=torch.float64), **COMMON)
    if structure == "kfac":
        pairs = [(_psd(g, r), _psd(g, d_in), "A"), (_psd(g, d_out), _psd(g, r), "B")]
        return KFACCurvature.from_factor_pairs(pairs, **COMMON)
    if structure == "kfac_tridiag":
        return KFACTridiagCurvature([_psd(g, r + d_out)], [_psd(g, d_in + r)], [(r, d_in, d_out)], **COMMON)
    k = min(3, p)
    U = torch.randn(p, k, generator=g, dtype=torch.float64)
    C = _psd(g, k)
    if structure == "lowrank":
        return LowRankCurvature(U, C, **COMMON)
    return DiagLowRankCurvature(torch.rand(p, generator=g, dtype=torch.float64), U, C, **COMMON)


structures = st.sampled_from(["dense", "diag", "kfac", "kfac_tridiag", "lowrank", "diag_lowrank"])
dims = st.integers(1, 4)


@settings(max_examples=60, deadline=None)
@given(structures, st.integers(0, 10_000), dims, dims, dims, st.floats(0.0, 5.0), st.floats(-3, 3))
def test_operator_invariants(structure, seed, r, d_in, d_out, alpha, beta):
    op = build(structure, seed, r, d_in, d_out)
    other = build(structure, seed + 1, r, d_in, d_out)
    # symmetry of the operator itself: to_dense() symmetrizes, so it could hide an asymmetric matvec
    P = op.matmat(torch.eye(op.num_params, dtype=torch.float64))
    assert torch.allclose(P, P.T, atol=1e-12)
    assert torch.linalg.eigvalsh(P).min() >= -1e-10 * max(1.0, float(P.norm()))
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(op.num_params, generator=g, dtype=torch.float64)
    v = torch.randn(op.num_params, generator=g, dtype=torch.float64)
    assert torch.allclose(op.matvec(u + beta * v), op.matvec(u) + beta * op.matvec(v), atol=1e-10)
    assert torch.allclose(op.quadratic_form(v), v @ op.matvec(v), rtol=1e-10, atol=1e-12)
    assert torch.allclose(op.diagonal(), P.diagonal(), atol=1e-12)
    combo = op + alpha * other
    assert torch.allclose(combo.to_dense(), P + alpha * other.to_dense(), atol=1e-10)
    assert torch.allclose((op * alpha).matvec(v), alpha * (P @ v), atol=1e-10)
