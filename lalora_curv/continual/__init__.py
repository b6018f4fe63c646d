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
  ``Lambda_t^s = Lambda_t + pred(Lambda_{t+1}^s - pred(Lambda_t))`` (precision form)  (:func:`rts_smooth`)

Layout: :mod:`.noise` (process noise), :mod:`.filtering` (accumulate / predict / with_isotropic),
:mod:`.smoothing` (RTS, decay smoothing), :mod:`.sequence` (``TaskSequence``, save/load). The
closed forms belong to the structures: each curvature class implements the continual operations
it has (``CurvatureOperator.predict`` / ``with_isotropic`` / ``smoothing_gain`` /
``smoothed_precision``); ``CurvatureOperator.structures_supporting(operation)`` lists them, and the
others refuse by name. Which forms are exact (tested against dense linear algebra in
tests/continual/):

* ``diag``: all closed form (``d / (1 + q d)``; gain ``1 / (1 + q lambda)``).
* ``diag_lowrank`` ``D + U C U^T``: the predict step is **exact with the rank unchanged**:
  with ``e = 1 + q*d`` (elementwise), ``K = U^T diag(q / e) U`` (``k x k``)::

      (Lambda^{-1} + Q)^{-1} = diag(d / e) + V C' V^T,   V = diag(1/e) U,   C' = (C^{-1} + K)^{-1} = C (I + K C)^{-1}

  (derivation: Woodbury on ``Lambda^{-1}``, add ``Q`` to its diagonal part, Woodbury again; the
  ``D^{-1}`` terms cancel, so it also holds for ``d_i = 0`` and singular ``C``). The smoothing
  gain is applied with Woodbury in ``O(p k^2)``:
  ``J v = v/e - (q/e) * U C (I + K C)^{-1} U^T (v/e)``. Smoothed *means* are exact; smoothed
  precisions are not diag+low-rank and are not returned. ``lowrank`` is the case ``D = 0``.
* ``dense``: ``(Lambda^{-1} + Q)^{-1} = Lambda - Lambda S (I + S Lambda S)^{-1} S Lambda`` with
  ``S = Q^{1/2}`` (no inverse of ``Lambda`` needed); smoothed precisions in precision form.
* ``kfac``: a block ``G (x) A = (Q_G (x) Q_A) diag(lambda_g (x) lambda_a) (Q_G (x) Q_A)^T`` with
  a process noise that is **constant on the block** (scalar, per-layer or per-matrix ``Q``):
  ``((G (x) A)^{-1} + q I)^{-1}`` is exact in the Kronecker eigenbasis with eigenvalues
  ``lambda / (1 + q lambda)`` — not a Kronecker product, but an :class:`EigenKFACCurvature`
  (:mod:`lalora_curv.curvature.eigen_kfac`). A ``Q`` that varies within a block is refused unless
  ``kfac_noise="eigenbasis_diagonal"`` (a measured approximation).
* ``kfac_tridiag`` and sums of Kronecker terms: no structured closed form (a tridiag layer block
  is a principal submatrix of ``U (x) V``, not a Kronecker product; a sum of Kronecker products has
  no common eigenbasis). :func:`predict` raises ``NotImplementedError`` unless
  ``dense_fallback=True`` (exact, small models only); :class:`TaskSequence` supports them with
  ``dynamics="identity"`` (online accumulation, exact sums).
* ``kfac_delta_w`` acts on the Delta-W space (``curv.space == "delta_w"``): refused by every
  continual operation.
"""

from __future__ import annotations

from ..curvature.eigen_kfac import KFAC_NOISE, EigenKFACCurvature
from .filtering import accumulate, predict, with_isotropic
from .noise import process_noise
from .sequence import (
    DYNAMICS,
    NOISE_STRUCTURES,
    SEQUENCE_FORMAT,
    SEQUENCE_META_KEY,
    TASK_STRUCTURES,
    TRUNCATABLE_STRUCTURES,
    TaskRecord,
    TaskSequence,
)
from .smoothing import SmoothingResult, decay_smooth, rts_smooth, smoothing_gain

__all__ = ["accumulate", "predict", "process_noise", "with_isotropic", "smoothing_gain", "rts_smooth",
           "decay_smooth", "SmoothingResult", "EigenKFACCurvature", "TaskSequence", "TaskRecord",
           "TASK_STRUCTURES", "NOISE_STRUCTURES", "TRUNCATABLE_STRUCTURES", "DYNAMICS", "KFAC_NOISE",
           "SEQUENCE_META_KEY", "SEQUENCE_FORMAT"]
