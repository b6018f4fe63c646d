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

from ..curvature.statistics import GradientRows
from ..losses import backward_vectors, forward_terms

__all__ = ["BackpackBackend"]


class BackpackBackend:
    """Per-sequence gradient rows from BackPACK's ``BatchGrad`` (gradient structures only).

    Extends the LoRA modules on entry; restores the caller's ``.grad`` of the LoRA parameters
    on exit (see the module docstring for what stays behind)."""

    name = "backpack"
    provides = frozenset()

    def __init__(self, lora, statistics: str, *, kind: str, mc_samples: int, generator, dtype: torch.dtype):
        if statistics != "gradients":
            raise ValueError(
                "backend='backpack' cannot build K-FAC structures on peft models: BackPACK's second-order "
                "extensions need a graph of supported modules and peft's LoRA forward is plain tensor ops "
                "(SEMANTICS §7); use backend='hooks' or 'curvlinops'")
        self.lora, self.kind, self.mc_samples, self.generator, self.dtype = lora, kind, mc_samples, generator, dtype

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

    def batch(self, model, batch) -> GradientRows | None:
        from backpack import backpack
        from backpack.extensions import BatchGrad

        terms = forward_terms(model, batch)
        if terms.num_terms == 0:
            return None
        if terms.position_mask is not None and self.kind == "ggn":
            raise ValueError("kind='ggn' with per-sequence gradients would mix positions of a sequence (biased); "
                             "use backend='hooks' with terms='token', or kind='mc'")
        vectors = list(backward_vectors(terms.logits, terms.targets, self.kind, mc_samples=self.mc_samples,
                                        generator=self.generator, dtype=self.dtype))
        out = []
        for k, r in enumerate(vectors):
            last = k == len(vectors) - 1
            for p in self.lora.params:
                p.grad = None
            with backpack(BatchGrad(), retain_graph=not last):
                (terms.logits * r.to(terms.logits.dtype)).sum().backward(retain_graph=not last)
            out.append(torch.cat([p.grad_batch.reshape(p.grad_batch.shape[0], -1).to(self.dtype)
                                  for p in self.lora.params], 1))
        return GradientRows(torch.cat(out), terms.num_terms)
