"""Block-tri-diagonal K-FAC ("B-Tri-KFAC" of the LaLoRA paper): couples each LoRA A with its B.

Per LoRA layer stack the output gradients ``u = [g_A; g_B]`` (``r + d_out``) and the inputs
``v = [x; A x]`` (``d_in + r``), and take ``U = E[u u^T]``, ``V = E[v v^T]`` (gradients: mean over
terms; inputs: mean over attended positions). The layer block is::

    [[U_AA (x) V_AA,  U_AB (x) V_AB],
     [U_BA (x) V_BA,  U_BB (x) V_BB]]

(row/column order: ``vec_r(A)`` then ``vec_r(B)``), a principal submatrix of ``U (x) V``, hence
symmetric PSD by construction. The diagonal blocks are exactly the ``kfac`` blocks, and at
``B = 0`` (``g_A = 0``) the whole block equals ``kfac``'s. No coupling across layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import CurvatureOperator, DenseTooLargeError
from .interop import logdet_psd_dense
from .kronecker import batch_to_rows, kron_diag, rows_to_batch
from .statistics import KroneckerSums

__all__ = ["KFACTridiagCurvature", "KFACTridiagAccumulator"]


class KFACTridiagCurvature(CurvatureOperator):
    """Per layer stacked factors ``U: (r+d_out)^2`` and ``V: (d_in+r)^2`` (see module docstring).

    ``shapes``: per layer ``(r, d_in, d_out)`` in ``lora.layers`` order.
    """

    structure = "kfac_tridiag"

    @classmethod
    def accumulator(cls, lora, *, dtype) -> KFACTridiagAccumulator:
        return KFACTridiagAccumulator(lora, dtype)

    def __init__(self, U: Sequence[Tensor], V: Sequence[Tensor], shapes: Sequence[Sequence[int]], **common):
        self.U, self.V = list(U), list(V)
        self.shapes = [tuple(int(x) for x in s) for s in shapes]
        for (r, d_in, d_out), Ul, Vl in zip(self.shapes, self.U, self.V, strict=True):
            if Ul.shape != (r + d_out, r + d_out) or Vl.shape != (d_in + r, d_in + r):
                raise ValueError(f"tridiag factor shapes {tuple(Ul.shape)}, {tuple(Vl.shape)} do not match "
                                 f"(r={r}, d_in={d_in}, d_out={d_out})")
        num_params = sum(r * d_in + d_out * r for r, d_in, d_out in self.shapes)
        common.pop("num_params", None)
        super().__init__(num_params, **common)

    def _iter_layers(self):
        offset = 0
        for (r, d_in, d_out), U, V in zip(self.shapes, self.U, self.V):
            nA, nB = r * d_in, d_out * r
            yield r, d_in, d_out, U, V, offset, offset + nA, offset + nA + nB
            offset += nA + nB

    def _matmat(self, X: Tensor) -> Tensor:
        out = torch.empty_like(X)
        for r, d_in, d_out, U, V, lo, mid, hi in self._iter_layers():
            XA = rows_to_batch(X[lo:mid], r, d_in)
            XB = rows_to_batch(X[mid:hi], d_out, r)
            U_AA, U_AB, U_BA, U_BB = U[:r, :r], U[:r, r:], U[r:, :r], U[r:, r:]
            V_AA, V_AB, V_BA, V_BB = V[:d_in, :d_in], V[:d_in, d_in:], V[d_in:, :d_in], V[d_in:, d_in:]
            # (U_xy (x) V_xy) vec_r(X) = vec_r(U_xy X V_xy^T)
            YA = U_AA @ XA @ V_AA.T + U_AB @ XB @ V_AB.T
            YB = U_BA @ XA @ V_BA.T + U_BB @ XB @ V_BB.T
            out[lo:mid] = batch_to_rows(YA)
            out[mid:hi] = batch_to_rows(YB)
        return out

    def diagonal(self) -> Tensor:
        parts = []
        for r, d_in, _d_out, U, V, *_ in self._iter_layers():
            parts.append(kron_diag(U[:r, :r], V[:d_in, :d_in]))
            parts.append(kron_diag(U[r:, r:], V[d_in:, d_in:]))
        return torch.cat(parts)

    def state_tensors(self):
        tensors = {f"U.{i}": U for i, U in enumerate(self.U)}
        tensors.update({f"V.{i}": V for i, V in enumerate(self.V)})
        return tensors

    def psd_parts(self):
        # each layer block is a principal submatrix of U (x) V (SEMANTICS §3)
        return [], self.U + self.V

    def state_meta(self):
        return {"shapes": [list(s) for s in self.shapes]}

    @classmethod
    def from_state(cls, tensors, meta, common):
        n = len(meta["shapes"])
        return cls([tensors[f"U.{i}"] for i in range(n)], [tensors[f"V.{i}"] for i in range(n)],
                   meta["shapes"], **common)

    def _scaled(self, alpha):
        return KFACTridiagCurvature([alpha * U for U in self.U], self.V, self.shapes, **self._common())

    # -- interop: scipy, curvlinops, trace, logdet --
    # trace: the diagonal blocks are U_AA (x) V_AA and U_BB (x) V_BB. logdet: a layer block is a
    # principal submatrix of U (x) V, with no closed-form spectrum: it is built dense per layer
    # (float64) if it has at most max_dense coordinates, else a named error.

    def trace(self) -> Tensor:
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for r, d_in, _d_out, U, V, *_ in self._iter_layers():
            total = total + U[:r, :r].trace() * V[:d_in, :d_in].trace() + U[r:, r:].trace() * V[d_in:, d_in:].trace()
        return total

    def layer_block(self, index: int) -> Tensor:
        """The dense block of layer ``index`` (``Tensor[r*d_in + d_out*r]^2``, rows ``vec_r(A)``
        then ``vec_r(B)``), in float64."""
        r, d_in, d_out = self.shapes[index]
        U, V = self.U[index].to(torch.float64), self.V[index].to(torch.float64)
        # torch.kron(X, Y) vec_r(Z) = vec_r(X Z Y^T): the row-major Kronecker order of this module
        top = torch.cat([torch.kron(U[:r, :r], V[:d_in, :d_in]), torch.kron(U[:r, r:], V[:d_in, d_in:])], 1)
        bottom = torch.cat([torch.kron(U[r:, :r], V[d_in:, :d_in]), torch.kron(U[r:, r:], V[d_in:, d_in:])], 1)
        return torch.cat([top, bottom], 0)

    def _logdet(self, prior_precision, max_dense):
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        names = self.signature.get("layers") or []
        for i, (r, d_in, d_out) in enumerate(self.shapes):
            size = r * d_in + d_out * r
            if size > max_dense:
                name = names[i] if i < len(names) else f"#{i}"
                raise DenseTooLargeError(
                    f"kfac_tridiag logdet: layer {name} has a {size} x {size} block (r={r}, d_in={d_in}, "
                    f"d_out={d_out}) with no closed-form spectrum, above max_dense={max_dense}; pass max_dense= "
                    "to build it")
            total = total + logdet_psd_dense(self.layer_block(i), prior_precision)
        return total

class KFACTridiagAccumulator(KroneckerSums):
    """The stacked factors themselves, cross blocks included (one weighting for all blocks, §3)."""

    requires = frozenset({"cross"})

    def __init__(self, lora, dtype):
        super().__init__(lora, dtype, cross=True, skip_zero_A=False)

    def finalize(self, common: dict) -> KFACTridiagCurvature:
        U, V = self.factors()
        common["info"]["num_terms"] = self.num_terms
        return KFACTridiagCurvature(U, V, self.shapes, **common)
