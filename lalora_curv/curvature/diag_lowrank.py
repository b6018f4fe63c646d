"""Diagonal plus low-rank curvature ``P ~= D + U C U^T`` (as in Laplace-Gaussian filtering).

Fitted from the curvature ``G`` as: ``U, C`` = top-``rank`` eigenpairs of ``G`` and
``D = diag(G - U C U^T)`` (the residual diagonal, >= 0 because ``G - U C U^T`` is PSD). So
``diag(P) == diag(G)`` exactly and ``P`` is exact on the top-``rank`` eigenspace up to the
residual diagonal. Solves use the Woodbury identity (no ``C^{-1}`` needed).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import CurvatureOperator, merged_common
from .diag import DiagCurvature
from .interop import diag_lowrank_logdet
from .lowrank import LowRankAccumulator, LowRankCurvature, _check_rank

__all__ = ["DiagLowRankCurvature", "DiagLowRankAccumulator"]


class DiagLowRankCurvature(CurvatureOperator):
    """``P = diag(D) + U C U^T``; ``D: Tensor[p]``, ``U: Tensor[p, k]``, ``C: Tensor[k, k]``."""

    structure = "diag_lowrank"
    fit_options = frozenset({"terms", "rank"})

    @classmethod
    def accumulator(cls, lora, *, dtype, rank: int = 16) -> DiagLowRankAccumulator:
        return DiagLowRankAccumulator(lora.numel, dtype, lora.device, keep_rows=True, rank=_check_rank(rank))

    def __init__(self, D: Tensor, U: Tensor, C: Tensor, **common):
        if D.ndim != 1 or U.shape[0] != D.shape[0] or C.shape != (U.shape[1], U.shape[1]):
            raise ValueError(f"diag_lowrank shapes do not fit: D {tuple(D.shape)}, U {tuple(U.shape)}, "
                             f"C {tuple(C.shape)}")
        common.pop("num_params", None)
        super().__init__(D.shape[0], **common)
        self.D, self.U, self.C = D, U, C

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    def _matmat(self, X: Tensor) -> Tensor:
        return self.D[:, None] * X + self.U @ (self.C @ (self.U.T @ X))

    def quadratic_form(self, delta, lora=None) -> Tensor:
        delta = self._check_vector(self._flat_delta(delta, lora), "delta")
        z = self.U.T @ delta
        return (self.D * delta * delta).sum() + z @ (self.C @ z)

    def diagonal(self) -> Tensor:
        return self.D + ((self.U @ self.C) * self.U).sum(1)

    def solve(self, v: Tensor, damping: float | None = None) -> Tensor:
        """Woodbury: ``(D' + U C U^T)^{-1} = D'^{-1} - D'^{-1} U (I + C U^T D'^{-1} U)^{-1} C U^T D'^{-1}``."""
        damping = self.damping if damping is None else damping
        v = self._check_vector(v)
        X = v[:, None] if v.ndim == 1 else v
        Dd = self.D + damping
        if (Dd <= 0).any():
            raise ZeroDivisionError("diag_lowrank has zero diagonal entries: pass damping > 0 to solve")
        Dinv_X = X / Dd[:, None]
        Dinv_U = self.U / Dd[:, None]
        k = self.rank
        inner = torch.eye(k, dtype=X.dtype, device=X.device) + self.C @ (self.U.T @ Dinv_U)
        out = Dinv_X - Dinv_U @ torch.linalg.solve(inner, self.C @ (self.U.T @ Dinv_X))
        return out[:, 0] if v.ndim == 1 else out

    def state_tensors(self):
        return {"D": self.D, "U": self.U, "C": self.C}

    def psd_parts(self):
        return [self.D], [self.C]

    @classmethod
    def from_state(cls, tensors, meta, common):
        return cls(tensors["D"], tensors["U"], tensors["C"], **common)

    def _scaled(self, alpha):
        return DiagLowRankCurvature(alpha * self.D, self.U, alpha * self.C, **self._common())

    def _add_same(self, other):
        common = merged_common(self, other)
        if isinstance(other, DiagLowRankCurvature):
            return DiagLowRankCurvature(self.D + other.D, torch.cat([self.U, other.U], 1),
                                        torch.block_diag(self.C, other.C), **common)
        if isinstance(other, DiagCurvature):
            return DiagLowRankCurvature(self.D + other.diag, self.U, self.C, **common)
        if isinstance(other, LowRankCurvature):
            return DiagLowRankCurvature(self.D, torch.cat([self.U, other.U], 1),
                                        torch.block_diag(self.C, other.C), **common)
        return None

    def _add_same_reflected(self, other):
        return self._add_same(other)

    def truncated(self, rank: int) -> DiagLowRankCurvature:
        """Keep the top-``rank`` eigenpairs of the low-rank part and move the discarded part's
        diagonal into ``D`` (so ``diagonal()`` is preserved exactly). Explicit, never silent."""
        low = LowRankCurvature(self.U, self.C, **self._common())
        kept = low.truncated(rank)
        dropped_diag = low.diagonal() - kept.diagonal()
        return DiagLowRankCurvature(self.D + dropped_diag.clamp_min(0), kept.U, kept.C, **self._common())

    # -- interop: scipy, curvlinops, trace, logdet --
    # trace: sum(D) + tr(C U^T U); logdet: matrix determinant lemma (interop.diag_lowrank_logdet)

    def trace(self) -> Tensor:
        return self.D.sum() + (self.C * (self.U.T @ self.U)).sum()

    def _logdet(self, prior_precision, max_dense):
        return diag_lowrank_logdet(self.D, self.U, self.C, prior_precision)

    # -- continual: filtering and smoothing (lalora_curv.continual) --
    # predict exact with the rank unchanged: with e = 1 + q d, (P^{-1} + Q)^{-1} = diag(d/e) + V C' V^T,
    # V = diag(1/e) U, C' = (C^{-1} + U^T diag(q/e) U)^{-1} (Woodbury twice; the D^{-1} terms cancel,
    # so zero d_i and singular C are fine)
    filtering_closed = True

    def _with_isotropic(self, value):
        return DiagLowRankCurvature(self.D + value, self.U, self.C, **self._common())

    def _predict(self, q):
        e = 1 + q * self.D
        return DiagLowRankCurvature(self.D / e, self.U / e[:, None],
                                    LowRankCurvature._woodbury_core(self.U, self.C, q / e), **self._common())

    def _smoothing_gain(self, q):
        return LowRankCurvature._woodbury_gain(self.D, self.U, self.C, q)


class DiagLowRankAccumulator(LowRankAccumulator):
    """``U, C`` = top eigenpairs of ``G``; ``D = diag(G - U C U^T)`` (>= 0: the residual is PSD)."""

    def finalize(self, common: dict) -> DiagLowRankCurvature:
        evals, U = self.eigenpairs(common)
        D = (self.sq_sum * self.scale() - (U * U) @ evals).clamp_min(0)
        return DiagLowRankCurvature(D, U, torch.diag(evals), **common)


# diag + U C U^T is diag_lowrank, exactly (registered here: diag and lowrank do not know this structure)
CurvatureOperator.register_sum_rule(
    DiagCurvature, LowRankCurvature,
    lambda d, low: DiagLowRankCurvature(d.diag, low.U, low.C, **merged_common(d, low)))
