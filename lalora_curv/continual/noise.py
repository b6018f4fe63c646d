"""Process noise of the per-task random walk ``theta_{t+1} = theta_t + w_t``, ``w_t ~ N(0, diag(q))``."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping

import torch
from torch import Tensor

from ..params import LoRAParams

__all__ = ["process_noise"]


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
    step stays exact (:mod:`lalora_curv.curvature.eigen_kfac`).
    """
    q = torch.full((lora.numel,), check_noise_value(value, "value"), dtype=dtype, device=lora.device)
    views = lora.unflatten(q)
    for pattern, val in (per_layer or {}).items():
        val = check_noise_value(val, f"per_layer[{pattern!r}]")
        hits = [layer for layer in lora.layers if fnmatch.fnmatchcase(layer.name, pattern)]
        if not hits:
            raise KeyError(f"per_layer pattern {pattern!r} matches no LoRA layer; layers are e.g. "
                           f"{[l.name for l in lora.layers[:3]]}")
        for layer in hits:
            views[layer.A_name].fill_(val)
            views[layer.B_name].fill_(val)
    for pattern, val in (per_matrix or {}).items():
        val = check_noise_value(val, f"per_matrix[{pattern!r}]")
        hits = [n for n in lora.names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise KeyError(f"per_matrix pattern {pattern!r} matches no LoRA parameter; names are e.g. "
                           f"{lora.names[:2]}")
        for n in hits:
            views[n].fill_(val)
    return q


def check_noise_value(value, what: str) -> float:
    """``value`` as a float, refused unless finite and >= 0 (``what`` names it in the error)."""
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"process noise {what} must be a finite number >= 0, got {value}")
    return value


def transition_noises(Q, num_tasks: int) -> list:
    """One process noise per transition ``t -> t+1``: ``Q`` repeated, or a list of ``num_tasks - 1``."""
    if isinstance(Q, (list, tuple)):
        if len(Q) != num_tasks - 1:
            raise ValueError(f"{num_tasks} tasks need {num_tasks - 1} process noises (one per transition), "
                             f"got {len(Q)}")
        return list(Q)
    return [Q] * max(num_tasks - 1, 0)
