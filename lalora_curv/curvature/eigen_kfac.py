"""Eigenbasis K-FAC: a Kronecker eigenbasis with a full eigenvalue matrix per block.

``P = diag_b[(Q_G (x) Q_A) diag(vec_r(Lam_b)) (Q_G (x) Q_A)^T]``. A K-FAC block
``G (x) A = (Q_G (x) Q_A) diag(lambda_G (x) lambda_A) (Q_G (x) Q_A)^T`` is the case
``Lam_b = outer(lambda_G, lambda_A)``; the continual operations keep this form exactly where plain
K-FAC cannot (:mod:`lalora_curv.continual`):

* ``P + iso * I``: ``Lam_b + iso``;
* the predict step ``(P^{-1} + q I)^{-1}`` with a noise ``q`` constant on the block (scalar,
  per-layer or per-matrix): ``Lam_b / (1 + q Lam_b)`` (not a Kronecker product any more);
* a noise that varies within a block is refused unless ``kfac_noise="eigenbasis_diagonal"``: then
  ``Q`` is replaced by the diagonal of ``(Q_G (x) Q_A)^T Q (Q_G (x) Q_A)`` (an approximation, exact
  for block-constant ``Q``; its error is measured in the tests).

Flat order as K-FAC: ``W`` of shape ``(d_out, d_in)`` row-major, output side first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import CurvatureOperator, merged_common
from .interop import logdet_eigenvalues
from .kronecker import batch_to_rows, rows_to_batch, sym_eigh

__all__ = ["EigenKFACCurvature", "KFAC_NOISE"]

#: how the eigen-K-FAC predict step treats a process noise (``kfac_noise=`` option)
KFAC_NOISE = ("exact", "eigenbasis_diagonal")


class EigenKFACCurvature(CurvatureOperator):
    """Block-diagonal ``P = diag_b[(Q_G (x) Q_A) diag(vec_r(Lam_b)) (Q_G (x) Q_A)^T]``.

    Per block (flat order, ``W`` of shape ``(d_out, d_in)`` row-major, output side first):
    orthogonal eigenvectors ``Q_G: (d_out, d_out)``, ``Q_A: (d_in, d_in)`` and a non-negative
    eigenvalue matrix ``Lam_b: (d_out, d_in)``; ``P vec_r(X) = vec_r(Q_G (Lam_b * (Q_G^T X Q_A)) Q_A^T)``.

    Args:
        grad_vecs, input_vecs: lists of eigenvector matrices (shared by blocks via indices).
        evals: list of ``Lam_b`` per block.
        blocks: per block ``{"grad", "inp", "d_out", "d_in", "name"}`` (as in ``KFACCurvature``).
    """

    structure = "eigen_kfac"

    def __init__(self, grad_vecs: Sequence[Tensor], input_vecs: Sequence[Tensor], evals: Sequence[Tensor],
                 blocks: Sequence[dict], **common):
        self.grad_vecs, self.input_vecs, self.evals = list(grad_vecs), list(input_vecs), list(evals)
        self.blocks = [dict(b) for b in blocks]
        if len(self.evals) != len(self.blocks):
            raise ValueError(f"{len(self.evals)} eigenvalue matrices for {len(self.blocks)} blocks")
        for b, lam in zip(self.blocks, self.evals):
            Qg, Qa = self.grad_vecs[b["grad"]], self.input_vecs[b["inp"]]
            if Qg.shape != (b["d_out"], b["d_out"]) or Qa.shape != (b["d_in"], b["d_in"]) \
                    or lam.shape != (b["d_out"], b["d_in"]):
                raise ValueError(f"eigen_kfac block {b.get('name', '')!r}: shapes {tuple(Qg.shape)}, "
                                 f"{tuple(Qa.shape)}, {tuple(lam.shape)} do not match d_out={b['d_out']}, "
                                 f"d_in={b['d_in']}")
        common.pop("num_params", None)
        super().__init__(sum(b["d_out"] * b["d_in"] for b in self.blocks), **common)

    @classmethod
    def from_kfac(cls, kfac: CurvatureOperator, isotropic: float = 0.0) -> EigenKFACCurvature:
        """Exact re-expression of a theta-space K-FAC operator (``grad_factors``, ``input_factors``,
        ``blocks``) ``+ isotropic * I`` in its Kronecker eigenbasis."""
        if kfac.space != "theta" or not all(hasattr(kfac, a) for a in ("grad_factors", "input_factors", "blocks")):
            raise TypeError(f"from_kfac needs a theta-space K-FAC operator, got {type(kfac).__name__} "
                            f"(structure {kfac.structure!r}, space {kfac.space!r})")
        eig_g = [sym_eigh(G) for G in kfac.grad_factors]
        eig_a = [sym_eigh(A) for A in kfac.input_factors]
        evals = [torch.outer(eig_g[b["grad"]][0], eig_a[b["inp"]][0]) + isotropic for b in kfac.blocks]
        # contiguous eigenvectors (eigh returns column-major ones): a saved and re-loaded operator
        # then runs the very same matmuls, bit for bit
        return cls([e[1].contiguous() for e in eig_g], [e[1].contiguous() for e in eig_a], evals,
                   [dict(b) for b in kfac.blocks], **kfac._common())

    def _iter_blocks(self):
        offset = 0
        for b, lam in zip(self.blocks, self.evals):
            n = b["d_out"] * b["d_in"]
            yield b, self.grad_vecs[b["grad"]], self.input_vecs[b["inp"]], lam, offset, offset + n
            offset += n

    def _matmat(self, X: Tensor) -> Tensor:
        out = torch.empty_like(X)
        for b, Qg, Qa, lam, lo, hi in self._iter_blocks():
            Xb = rows_to_batch(X[lo:hi], b["d_out"], b["d_in"])
            out[lo:hi] = batch_to_rows(Qg @ (lam * (Qg.T @ Xb @ Qa)) @ Qa.T)
        return out

    def quadratic_form(self, delta, lora=None) -> Tensor:
        delta = self._check_vector(self._flat_delta(delta, lora), "delta")
        total = delta.new_zeros(())
        for b, Qg, Qa, lam, lo, hi in self._iter_blocks():
            R = Qg.T @ delta[lo:hi].view(b["d_out"], b["d_in"]) @ Qa
            total = total + (lam * R * R).sum()
        return total

    def diagonal(self) -> Tensor:
        return torch.cat([((Qg * Qg) @ lam @ (Qa * Qa).T).reshape(-1) for _, Qg, Qa, lam, _, _ in self._iter_blocks()])

    def solve(self, v: Tensor, damping: float | None = None) -> Tensor:
        damping = self.damping if damping is None else damping
        v = self._check_vector(v)
        X = v[:, None] if v.ndim == 1 else v
        out = torch.empty_like(X)
        for b, Qg, Qa, lam, lo, hi in self._iter_blocks():
            denom = lam + damping
            if (denom <= 0).any():
                raise ZeroDivisionError("eigen_kfac block is singular: pass damping > 0 to solve")
            Xb = rows_to_batch(X[lo:hi], b["d_out"], b["d_in"])
            out[lo:hi] = batch_to_rows(Qg @ ((Qg.T @ Xb @ Qa) / denom) @ Qa.T)
        return out[:, 0] if v.ndim == 1 else out

    def with_evals(self, evals: Sequence[Tensor]) -> EigenKFACCurvature:
        """Same eigenbasis, new eigenvalue matrices."""
        return EigenKFACCurvature(self.grad_vecs, self.input_vecs, list(evals), self.blocks, **self._common())

    def state_tensors(self):
        tensors = {f"grad_vecs.{i}": Q for i, Q in enumerate(self.grad_vecs)}
        tensors.update({f"input_vecs.{j}": Q for j, Q in enumerate(self.input_vecs)})
        tensors.update({f"evals.{b}": lam for b, lam in enumerate(self.evals)})
        return tensors

    def psd_parts(self):
        # (Q_G (x) Q_A) diag(Lam) (Q_G (x) Q_A)^T is PSD for any Q when Lam >= 0
        return [lam.reshape(-1) for lam in self.evals], []

    def state_meta(self):
        return {"blocks": self.blocks, "num_grad": len(self.grad_vecs), "num_input": len(self.input_vecs)}

    @classmethod
    def from_state(cls, tensors, meta, common):
        return cls([tensors[f"grad_vecs.{i}"] for i in range(meta["num_grad"])],
                   [tensors[f"input_vecs.{j}"] for j in range(meta["num_input"])],
                   [tensors[f"evals.{b}"] for b in range(len(meta["blocks"]))], meta["blocks"], **common)

    def _scaled(self, alpha):
        return self.with_evals([alpha * lam for lam in self.evals])

    def _add_same(self, other):
        # same eigenbasis (e.g. two predicted versions of one K-FAC): eigenvalues add exactly
        if isinstance(other, EigenKFACCurvature) and other.blocks == self.blocks and all(
                a is b or (a.shape == b.shape and torch.equal(a, b))
                for a, b in zip(self.grad_vecs + self.input_vecs, other.grad_vecs + other.input_vecs)):
            return EigenKFACCurvature(self.grad_vecs, self.input_vecs,
                                      [a + b for a, b in zip(self.evals, other.evals)], self.blocks,
                                      **merged_common(self, other))
        return None

    # -- interop: scipy, curvlinops, trace, logdet --
    # the eigenvalues are stored: trace = their sum, log det(P + p I) = sum log(lam + p)

    def trace(self) -> Tensor:
        return sum(lam.sum() for lam in self.evals)

    def _logdet(self, prior_precision, max_dense):
        return sum(logdet_eigenvalues(lam, prior_precision) for lam in self.evals)

    # -- continual: filtering and smoothing (lalora_curv.continual) --
    predict_options = ("kfac_noise",)

    def _with_isotropic(self, value):
        return self.with_evals([lam + value for lam in self.evals])

    def _block_noise(self, q: Tensor, kfac_noise: str, operation: str) -> list[Tensor]:
        """Per block the noise in the eigenbasis: the block's constant value (exact in any
        orthonormal basis), or with ``kfac_noise="eigenbasis_diagonal"`` the diagonal of
        ``(Q_G (x) Q_A)^T diag(q) (Q_G (x) Q_A)`` as a ``(d_out, d_in)`` matrix."""
        if kfac_noise not in KFAC_NOISE:
            raise ValueError(f"unknown kfac_noise {kfac_noise!r}; choose one of {KFAC_NOISE}")
        out = []
        for b, Qg, Qa, _lam, lo, hi in self._iter_blocks():
            qb = q[lo:hi]
            if bool((qb == qb[0]).all()):
                out.append(qb[0])
            elif kfac_noise == "exact":
                raise ValueError(
                    f"{operation}: process noise varies within the Kronecker block {b.get('name', '')!r}: the K-FAC "
                    "predict step is exact only for noise constant on each LoRA matrix (scalar, per_layer or "
                    "per_matrix process_noise); pass kfac_noise='eigenbasis_diagonal' for the documented "
                    "approximation")
            else:  # sum_kl Qg_ki^2 q_kl Qa_lj^2
                out.append((Qg * Qg).T @ qb.view(b["d_out"], b["d_in"]) @ (Qa * Qa))
        return out

    def _predict(self, q, kfac_noise: str = "exact"):
        noise = self._block_noise(q, kfac_noise, "predict")
        return self.with_evals([lam / (1 + qe * lam) for lam, qe in zip(self.evals, noise)])

    def _smoothing_gain(self, q):
        # (I + q P)^{-1}: eigenvalues 1 / (1 + q lambda) in the same basis (q constant per block)
        gain = self.with_evals([1 / (1 + qe * lam) for lam, qe in zip(self.evals, self._block_noise(q, "exact",
                                                                                                    "smoothing_gain"))])
        return lambda v: gain.matvec(v.to(gain.dtype))
