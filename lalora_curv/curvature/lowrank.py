"""Low-rank curvature ``P ~= U C U^T``.

Fitted as the top-``rank`` eigenpairs of the curvature ``G``: ``U`` orthonormal
(``num_params x k``) and ``C = diag(eigenvalues)``. Sums keep the form with stacked ``U`` and a
block-diagonal ``C`` (rank grows; see :meth:`truncated`).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .base import CurvatureOperator, merged_common
from .interop import lowrank_logdet
from .statistics import GradientSums

__all__ = ["LowRankCurvature", "LowRankAccumulator", "top_eigenpairs", "kept_rank_info"]


def top_eigenpairs(rows: Tensor, rank: int, scale: float) -> tuple[Tensor, Tensor]:
    """Top eigenpairs of ``G = scale * rows^T rows`` for ``rows: Tensor[n, p]`` (per-term vectors).

    From a thin SVD of ``rows`` (``rows = W S Z^T``, so ``G = Z (scale S^2) Z^T``), never from the
    Gram matrix, which would square the condition number. Directions whose singular value is below
    ``max(n, p) * eps(dtype) * s_max`` are numerically zero and are not returned, so
    ``k = min(rank, numerical rank)`` may be smaller than ``rank``; no random completion.
    Returns ``(evals: Tensor[k], U: Tensor[p, k])``, eigenvalues descending, ``U`` orthonormal.
    """
    n, p = rows.shape
    if n == 0:
        return rows.new_zeros(0), rows.new_zeros(p, 0)
    _, S, Vh = torch.linalg.svd(rows, full_matrices=False)
    tol = S.max() * max(n, p) * torch.finfo(rows.dtype).eps
    k = min(int(rank), int((S > tol).sum()))
    return scale * S[:k] ** 2, Vh[:k].T.contiguous()


def kept_rank_info(info: dict, requested: int, kept: int) -> None:
    """Record the rank asked for and the rank kept; warn when the data cannot give the rank."""
    info["rank_requested"], info["rank"] = int(requested), int(kept)
    if kept < requested:
        warnings.warn(f"rank={requested} requested but the fitted curvature has numerical rank {kept} (fewer "
                      "independent gradient rows than the rank: more or longer batches, or terms='token', give more); "
                      f"keeping rank {kept}", stacklevel=4)


class LowRankCurvature(CurvatureOperator):
    """``P = U C U^T`` with ``U: Tensor[num_params, k]``, ``C: Tensor[k, k]`` symmetric PSD."""

    structure = "lowrank"
    fit_options = frozenset({"terms", "rank"})

    @classmethod
    def accumulator(cls, lora, *, dtype, rank: int = 16) -> LowRankAccumulator:
        return LowRankAccumulator(lora.numel, dtype, lora.device, keep_rows=True, rank=_check_rank(rank))

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

    def truncated(self, rank: int) -> LowRankCurvature:
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
                                    **merged_common(self, other))
        return None

    # -- interop: scipy, curvlinops, trace, logdet --
    # tr(U C U^T) = sum(C * U^T U) holds for any U (orthonormal or not, e.g. a sum's stacked U);
    # logdet from a QR of U (interop.lowrank_logdet)

    def trace(self) -> Tensor:
        return (self.C * (self.U.T @ self.U)).sum()

    def _logdet(self, prior_precision, max_dense):
        return lowrank_logdet(self.U, self.C, prior_precision)

    # -- continual: filtering and smoothing (lalora_curv.continual) --
    # ``P = U C U^T`` with noise ``diag(q)``: Woodbury, never ``C^{-1}``, rank unchanged.
    # (``P + value * I`` is diag_lowrank: the generic ``P + diag`` sum gives it exactly.)
    filtering_closed = True

    @staticmethod
    def _woodbury_core(U: Tensor, C: Tensor, w: Tensor) -> Tensor:
        """``(C^{-1} + U^T diag(w) U)^{-1} = (I + C K)^{-1} C`` with ``K = U^T diag(w) U``
        (no ``C^{-1}``; symmetric PSD ``Tensor[k, k]``)."""
        K = U.T @ (w[:, None] * U)
        eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
        core = torch.linalg.solve(eye + C @ K, C)
        return 0.5 * (core + core.T)

    @staticmethod
    def _woodbury_gain(d: Tensor, U: Tensor, C: Tensor, q: Tensor):
        """RTS gain ``(I + Q (diag(d) + U C U^T))^{-1}`` as ``v -> J v`` in ``O(p k^2)``:
        ``J v = v/e - (q/e) * U core U^T (v/e)``, ``e = 1 + q d``."""
        e = 1 + q * d
        core = LowRankCurvature._woodbury_core(U, C, q / e)

        def apply(v: Tensor) -> Tensor:
            v = v.to(e.dtype) / e
            return v - (q / e) * (U @ (core @ (U.T @ v)))

        return apply

    def _predict(self, q):
        return LowRankCurvature(self.U, self._woodbury_core(self.U, self.C, q), **self._common())

    def _smoothing_gain(self, q):
        return self._woodbury_gain(torch.zeros_like(q), self.U, self.C, q)


def _check_rank(rank) -> int:
    if isinstance(rank, bool) or int(rank) != rank or int(rank) < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    return int(rank)


class LowRankAccumulator(GradientSums):
    """Top-``rank`` eigenpairs of ``G = (1/M) sum_rows rows rows^T`` (see :func:`top_eigenpairs`)."""

    def __init__(self, *args, rank: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.rank = rank

    def eigenpairs(self, common: dict) -> tuple[Tensor, Tensor]:
        evals, U = top_eigenpairs(self.stacked_rows(), self.rank, self.scale())
        kept_rank_info(common["info"], self.rank, evals.numel())
        common["info"]["num_terms"] = self.num_terms
        return evals, U

    def finalize(self, common: dict) -> LowRankCurvature:
        evals, U = self.eigenpairs(common)
        return LowRankCurvature(U, torch.diag(evals), **common)
