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
hidden state) are stored once.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .base import CurvatureOperator
from .kronecker import kron_diag, kron_matmat, kron_solve, sym_eigh

__all__ = ["KFACCurvature", "KroneckerBlock"]


class KroneckerBlock(dict):
    """JSON-able description of one block: indices of its factors and its shape."""

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

    def __init__(self, grad_factors: Sequence[Tensor], input_factors: Sequence[Tensor],
                 blocks: Sequence[dict], **common):
        self.grad_factors = list(grad_factors)
        self.input_factors = list(input_factors)
        self.blocks = [KroneckerBlock(**b) for b in blocks]
        for b in self.blocks:
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
    def from_factor_pairs(cls, pairs: Sequence[tuple[Tensor, Tensor, str]], *, share_inputs: bool = True,
                          **common) -> "KFACCurvature":
        """Build from ``(G, A, name)`` per block in flat order, storing identical input factors once."""
        grads, inputs, blocks = [], [], []
        for G, A, name in pairs:
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
        out = torch.empty_like(X)
        for b, lo, hi in self._iter_blocks():
            out[lo:hi] = kron_matmat(self.grad_factors[b["grad"]], self.input_factors[b["inp"]], X[lo:hi])
        return out

    def quadratic_form(self, delta, lora=None) -> Tensor:
        delta = self._check_vector(self._flat_delta(delta, lora), "delta")
        total = delta.new_zeros(())
        # one split, not per-block slices: each slice's backward would zero-fill a full-length gradient
        parts = delta.split([b["d_out"] * b["d_in"] for b in self.blocks])
        for b, part in zip(self.blocks, parts):
            D = part.view(b["d_out"], b["d_in"])
            G, A = self.grad_factors[b["grad"]], self.input_factors[b["inp"]]
            total = total + ((G @ D) * (D @ A)).sum()  # tr(D^T G D A) for symmetric A
        return total

    def diagonal(self) -> Tensor:
        return torch.cat([
            kron_diag(self.grad_factors[b["grad"]], self.input_factors[b["inp"]]) for b in self.blocks
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
