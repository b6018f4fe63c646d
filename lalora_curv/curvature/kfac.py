"""K-FAC: one Kronecker-factored block per LoRA matrix (A and B separately).

For a LoRA layer with ``A: (r, d_in)`` and ``B: (d_out, r)``:

* A-block ``G_A (x) X_A``: ``G_A = E[g_A g_A^T]`` (``r x r``, output gradients of ``lora_A``),
  ``X_A = E[x x^T]`` (``d_in x d_in``, inputs of ``lora_A``);
* B-block ``G_B (x) X_B``: ``G_B`` (``d_out x d_out``, output gradients of ``lora_B``),
  ``X_B = E[(A x)(A x)^T]`` (``r x r``).

``E`` over gradients is the mean over prediction terms; ``E`` over inputs is the mean over the
(attended) positions ("expand" K-FAC, Eschenhagen et al. 2023). At the standard peft init
``B = 0``, ``g_A = s B^T g = 0``, so every A-block is exactly zero; anchor those directions with
the penalty's ``prior_precision`` or the operator's ``damping``.

Input factors that are bit-identical across blocks (e.g. ``q_proj`` and ``v_proj`` read the same
hidden state) are stored once. Blocks that are exactly zero (the A-blocks at ``B = 0``) store no
factors at all (``grad = inp = -1`` in their description): the ``d_in x d_in`` input factor of
``lora_A``, the largest one, is then neither computed nor kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .base import CurvatureOperator
from .interop import logdet_eigenvalues
from .kronecker import kron_diag, kron_matmat, kron_solve, sym_eigh
from .statistics import KroneckerSums

__all__ = ["KFACCurvature", "KroneckerBlock", "KFACAccumulator"]


class KroneckerBlock(dict):
    """JSON-able description of one block: indices of its factors (``-1``: an exactly zero block
    with no factors) and its shape."""

    def __init__(self, grad: int, inp: int, d_out: int, d_in: int, name: str = ""):
        super().__init__(grad=grad, inp=inp, d_out=d_out, d_in=d_in, name=name)


class KFACCurvature(CurvatureOperator):
    """Block-diagonal ``P = diag_b(G_b (x) A_b)``, blocks in flat order.

    Args:
        grad_factors: list of output-gradient factors ``G`` (``d_out x d_out``).
        input_factors: list of input factors ``A`` (``d_in x d_in``); may be shared by blocks.
        blocks: per block (in flat order) the indices ``grad``/``inp`` into those lists, and
            ``d_out``/``d_in``.
    """

    structure = "kfac"
    #: fit_curvature options this structure reads (besides the common ones)
    fit_options = frozenset({"share_inputs"})

    @classmethod
    def accumulator(cls, lora, *, dtype, share_inputs: bool = True) -> KFACAccumulator:
        return KFACAccumulator(lora, dtype, share_inputs=share_inputs)

    def __init__(self, grad_factors: Sequence[Tensor], input_factors: Sequence[Tensor],
                 blocks: Sequence[dict], **common):
        self.grad_factors = list(grad_factors)
        self.input_factors = list(input_factors)
        self.blocks = [KroneckerBlock(**b) for b in blocks]
        for b in self.blocks:
            if (b["grad"] < 0) != (b["inp"] < 0):
                raise ValueError(f"block {b['name']!r}: a zero block has neither factor (grad = inp = -1)")
            if b["grad"] < 0:
                continue
            G, A = self.grad_factors[b["grad"]], self.input_factors[b["inp"]]
            if G.shape != (b["d_out"], b["d_out"]) or A.shape != (b["d_in"], b["d_in"]):
                raise ValueError(
                    f"block {b['name']!r}: factor shapes {tuple(G.shape)}, {tuple(A.shape)} do not match "
                    f"d_out={b['d_out']}, d_in={b['d_in']}"
                )
        num_params = sum(b["d_out"] * b["d_in"] for b in self.blocks)
        common.pop("num_params", None)
        super().__init__(num_params, **common)
        self._eig_cache: dict | None = None

    @classmethod
    def from_factor_pairs(cls, pairs: Sequence[tuple], *, share_inputs: bool = True, **common) -> KFACCurvature:
        """Build from ``(G, A, name)`` per block in flat order, storing identical input factors once.

        A zero block is given as ``(None, None, name, d_out, d_in)``."""
        grads, inputs, blocks = [], [], []
        for G, A, name, *shape in pairs:
            if G is None:
                blocks.append(KroneckerBlock(-1, -1, *shape, name))
                continue
            idx = None
            if share_inputs:
                for j, existing in enumerate(inputs):
                    if existing.shape == A.shape and torch.equal(existing, A):
                        idx = j
                        break
            if idx is None:
                inputs.append(A)
                idx = len(inputs) - 1
            grads.append(G)
            blocks.append(KroneckerBlock(len(grads) - 1, idx, G.shape[0], A.shape[0], name))
        return cls(grads, inputs, blocks, **common)

    def _iter_blocks(self):
        offset = 0
        for b in self.blocks:
            n = b["d_out"] * b["d_in"]
            yield b, offset, offset + n
            offset += n

    def _matmat(self, X: Tensor) -> Tensor:
        out = torch.zeros_like(X)
        for b, lo, hi in self._iter_blocks():
            if b["grad"] < 0:
                continue
            out[lo:hi] = kron_matmat(self.grad_factors[b["grad"]], self.input_factors[b["inp"]], X[lo:hi])
        return out

    def quadratic_form(self, delta, lora=None) -> Tensor:
        delta = self._check_vector(self._flat_delta(delta, lora), "delta")
        total = delta.new_zeros(())
        # one split, not per-block slices: each slice's backward would zero-fill a full-length gradient
        parts = delta.split([b["d_out"] * b["d_in"] for b in self.blocks])
        for b, part in zip(self.blocks, parts):
            if b["grad"] < 0:
                continue
            D = part.view(b["d_out"], b["d_in"])
            G, A = self.grad_factors[b["grad"]], self.input_factors[b["inp"]]
            total = total + ((G @ D) * (D @ A)).sum()  # tr(D^T G D A) for symmetric A
        return total

    def diagonal(self) -> Tensor:
        return torch.cat([
            kron_diag(self.grad_factors[b["grad"]], self.input_factors[b["inp"]]) if b["grad"] >= 0
            else torch.zeros(b["d_out"] * b["d_in"], dtype=self.dtype, device=self.device) for b in self.blocks
        ])

    def _eigs(self):
        if self._eig_cache is None:
            self._eig_cache = {
                "grad": [sym_eigh(G) for G in self.grad_factors],
                "inp": [sym_eigh(A) for A in self.input_factors],
            }
        return self._eig_cache

    def solve(self, v: Tensor, damping: float | None = None) -> Tensor:
        damping = self.damping if damping is None else damping
        v = self._check_vector(v)
        X = v[:, None] if v.ndim == 1 else v
        eigs = self._eigs()
        out = torch.empty_like(X)
        for b, lo, hi in self._iter_blocks():
            if b["grad"] < 0:
                if damping <= 0:
                    raise ZeroDivisionError(f"K-FAC block {b['name']!r} is zero: pass damping > 0 to solve")
                out[lo:hi] = X[lo:hi] / damping
                continue
            out[lo:hi] = kron_solve(eigs["grad"][b["grad"]], eigs["inp"][b["inp"]], X[lo:hi], damping)
        return out[:, 0] if v.ndim == 1 else out

    def state_tensors(self):
        tensors = {f"grad.{i}": G for i, G in enumerate(self.grad_factors)}
        tensors.update({f"input.{j}": A for j, A in enumerate(self.input_factors)})
        return tensors

    def psd_parts(self):
        # G (x) A is PSD when both factors are
        return [], self.grad_factors + self.input_factors

    def state_meta(self):
        return {"blocks": [dict(b) for b in self.blocks], "num_grad": len(self.grad_factors),
                "num_input": len(self.input_factors)}

    @classmethod
    def from_state(cls, tensors, meta, common):
        grads = [tensors[f"grad.{i}"] for i in range(meta["num_grad"])]
        inputs = [tensors[f"input.{j}"] for j in range(meta["num_input"])]
        return cls(grads, inputs, meta["blocks"], **common)

    def _scaled(self, alpha):
        # scale the gradient factors only: input factors stay shared
        return type(self)([alpha * G for G in self.grad_factors], self.input_factors, self.blocks,
                          **self._common())

    # -- interop: scipy, curvlinops, trace, logdet --
    # tr(G (x) A) = tr(G) tr(A); the eigenvalues of G (x) A are the products l_G * l_A, so
    # log det(P + p I) = sum_blocks sum_ij log(l_G,i l_A,j + p), a zero block n log p (float64)

    def trace(self) -> Tensor:
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for b in self.blocks:
            if b["grad"] >= 0:
                total = total + self.grad_factors[b["grad"]].trace() * self.input_factors[b["inp"]].trace()
        return total

    def _logdet(self, prior_precision, max_dense):
        grad_evals = [torch.linalg.eigvalsh(_sym64(G)) for G in self.grad_factors]
        input_evals = [torch.linalg.eigvalsh(_sym64(A)) for A in self.input_factors]
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for b in self.blocks:
            if b["grad"] < 0:
                total = total + b["d_out"] * b["d_in"] * math.log(prior_precision)
            else:
                total = total + logdet_eigenvalues(torch.outer(grad_evals[b["grad"]].clamp_min(0),
                                                               input_evals[b["inp"]].clamp_min(0)), prior_precision)
        return total

    # -- continual: filtering and smoothing (lalora_curv.continual) --
    # exact in the Kronecker eigenbasis: every operation goes through EigenKFACCurvature (a sum of
    # Kronecker products has no common eigenbasis, so filtering with noise is not closed here).
    # kfac_delta_w inherits these methods and is refused by its space in the base class.
    predict_options = ("kfac_noise",)

    def _eigenbasis(self, isotropic: float = 0.0):
        # imported here to keep this section apart from the fitting side of the file; no cycle:
        # eigen_kfac does not import this module
        from .eigen_kfac import EigenKFACCurvature

        return EigenKFACCurvature.from_kfac(self, isotropic)

    def _with_isotropic(self, value):
        return self._eigenbasis(value)

    def _predict(self, q, kfac_noise: str = "exact"):
        return self._eigenbasis()._predict(q, kfac_noise=kfac_noise)

    def _smoothing_gain(self, q):
        return self._eigenbasis()._smoothing_gain(q)


def _sym64(M: Tensor) -> Tensor:
    """The symmetric part of a factor in float64 (for exact spectra)."""
    M = M.to(torch.float64)
    return 0.5 * (M + M.T)


class KFACAccumulator(KroneckerSums):
    """K-FAC from the stacked sums: the diagonal (A-A and B-B) blocks of each layer, one block per
    LoRA matrix; A-blocks of layers with ``B = 0`` are stored as zero blocks (no factors)."""

    def __init__(self, lora, dtype, *, share_inputs: bool = True):
        super().__init__(lora, dtype, cross=False, skip_zero_A=True)
        self.names = [(layer.A_name, layer.B_name) for layer in lora.layers]
        self.share_inputs = share_inputs

    def finalize(self, common: dict) -> KFACCurvature:
        pairs = []
        for (r, d_in, _d_out, zero, U, V), (a_name, b_name) in zip(self.nonzero_blocks(), self.names):
            if zero:
                pairs += [(None, None, a_name, r, d_in), (U, V, b_name)]
            else:
                pairs += [(U[:r, :r].clone(), V[:d_in, :d_in].clone(), a_name),
                          (U[r:, r:].clone(), V[d_in:, d_in:].clone(), b_name)]
        common["info"]["num_terms"] = self.num_terms
        return KFACCurvature.from_factor_pairs(pairs, share_inputs=self.share_inputs, **common)
