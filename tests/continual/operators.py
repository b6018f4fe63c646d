"""Shared cases of the continual tests: random PSD operators of each structure (float64) and
dense references of the predict step and of RTS smoothing (textbook covariance form)."""

from __future__ import annotations

import torch

from lalora_curv.curvature import DenseCurvature, DiagCurvature, DiagLowRankCurvature, KFACCurvature, LowRankCurvature

from ..helpers_continual import random_psd

F64 = dict(kind="empirical")
# Kronecker blocks (d_out, d_in) of the synthetic K-FAC operators; blocks 0 and 1 share an input factor
KFAC_SHAPES = [(3, 4), (2, 4), (5, 2)]
P_KFAC = sum(a * b for a, b in KFAC_SHAPES)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make_operator(structure: str, seed: int, p: int = 30, rank: int = 3, pd: bool = True):
    """A random PSD operator of ``structure`` over ``p`` (kfac: ``P_KFAC``) coordinates; ``pd`` adds
    a positive floor so that dense references may invert it."""
    g = gen(seed)
    floor = 0.05 if pd else 0.0
    if structure == "diag":
        d = torch.rand(p, generator=g, dtype=torch.float64) + floor
        if not pd:
            d[:3] = 0
        return DiagCurvature(d, **F64)
    if structure in ("diag_lowrank", "lowrank"):
        U = torch.randn(p, rank, generator=g, dtype=torch.float64)
        C = random_psd(rank, seed=seed + 1)
        if structure == "lowrank":
            return LowRankCurvature(U, C, **F64)
        return DiagLowRankCurvature(torch.rand(p, generator=g, dtype=torch.float64) + floor, U, C, **F64)
    if structure == "dense":
        return DenseCurvature(random_psd(p, seed=seed) + floor * torch.eye(p, dtype=torch.float64), **F64)
    if structure == "kfac":
        shared = random_psd(4, seed=seed + 7) + floor * torch.eye(4, dtype=torch.float64)
        pairs = []
        for i, (d_out, d_in) in enumerate(KFAC_SHAPES):
            G = random_psd(d_out, seed=seed + 10 * i) + floor * torch.eye(d_out, dtype=torch.float64)
            A = shared if d_in == 4 else random_psd(d_in, seed=seed + 10 * i + 1) + floor * torch.eye(d_in,
                                                                                                    dtype=torch.float64)
            pairs.append((G, A, f"block{i}"))
        op = KFACCurvature.from_factor_pairs(pairs, **F64)
        assert len(op.input_factors) == 2  # the shared factor is stored once
        return op
    raise ValueError(structure)


def dense_predict(P: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The textbook formula (needs an invertible P)."""
    return torch.linalg.inv(torch.linalg.inv(P) + torch.diag(q))


def block_constant_noise(seed):
    g = gen(seed)
    return torch.cat([torch.full((a * b,), float(torch.rand(1, generator=g)), dtype=torch.float64)
                      for a, b in KFAC_SHAPES])


def dense_rts(means, precisions, qs):
    """Textbook RTS (identity dynamics) with covariances S = Lambda^{-1}."""
    S = [torch.linalg.inv(L) for L in precisions]
    ms, Ss = [None] * len(means), [None] * len(means)
    ms[-1], Ss[-1] = means[-1], S[-1]
    for t in range(len(means) - 2, -1, -1):
        S_pred = S[t] + torch.diag(qs[t])
        J = S[t] @ torch.linalg.inv(S_pred)
        ms[t] = means[t] + J @ (ms[t + 1] - means[t])
        Ss[t] = S[t] + J @ (Ss[t + 1] - S_pred) @ J.T
    return ms, [torch.linalg.inv(s) for s in Ss]

