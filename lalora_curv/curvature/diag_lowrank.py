"""Diagonal plus low-rank curvature ``P ~= D + U C U^T`` (as in Laplace-Gaussian filtering).

Fitted from the curvature ``G`` as: ``U, C`` = top-``rank`` eigenpairs of ``G`` and
``D = diag(G - U C U^T)`` (the residual diagonal, >= 0 because ``G - U C U^T`` is PSD). So
``diag(P) == diag(G)`` exactly and ``P`` is exact on the top-``rank`` eigenspace up to the
residual diagonal. Solves use the Woodbury identity (no ``C^{-1}`` needed).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import CurvatureOperator
from .dense import _merged_common
from .diag import DiagCurvature
from .lowrank import LowRankCurvature

__all__ = ["DiagLowRankCurvature"]


class DiagLowRankCurvature(CurvatureOperator):
    """``P = diag(D) + U C U^T``; ``D: Tensor[p]``, ``U: Tensor[p, k]``, ``C: Tensor[k, k]``."""

    structure = "diag_lowrank"

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
        common = _merged_common(self, other)
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

    def truncated(self, rank: int) -> "DiagLowRankCurvature":
        """Keep the top-``rank`` eigenpairs of the low-rank part and move the discarded part's
        diagonal into ``D`` (so ``diagonal()`` is preserved exactly). Explicit, never silent."""
        low = LowRankCurvature(self.U, self.C, **self._common())
        kept = low.truncated(rank)
        dropped_diag = low.diagonal() - kept.diagonal()
        return DiagLowRankCurvature(self.D + dropped_diag.clamp_min(0), kept.U, kept.C, **self._common())
