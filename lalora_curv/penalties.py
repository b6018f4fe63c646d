"""Differentiable penalties: LaLoRA / EWC-style Laplace penalty and the L2 baseline.

``LaplacePenalty()`` returns ``strength/2 * [(theta - theta0)^T P (theta - theta0)
+ prior_precision * ||theta - theta0||^2]`` over the LoRA parameters, computed in the curvature's
dtype (fp32 by default) with autocast disabled, never forming Kronecker products or dense
matrices (each structure's ``quadratic_form``). A curvature over the Delta-W space
(``curv.space == "delta_w"``: ``kfac_delta_w``, its scalings and sums) acts on
``Delta W_l = s_l B_l A_l - s0_l B0_l A0_l`` (quartic in ``(A, B)``; ``s_l`` the live LoRA
scaling, ``s0_l`` the scaling stored with the anchor), the prior term stays on theta.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .curvature.base import CurvatureOperator
from .curvature.io import validate_signature
from .params import LoRAParams, full_tensor

__all__ = ["LaplacePenalty", "L2Penalty"]


def _check_strength(value: float, name: str = "strength") -> float:
    """A finite real number >= 0 (int, float, numpy scalar; not a bool, a string or a tensor)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        hint = " (use .item() for a one-element tensor)" if isinstance(value, Tensor) else ""
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r:.40}{hint}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def _kronecker_blocks(op: CurvatureOperator) -> list[tuple[Tensor, Tensor]] | None:
    """``[(G_b, X_b)]`` per block, in flat order, for an operator that exposes its Kronecker blocks
    (``blocks`` with ``grad``/``inp`` indices into ``grad_factors``/``input_factors``, as K-FAC
    does); None for any other operator."""
    blocks = getattr(op, "blocks", None)
    grads, inputs = getattr(op, "grad_factors", None), getattr(op, "input_factors", None)
    if blocks is None or grads is None or inputs is None:
        return None
    return [(grads[b["grad"]], inputs[b["inp"]]) for b in blocks]


def _sum_terms(op: CurvatureOperator) -> list[CurvatureOperator]:
    """The terms of an exact sum operator (it exposes ``terms``), or ``[op]``."""
    terms = getattr(op, "terms", None)
    return list(terms) if isinstance(terms, (list, tuple)) else [op]


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

    For a curvature over the Delta-W space (``curv.space == "delta_w"``) the quadratic is
    ``dW^T P dW`` with ``dW_l = s_l B_l A_l - s0_l B0_l A0_l`` per layer (module docstring).

    Args:
        curv: a fitted :class:`CurvatureOperator` (any structure, sums and scalings included); it
            is moved to the LoRA parameters' device once, here.
        anchor: ``theta0``, a dict ``name -> tensor`` (``lora.snapshot()``) or a flat vector.
        strength: ``lambda`` (>= 0); can be changed later via ``pen.strength = ...``.
        lora: the registry of the model being trained (validated against the curvature's).
        prior_precision: isotropic precision added to ``P`` (>= 0), so that directions of zero
            curvature (e.g. the LoRA ``A`` blocks of K-FAC fitted at ``B = 0``) are still anchored;
            can be changed later via ``pen.prior_precision = ...`` (validated like ``strength``).
        anchor_scaling: Delta-W space only: the LoRA scaling ``s0_l`` of each layer (``lora.layers``
            order) when the anchor was taken; default: the layers' live scalings now, when the
            penalty is built. Stored with the anchor (a buffer): a later ``set_scale`` changes the
            scaling of the current ``Delta W`` only.
    """

    def __init__(self, curv: CurvatureOperator, anchor, strength: float, lora: LoRAParams,
                 prior_precision: float = 0.0, anchor_scaling: Sequence[float] | None = None):
        if not isinstance(curv, CurvatureOperator):
            raise TypeError(f"curv must be a CurvatureOperator, got {type(curv).__name__}")
        validate_signature(curv.signature, lora, what="curvature")
        super().__init__(anchor, strength, lora, dtype=curv.dtype)
        sizes = {"theta": lora.numel, "delta_w": sum(layer.d_out * layer.d_in for layer in lora.layers)}
        if curv.space not in sizes:
            raise ValueError(f"curvature space {curv.space!r} is unknown; a penalty needs 'theta' or 'delta_w'")
        self.delta_w = curv.space == "delta_w"
        if curv.num_params != sizes[curv.space]:
            raise ValueError(
                f"this {curv.structure} curvature acts on the {curv.space!r} space with {curv.num_params} "
                f"coordinates, but the LoRA registry's {curv.space!r} space has {sizes[curv.space]} "
                f"(theta: {sizes['theta']}, delta_w: {sizes['delta_w']}); spaces never mix, even when sizes match")
        self.curv = curv.to(lora.device) if curv.device != lora.device else curv
        self.prior_precision = prior_precision
        if self.delta_w:
            self.register_buffer("anchor_scaling", self._anchor_scaling(anchor_scaling))
        elif anchor_scaling is not None:
            raise ValueError("anchor_scaling applies to Delta-W curvatures only (theta-space penalties do not "
                             "involve the LoRA scaling)")

    def _anchor_scaling(self, given: Sequence[float] | None) -> Tensor:
        layers = self.lora.layers
        values = [layer.scaling for layer in layers] if given is None else list(given)
        if len(values) != len(layers):
            raise ValueError(f"anchor_scaling has {len(values)} entries, the LoRA registry has {len(layers)} layers")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(f"anchor_scaling entries must be finite real numbers, got {v!r}")
        return torch.tensor([float(v) for v in values], dtype=self.anchor_flat.dtype, device=self.anchor_flat.device)

    @property
    def prior_precision(self) -> float:
        return self._prior_precision

    @prior_precision.setter
    def prior_precision(self, value: float) -> None:
        self._prior_precision = _check_strength(value, "prior_precision")

    def _apply(self, fn, *args, **kwargs):
        # nn.Module.to()/cuda()/double() move buffers; the curvature is not a module: move it alike
        result = super()._apply(fn, *args, **kwargs)
        probe = fn(torch.zeros((), dtype=self.curv.dtype, device=self.curv.device))
        if probe.device != self.curv.device or probe.dtype != self.curv.dtype:
            self.curv = self.curv.to(probe.device, dtype=probe.dtype)
        return result

    def _delta_w_low_rank_factors(self) -> list[tuple[Tensor, Tensor]]:
        """Per layer ``(L, R)`` with ``dW = s B A - s0 B0 A0 = L R^T``: ``L = [s B, -s0 B0]``
        (``d_out x 2r``), ``R = [A^T, A0^T]`` (``d_in x 2r``); ``s`` live, ``s0`` stored."""
        self.lora.check_live()
        anchor = self.lora.split_layers(self.anchor_flat)
        dtype = self.anchor_flat.dtype
        factors = []
        for layer, (A0, B0), s0 in zip(self.lora.layers, anchor, self.anchor_scaling):
            # full_tensor: under FSDP2 A and B are sharded DTensors; the quadratic needs the full matrices
            L = torch.cat([layer.scaling * full_tensor(layer.B).to(dtype), -s0 * B0], dim=1)
            R = torch.cat([full_tensor(layer.A).to(dtype), A0], dim=0).T
            factors.append((L, R))
        return factors

    def _delta_w_flat(self) -> Tensor:
        """``dW`` of every layer flattened row-major (``Tensor[sum d_out*d_in]``)."""
        return torch.cat([(L @ R.T).reshape(-1) for L, R in self._delta_w_low_rank_factors()])

    def _delta_w_quadratic(self) -> Tensor:
        """``dW^T P dW``. Each term of the curvature (one, or the terms of a sum) that exposes its
        Kronecker blocks ``G_l (x) X_l`` (one per layer) contributes
        ``sum_l tr(dW_l^T G_l dW_l X_l) = sum_l sum((L^T G_l L) * (R^T X_l R))`` without forming
        ``dW_l`` (``O(d^2 r)`` per layer instead of ``O(d^3)``; exact); any other term is evaluated
        on the flat ``dW`` with its ``quadratic_form``."""
        factors = self._delta_w_low_rank_factors()
        total = self.anchor_flat.new_zeros(())
        flat_terms = []
        for term in _sum_terms(self.curv):
            blocks = _kronecker_blocks(term)
            if blocks is None or len(blocks) != len(factors) or any(
                    G.shape[0] != L.shape[0] or X.shape[0] != R.shape[0] for (G, X), (L, R) in zip(blocks, factors)):
                flat_terms.append(term)
                continue
            for (G, X), (L, R) in zip(blocks, factors):
                total = total + ((L.T @ G @ L) * (R.T @ X @ R)).sum()
        if flat_terms:
            dw = torch.cat([(L @ R.T).reshape(-1) for L, R in factors])
            for term in flat_terms:
                total = total + term.quadratic_form(dw)
        return total

    def quadratic(self) -> Tensor:
        """``(theta - theta0)^T P (theta - theta0)`` (or its Delta-W form), without strength or prior."""
        with torch.autocast(device_type=self.anchor_flat.device.type, enabled=False):
            if self.delta_w:
                return self._delta_w_quadratic()
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
