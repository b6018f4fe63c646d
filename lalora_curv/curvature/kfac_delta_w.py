"""K-FAC of the frozen base layers, on the Delta-W space (our addition, not the LaLoRA paper's).

For each adapted layer, ``P_l = G_l (x) X_l`` with ``X_l = E[x x^T]`` (``d_in x d_in``, the base
layer's inputs, mean over attended positions) and ``G_l = E[g g^T]`` (``d_out x d_out``, the
gradient w.r.t. the layer's output, mean over terms). The operator acts on the flat Delta-W space:
per layer ``Delta W_l`` of shape ``(d_out, d_in)`` row-major, layers in ``lora.layers`` order, so
``num_params = sum_l d_out * d_in`` (not ``lora.numel``).

The LaLoRA penalty on ``Delta W = s (B A - B0 A0)`` is quartic in ``(A, B)``:
:class:`lalora_curv.penalties.LaplacePenalty` handles it as its own case. Unlike theta-space
K-FAC fitted at ``B = 0`` (whose A-blocks are zero), it anchors ``A`` as soon as ``B`` moves.
"""

from __future__ import annotations

from .kfac import KFACCurvature

__all__ = ["KFACDeltaWCurvature"]


class KFACDeltaWCurvature(KFACCurvature):
    """Block-diagonal K-FAC over Delta-W; one block per adapted layer (see module docstring)."""

    structure = "kfac_delta_w"
    space = "delta_w"
