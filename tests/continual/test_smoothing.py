"""lalora_curv.continual.smoothing against the textbook RTS recursion (dense, float64)."""

from __future__ import annotations

import pytest
import torch

from lalora_curv.continual import predict, rts_smooth, smoothing_gain, with_isotropic
from lalora_curv.curvature import DenseCurvature, DiagCurvature

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



# ---------------------------------------------------------------------------------- defect 10: stability
def _log_uniform(n, seed, low=-6.0, high=6.0):
    return 10 ** (low + (high - low) * torch.rand(n, generator=gen(seed), dtype=torch.float64))


def _orthogonal(n, seed):
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen(seed), dtype=torch.float64))
    return Q


def _ill_conditioned_sequence(structure, p, q):
    """Three filtered float32 precisions ``Lambda_t = pred(Lambda_{t-1}) + C_t`` whose curvatures
    have eigenvalues spread log-uniformly over 1e-6..1e6 (built in float64, then cast)."""
    if structure == "diag":
        curvatures = [DiagCurvature(_log_uniform(p, 70 + t), kind="empirical") for t in range(3)]
    else:
        curvatures = []
        for t in range(3):
            V = _orthogonal(p, 80 + t)
            M = (V * _log_uniform(p, 70 + t)) @ V.T
            curvatures.append(DenseCurvature(0.5 * (M + M.T), kind="empirical"))
    precisions = [curvatures[0]]
    for C in curvatures[1:]:
        precisions.append(predict(precisions[-1], q) + C)
    return [P.to(dtype=torch.float32) for P in precisions]


def _mp_rts_precisions(precisions, q):
    """Smoothed precisions by the textbook covariance recursion in 60-digit arithmetic: the inputs
    (float32 values, exactly representable) are inverted without rounding worth the name."""
    mp = pytest.importorskip("mpmath").mp
    mp.dps = 60
    to_mp = lambda M: mp.matrix([[mp.mpf(float(x)) for x in row] for row in M.tolist()])  # noqa: E731
    S = [mp.inverse(to_mp(P.to_dense().double())) for P in precisions]
    Qm = mp.diag([mp.mpf(float(x)) for x in q.tolist()])
    Ss = S[-1]
    out = [mp.inverse(Ss)]
    for t in range(len(S) - 2, -1, -1):
        S_pred = S[t] + Qm
        J = S[t] * mp.inverse(S_pred)
        Ss = S[t] + J * (Ss - S_pred) * J.T
        out.append(mp.inverse(Ss))
    return [torch.tensor([[float(x) for x in (M[i, :])] for i in range(M.rows)], dtype=torch.float64)
            for M in out[::-1]]


@pytest.mark.parametrize("structure", ["diag", "dense"])
def test_smoothed_precisions_stay_accurate_in_float32_when_ill_conditioned(structure):
    """Defect 10: float32 precisions whose spectra span 1e-6..1e6. Inverting them (the covariance
    form) loses every digit in the well-determined directions; the precision form keeps float32
    accuracy. Reference: the textbook recursion in 60-digit arithmetic on the same float32 inputs."""
    p = 12
    q = torch.full((p,), 1e-3, dtype=torch.float64)
    precisions = _ill_conditioned_sequence(structure, p, q)
    means = [torch.zeros(p, dtype=torch.float32) for _ in precisions]
    got = rts_smooth(means, precisions, q.float()).precisions
    reference = _mp_rts_precisions(precisions, q.float().double())
    for t, (P, ref) in enumerate(zip(got, reference)):
        assert P.structure == structure and P.dtype == torch.float32
        dense = P.to_dense().double()
        if structure == "diag":  # elementwise: every entry to float32 accuracy
            err = float(((dense.diagonal() - ref.diagonal()).abs() / ref.diagonal()).max())
        else:
            err = float(torch.linalg.norm(dense - ref) / torch.linalg.norm(ref))
        assert err < 1e-5, f"task {t}: relative error {err:.2e} of the smoothed {structure} precision"
    # the smoothing really changed the earlier precisions (a test that could not fail otherwise)
    assert float((got[0].to_dense() - precisions[0].to_dense()).abs().max()) > 1.0


def test_smoothed_diag_precision_with_zero_entries():
    """Precision form allows singular filtered precisions: a coordinate no task has informed before
    ``t+1`` gets the later information carried back, ``Lambda_t^s = pred(Lambda_{t+1}^s)`` (the
    covariance form's ``inf - inf`` limit), instead of a division by zero."""
    p = 6
    q = torch.full((p,), 0.5, dtype=torch.float64)
    first = DiagCurvature(torch.tensor([0.0, 0.0, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64), kind="empirical")
    second = predict(first, q) + DiagCurvature(torch.linspace(1.0, 2.0, p, dtype=torch.float64), kind="empirical")
    means = [torch.zeros(p, dtype=torch.float64)] * 2
    smoothed = rts_smooth(means, [first, second], q).precisions
    carried = second.diag / (1 + 0.5 * second.diag)
    torch.testing.assert_close(smoothed[0].diag[:2], carried[:2], rtol=1e-14, atol=0)
    S, S_pred, Ss = 1 / first.diag[2:], 1 / first.diag[2:] + 0.5, 1 / second.diag[2:]  # textbook, invertible part
    J = S / S_pred
    torch.testing.assert_close(smoothed[0].diag[2:], 1 / (S + J * J * (Ss - S_pred)), rtol=1e-12, atol=0)
