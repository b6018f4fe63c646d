"""Filtering: the update ``Lambda_t = Lambda_{t|t-1} + C_t`` (plain ``+``, exact for every
structure), the online-EWC decay and the Gaussian-filtering predict step
``Lambda_{t+1|t} = (Lambda_t^{-1} + Q)^{-1}``.

The closed forms belong to the structures (``CurvatureOperator.predict`` / ``with_isotropic``,
each in its own file); this module picks the generic fallbacks where a structure has none.
"""

from __future__ import annotations

import math

import torch

from ..curvature.base import CurvatureOperator
from ..curvature.dense import DenseCurvature
from ..curvature.diag import DiagCurvature
from .noise import check_noise_value

__all__ = ["accumulate", "with_isotropic", "predict"]


def accumulate(P_old: CurvatureOperator | None, P_new: CurvatureOperator, gamma: float = 1.0) -> CurvatureOperator:
    """Online EWC: ``gamma * P_old + P_new`` (``P_new`` if ``P_old`` is None or ``gamma == 0``).

    Exact for every structure: diag+diag stays diag, diag_lowrank stacks the low-rank parts (rank
    grows: truncate explicitly with ``DiagLowRankCurvature.truncated``), kfac/kfac_tridiag give an
    exact sum operator (SEMANTICS §5).
    """
    gamma = float(gamma)
    if not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma}")
    if P_old is None or gamma == 0:
        return P_new
    return gamma * P_old + P_new


def with_isotropic(P: CurvatureOperator, isotropic: float) -> CurvatureOperator:
    """``P + isotropic * I``, exactly, in a structure that :func:`predict` can handle where one
    exists: the structure's own fold (diag/diag_lowrank/dense: the diagonal; kfac/eigen_kfac: every
    eigenvalue), otherwise the generic sum ``P + diag`` (lowrank: diag_lowrank; kfac_tridiag and
    sums: an exact sum operator). Delta-W operators are refused by their space."""
    iso = check_noise_value(isotropic, "isotropic")
    if iso == 0:
        return P
    if P.space == "theta" and not type(P).supports("with_isotropic"):
        return P + DiagCurvature(torch.full((P.num_params,), iso, dtype=P.dtype, device=P.device), **P._common())
    return P.with_isotropic(iso)


def predict(P: CurvatureOperator, Q, *, kfac_noise: str = "exact", dense_fallback: bool = False) -> CurvatureOperator:
    """Gaussian-filtering predict step: the precision ``(P^{-1} + diag(q))^{-1}``.

    Written without ``P^{-1}`` (``P (I + Q P)^{-1}``), so singular ``P`` is fine: a direction of
    zero precision stays at zero.

    Args:
        P: the filtered precision (a structure with its own predict step:
            ``CurvatureOperator.structures_supporting("predict")``).
        Q: process noise, a float (isotropic) or ``Tensor[num_params]`` (see :func:`process_noise`).
        kfac_noise: for the structures that take it (kfac, eigen_kfac): "exact" (default; ``Q``
            must be constant on every Kronecker block) or "eigenbasis_diagonal" (approximation for
            other ``Q``, :mod:`lalora_curv.curvature.eigen_kfac`). The other structures are exact
            for any diagonal ``Q`` and ignore it.
        dense_fallback: for structures without a closed form (kfac_tridiag, sums), compute the exact
            result densely (``DenseCurvature``; small models only) instead of raising.

    Returns:
        an operator of the same family: diag -> diag, diag_lowrank -> diag_lowrank (same rank),
        lowrank -> lowrank, dense -> dense, kfac/eigen_kfac -> eigen_kfac. Exact except for the
        documented ``kfac_noise="eigenbasis_diagonal"`` approximation.
    """
    if not isinstance(P, CurvatureOperator):
        raise TypeError(f"P must be a CurvatureOperator, got {type(P).__name__}")
    options = {"kfac_noise": kfac_noise} if "kfac_noise" in P.predict_options else {}
    if P.space == "theta" and not type(P).supports("predict"):
        if not dense_fallback:
            raise NotImplementedError(
                f"{P._unsupported('predict')}. A kfac_tridiag layer block is a principal submatrix of U (x) V (not "
                "a Kronecker product) and a sum of Kronecker products has no common eigenbasis. Use dynamics "
                "'identity' (online accumulation, exact sums), or dense_fallback=True on small models.")
        P = DenseCurvature(P.to_dense(), **P._common())
    return P.predict(Q, **options)
