"""Our own statistics backend: forward/backward hooks on every LoRA ``lora_A``/``lora_B`` module.

Per batch: ONE forward, then one backward per backward vector (1 for ``empirical``, ``S`` for
``mc``, ``C`` for ``ggn``), each covering all terms of the batch at once. From the hooked layer
inputs ``a`` and output gradients ``g`` we build

* the K-FAC family's statistics (sums of ``u u^T`` and ``v v^T`` with ``u = [g_A; g_B]`` and
  ``v = [a_A; a_B]`` over attended positions: "expand" K-FAC), and/or
* per-sequence gradients ``sum_t g_t a_t^T`` of every LoRA matrix (exact; SEMANTICS §1).

Exact per-*token* gradients cannot come out of one backward (attention mixes positions):
:func:`per_term_gradients` does one backward per term (the ``terms="token"`` reference path).

Gradient checkpointing re-runs forwards inside backward, so forward hooks can fire more than
once per batch: each hook call makes its own record, and a record only contributes once its own
output gradient arrived (a recomputed forward's record pairs its inputs with its own gradients,
a first pass whose output never receives a gradient is dropped). Input statistics are averaged
per record, so a forward recorded twice is not double counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..losses import Terms

__all__ = ["LoRAHookRecorder", "KroneckerStats", "per_sequence_gradients", "per_term_gradients"]


@dataclass
class _Record:
    a: Tensor
    grads: list = field(default_factory=list)


class LoRAHookRecorder:
    """Context manager recording inputs and output gradients of each layer's ``lora_A``/``lora_B``.

    After a forward and the backward(s) of one batch, :meth:`layer_records` pairs the A and B
    records of each layer; call :meth:`clear` before the next batch.
    """

    def __init__(self, lora):
        self.lora = lora
        self._handles = []
        self.records: list[dict[str, list[_Record]]] = [{"A": [], "B": []} for _ in lora.layers]

    def __enter__(self):
        for i, layer in enumerate(self.lora.layers):
            for which, module in (("A", layer.lora_A), ("B", layer.lora_B)):
                self._handles.append(module.register_forward_hook(self._make_hook(i, which)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _make_hook(self, layer_index: int, which: str):
        store = self.records[layer_index][which]

        def hook(module, inputs, output):
            if not (torch.is_grad_enabled() and output.requires_grad):
                return  # e.g. the no-grad first pass of reentrant checkpointing
            record = _Record(a=inputs[0].detach())
            store.append(record)
            output.register_hook(lambda g: record.grads.append(g.detach()))

        return hook

    def clear(self):
        for rec in self.records:
            rec["A"].clear()
            rec["B"].clear()

    def layer_records(self, layer_index: int) -> list[tuple[_Record, _Record]]:
        """Pairs (A-record, B-record) of one layer that received gradients."""
        rec = self.records[layer_index]
        pairs = [(ra, rb) for ra, rb in zip(rec["A"], rec["B"]) if ra.grads and rb.grads]
        for ra, rb in pairs:
            if len(ra.grads) != len(rb.grads):
                raise RuntimeError(f"{self.lora.layers[layer_index].name}: lora_A and lora_B received a different "
                                   "number of gradients (a hook ordering problem)")
        return pairs


def _rows(x: Tensor, mask: Tensor | None, dtype: torch.dtype) -> Tensor:
    """Flatten ``(N, [T,] d)`` to the rows of the attended positions, ``(P, d)``, in ``dtype``."""
    if mask is not None and x.ndim == 3 and x.shape[:2] == mask.shape:
        x = x[mask]
    else:
        x = x.reshape(-1, x.shape[-1])
    return x.to(dtype)


def _add_stacked(target: Tensor, top_left: Tensor, first: Tensor, second: Tensor, cross: bool) -> None:
    """``target += [first, second]^T [first, second]`` given ``top_left = first^T first``.

    Cross blocks are skipped when ``cross`` is False (plain K-FAC never reads them)."""
    n = first.shape[1]
    target[:n, :n] += top_left
    target[n:, n:].addmm_(second.T, second)
    if cross:
        block = first.T @ second
        target[:n, n:] += block
        target[n:, :n] += block.T


class KroneckerStats:
    """Running sums for the K-FAC family, per layer (stacked A/B statistics, SEMANTICS §3).

    ``U_sum[l]``: sum over positions and backward vectors of ``u u^T``, ``u = [g_A; g_B]``
    (``r + d_out``). ``V_sum[l]``: sum over recorded positions of ``v v^T``, ``v = [a_A; a_B]``
    (``d_in + r``), with ``V_count[l]`` positions. Factors: ``U = U_sum / num_terms`` (mean over
    terms), ``V = V_sum / V_count`` (mean over attended positions; a forward replayed by
    gradient checkpointing adds to both sums alike, so the mean is unchanged).
    """

    def __init__(self, lora, dtype: torch.dtype, device, need_cross: bool = True):
        self.dtype = dtype
        self.need_cross = need_cross
        self.U_sum, self.V_sum, self.V_count = [], [], []
        for layer in lora.layers:
            r, d_in, d_out = layer.rank, layer.d_in, layer.d_out
            self.U_sum.append(torch.zeros(r + d_out, r + d_out, dtype=dtype, device=device))
            self.V_sum.append(torch.zeros(d_in + r, d_in + r, dtype=dtype, device=device))
            self.V_count.append(0)

    def add_batch(self, recorder: LoRAHookRecorder, position_mask: Tensor | None):
        # Modules that read the same activation (q_proj, k_proj, v_proj after one norm) get the same
        # input tensor: its covariance x^T x, the largest product here, is computed once per batch.
        shared_inputs: dict[tuple, Tensor] = {}
        for i in range(len(self.U_sum)):
            for ra, rb in recorder.layer_records(i):
                xa, xb = _rows(ra.a, position_mask, self.dtype), _rows(rb.a, position_mask, self.dtype)
                key = (ra.a.data_ptr(), tuple(ra.a.shape), ra.a.dtype)
                if key not in shared_inputs:
                    shared_inputs[key] = xa.T @ xa
                _add_stacked(self.V_sum[i], shared_inputs[key], xa, xb, self.need_cross)
                # one record may be replayed by gradient checkpointing: count its positions once
                self.V_count[i] += xa.shape[0]
                for gA, gB in zip(ra.grads, rb.grads):
                    ga, gb = _rows(gA, position_mask, self.dtype), _rows(gB, position_mask, self.dtype)
                    _add_stacked(self.U_sum[i], ga.T @ ga, ga, gb, self.need_cross)

    def factors(self, num_terms: int) -> tuple[list[Tensor], list[Tensor]]:
        """``(U list, V list)``: gradient factors (mean over terms), input factors (mean over positions)."""
        if num_terms == 0:
            raise ValueError("no prediction terms in the batches (every label is -100?)")
        U = [(u / num_terms) for u in self.U_sum]
        V = []
        for v, c in zip(self.V_sum, self.V_count):
            if c == 0:
                raise ValueError("a LoRA layer never received a gradient: is it used in the forward pass?")
            V.append(v / c)
        return U, V


def per_sequence_gradients(recorder: LoRAHookRecorder, lora, num_sequences: int, position_mask: Tensor | None,
                           dtype: torch.dtype) -> Tensor:
    """Per-sequence gradients of every LoRA matrix, ``Tensor[K, N, numel]`` in canonical order.

    ``K`` = backward vectors per forward. Sequence ``b``'s gradient of a LoRA matrix ``W`` is
    ``sum_t g_bt a_bt^T`` (exact, one backward); summed over the records of one layer.
    """
    blocks = []
    for i, layer in enumerate(lora.layers):
        partsA, partsB = [], []
        # one record per forward call; a forward replayed by reentrant checkpointing makes one record
        # per backward, so records are concatenated along K (each LoRA module runs once per forward)
        for ra, rb in recorder.layer_records(i):
            xa, xb = ra.a.to(dtype), rb.a.to(dtype)
            gA = torch.stack([g.to(dtype) for g in ra.grads])
            gB = torch.stack([g.to(dtype) for g in rb.grads])
            if position_mask is not None and xa.ndim == 3:
                m = position_mask.to(dtype)[..., None]
                xa, xb = xa * m, xb * m
            eq = "kbto,bti->kboi" if xa.ndim == 3 else "kbo,bi->kboi"
            partsA.append(torch.einsum(eq, gA, xa))
            partsB.append(torch.einsum(eq, gB, xb))
        if not partsA:
            raise ValueError(f"LoRA layer {layer.name} received no gradient: is it used in the forward pass?")
        gradA, gradB = torch.cat(partsA), torch.cat(partsB)
        K = gradA.shape[0]
        blocks.append(gradA.reshape(K, num_sequences, -1))
        blocks.append(gradB.reshape(K, num_sequences, -1))
    return torch.cat(blocks, dim=2)


def per_term_gradients(terms: Terms, R: Tensor, lora, dtype: torch.dtype) -> Tensor:
    """Exact per-term gradient vectors ``J_m^T r_mk``: ``Tensor[K * M, numel]`` (one backward each).

    ``R: Tensor[K, M, C]`` backward vectors. Cost grows with ``K * M``: the reference path.
    """
    K, M, _ = R.shape
    out = torch.empty(K * M, lora.numel, dtype=dtype, device=R.device)
    params = lora.params
    logits = terms.logits
    row = 0
    for k in range(K):
        for m in range(M):
            grads = torch.autograd.grad(logits[m], params, grad_outputs=R[k, m].to(logits.dtype), retain_graph=True,
                                        allow_unused=True)
            out[row] = torch.cat([
                (g if g is not None else torch.zeros_like(p)).reshape(-1).to(dtype) for g, p in zip(grads, params)
            ])
            row += 1
    return out
