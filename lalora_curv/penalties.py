"""Differentiable penalties: LaLoRA / EWC-style Laplace penalty and the L2 baseline.

``LaplacePenalty()`` returns ``strength/2 * [(theta - theta0)^T P (theta - theta0)
+ prior_precision * ||theta - theta0||^2]`` over the LoRA parameters, computed in the curvature's
dtype (fp32 by default) with autocast disabled, never forming Kronecker products or dense
matrices (each structure's ``quadratic_form``). For ``kfac_delta_w`` the curvature acts on
``Delta W_l = s_l (B_l A_l - B0_l A0_l)`` (quartic in ``(A, B)``), the prior term stays on theta.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor, nn

from .curvature.base import CurvatureOperator
from .curvature.io import validate_signature
from .params import LoRAParams

__all__ = ["LaplacePenalty", "L2Penalty"]


def _check_strength(value: float, name: str = "strength") -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


class _AnchoredPenalty(nn.Module):
    """Shared part: the LoRA registry and the anchor ``theta0`` (a flat fp32 buffer)."""

    def __init__(self, anchor: Mapping[str, Tensor] | Tensor, strength: float, lora: LoRAParams,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if not isinstance(lora, LoRAParams):
            raise TypeError(f"lora must be a LoRAParams, got {type(lora).__name__}")
        if dtype is None:  # at least fp32 (bf16/fp16 models), float64 stays float64
            dtype = torch.promote_types(lora.params[0].dtype, torch.float32)
        self.lora = lora
        if isinstance(anchor, Mapping):
            unknown = sorted(set(anchor) - set(lora.names))
            if unknown:
                raise KeyError(f"anchor has tensors that are not LoRA parameters of this model: {unknown[:3]}")
        flat = lora.as_flat(anchor).detach().to(device=lora.device, dtype=dtype)
        if not torch.isfinite(flat).all():
            raise ValueError("anchor contains NaN/inf")
        self.register_buffer("anchor_flat", flat.clone())
        self.strength = strength

    @property
    def strength(self) -> float:
        return self._strength

    @strength.setter
    def strength(self, value: float) -> None:
        self._strength = _check_strength(value)

    def displacement(self) -> Tensor:
        """``theta - theta0`` as ``Tensor[numel]`` (differentiable w.r.t. the LoRA parameters)."""
        self.lora.check_live()
        return self.lora.flatten().to(self.anchor_flat.dtype) - self.anchor_flat

    def anchor(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self.lora.unflatten(self.anchor_flat).items()}


class LaplacePenalty(_AnchoredPenalty):
    """``strength/2 * (theta - theta0)^T (P + prior_precision I) (theta - theta0)``.

    Args:
        curv: a fitted :class:`CurvatureOperator` (any structure, sums included); it is moved to
            the LoRA parameters' device once, here.
        anchor: ``theta0``, a dict ``name -> tensor`` (``lora.snapshot()``) or a flat vector.
        strength: ``lambda`` (>= 0); can be changed later via ``pen.strength = ...``.
        lora: the registry of the model being trained (validated against the curvature's).
        prior_precision: isotropic precision added to ``P`` (>= 0), so that directions of zero
            curvature (e.g. the LoRA ``A`` blocks of K-FAC fitted at ``B = 0``) are still anchored.
    """

    def __init__(self, curv: CurvatureOperator, anchor, strength: float, lora: LoRAParams,
                 prior_precision: float = 0.0):
        if not isinstance(curv, CurvatureOperator):
            raise TypeError(f"curv must be a CurvatureOperator, got {type(curv).__name__}")
        validate_signature(curv.signature, lora, what="curvature")
        super().__init__(anchor, strength, lora, dtype=curv.dtype)
        self.delta_w = curv.structure == "kfac_delta_w"
        expected = sum(l.d_out * l.d_in for l in lora.layers) if self.delta_w else lora.numel
        if curv.num_params != expected:
            raise ValueError(f"curvature acts on {curv.num_params} coordinates, the LoRA registry needs {expected}")
        self.curv = curv.to(lora.device) if curv.device != lora.device else curv
        self.prior_precision = _check_strength(prior_precision, "prior_precision")

    def _apply(self, fn, *args, **kwargs):
        # nn.Module.to()/cuda()/double() move buffers; the curvature is not a module: move it alike
        result = super()._apply(fn, *args, **kwargs)
        probe = fn(torch.zeros((), dtype=self.curv.dtype, device=self.curv.device))
        if probe.device != self.curv.device or probe.dtype != self.curv.dtype:
            self.curv = self.curv.to(probe.device, dtype=probe.dtype)
        return result

    def _delta_w_flat(self) -> Tensor:
        self.lora.check_live()
        anchor = self.lora.split_layers(self.anchor_flat)
        parts = []
        dtype = self.anchor_flat.dtype
        for layer, (A0, B0) in zip(self.lora.layers, anchor):
            s = layer.scaling
            parts.append((s * (layer.B.to(dtype) @ layer.A.to(dtype) - B0 @ A0)).reshape(-1))
        return torch.cat(parts)

    def _delta_w_quadratic_low_rank(self) -> Tensor:
        """``sum_l vec(dW_l)^T (G_l (x) X_l) vec(dW_l)`` without forming ``dW_l`` (``d_out x d_in``).

        ``dW = s (B A - B0 A0) = L R^T`` with ``L = s [B, -B0]`` (``d_out x 2r``) and
        ``R = [A^T, A0^T]`` (``d_in x 2r``), so ``tr(dW^T G dW X) = sum((L^T G L) * (R^T X R))``:
        ``O(d^2 r)`` per layer instead of ``O(d^3)``. Exact.
        """
        self.lora.check_live()
        anchor = self.lora.split_layers(self.anchor_flat)
        dtype = self.anchor_flat.dtype
        total = self.anchor_flat.new_zeros(())
        for layer, (A0, B0), block in zip(self.lora.layers, anchor, self.curv.blocks):
            G = self.curv.grad_factors[block["grad"]]
            X = self.curv.input_factors[block["inp"]]
            L = layer.scaling * torch.cat([layer.B.to(dtype), -B0], dim=1)
            R = torch.cat([layer.A.to(dtype), A0], dim=0).T
            total = total + ((L.T @ G @ L) * (R.T @ X @ R)).sum()
        return total

    def quadratic(self) -> Tensor:
        """``(theta - theta0)^T P (theta - theta0)`` (or its Delta-W form), without strength or prior."""
        with torch.autocast(device_type=self.anchor_flat.device.type, enabled=False):
            if self.delta_w:
                from .curvature.kfac_delta_w import KFACDeltaWCurvature

                if isinstance(self.curv, KFACDeltaWCurvature):
                    return self._delta_w_quadratic_low_rank()
                return self.curv.quadratic_form(self._delta_w_flat())  # e.g. a sum of Delta-W operators
            return self.curv.quadratic_form(self.displacement())

    def forward(self) -> Tensor:
        with torch.autocast(device_type=self.anchor_flat.device.type, enabled=False):
            value = self.quadratic()
            if self.prior_precision:
                d = self.displacement()
                value = value + self.prior_precision * (d * d).sum()
            return 0.5 * self.strength * value

    def extra_repr(self) -> str:
        return (f"structure={self.curv.structure!r}, strength={self.strength}, "
                f"prior_precision={self.prior_precision}, num_params={self.curv.num_params}")


class L2Penalty(_AnchoredPenalty):
    """Baseline ``strength/2 * ||theta - theta0||^2`` over the LoRA parameters."""

    def forward(self) -> Tensor:
        with torch.autocast(device_type=self.anchor_flat.device.type, enabled=False):
            d = self.displacement()
            return 0.5 * self.strength * (d * d).sum()

    def extra_repr(self) -> str:
        return f"strength={self.strength}"
