"""Interop helpers shared by every curvature structure: scipy and curvlinops wrappers, and the
exact log-determinant pieces.

The operators call these from their ``# -- interop: scipy, curvlinops, trace, logdet --``
sections. This module never imports ``base`` (the base class imports it lazily: no cycle) and
imports scipy and curvlinops only inside the functions that need them (both are optional).

Conventions: ``P`` is a symmetric PSD operator on ``n = curv.num_params`` coordinates;
``logdet`` means ``log det(P + prior_precision * I)``, computed in float64, returned as a 0-dim
float64 tensor on the operator's device.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

__all__ = ["check_prior_precision", "logdet_psd_dense", "logdet_eigenvalues", "lowrank_logdet",
           "diag_lowrank_logdet", "scipy_operator", "curvlinops_operator", "operator_shapes"]


def check_prior_precision(prior_precision: Any) -> float:
    """``prior_precision`` as a float; a clear error unless it is a finite number > 0.

    ``P`` itself is often singular (e.g. K-FAC A-blocks at ``B = 0``), so ``log det(P)`` alone is
    ``-inf``: the isotropic prior term is what makes the log-determinant finite."""
    if isinstance(prior_precision, Tensor):
        if prior_precision.numel() != 1:
            raise ValueError(f"prior_precision must be a scalar, got a tensor of shape "
                             f"{tuple(prior_precision.shape)}")
        prior_precision = prior_precision.item()
    if isinstance(prior_precision, bool) or not isinstance(prior_precision, numbers.Real):
        raise TypeError(f"prior_precision must be a number, got {type(prior_precision).__name__}")
    value = float(prior_precision)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"logdet needs prior_precision > 0 (finite): log det(P + p I) with p = {value} is "
                         "-inf or undefined for a singular curvature P")
    return value


def logdet_eigenvalues(evals: Tensor, prior_precision: float) -> Tensor:
    """``sum log(max(evals, 0) + p)`` in float64 (``evals``: eigenvalues of a PSD operator; the
    clamp removes negative rounding)."""
    return torch.log(evals.to(torch.float64).clamp_min(0) + prior_precision).sum()


def logdet_psd_dense(matrix: Tensor, prior_precision: float) -> Tensor:
    """``log det(M + p I)`` for a symmetric PSD ``M: Tensor[n, n]``, from the eigenvalues of
    ``M`` in float64 (robust to the tiny negative eigenvalues a singular ``M`` has in rounding)."""
    M = matrix.to(torch.float64)
    return logdet_eigenvalues(torch.linalg.eigvalsh(0.5 * (M + M.T)), prior_precision)


def _psd_sqrt_factor(C: Tensor) -> Tensor:
    """``S`` with ``C = S S^T`` for a symmetric PSD ``C: Tensor[k, k]`` (eigenvalues clamped at 0)."""
    evals, vecs = torch.linalg.eigh(0.5 * (C + C.T))
    return vecs * evals.clamp_min(0).sqrt()


def lowrank_logdet(U: Tensor, C: Tensor, prior_precision: float) -> Tensor:
    """``log det(U C U^T + p I_n)`` for ``U: Tensor[n, k]`` (any, orthonormal or not, ``k`` may
    exceed ``n``) and symmetric PSD ``C: Tensor[k, k]``.

    With the thin QR ``U = Q R`` (``Q: n x m``, ``m = min(n, k)``), ``U C U^T = Q (R C R^T) Q^T``:
    the eigenvalues are those of the ``m x m`` matrix ``R C R^T`` and ``n - m`` zeros."""
    U, C = U.to(torch.float64), C.to(torch.float64)
    n = U.shape[0]
    if U.shape[1] == 0:
        return torch.tensor(n * math.log(prior_precision), dtype=torch.float64, device=U.device)
    _, R = torch.linalg.qr(U)
    core = R @ C @ R.T
    m = core.shape[0]
    return logdet_psd_dense(core, prior_precision) + (n - m) * math.log(prior_precision)


def diag_lowrank_logdet(D: Tensor, U: Tensor, C: Tensor, prior_precision: float) -> Tensor:
    """``log det(diag(D) + U C U^T + p I)`` by the matrix determinant lemma, in float64::

        log det(D_p + U C U^T) = sum log D_p + log det(I_k + S^T U^T D_p^{-1} U S)

    with ``D_p = D + p > 0`` and ``C = S S^T``; the ``k x k`` matrix on the right is symmetric
    positive definite (no ``C^{-1}`` needed, a singular ``C`` is fine)."""
    D, U, C = D.to(torch.float64), U.to(torch.float64), C.to(torch.float64)
    Dp = D.clamp_min(0) + prior_precision
    head = torch.log(Dp).sum()
    if U.shape[1] == 0:
        return head
    W = U @ _psd_sqrt_factor(C)  # U S: (n, k)
    inner = W.T @ (W / Dp[:, None])
    inner = 0.5 * (inner + inner.T) + torch.eye(inner.shape[0], dtype=torch.float64, device=inner.device)
    return head + 2 * torch.log(torch.linalg.cholesky(inner).diagonal()).sum()


# ---------------------------------------------------------------------------- scipy
def scipy_operator(curv, dtype=None):
    """``scipy.sparse.linalg.LinearOperator`` of shape ``(n, n)`` applying ``curv`` (symmetric:
    ``rmatvec = matvec``). numpy arrays are moved to the operator's device and dtype, multiplied
    in torch and returned as numpy arrays of ``dtype`` (default ``float64``)."""
    import numpy as np
    from scipy.sparse.linalg import LinearOperator

    np_dtype = np.dtype(np.float64 if dtype is None else dtype)
    if np_dtype.kind != "f":
        raise TypeError(f"to_scipy needs a real floating dtype, got {np_dtype}")
    n = curv.num_params

    def matmat(X):
        X = np.asarray(X)
        was_vector = X.ndim == 1
        X_torch = torch.from_numpy(np.ascontiguousarray(X.reshape(n, -1))).to(device=curv.device, dtype=curv.dtype)
        with torch.no_grad():
            Y = curv.matmat(X_torch)
        Y = Y.detach().to("cpu", torch.float64 if Y.dtype == torch.bfloat16 else Y.dtype).numpy().astype(np_dtype)
        return Y[:, 0] if was_vector else Y

    return LinearOperator((n, n), matvec=matmat, rmatvec=matmat, matmat=matmat, rmatmat=matmat, dtype=np_dtype)


# ---------------------------------------------------------------------------- curvlinops
def operator_shapes(curv) -> list[tuple[int, ...]]:
    """The tensor-list shapes a curvlinops operator of ``curv`` acts on, in flat order.

    Theta space: the LoRA parameter shapes of the fit (``signature["shapes"]``: per layer ``A``
    ``(r, d_in)`` then ``B`` ``(d_out, r)``). Delta-W space: per adapted layer ``(d_out, d_in)``
    (from the operator's Kronecker blocks). An operator that records neither (built by hand
    without a signature) is one flat vector ``(n,)``."""
    n = curv.num_params
    if curv.space == "delta_w":
        blocks = _blocks_of(curv)
        shapes = [(b["d_out"], b["d_in"]) for b in blocks] if blocks is not None else None
    elif curv.space == "theta":
        raw = curv.signature.get("shapes")
        shapes = [tuple(int(x) for x in s) for s in raw] if raw else None
    else:
        raise ValueError(f"to_curvlinops: unknown space {curv.space!r} (expected 'theta' or 'delta_w')")
    if shapes is None:
        return [(n,)]
    total = sum(math.prod(s) for s in shapes)
    if total != n:
        raise ValueError(f"to_curvlinops: the recorded {curv.space} shapes hold {total} entries but the "
                         f"{curv.structure} curvature acts on {n} coordinates")
    return shapes


def _blocks_of(curv):
    """The Kronecker block descriptions of a (possibly summed) Delta-W operator, or None."""
    for candidate in [curv, *getattr(curv, "terms", [])]:
        blocks = getattr(candidate, "blocks", None)
        if blocks is not None:
            return blocks
    return None


_CURVLINOPS_CLASS = None


def _curvlinops_class():
    """The :class:`curvlinops.PyTorchLinearOperator` subclass (defined on first use: curvlinops is
    an optional dependency, imported only here)."""
    global _CURVLINOPS_CLASS
    if _CURVLINOPS_CLASS is not None:
        return _CURVLINOPS_CLASS
    import curvlinops

    # curvlinops 3.0.1 does not re-export its base class at the top level; its own example
    # operators (curvlinops.examples) subclass it from curvlinops._torch_base, as we do
    PyTorchLinearOperator = getattr(curvlinops, "PyTorchLinearOperator", None)
    if PyTorchLinearOperator is None:
        from curvlinops._torch_base import PyTorchLinearOperator

    class CurvatureAsCurvlinops(PyTorchLinearOperator):
        """A lalora_curv curvature as a curvlinops operator (self-adjoint). ``_matmat`` receives
        tensors shaped ``[*shape_i, K]`` (curvlinops' tensor-list matrix format), multiplies the
        flat ``[n, K]`` concatenation by the curvature and splits the result back."""

        SELF_ADJOINT = True

        def __init__(self, curv, shapes):
            super().__init__(shapes, shapes)
            self.curvature = curv

        def _matmat(self, X: list[Tensor]) -> list[Tensor]:
            K = X[0].shape[-1]
            flat = torch.cat([x.reshape(-1, K) for x in X])
            Y = self.curvature.matmat(flat)
            return [y.reshape(*s, K) for y, s in zip(Y.split(self._in_shape_flat), self._in_shape)]

        @property
        def device(self) -> torch.device:
            return self.curvature.device

        @property
        def dtype(self) -> torch.dtype:
            return self.curvature.dtype

    _CURVLINOPS_CLASS = CurvatureAsCurvlinops
    return CurvatureAsCurvlinops


def curvlinops_operator(curv):
    """``curv`` as a curvlinops ``PyTorchLinearOperator`` over :func:`operator_shapes`."""
    try:
        cls = _curvlinops_class()
    except ImportError as err:
        raise ImportError("to_curvlinops needs the optional dependency curvlinops "
                          "(pip install curvlinops-for-pytorch)") from err
    return cls(curv, operator_shapes(curv))
