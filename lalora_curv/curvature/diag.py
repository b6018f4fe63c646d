"""Diagonal curvature."""

from __future__ import annotations

from torch import Tensor

from .base import CurvatureOperator
from .dense import _merged_common

__all__ = ["DiagCurvature"]


class DiagCurvature(CurvatureOperator):
    """``P = diag(d)`` with ``d: Tensor[num_params]`` (>= 0)."""

    structure = "diag"

    def __init__(self, diag: Tensor, **common):
        if diag.ndim != 1:
            raise ValueError(f"diag curvature needs a vector, got shape {tuple(diag.shape)}")
        common.pop("num_params", None)
        super().__init__(diag.numel(), **common)
        self.diag = diag

    def _matmat(self, X: Tensor) -> Tensor:
        return self.diag[:, None] * X

    def quadratic_form(self, delta, lora=None) -> Tensor:
        delta = self._check_vector(self._flat_delta(delta, lora), "delta")
        return (self.diag * delta * delta).sum()

    def diagonal(self) -> Tensor:
        return self.diag.clone()

    def solve(self, v: Tensor, damping: float | None = None) -> Tensor:
        damping = self.damping if damping is None else damping
        v = self._check_vector(v)
        denom = self.diag + damping
        if (denom <= 0).any():
            raise ZeroDivisionError("diag curvature has zero entries: pass damping > 0 to solve")
        return v / (denom if v.ndim == 1 else denom[:, None])

    def state_tensors(self):
        return {"diag": self.diag}

    def psd_parts(self):
        return [self.diag], []

    @classmethod
    def from_state(cls, tensors, meta, common):
        return cls(tensors["diag"], **common)

    def _scaled(self, alpha):
        return DiagCurvature(alpha * self.diag, **self._common())

    def _add_same(self, other):
        if isinstance(other, DiagCurvature):
            return DiagCurvature(self.diag + other.diag, **_merged_common(self, other))
        from .lowrank import LowRankCurvature

        if isinstance(other, LowRankCurvature):  # diag + U C U^T is diag_lowrank, exactly
            from .diag_lowrank import DiagLowRankCurvature

            return DiagLowRankCurvature(self.diag, other.U, other.C, **_merged_common(self, other))
        return None

    def _add_same_reflected(self, other):
        return self._add_same(other)
