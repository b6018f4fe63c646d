"""lalora_curv.continual.smoothing against the textbook RTS recursion (dense, float64)."""

from __future__ import annotations

import pytest
import torch

from lalora_curv.continual import predict, rts_smooth, smoothing_gain, with_isotropic

from ..helpers_continual import single_thread  # noqa: F401  (autouse fixture: one torch thread)
from .operators import P_KFAC, block_constant_noise, dense_rts, gen, make_operator


@pytest.mark.parametrize("structure", ["diag", "diag_lowrank", "dense"])
def test_rts_smooth_equals_dense_recursion(structure):
    """Three tasks: filtered precisions Lambda_t = predict(Lambda_{t-1}) + C_t, then RTS."""
    p = 30
    qs = [torch.rand(p, generator=gen(20 + t), dtype=torch.float64) for t in range(2)]
    means = [torch.randn(p, generator=gen(30 + t), dtype=torch.float64) for t in range(3)]
    precisions = [make_operator(structure, 40)]
    for t in range(1, 3):
        precisions.append(predict(precisions[-1], qs[t - 1]) + make_operator(structure, 40 + t))
    result = rts_smooth(means, precisions, qs)
    ref_means, ref_precisions = dense_rts(means, [P.to_dense() for P in precisions], qs)
    for got, ref in zip(result.means, ref_means):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10)
    assert (result.means[0] - means[0]).abs().max() > 1e-3  # smoothing moved the first task
    if structure == "diag_lowrank":
        assert result.precisions is None
    else:
        for got, ref in zip(result.precisions, ref_precisions):
            torch.testing.assert_close(got.to_dense(), ref, rtol=1e-8, atol=1e-9)


def test_smoothing_gain_kfac_matches_dense():
    P = with_isotropic(make_operator("kfac", 13), 0.1)
    q = block_constant_noise(14)
    v = torch.randn(P_KFAC, generator=gen(15), dtype=torch.float64)
    J = torch.linalg.inv(torch.eye(P_KFAC, dtype=torch.float64) + torch.diag(q) @ P.to_dense())
    torch.testing.assert_close(smoothing_gain(P, q)(v), J @ v, rtol=1e-10, atol=1e-12)

