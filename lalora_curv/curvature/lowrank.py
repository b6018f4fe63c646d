"""Low-rank curvature ``P ~= U C U^T``.

Fitted as the top-``rank`` eigenpairs of the curvature ``G``: ``U`` orthonormal
(``num_params x k``) and ``C = diag(eigenvalues)``. Sums keep the form with stacked ``U`` and a
block-diagonal ``C`` (rank grows; see :meth:`truncated`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import CurvatureOperator
from .dense import _merged_common

__all__ = ["LowRankCurvature", "top_eigenpairs_from_factors"]


def top_eigenpairs_from_factors(V: Tensor, rank: int, scale: float) -> tuple[Tensor, Tensor]:
    """Top eigenpairs of ``G = scale * V^T V`` for ``V: Tensor[n, p]`` (rows = per-term vectors).

    Uses a thin SVD of ``V`` via the smaller Gram matrix: exact, and cheaper than Lanczos on
    matvecs whenever the number of vectors ``n`` is small compared with ``p`` (one eigh of an
    ``min(n, p)`` square matrix). Returns ``(evals: Tensor[k], U: Tensor[p, k])``, descending.
    """
    n, p = V.shape
    k = min(rank, n, p)
    if n <= p:
        gram = V @ V.T
        evals, W = torch.linalg.eigh(0.5 * (gram + gram.T))
        evals, W = evals.flip(0)[:k].clamp_min(0), W.flip(1)[:, :k]
        sing = evals.sqrt()
        keep = sing > sing.max().clamp_min(1e-30) * 1e-12 if k else sing.new_zeros(0, dtype=torch.bool)
        U = torch.zeros(p, k, dtype=V.dtype, device=V.device)
        U[:, keep] = (V.T @ W[:, keep]) / sing[keep]
        if (~keep).any():  # complete a basis for (numerically) zero directions; their eigenvalue is 0
            Q, _ = torch.linalg.qr(torch.cat([U[:, keep], torch.randn(p, int((~keep).sum()), dtype=V.dtype,
                                                                       device=V.device)], 1))
            U = Q[:, :k]
            evals = torch.cat([evals[keep], evals.new_zeros(int((~keep).sum()))])
    else:
        G = V.T @ V
        evals, U = torch.linalg.eigh(0.5 * (G + G.T))
        evals, U = evals.flip(0)[:k].clamp_min(0), U.flip(1)[:, :k]
    return scale * evals, U


class LowRankCurvature(CurvatureOperator):
    """``P = U C U^T`` with ``U: Tensor[num_params, k]``, ``C: Tensor[k, k]`` symmetric PSD."""

    structure = "lowrank"

    def __init__(self, U: Tensor, C: Tensor, **common):
        if U.ndim != 2 or C.shape != (U.shape[1], U.shape[1]):
            raise ValueError(f"lowrank needs U (p, k) and C (k, k), got {tuple(U.shape)}, {tuple(C.shape)}")
        num_params = common.pop("num_params", U.shape[0])
        super().__init__(num_params, **common)
        self.U, self.C = U, C

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    def _matmat(self, X: Tensor) -> Tensor:
        return self.U @ (self.C @ (self.U.T @ X))

    def quadratic_form(self, delta, lora=None) -> Tensor:
        delta = self._check_vector(self._flat_delta(delta, lora), "delta")
        z = self.U.T @ delta
        return z @ (self.C @ z)

    def diagonal(self) -> Tensor:
        return ((self.U @ self.C) * self.U).sum(1)

    def truncated(self, rank: int) -> "LowRankCurvature":
        """Best rank-``rank`` approximation (in Frobenius norm) of this operator: the top eigenpairs
        of ``U C U^T``, computed from a QR of ``U``. Explicit, never applied silently."""
        Q, R = torch.linalg.qr(self.U)
        evals, W = torch.linalg.eigh(R @ self.C @ R.T)
        evals, W = evals.flip(0)[:rank].clamp_min(0), W.flip(1)[:, :rank]
        return LowRankCurvature(Q @ W, torch.diag(evals), **self._common())

    def state_tensors(self):
        return {"U": self.U, "C": self.C}

    def psd_parts(self):
        return [], [self.C]  # U C U^T is PSD for any U

    @classmethod
    def from_state(cls, tensors, meta, common):
        return cls(tensors["U"], tensors["C"], **common)

    def _scaled(self, alpha):
        return LowRankCurvature(self.U, alpha * self.C, **self._common())

    def _add_same(self, other):
        if isinstance(other, LowRankCurvature):
            return LowRankCurvature(torch.cat([self.U, other.U], 1), torch.block_diag(self.C, other.C),
                                    **_merged_common(self, other))
        return None
