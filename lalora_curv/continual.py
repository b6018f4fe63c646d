"""Multi-task / continual learning with Laplace posteriors: online accumulation, the Gaussian
filtering predict step, Rauch–Tung–Striebel smoothing, and a stateful :class:`TaskSequence`.

Model (identity dynamics, Gaussian random walk of the LoRA parameters between tasks)::

    theta_{t+1} = theta_t + w_t,   w_t ~ N(0, Q_t),   Q_t = diag(q) (process noise, >= 0)

Each task ``t`` gives a Laplace "measurement": after training on it, its curvature ``C_t``
(``fit_curvature`` at the trained adapter ``m_t``). Precisions ``Lambda = S^{-1}`` (``S`` the
covariance) are the curvature operators of :mod:`lalora_curv.curvature`; all vectors are flat LoRA
vectors (``lora.flatten()`` order, ``Tensor[p]``).

* filtering update:  ``Lambda_t = Lambda_{t|t-1} + C_t``  (plain ``+``; exact for every structure)
* predict, noise:    ``Lambda_{t+1|t} = (Lambda_t^{-1} + Q)^{-1}``                   (:func:`predict`)
* predict, decay:    ``Lambda_{t+1|t} = gamma * Lambda_t``  (online EWC)             (:func:`accumulate`)
* smoothing (RTS):   ``J_t = S_t (S_t + Q)^{-1} = (I + Q Lambda_t)^{-1}``,
  ``m_t^s = m_t + J_t (m_{t+1}^s - m_t)``,
  ``S_t^s = S_t + J_t (S_{t+1}^s - S_t - Q) J_t^T``                                   (:func:`rts_smooth`)

Which forms are exact (tested against dense linear algebra in tests/test_continual.py):

* ``diag``: all closed form (``d / (1 + q d)``; gain ``1 / (1 + q lambda)``).
* ``diag_lowrank`` ``D + U C U^T``: the predict step is **exact with the rank unchanged**:
  with ``e = 1 + q*d`` (elementwise), ``K = U^T diag(q / e) U`` (``k x k``)::

      (Lambda^{-1} + Q)^{-1} = diag(d / e) + V C' V^T,   V = diag(1/e) U,   C' = (C^{-1} + K)^{-1} = C (I + K C)^{-1}

  (derivation: Woodbury on ``Lambda^{-1}``, add ``Q`` to its diagonal part, Woodbury again; the
  ``D^{-1}`` terms cancel, so it also holds for ``d_i = 0`` and singular ``C``). The smoothing
  gain is applied with Woodbury in ``O(p k^2)``:
  ``J v = v/e - (q/e) * U C (I + K C)^{-1} U^T (v/e)``. Smoothed *means* are exact; smoothed
  precisions are not diag+low-rank and are not returned.
* ``dense``: ``(Lambda^{-1} + Q)^{-1} = Lambda - Lambda S (I + S Lambda S)^{-1} S Lambda`` with
  ``S = Q^{1/2}`` (no inverse of ``Lambda`` needed); RTS with dense inverses.
* ``kfac``: a block ``G (x) A = (Q_G (x) Q_A) diag(lambda_g (x) lambda_a) (Q_G (x) Q_A)^T`` with
  a process noise that is **constant on the block** (scalar, per-layer or per-matrix ``Q``):
  ``((G (x) A)^{-1} + q I)^{-1}`` is exact in the Kronecker eigenbasis with eigenvalues
  ``lambda / (1 + q lambda)`` — not a Kronecker product, but an :class:`EigenKFACCurvature`
  (eigenbasis ``Q_G (x) Q_A`` and a full ``d_out x d_in`` eigenvalue matrix). A ``Q`` that varies
  within a block is refused unless ``kfac_noise="eigenbasis_diagonal"``: then ``Q`` is replaced by
  the diagonal of ``(Q_G (x) Q_A)^T Q (Q_G (x) Q_A)`` (an approximation, exact for block-constant
  ``Q``; its error is measured in the tests).
* ``kfac_tridiag`` and sums of Kronecker terms: no structured closed form (a tridiag layer block
  is a principal submatrix of ``U (x) V``, not a Kronecker product; a sum of Kronecker products has
  no common eigenbasis). :func:`predict` raises ``NotImplementedError`` unless
  ``dense_fallback=True`` (exact, small models only); :class:`TaskSequence` supports them with
  ``dynamics="identity"`` (online accumulation, exact sums).
"""

from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .curvature.base import CurvatureOperator
from .curvature.dense import DenseCurvature
from .curvature.diag import DiagCurvature
from .curvature.diag_lowrank import DiagLowRankCurvature
from .curvature.io import CurvatureFileError, CurvatureMismatchError, validate_signature, write_safetensors_atomic
from .curvature.kfac import KFACCurvature
from .curvature.kronecker import batch_to_rows, rows_to_batch, sym_eigh
from .curvature.lowrank import LowRankCurvature
from .params import LoRAParams

__all__ = ["accumulate", "predict", "process_noise", "with_isotropic", "smoothing_gain", "rts_smooth",
           "decay_smooth", "SmoothingResult", "EigenKFACCurvature", "TaskSequence", "TaskRecord",
           "TASK_STRUCTURES", "DYNAMICS"]

TASK_STRUCTURES = ("diag", "diag_lowrank", "kfac", "kfac_tridiag", "dense")
DYNAMICS = ("identity", "noise")
#: structures whose predict step is closed form (TaskSequence(dynamics="noise") needs it every task)
NOISE_STRUCTURES = ("diag", "diag_lowrank", "dense")


# ---------------------------------------------------------------------------------- eigen-KFAC
class EigenKFACCurvature(CurvatureOperator):
    """Block-diagonal ``P = diag_b[(Q_G (x) Q_A) diag(vec_r(Lam_b)) (Q_G (x) Q_A)^T]``.

    Per block (flat order, ``W`` of shape ``(d_out, d_in)`` row-major, output side first):
    orthogonal eigenvectors ``Q_G: (d_out, d_out)``, ``Q_A: (d_in, d_in)`` and a non-negative
    eigenvalue matrix ``Lam_b: (d_out, d_in)``; ``P vec_r(X) = vec_r(Q_G (Lam_b * (Q_G^T X Q_A)) Q_A^T)``.
    A Kronecker block ``G (x) A`` is the case ``Lam_b = outer(lambda_G, lambda_A)``; the predict step
    with block-constant noise and isotropic additions keep this form exactly (module docstring).

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
    def from_kfac(cls, kfac: KFACCurvature, isotropic: float = 0.0) -> "EigenKFACCurvature":
        """Exact re-expression of ``kfac (+ isotropic * I)`` in the Kronecker eigenbasis."""
        if type(kfac) is not KFACCurvature:
            raise TypeError(f"from_kfac needs a theta-space KFACCurvature, got {type(kfac).__name__} "
                            f"(structure {kfac.structure!r})")
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

    def with_evals(self, evals: Sequence[Tensor]) -> "EigenKFACCurvature":
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
            from .curvature.dense import _merged_common

            return EigenKFACCurvature(self.grad_vecs, self.input_vecs,
                                      [a + b for a, b in zip(self.evals, other.evals)], self.blocks,
                                      **_merged_common(self, other))
        return None


# ---------------------------------------------------------------------------------- process noise
def process_noise(lora: LoRAParams, value: float = 0.0, per_layer: Mapping[str, float] | None = None,
                  per_matrix: Mapping[str, float] | None = None, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """Diagonal process noise ``q: Tensor[lora.numel]`` (variances of the per-task random walk).

    ``Q`` says **which LoRA parameters are expected to shift between tasks**: a larger ``q_i``
    forgets more of the old precision along coordinate ``i`` (``lambda -> lambda / (1 + q lambda)``),
    so those weights are anchored less. Typical: small ``value`` everywhere, more noise on the
    layers expected to specialise (e.g. the upper layers' ``v_proj``).

    Args:
        lora: the registry (order and sizes of the flat vector).
        value: the noise of every coordinate not matched below.
        per_layer: ``{pattern: q}``; ``pattern`` is an ``fnmatch`` pattern matched against the LoRA
            *module paths* (``lora.layers[i].name``, e.g. ``"*.layers.1.self_attn.v_proj"``); sets
            both ``A`` and ``B`` of every matching layer. Later keys override earlier ones.
        per_matrix: ``{pattern: q}`` matched against the *parameter names* (``lora.names``, e.g.
            ``"*.layers.0.*.lora_B.*"``); overrides ``per_layer``.
        dtype: of the returned vector (on ``lora.device``).

    A pattern that matches nothing raises ``KeyError`` (typos would otherwise go unnoticed).
    The result is constant on every LoRA matrix, i.e. on every K-FAC block, so the K-FAC predict
    step stays exact (module docstring).
    """
    q = torch.full((lora.numel,), _check_noise_value(value, "value"), dtype=dtype, device=lora.device)
    views = lora.unflatten(q)
    for pattern, val in (per_layer or {}).items():
        val = _check_noise_value(val, f"per_layer[{pattern!r}]")
        hits = [layer for layer in lora.layers if fnmatch.fnmatchcase(layer.name, pattern)]
        if not hits:
            raise KeyError(f"per_layer pattern {pattern!r} matches no LoRA layer; layers are e.g. "
                           f"{[l.name for l in lora.layers[:3]]}")
        for layer in hits:
            views[layer.A_name].fill_(val)
            views[layer.B_name].fill_(val)
    for pattern, val in (per_matrix or {}).items():
        val = _check_noise_value(val, f"per_matrix[{pattern!r}]")
        hits = [n for n in lora.names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise KeyError(f"per_matrix pattern {pattern!r} matches no LoRA parameter; names are e.g. "
                           f"{lora.names[:2]}")
        for n in hits:
            views[n].fill_(val)
    return q


def _check_noise_value(value, what: str) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"process noise {what} must be a finite number >= 0, got {value}")
    return value


def _noise_vector(Q, P: CurvatureOperator) -> Tensor:
    """``Q`` (float or ``Tensor[num_params]``) as a vector in ``P``'s dtype/device."""
    if isinstance(Q, Tensor):
        if Q.ndim == 0:
            Q = Q.expand(P.num_params)
        if Q.shape != (P.num_params,):
            raise ValueError(f"process noise has shape {tuple(Q.shape)}, expected ({P.num_params},) or a scalar")
        q = Q.to(device=P.device, dtype=P.dtype)
    else:
        q = torch.full((P.num_params,), _check_noise_value(Q, "Q"), dtype=P.dtype, device=P.device)
    if not torch.isfinite(q).all() or (q < 0).any():
        raise ValueError("process noise must be finite and >= 0")
    return q


# ---------------------------------------------------------------------------------- accumulation
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
    """``P + isotropic * I``, exactly, in a structure that :func:`predict` can handle where one exists:
    diag/diag_lowrank/dense fold it into the diagonal, lowrank becomes diag_lowrank, kfac becomes
    :class:`EigenKFACCurvature` (``+iso`` on every eigenvalue); anything else an exact sum operator."""
    iso = _check_noise_value(isotropic, "isotropic")
    if iso == 0:
        return P
    common = P._common()
    if isinstance(P, DiagCurvature):
        return DiagCurvature(P.diag + iso, **common)
    if isinstance(P, DiagLowRankCurvature):
        return DiagLowRankCurvature(P.D + iso, P.U, P.C, **common)
    if isinstance(P, LowRankCurvature):
        return DiagLowRankCurvature(torch.full((P.num_params,), iso, dtype=P.dtype, device=P.device), P.U, P.C,
                                    **common)
    if isinstance(P, DenseCurvature):
        return DenseCurvature(P.matrix + iso * torch.eye(P.num_params, dtype=P.dtype, device=P.device), **common)
    if type(P) is KFACCurvature:
        return EigenKFACCurvature.from_kfac(P, iso)
    if isinstance(P, EigenKFACCurvature):
        return P.with_evals([lam + iso for lam in P.evals])
    if P.structure == "kfac_delta_w":
        raise ValueError("with_isotropic: kfac_delta_w acts on the Delta-W space, not on theta")
    return P + DiagCurvature(torch.full((P.num_params,), iso, dtype=P.dtype, device=P.device), **common)


# ---------------------------------------------------------------------------------- predict step
def _sym(M: Tensor) -> Tensor:
    return 0.5 * (M + M.T)


def _lowrank_core(U: Tensor, C: Tensor, w: Tensor) -> Tensor:
    """``(C^{-1} + U^T diag(w) U)^{-1} = C (I + K C)^{-1}`` (no ``C^{-1}``; symmetric PSD)."""
    K = U.T @ (w[:, None] * U)
    eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    # C (I + K C)^{-1} = (I + C K)^{-1} C
    return _sym(torch.linalg.solve(eye + C @ K, C))


def predict(P: CurvatureOperator, Q, *, kfac_noise: str = "exact", dense_fallback: bool = False) -> CurvatureOperator:
    """Gaussian-filtering predict step: the precision ``(P^{-1} + diag(q))^{-1}``.

    Written without ``P^{-1}`` (``P (I + Q P)^{-1}``), so singular ``P`` is fine: a direction of
    zero precision stays at zero.

    Args:
        P: the filtered precision (diag, diag_lowrank, lowrank, dense, kfac, eigen_kfac).
        Q: process noise, a float (isotropic) or ``Tensor[num_params]`` (see :func:`process_noise`).
        kfac_noise: for kfac/eigen_kfac, "exact" (default; ``Q`` must be constant on every Kronecker
            block) or "eigenbasis_diagonal" (approximation for other ``Q``, module docstring).
        dense_fallback: for structures without a closed form (kfac_tridiag, sums), compute the exact
            result densely (``DenseCurvature``; small models only) instead of raising.

    Returns:
        an operator of the same family: diag -> diag, diag_lowrank -> diag_lowrank (same rank),
        lowrank -> lowrank, dense -> dense, kfac/eigen_kfac -> eigen_kfac. Exact except for the
        documented ``kfac_noise="eigenbasis_diagonal"`` approximation.
    """
    if not isinstance(P, CurvatureOperator):
        raise TypeError(f"P must be a CurvatureOperator, got {type(P).__name__}")
    q = _noise_vector(Q, P)
    common = P._common()
    if isinstance(P, DiagCurvature):
        return DiagCurvature(P.diag / (1 + q * P.diag), **common)
    if isinstance(P, DiagLowRankCurvature):
        e = 1 + q * P.D
        return DiagLowRankCurvature(P.D / e, P.U / e[:, None], _lowrank_core(P.U, P.C, q / e), **common)
    if isinstance(P, LowRankCurvature):
        return LowRankCurvature(P.U, _lowrank_core(P.U, P.C, q), **common)
    if isinstance(P, DenseCurvature):
        s = q.sqrt()
        PS = P.matrix * s[None, :]  # P S
        inner = torch.eye(P.num_params, dtype=P.dtype, device=P.device) + s[:, None] * PS  # I + S P S
        return DenseCurvature(_sym(P.matrix - PS @ torch.linalg.solve(inner, PS.T)), **common)
    if type(P) is KFACCurvature:
        P = EigenKFACCurvature.from_kfac(P)
    if isinstance(P, EigenKFACCurvature):
        return _predict_eigen_kfac(P, q, kfac_noise)
    if P.structure == "kfac_delta_w":
        raise ValueError("predict: kfac_delta_w is a Delta-W space operator (its penalty is quartic in theta); "
                         "a predict step on it is not defined here")
    if dense_fallback:
        return predict(DenseCurvature(P.to_dense(), **common), q)
    raise NotImplementedError(
        f"predict has no structured closed form for {P.structure!r}: a kfac_tridiag layer block is a principal "
        "submatrix of U (x) V (not a Kronecker product) and a sum of Kronecker products has no common eigenbasis. "
        "Use dynamics 'identity' (online accumulation, exact sums), or dense_fallback=True on small models.")


KFAC_NOISE = ("exact", "eigenbasis_diagonal")


def _predict_eigen_kfac(P: EigenKFACCurvature, q: Tensor, kfac_noise: str) -> EigenKFACCurvature:
    if kfac_noise not in KFAC_NOISE:
        raise ValueError(f"unknown kfac_noise {kfac_noise!r}; choose one of {KFAC_NOISE}")
    new = []
    for b, Qg, Qa, lam, lo, hi in P._iter_blocks():
        qb = q[lo:hi]
        if bool((qb == qb[0]).all()):
            q_eig = qb[0]  # isotropic on the block: exact in any orthonormal basis
        elif kfac_noise == "exact":
            raise ValueError(
                f"process noise varies within the Kronecker block {b.get('name', '')!r}: the K-FAC predict step "
                "is exact only for noise constant on each LoRA matrix (scalar, per_layer or per_matrix "
                "process_noise); pass kfac_noise='eigenbasis_diagonal' for the documented approximation")
        else:
            # diagonal of (Q_G (x) Q_A)^T diag(q) (Q_G (x) Q_A): sum_kl Qg_ki^2 q_kl Qa_lj^2
            q_eig = (Qg * Qg).T @ qb.view(b["d_out"], b["d_in"]) @ (Qa * Qa)
        new.append(lam / (1 + q_eig * lam))
    return P.with_evals(new)


# ---------------------------------------------------------------------------------- smoothing
def smoothing_gain(P: CurvatureOperator, Q) -> Callable[[Tensor], Tensor]:
    """The RTS gain ``J = S (S + Q)^{-1} = (I + Q P)^{-1}`` (identity dynamics) as a function
    ``v: Tensor[num_params] -> J v``; ``P`` is the *filtered* precision of the earlier task.

    Exact for diag (elementwise), diag_lowrank/lowrank (Woodbury, ``O(p k^2)``), dense (a solve)
    and kfac/eigen_kfac with block-constant ``Q`` (``1 / (1 + q lambda)`` in the eigenbasis).
    ``I + Q P`` is always invertible (its eigenvalues are those of ``I + Q^{1/2} P Q^{1/2}`` >= 1),
    so singular ``P`` is allowed here.
    """
    q = _noise_vector(Q, P)
    if isinstance(P, DiagCurvature):
        g = 1 / (1 + q * P.diag)
        return lambda v: g * v.to(g.dtype)
    if isinstance(P, (DiagLowRankCurvature, LowRankCurvature)):
        d = P.D if isinstance(P, DiagLowRankCurvature) else torch.zeros_like(q)
        e = 1 + q * d
        core = _lowrank_core(P.U, P.C, q / e)  # C (I + K C)^{-1}
        U = P.U

        def apply(v: Tensor) -> Tensor:
            v = v.to(e.dtype) / e
            return v - (q / e) * (U @ (core @ (U.T @ v)))

        return apply
    if isinstance(P, DenseCurvature):
        M = torch.eye(P.num_params, dtype=P.dtype, device=P.device) + q[:, None] * P.matrix
        return lambda v: torch.linalg.solve(M, v.to(M.dtype))
    if type(P) is KFACCurvature:
        P = EigenKFACCurvature.from_kfac(P)
    if isinstance(P, EigenKFACCurvature):
        # (I + q P)^{-1} = P' with eigenvalues 1/(1 + q lambda) in the same basis (q constant per block)
        gains = []
        for b, Qg, Qa, lam, lo, hi in P._iter_blocks():
            qb = q[lo:hi]
            if not bool((qb == qb[0]).all()):
                raise ValueError(f"smoothing_gain: process noise varies within K-FAC block {b.get('name', '')!r}")
            gains.append(1 / (1 + qb[0] * lam))
        G = P.with_evals(gains)
        return lambda v: G.matvec(v.to(G.dtype))
    raise NotImplementedError(f"smoothing_gain has no closed form for structure {P.structure!r}")


@dataclass
class SmoothingResult:
    """Smoothed means ``Tensor[p]`` per task and, where cheap, smoothed precisions (diag: a
    ``DiagCurvature``; dense: a ``DenseCurvature``; otherwise None)."""

    means: list[Tensor]
    precisions: list[CurvatureOperator] | None = None


def _noise_list(Q, T: int) -> list:
    if isinstance(Q, (list, tuple)):
        if len(Q) != T - 1:
            raise ValueError(f"{T} tasks need {T - 1} process noises (one per transition), got {len(Q)}")
        return list(Q)
    return [Q] * max(T - 1, 0)


def rts_smooth(means: Sequence[Tensor], precisions: Sequence[CurvatureOperator], Q) -> SmoothingResult:
    """Rauch–Tung–Striebel smoother for identity dynamics with process noise (no data re-access).

    Args:
        means: filtered means ``m_t: Tensor[p]``, ``t = 1..T`` (the trained adapters).
        precisions: filtered precisions ``Lambda_t`` (prior + curvature, including any isotropic
            prior: see :func:`with_isotropic`).
        Q: process noise of the transitions ``t -> t+1``: one float/``Tensor[p]`` for all, or a list
            of ``T - 1``.

    Recursion (``S = Lambda^{-1}``), backwards from ``m_T^s = m_T``, ``S_T^s = S_T``::

        S_{t+1|t} = S_t + Q_t,  J_t = S_t S_{t+1|t}^{-1} = (I + Q_t Lambda_t)^{-1}
        m_t^s = m_t + J_t (m_{t+1}^s - m_t)
        S_t^s = S_t + J_t (S_{t+1}^s - S_{t+1|t}) J_t^T

    Means: exact for every structure :func:`smoothing_gain` supports (they need only the gain).
    Precisions: diag (elementwise, needs ``Lambda_t > 0``: use a prior precision) and dense
    (dense inverses, needs ``Lambda_t`` positive definite); None otherwise.
    """
    T = len(means)
    if T != len(precisions):
        raise ValueError(f"{T} means but {len(precisions)} precisions")
    if T == 0:
        return SmoothingResult([], [])
    noises = _noise_list(Q, T)
    out = [None] * T
    out[-1] = means[-1].clone()
    for t in range(T - 2, -1, -1):
        J = smoothing_gain(precisions[t], noises[t])
        m = means[t]
        out[t] = (m + J(out[t + 1] - m).to(m.dtype))
    smoothed_prec = None
    if all(isinstance(P, DiagCurvature) for P in precisions):
        smoothed_prec = _smooth_diag_precisions(precisions, noises)
    elif all(isinstance(P, DenseCurvature) for P in precisions):
        smoothed_prec = _smooth_dense_precisions(precisions, noises)
    return SmoothingResult(out, smoothed_prec)


def _smooth_diag_precisions(precisions, noises) -> list[DiagCurvature]:
    for t, P in enumerate(precisions):
        if (P.diag <= 0).any():
            raise ZeroDivisionError(f"task {t}: the filtered diag precision has zero entries, its covariance is "
                                    "infinite; use a prior_precision > 0 to smooth precisions")
    S = [1 / P.diag for P in precisions]
    Ss = S[-1]
    result = [DiagCurvature(1 / Ss, **precisions[-1]._common())]
    for t in range(len(S) - 2, -1, -1):
        q = _noise_vector(noises[t], precisions[t])
        S_pred = S[t] + q
        J = S[t] / S_pred
        Ss = S[t] + J * J * (Ss - S_pred)
        result.append(DiagCurvature(1 / Ss, **precisions[t]._common()))
    return result[::-1]


def _smooth_dense_precisions(precisions, noises) -> list[DenseCurvature]:
    S = [torch.cholesky_inverse(torch.linalg.cholesky(P.matrix)) for P in precisions]
    Ss = S[-1]
    result = [DenseCurvature(_sym(torch.linalg.inv(Ss)), **precisions[-1]._common())]
    for t in range(len(S) - 2, -1, -1):
        S_pred = S[t] + torch.diag(_noise_vector(noises[t], precisions[t]))
        J = torch.linalg.solve(S_pred, S[t]).T  # S_t S_pred^{-1} (both symmetric)
        Ss = _sym(S[t] + J @ (Ss - S_pred) @ J.T)
        result.append(DenseCurvature(_sym(torch.linalg.inv(Ss)), **precisions[t]._common()))
    return result[::-1]


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


# ---------------------------------------------------------------------------------- TaskSequence
@dataclass
class TaskRecord:
    """One finished task: ``mean`` (``Tensor[p]``, the trained adapter = filtered mean), the
    filtered precision ``precision + isotropic * I`` and JSON-able ``info``."""

    name: str
    mean: Tensor
    precision: CurvatureOperator
    isotropic: float = 0.0
    info: dict = field(default_factory=dict)


SEQUENCE_META_KEY = "lalora_curv.task_sequence"
SEQUENCE_FORMAT = 1


class TaskSequence:
    """Sequential Laplace posteriors over a stream of tasks (online EWC / Gaussian filtering).

    Usage::

        seq = TaskSequence(model, structure="diag", kind="empirical", dynamics="noise",
                           process_noise=process_noise(lora, 1e-4, per_layer={"*.layers.1.*": 1e-3}),
                           prior_precision=1.0)
        for task in tasks:
            finetune(model, task.train, penalty=seq.prior_penalty(strength), steps=...)  # None for task 1
            seq.fit_task(task.proxy)          # curvature at the trained adapter + filtering update
        adapters = seq.smooth()               # per-task smoothed adapters (dicts name -> tensor)

    Precisions (``Lambda``) are in the curvature's units (mean over terms), times
    ``curvature_scale`` (e.g. the number of training terms, to make them posterior precisions;
    ``process_noise`` is a variance in the units of ``Lambda^{-1}``).

    * task 1: ``Lambda_1 = prior_precision * I + curvature_scale * C_1``
    * prior of task ``t+1`` (``predicted_precision``):
      ``dynamics="identity"``: ``gamma * Lambda_t`` (online EWC; ``gamma = 1``: plain accumulation);
      ``dynamics="noise"``: ``(Lambda_t^{-1} + Q)^{-1}`` (:func:`predict`; diag, diag_lowrank, dense);
    * update: ``Lambda_{t+1} = prior + curvature_scale * C_{t+1}``, anchor ``m_t`` = the adapter
      after task ``t``.

    With ``dynamics="identity"`` the isotropic part is kept as a scalar (``TaskRecord.isotropic``,
    passed to ``LaplacePenalty(prior_precision=...)``), so kfac/kfac_tridiag stay exact sums;
    with ``"noise"`` it is folded into the operator (:func:`with_isotropic`) before predicting.

    Args:
        model: the peft model being trained (its LoRA registry fixes the flat order).
        structure: "diag" | "diag_lowrank" | "kfac" | "kfac_tridiag" | "dense".
        kind: curvature kind for ``fit_curvature`` ("empirical" | "mc" | "ggn").
        dynamics: "identity" (decay ``gamma``) or "noise" (process noise; needs a structure with a
            closed-form predict step: diag, diag_lowrank, dense).
        gamma: online-EWC decay in [0, 1] (identity dynamics only).
        process_noise: float or ``Tensor[numel]`` (see :func:`process_noise`); noise dynamics only.
        prior_precision: isotropic precision of the initial prior (>= 0); > 0 makes every
            ``Lambda_t`` invertible (needed for smoothed precisions).
        curvature_scale: factor on each fitted curvature (> 0).
        max_rank: diag_lowrank only: after each update keep the top ``max_rank`` eigenpairs of the
            low-rank part and move the rest's diagonal into ``D`` (explicit approximation; None
            keeps the exact, growing rank).
        fit_options: extra ``fit_curvature`` options (``terms``, ``rank``, ``mc_samples``, ``seed``,
            ``factor_dtype``, ...).
        lora: the registry (built from ``model`` if None).
    """

    def __init__(self, model: nn.Module, structure: str = "diag", kind: str = "empirical", *,
                 dynamics: str = "identity", gamma: float = 1.0, process_noise: float | Tensor = 0.0,
                 prior_precision: float = 0.0, curvature_scale: float = 1.0, max_rank: int | None = None,
                 fit_options: Mapping[str, Any] | None = None, lora: LoRAParams | None = None):
        if structure not in TASK_STRUCTURES:
            raise ValueError(f"unknown structure {structure!r}; choose one of {TASK_STRUCTURES}")
        if dynamics not in DYNAMICS:
            raise ValueError(f"unknown dynamics {dynamics!r}; choose one of {DYNAMICS}")
        if dynamics == "noise" and structure not in NOISE_STRUCTURES:
            raise NotImplementedError(
                f"dynamics='noise' needs a closed-form predict step every task, which {structure!r} lacks: the "
                "filtered precision becomes a sum of Kronecker terms (or a tridiag block) with no common "
                "eigenbasis (see lalora_curv.continual). Use dynamics='identity' (exact online accumulation), "
                f"or one of {NOISE_STRUCTURES}")
        gamma = float(gamma)
        if not (0 <= gamma <= 1):
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        if dynamics == "noise" and gamma != 1.0:
            raise ValueError("gamma applies to dynamics='identity'; with 'noise' forgetting comes from process_noise")
        if max_rank is not None and (structure != "diag_lowrank" or int(max_rank) < 1):
            raise ValueError("max_rank (>= 1) applies to structure='diag_lowrank' only")
        self.model = model
        self.lora = lora if lora is not None else LoRAParams.from_model(model)
        self.structure, self.kind, self.dynamics = structure, kind, dynamics
        self.gamma = gamma
        self.prior_precision = _check_noise_value(prior_precision, "prior_precision")
        self.curvature_scale = float(curvature_scale)
        if not (math.isfinite(self.curvature_scale) and self.curvature_scale > 0):
            raise ValueError(f"curvature_scale must be finite and > 0, got {curvature_scale}")
        self.max_rank = None if max_rank is None else int(max_rank)
        # dtypes as strings: fit_curvature accepts them, JSON stores them, load round-trips them
        self.fit_options = {k: (str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v)
                            for k, v in dict(fit_options or {}).items()}
        q_dtype = torch.promote_types(self.lora.params[0].dtype, torch.float32)
        if isinstance(process_noise, Tensor):
            q = process_noise.detach().to(device=self.lora.device, dtype=q_dtype).clone()
            if q.shape != (self.lora.numel,):
                raise ValueError(f"process_noise has shape {tuple(q.shape)}, expected ({self.lora.numel},)")
        else:
            q = torch.full((self.lora.numel,), _check_noise_value(process_noise, "process_noise"), dtype=q_dtype,
                           device=self.lora.device)
        if not torch.isfinite(q).all() or (q < 0).any():
            raise ValueError("process_noise must be finite and >= 0")
        if dynamics == "identity" and bool((q != 0).any()):
            raise ValueError("process_noise applies to dynamics='noise'; identity dynamics forget through gamma")
        self.process_noise = q
        self.tasks: list[TaskRecord] = []

    # ------------------------------------------------------------------ filtering
    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def predicted_precision(self) -> tuple[CurvatureOperator | None, float]:
        """The prior of the next task as ``(operator, isotropic)``: precision ``op + iso * I``.

        Before any task: ``(None, prior_precision)``.
        """
        if not self.tasks:
            return None, self.prior_precision
        last = self.tasks[-1]
        if self.dynamics == "identity":
            return self.gamma * last.precision, self.gamma * last.isotropic
        return predict(with_isotropic(last.precision, last.isotropic), self.process_noise), 0.0

    def prior_penalty(self, strength: float) -> nn.Module | None:
        """``LaplacePenalty`` of the prior for the next task: anchor = the previous task's adapter,
        precision = the predicted precision (its isotropic part as ``prior_precision``).
        None before the first task (nothing to remember yet)."""
        from .penalties import LaplacePenalty

        op, iso = self.predicted_precision()
        if op is None:
            return None
        return LaplacePenalty(op, anchor=self.tasks[-1].mean, strength=strength, lora=self.lora, prior_precision=iso)

    def fit_task(self, proxy_batches: Iterable[Any], *, name: str | None = None, progress: bool = False) -> TaskRecord:
        """After training a task: fit its curvature at the current adapter on ``proxy_batches`` and
        apply the filtering update (:meth:`add_task`)."""
        from .curvature.fit import fit_curvature

        curv = fit_curvature(self.model, proxy_batches, structure=self.structure, kind=self.kind, lora=self.lora,
                             progress=progress, **self.fit_options)
        return self.add_task(curv, name=name)

    def add_task(self, curvature: CurvatureOperator, *, mean: Tensor | Mapping[str, Tensor] | None = None,
                 name: str | None = None) -> TaskRecord:
        """Filtering update with a given curvature: ``Lambda_t = prior + curvature_scale * curvature``,
        ``m_t = mean`` (default: the model's current adapter)."""
        if curvature.structure != self.structure:
            raise CurvatureMismatchError(f"this sequence holds {self.structure!r} precisions, got a "
                                         f"{curvature.structure!r} curvature")
        validate_signature(curvature.signature, self.lora, what="curvature")
        curvature = curvature.to(self.lora.device) if curvature.device != self.lora.device else curvature
        if self.curvature_scale != 1.0:
            curvature = self.curvature_scale * curvature
        mean = self.lora.flatten() if mean is None else self.lora.as_flat(mean)
        mean = mean.detach().clone()
        prior, iso = self.predicted_precision()
        precision = curvature if prior is None else prior + curvature
        if self.dynamics == "noise":
            precision, iso = with_isotropic(precision, iso), 0.0
        if self.max_rank is not None and precision.rank > self.max_rank:
            precision = precision.truncated(self.max_rank)
        record = TaskRecord(name=name if name is not None else f"task{len(self.tasks)}", mean=mean,
                            precision=precision, isotropic=float(iso), info={"curvature": curvature.info})
        self.tasks.append(record)
        return record

    # ------------------------------------------------------------------ smoothing
    def smoothed(self) -> SmoothingResult:
        """Flat smoothed means (and precisions where cheap), one per task (module docstring)."""
        means = [t.mean for t in self.tasks]
        if self.dynamics == "identity":
            return SmoothingResult(decay_smooth(means, self.gamma), None)
        precisions = [with_isotropic(t.precision, t.isotropic) for t in self.tasks]
        return rts_smooth(means, precisions, self.process_noise)

    def smooth(self) -> list[dict[str, Tensor]]:
        """Per-task smoothed adapters, dicts ``name -> tensor`` (load one with :meth:`set_adapter`)."""
        return [{k: v.clone() for k, v in self.lora.unflatten(m).items()} for m in self.smoothed().means]

    def set_adapter(self, tensors: Mapping[str, Tensor] | Tensor) -> None:
        """Copy an adapter (dict or flat vector, e.g. a smoothed one) into the model's LoRA weights."""
        flat = self.lora.as_flat(tensors)
        with torch.no_grad():
            for p, v in zip(self.lora.params, self.lora.unflatten(flat).values()):
                p.copy_(v)

    # ------------------------------------------------------------------ io
    def _config(self) -> dict:
        return {"structure": self.structure, "kind": self.kind, "dynamics": self.dynamics, "gamma": self.gamma,
                "prior_precision": self.prior_precision, "curvature_scale": self.curvature_scale,
                "max_rank": self.max_rank, "fit_options": self.fit_options}

    def save(self, path) -> None:
        """Write the sequence to one safetensors file (atomic): tensors ``process_noise``,
        ``task{t}.mean``, ``task{t}.precision.<key>`` (each operator's state tensors) and, under the
        metadata key ``lalora_curv.task_sequence``, JSON with the configuration, the LoRA registry
        signature and per task its name, isotropic part, info and the operator's structure/meta."""
        tensors: dict[str, Tensor] = {"process_noise": self.process_noise}
        tasks_meta = []
        for t, rec in enumerate(self.tasks):
            tensors[f"task{t}.mean"] = rec.mean
            for key, val in rec.precision.state_tensors().items():
                tensors[f"task{t}.precision.{key}"] = val
            common = rec.precision._common() | {"num_params": rec.precision.num_params}
            common.pop("signature", None)  # stored once, below
            tasks_meta.append({"name": rec.name, "isotropic": rec.isotropic, "info": rec.info,
                               "precision": {"structure": rec.precision.structure, "common": common,
                                             "meta": rec.precision.state_meta()}})
        meta = {"format": SEQUENCE_FORMAT, "config": self._config(), "signature": self.lora.signature(),
                "tasks": tasks_meta}
        write_safetensors_atomic(tensors, path, {SEQUENCE_META_KEY: json.dumps(meta)})

    @classmethod
    def load(cls, path, model: nn.Module, *, structure: str | None = None,
             lora: LoRAParams | None = None) -> "TaskSequence":
        """Read a sequence saved with :meth:`save` for ``model``.

        Raises :class:`~lalora_curv.CurvatureFileError` (missing / corrupted / not a task sequence
        file / inconsistent state) or :class:`~lalora_curv.CurvatureMismatchError` (saved for another
        LoRA registry: adapter, names, shapes; or ``structure`` given and different).
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise CurvatureFileError(f"task sequence file not found: {path}")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors' own error types for corrupt files
            raise CurvatureFileError(f"{path} is not a valid safetensors file: {exc}") from None
        if SEQUENCE_META_KEY not in header:
            what = "a curvature file" if "lalora_curv" in header else "not a lalora_curv file"
            raise CurvatureFileError(f"{path} is not a TaskSequence file ({what}); use load_curvature for curvatures")
        try:
            meta = json.loads(header[SEQUENCE_META_KEY])
        except json.JSONDecodeError as exc:
            raise CurvatureFileError(f"{path}: corrupted task sequence metadata ({exc})") from None
        if meta.get("format") != SEQUENCE_FORMAT:
            raise CurvatureFileError(f"{path}: unsupported task sequence format {meta.get('format')!r}")
        config = meta["config"]
        if structure is not None and structure != config["structure"]:
            raise CurvatureMismatchError(
                f"{path} holds a {config['structure']!r} task sequence, expected {structure!r}")
        lora = lora if lora is not None else LoRAParams.from_model(model)
        validate_signature(meta["signature"], lora, what="task sequence")
        device = lora.device
        seq = cls(model, config["structure"], config["kind"], dynamics=config["dynamics"], gamma=config["gamma"],
                  process_noise=tensors["process_noise"].to(device), prior_precision=config["prior_precision"],
                  curvature_scale=config["curvature_scale"], max_rank=config["max_rank"],
                  fit_options=config["fit_options"], lora=lora)
        seq.process_noise = tensors["process_noise"].to(device)  # keep the stored dtype bit for bit
        for t, spec in enumerate(meta["tasks"]):
            prefix = f"task{t}.precision."
            state = {k[len(prefix):]: v.to(device) for k, v in tensors.items() if k.startswith(prefix)}
            pspec = spec["precision"]
            op_cls = CurvatureOperator.registry.get(pspec["structure"])
            if op_cls is None:
                raise CurvatureFileError(f"{path}: task {t} has an unknown precision structure {pspec['structure']!r}")
            try:
                op = op_cls.from_state(state, pspec["meta"], dict(pspec["common"]) | {"signature": meta["signature"]})
                mean = tensors[f"task{t}.mean"].to(device)
            except (KeyError, ValueError, TypeError) as exc:
                raise CurvatureFileError(f"{path}: inconsistent state of task {t} ({exc})") from None
            if op.num_params != lora.numel or mean.shape != (lora.numel,):
                raise CurvatureFileError(f"{path}: task {t} has {op.num_params} precision / {tuple(mean.shape)} mean "
                                         f"entries, the registry has {lora.numel} parameters")
            seq.tasks.append(TaskRecord(name=spec["name"], mean=mean, precision=op, isotropic=spec["isotropic"],
                                        info=spec["info"]))
        return seq

    def __repr__(self) -> str:
        return (f"TaskSequence(structure={self.structure!r}, kind={self.kind!r}, dynamics={self.dynamics!r}, "
                f"tasks={self.num_tasks}, numel={self.lora.numel})")
