"""Small helpers for Kronecker-factored blocks, shared by the K-FAC family.

Convention: a weight block ``W`` of shape ``(d_out, d_in)`` is flattened row-major, so a
Kronecker block is ``G (x) A`` with ``G: (d_out, d_out)`` the output-gradient factor first and
``A: (d_in, d_in)`` the input factor, and ``(G (x) A) vec_r(X) = vec_r(G X A^T)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["kron_matmat", "kron_diag", "kron_solve", "sym_eigh", "rows_to_batch", "batch_to_rows"]


def rows_to_batch(X: Tensor, d_out: int, d_in: int) -> Tensor:
    """``X: Tensor[d_out*d_in, k]`` (a block of flat columns) -> ``Tensor[k, d_out, d_in]``."""
    return X.T.reshape(X.shape[1], d_out, d_in)


def batch_to_rows(Y: Tensor) -> Tensor:
    """Inverse of :func:`rows_to_batch`: ``Tensor[k, d_out, d_in]`` -> ``Tensor[d_out*d_in, k]``."""
    return Y.reshape(Y.shape[0], -1).T


def kron_matmat(G: Tensor, A: Tensor, X: Tensor) -> Tensor:
    """``(G (x) A) @ X`` for ``X: Tensor[d_out*d_in, k]``, never forming the Kronecker product."""
    Xb = rows_to_batch(X, G.shape[0], A.shape[0])
    return batch_to_rows(G @ Xb @ A.T)


def kron_diag(G: Tensor, A: Tensor) -> Tensor:
    """``diag(G (x) A)`` as ``Tensor[d_out*d_in]``."""
    return torch.outer(G.diagonal(), A.diagonal()).reshape(-1)


def sym_eigh(M: Tensor) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of a symmetric PSD factor, eigenvalues clamped at 0 (rounding)."""
    evals, evecs = torch.linalg.eigh(0.5 * (M + M.T))
    return evals.clamp_min(0), evecs


def kron_solve(eig_G: tuple[Tensor, Tensor], eig_A: tuple[Tensor, Tensor], X: Tensor, damping: float) -> Tensor:
    """``(G (x) A + damping I)^{-1} X`` from the factors' eigen-decompositions (exact)."""
    (lg, Qg), (la, Qa) = eig_G, eig_A
    Xb = rows_to_batch(X, Qg.shape[0], Qa.shape[0])
    rotated = Qg.T @ Xb @ Qa
    denom = torch.outer(lg, la) + damping
    if (denom <= 0).any():
        raise ZeroDivisionError("K-FAC block is singular: pass damping > 0 to solve")
    return batch_to_rows(Qg @ (rotated / denom) @ Qa.T)
