"""Exact dense curvature: the reference structure for small models."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import DEFAULT_MAX_DENSE, CurvatureOperator, DenseTooLargeError, merged_common
from .interop import logdet_psd_dense
from .statistics import GradientSums

__all__ = ["DenseCurvature", "DenseAccumulator"]


class DenseCurvature(CurvatureOperator):
    """``P`` stored as a symmetric ``Tensor[num_params, num_params]``."""

    structure = "dense"
    fit_options = frozenset({"terms", "max_dense"})

    @classmethod
    def accumulator(cls, lora, *, dtype, max_dense: int = DEFAULT_MAX_DENSE) -> DenseAccumulator:
        cls.check_size(lora.numel, int(max_dense))
        return DenseAccumulator(lora.numel, dtype, lora.device, keep_outer=True)

    def __init__(self, matrix: Tensor, **common):
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"dense curvature needs a square matrix, got shape {tuple(matrix.shape)}")
        common.pop("num_params", None)
        super().__init__(matrix.shape[0], **common)
        self.matrix = matrix

    @staticmethod
    def check_size(num_params: int, max_params: int = DEFAULT_MAX_DENSE) -> None:
        if num_params > max_params:
            raise DenseTooLargeError(
                f"structure='dense' refused: {num_params} LoRA parameters > max_dense={max_params} "
                f"({num_params ** 2 * 4 / 1e9:.1f} GB in fp32); use diag/kfac/lowrank, or pass max_dense="
            )

    def _matmat(self, X: Tensor) -> Tensor:
        return self.matrix @ X

    def diagonal(self) -> Tensor:
        return self.matrix.diagonal().clone()

    def to_dense(self, max_params: int = DEFAULT_MAX_DENSE) -> Tensor:
        return self.matrix.clone()

    def solve(self, v: Tensor, damping: float | None = None) -> Tensor:
        damping = self.damping if damping is None else damping
        v = self._check_vector(v)
        eye = torch.eye(self.num_params, dtype=self.dtype, device=self.device)
        return torch.linalg.solve(self.matrix + damping * eye, v)

    def state_tensors(self):
        return {"matrix": self.matrix}

    def psd_parts(self):
        return [], [self.matrix]

    @classmethod
    def from_state(cls, tensors, meta, common):
        return cls(tensors["matrix"], **common)

    def _scaled(self, alpha):
        return DenseCurvature(alpha * self.matrix, **self._common())

    def _add_same(self, other):
        if isinstance(other, DenseCurvature):
            return DenseCurvature(self.matrix + other.matrix, **merged_common(self, other))
        return None

    # -- interop: scipy, curvlinops, trace, logdet --
    def _logdet(self, prior_precision, max_dense):
        return logdet_psd_dense(self.matrix, prior_precision)

    # -- continual: filtering and smoothing (lalora_curv.continual) --
    filtering_closed = True

    def _with_isotropic(self, value):
        return DenseCurvature(self.matrix + value * torch.eye(self.num_params, dtype=self.dtype, device=self.device),
                              **self._common())

    def _predict(self, q):
        # (P^{-1} + Q)^{-1} = P - P S (I + S P S)^{-1} S P with S = Q^{1/2}: no inverse of P (may be singular)
        s = q.sqrt()
        PS = self.matrix * s[None, :]
        inner = torch.eye(self.num_params, dtype=self.dtype, device=self.device) + s[:, None] * PS
        result = self.matrix - PS @ torch.linalg.solve(inner, PS.T)
        return DenseCurvature(0.5 * (result + result.T), **self._common())

    def _smoothing_gain(self, q):
        M = torch.eye(self.num_params, dtype=self.dtype, device=self.device) + q[:, None] * self.matrix
        return lambda v: torch.linalg.solve(M, v.to(M.dtype))

    def _smoothed_precision(self, next_smoothed, q):
        later = next_smoothed.matrix - self._predict(q).matrix  # information of the later tasks (PSD)
        carried = DenseCurvature(0.5 * (later + later.T), **self._common())._predict(q).matrix
        return DenseCurvature(self.matrix + carried, **self._common())


class DenseAccumulator(GradientSums):
    """``P = (1/M) sum_rows rows rows^T``, symmetrized."""

    def finalize(self, common: dict) -> DenseCurvature:
        M = self.outer * self.scale()
        common["info"]["num_terms"] = self.num_terms
        return DenseCurvature(0.5 * (M + M.T), **common)
