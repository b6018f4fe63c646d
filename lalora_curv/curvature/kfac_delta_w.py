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
from .statistics import KroneckerSums

__all__ = ["KFACDeltaWCurvature", "KFACDeltaWAccumulator"]


class KFACDeltaWCurvature(KFACCurvature):
    """Block-diagonal K-FAC over Delta-W; one block per adapted layer (see module docstring)."""

    structure = "kfac_delta_w"
    space = "delta_w"

    @classmethod
    def accumulator(cls, lora, *, dtype, share_inputs: bool = True) -> KFACDeltaWAccumulator:
        return KFACDeltaWAccumulator(lora, dtype, share_inputs=share_inputs)


class KFACDeltaWAccumulator(KroneckerSums):
    """Base-layer factors from the LoRA statistics: the base layer's input is ``lora_A``'s input
    (``X = V_AA``) and the gradient w.r.t. the layer output is ``g_B / scaling``
    (``G = U_BB / scaling^2``, with the scaling at fit time, recorded in ``info``)."""

    def __init__(self, lora, dtype, *, share_inputs: bool = True):
        super().__init__(lora, dtype, cross=False, skip_zero_A=False)
        self.names = [layer.name for layer in lora.layers]
        self.scalings = [layer.scaling for layer in lora.layers]
        for name, s in zip(self.names, self.scalings):
            if s == 0:
                raise ValueError(f"{name}: LoRA scaling is 0, the Delta-W gradient factor is undefined")
        self.share_inputs = share_inputs

    def finalize(self, common: dict) -> KFACDeltaWCurvature:
        pairs = [(U[r:, r:] / s**2, V[:d_in, :d_in].clone(), name)
                 for (r, d_in, d_out, _, U, V), s, name in zip(self.nonzero_blocks(), self.scalings, self.names)]
        common["info"]["num_terms"] = self.num_terms
        common["info"]["scaling_at_fit"] = list(self.scalings)
        return KFACDeltaWCurvature.from_factor_pairs(pairs, share_inputs=self.share_inputs, **common)
