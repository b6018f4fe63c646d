"""Adapter over BackPACK's first-order ``BatchGrad`` extension (backpack-for-pytorch 1.7).

BackPACK's second-order extensions need a graph of supported modules and peft's LoRA forward is
plain tensor ops, so they fail on peft models (SEMANTICS §7). Its first-order extensions work on
the ``lora_A``/``lora_B`` ``nn.Linear`` modules themselves: ``BatchGrad`` gives per-sample
(per-sequence) gradients of whatever is backpropagated. We backpropagate our masked backward
vectors ourselves (BackPACK's loss modules ignore masks), so the result is the per-sequence
gradient ``sum_t g_t a_t^T`` of each LoRA matrix, the same quantity as the hooks backend's.
The caller's ``.grad`` of the LoRA parameters is saved and restored. BackPACK has no public
"un-extend": the LoRA modules keep its (inactive outside a ``backpack()`` context) hooks, so
prefer ``backend="hooks"`` inside training runs; this backend is for cross-checks.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["BackpackPerSampleGradients"]


class BackpackPerSampleGradients:
    """Context manager: extends the LoRA modules with BackPACK; restores the caller's ``.grad``."""

    def __init__(self, lora):
        self.lora = lora

    def __enter__(self):
        from backpack import extend

        self._saved_grads = [None if p.grad is None else p.grad.clone() for p in self.lora.params]
        for layer in self.lora.layers:
            extend(layer.lora_A)
            extend(layer.lora_B)
        return self

    def __exit__(self, *exc):
        for p, g in zip(self.lora.params, self._saved_grads):
            p.grad = g
            if hasattr(p, "grad_batch"):
                del p.grad_batch  # the attribute BackPACK's BatchGrad documents as its output

    def gradients(self, terms, R: Tensor, dtype) -> Tensor:
        """Per-sequence gradient vectors ``Tensor[K * N, numel]`` for backward vectors ``R[K, M, C]``."""
        from backpack import backpack
        from backpack.extensions import BatchGrad

        K = R.shape[0]
        out = []
        for k in range(K):
            for p in self.lora.params:
                p.grad = None
            with backpack(BatchGrad(), retain_graph=k < K - 1):
                (terms.logits * R[k].to(terms.logits.dtype)).sum().backward(retain_graph=k < K - 1)
            out.append(torch.cat([p.grad_batch.reshape(p.grad_batch.shape[0], -1).to(dtype) for p in self.lora.params],
                                 1))
        return torch.cat(out)
