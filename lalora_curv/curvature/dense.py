"""Exact dense curvature: the reference structure for small models."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import DEFAULT_MAX_DENSE, CurvatureOperator, DenseTooLargeError

__all__ = ["DenseCurvature"]


class DenseCurvature(CurvatureOperator):
    """``P`` stored as a symmetric ``Tensor[num_params, num_params]``."""

    structure = "dense"

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
            return DenseCurvature(self.matrix + other.matrix, **_merged_common(self, other))
        return None


def _merged_common(a: CurvatureOperator, b: CurvatureOperator) -> dict:
    """Common metadata of an exact sum ``a + b`` (kind and info of both recorded)."""
    kind = a.kind if a.kind == b.kind else "sum"
    info = {"sum_of": [a.info, b.info]}
    return dict(kind=kind, signature=a.signature or b.signature, info=info, damping=max(a.damping, b.damping))
