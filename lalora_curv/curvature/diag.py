"""Diagonal curvature."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import CurvatureOperator, merged_common
from .statistics import GradientSums

__all__ = ["DiagCurvature", "DiagAccumulator"]


class DiagCurvature(CurvatureOperator):
    """``P = diag(d)`` with ``d: Tensor[num_params]`` (>= 0)."""

    structure = "diag"
    fit_options = frozenset({"terms"})

    @classmethod
    def accumulator(cls, lora, *, dtype) -> DiagAccumulator:
        return DiagAccumulator(lora.numel, dtype, lora.device)

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
            return DiagCurvature(self.diag + other.diag, **merged_common(self, other))
        return None

    def _add_same_reflected(self, other):
        return self._add_same(other)

    # -- interop: scipy, curvlinops, trace, logdet --
    def trace(self) -> Tensor:
        return self.diag.sum()

    def _logdet(self, prior_precision, max_dense):
        return torch.log(self.diag.to(torch.float64).clamp_min(0) + prior_precision).sum()

    # -- continual: filtering and smoothing (lalora_curv.continual) --
    # all elementwise: a diagonal precision stays diagonal under identity dynamics with diagonal noise
    filtering_closed = True

    def _with_isotropic(self, value):
        return DiagCurvature(self.diag + value, **self._common())

    def _predict(self, q):
        return DiagCurvature(self.diag / (1 + q * self.diag), **self._common())

    def _smoothing_gain(self, q):
        gain = 1 / (1 + q * self.diag)
        return lambda v: gain * v.to(gain.dtype)

    def _smoothed_precision(self, next_smoothed, q):
        predicted = self.diag / (1 + q * self.diag)
        later = next_smoothed.diag - predicted  # information of the later tasks (>= 0 up to rounding)
        return DiagCurvature(self.diag + later / (1 + q * later), **self._common())


class DiagAccumulator(GradientSums):
    """``diag(P) = (1/M) sum_rows rows^2``."""

    def finalize(self, common: dict) -> DiagCurvature:
        scale = self.scale()
        common["info"]["num_terms"] = self.num_terms
        return DiagCurvature(self.sq_sum * scale, **common)
