"""Smoothing: Rauch–Tung–Striebel for identity dynamics with process noise, and the smoother of
online EWC (decay). Means need only the RTS gain; smoothed precisions are computed in precision
form (``CurvatureOperator.smoothed_precision``), never by inverting a precision."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor

from ..curvature.base import CurvatureOperator
from .noise import transition_noises

__all__ = ["smoothing_gain", "SmoothingResult", "rts_smooth", "decay_smooth"]


def smoothing_gain(P: CurvatureOperator, Q) -> Callable[[Tensor], Tensor]:
    """The RTS gain ``J = S (S + Q)^{-1} = (I + Q P)^{-1}`` (identity dynamics) as a function
    ``v: Tensor[num_params] -> J v``; ``P`` is the *filtered* precision of the earlier task.

    Exact for diag (elementwise), diag_lowrank/lowrank (Woodbury, ``O(p k^2)``), dense (a solve)
    and kfac/eigen_kfac with block-constant ``Q`` (``1 / (1 + q lambda)`` in the eigenbasis).
    ``I + Q P`` is always invertible (its eigenvalues are those of ``I + Q^{1/2} P Q^{1/2}`` >= 1),
    so singular ``P`` is allowed here.
    """
    return P.smoothing_gain(Q)


@dataclass
class SmoothingResult:
    """Smoothed means ``Tensor[p]`` per task and, where the structure has a closed form
    (``CurvatureOperator.structures_supporting("smoothed_precision")``: diag, dense), smoothed
    precisions in that structure; otherwise ``precisions`` is None."""

    means: list[Tensor]
    precisions: list[CurvatureOperator] | None = None


def rts_smooth(means: Sequence[Tensor], precisions: Sequence[CurvatureOperator], Q) -> SmoothingResult:
    """Rauch–Tung–Striebel smoother for identity dynamics with process noise (no data re-access).

    Args:
        means: filtered means ``m_t: Tensor[p]``, ``t = 1..T`` (the trained adapters).
        precisions: filtered precisions ``Lambda_t`` (prior + curvature, including any isotropic
            prior: see :func:`with_isotropic`).
        Q: process noise of the transitions ``t -> t+1``: one float/``Tensor[p]`` for all, or a list
            of ``T - 1``.

    Recursion (``S = Lambda^{-1}``), backwards from ``m_T^s = m_T``, ``Lambda_T^s = Lambda_T``::

        J_t = S_t (S_t + Q_t)^{-1} = (I + Q_t Lambda_t)^{-1}
        m_t^s = m_t + J_t (m_{t+1}^s - m_t)
        Lambda_t^s = Lambda_t + pred(Lambda_{t+1}^s - pred(Lambda_t))      (pred: the predict step)

    The precision line is the covariance form ``S_t^s = S_t + J_t (S_{t+1}^s - S_t - Q_t) J_t^T``
    written in precision (information) form: ``Lambda_{t+1}^s - pred(Lambda_t)`` is the information
    of the later tasks, carried back one transition. It needs no inverse of an (ill-conditioned)
    precision and allows singular ones.

    Means: exact for every structure :func:`smoothing_gain` supports (they need only the gain).
    Precisions: when all precisions share one structure with its own ``smoothed_precision``
    (diag, dense); None otherwise.
    """
    T = len(means)
    if T != len(precisions):
        raise ValueError(f"{T} means but {len(precisions)} precisions")
    if T == 0:
        return SmoothingResult([], [])
    noises = transition_noises(Q, T)
    out = [None] * T
    out[-1] = means[-1].clone()
    for t in range(T - 2, -1, -1):
        J = smoothing_gain(precisions[t], noises[t])
        m = means[t]
        out[t] = m + J(out[t + 1] - m).to(m.dtype)
    smoothed_prec = None
    kinds = {type(P) for P in precisions}
    if len(kinds) == 1 and kinds.pop().supports("smoothed_precision"):
        smoothed_prec = [precisions[-1]]
        for t in range(T - 2, -1, -1):
            smoothed_prec.append(precisions[t].smoothed_precision(smoothed_prec[-1], noises[t]))
        smoothed_prec.reverse()
    return SmoothingResult(out, smoothed_prec)


def decay_smooth(means: Sequence[Tensor], gamma: float) -> list[Tensor]:
    """Smoothing for online EWC (``Lambda_{t+1|t} = gamma Lambda_t``), any structure.

    The decay is the predict step ``S_{t+1|t} = S_t / gamma`` (process noise
    ``Q_t = (1/gamma - 1) S_t``), so the RTS gain is ``J_t = S_t (S_t / gamma)^{-1} = gamma I`` and
    ``m_t^s = m_t + gamma (m_{t+1}^s - m_t)``. With ``gamma = 1`` every task's smoothed mean is the
    last one (a static parameter: the final posterior is the posterior for all tasks).
    """
    gamma = float(gamma)
    out = [None] * len(means)
    if not means:
        return []
    out[-1] = means[-1].clone()
    for t in range(len(means) - 2, -1, -1):
        out[t] = means[t] + gamma * (out[t + 1] - means[t])
    return out
