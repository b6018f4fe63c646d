"""Our own statistics backend: forward/backward hooks on every LoRA ``lora_A``/``lora_B`` module.

Per batch: ONE forward, then one backward per backward vector (1 for ``empirical``, ``S`` for
``mc``, ``C`` for ``ggn``, produced one at a time), each covering all terms of the batch. From
the hooked layer inputs ``a`` and output gradients ``g`` it hands over

* :class:`~lalora_curv.curvature.statistics.KroneckerBatch`: per layer and module call, ``a`` and
  ``g`` at the attended positions (the K-FAC family's "expand" statistics), or
* :class:`~lalora_curv.curvature.statistics.GradientRows`: per-sequence gradients
  ``sum_t g_t a_t^T`` of every LoRA matrix (exact from one backward; SEMANTICS §1), or per-term
  gradients for ``terms="token"`` (one backward per term, batched with ``is_grads_batched``).

Gradient checkpointing re-runs forwards inside backward, so forward hooks can fire more than
once per batch, and a LoRA module may also be called several times in one forward. Each hook call
makes its own record; each gradient that reaches a record is tagged with the backward vector that
produced it. A record contributes only its own gradients: a recomputed forward pairs its inputs
with its own gradients, a first pass whose output never receives a gradient is dropped, and the
per-sequence gradient of backward vector ``k`` is the sum over every record that received a
gradient in backward ``k`` (several calls in one forward add up, exactly as autograd would).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..curvature.statistics import GradientRows, KroneckerBatch, KroneckerCall
from ..losses import Terms, backward_vectors, forward_terms
from ..params import is_sharded

__all__ = ["LoRAHookRecorder", "HooksBackend", "per_term_rows"]


@dataclass
class _Record:
    a: Tensor
    grads: dict[int, Tensor] = field(default_factory=dict)  # backward index -> output gradient


class LoRAHookRecorder:
    """Context manager recording inputs and output gradients of each layer's ``lora_A``/``lora_B``.

    :attr:`backward_index` tags the gradients that arrive; the caller advances it between
    backward passes. Call :meth:`clear` before each batch.
    """

    def __init__(self, lora):
        self.lora = lora
        self._handles = []
        self.backward_index = 0
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

            def on_grad(g, record=record):
                k = self.backward_index
                record.grads[k] = g.detach() if k not in record.grads else record.grads[k] + g.detach()

            output.register_hook(on_grad)

        return hook

    def clear(self):
        self.backward_index = 0
        for rec in self.records:
            rec["A"].clear()
            rec["B"].clear()

    def drop_backward(self, k: int) -> None:
        """Forget the gradients of backward ``k`` (a failed attempt that is repeated)."""
        for rec in self.records:
            for r in rec["A"] + rec["B"]:
                r.grads.pop(k, None)

    def layer_calls(self, layer_index: int) -> list[tuple[_Record, _Record]]:
        """Pairs (A-record, B-record) of one layer's calls that received gradients."""
        rec = self.records[layer_index]
        if len(rec["A"]) != len(rec["B"]):
            raise RuntimeError(f"{self.lora.layers[layer_index].name}: lora_A ran {len(rec['A'])} times but lora_B "
                               f"{len(rec['B'])} times in one forward; cannot pair their statistics")
        pairs = [(ra, rb) for ra, rb in zip(rec["A"], rec["B"]) if ra.grads or rb.grads]
        for ra, rb in pairs:
            if ra.grads.keys() != rb.grads.keys():
                raise RuntimeError(f"{self.lora.layers[layer_index].name}: lora_A and lora_B received gradients from "
                                   "different backward passes (a hook ordering problem)")
        return pairs


def _rows(x: Tensor, mask: Tensor | None) -> Tensor:
    """Flatten ``(N, [T,] d)`` to the rows of the attended positions, ``(P, d)``."""
    if mask is not None and x.ndim == 3 and x.shape[:2] == mask.shape:
        return x[mask]
    return x.reshape(-1, x.shape[-1])


class HooksBackend:
    """Statistics for one structure's accumulator from hooks on the LoRA modules.

    Args:
        lora: the registry. statistics: "kronecker" or "gradients". kind, mc_samples, generator,
        dtype: as in ``fit_curvature``. terms: "sequence" or "token" (gradient statistics of
        causal LMs only).
    """

    name = "hooks"
    provides = frozenset({"cross"})

    def __init__(self, lora, statistics: str, *, kind: str, terms: str, mc_samples: int,
                 generator: torch.Generator, dtype: torch.dtype):
        self.lora, self.statistics, self.kind, self.terms = lora, statistics, kind, terms
        self.mc_samples, self.generator, self.dtype = mc_samples, generator, dtype
        self._recorder = LoRAHookRecorder(lora)
        # FSDP2 (sharded DTensor parameters) computes with unsharded copies, so torch.autograd.grad
        # w.r.t. lora.params reaches nothing: run .backward() from the start (the hooks record the
        # output gradients either way; FSDP2 reduce-scatters into .grad, which is restored after).
        sharded = any(is_sharded(p) for p in lora.params)
        if sharded and statistics == "gradients" and terms == "token":
            raise ValueError("terms='token' differentiates w.r.t. the LoRA parameters themselves, which FSDP2 "
                             "shards (DTensor parameters; the forward uses unsharded copies): use terms='sequence' "
                             "under fully_shard")
        self._use_backward = sharded  # also set once reentrant checkpointing refuses torch.autograd.grad

    def __enter__(self):
        self._recorder.__enter__()
        return self

    def __exit__(self, *exc):
        self._recorder.__exit__(*exc)

    def _vectors(self, terms: Terms):
        return backward_vectors(terms.logits, terms.targets, self.kind, mc_samples=self.mc_samples,
                                generator=self.generator, dtype=self.dtype)

    def batch(self, model, batch):
        """The statistics of one batch, or None when it has no terms."""
        # per-token rows of causal LMs (for classifiers a term is a sample: the sequence path is exact)
        token_rows = self.statistics == "gradients" and self.terms == "token" and isinstance(batch, Mapping)
        self._recorder.clear()
        with _paused(self._recorder) if token_rows else contextlib.nullcontext():
            terms = forward_terms(model, batch)
        if terms.num_terms == 0:
            return None
        if token_rows:
            rows = torch.cat([per_term_rows(terms.logits, r, self.lora, self.dtype) for r in self._vectors(terms)])
            return GradientRows(rows, terms.num_terms)
        if self.statistics == "gradients" and terms.position_mask is not None and self.kind == "ggn":
            raise ValueError("kind='ggn' with terms='sequence' would mix positions of a sequence (biased); use "
                             "terms='token' (exact) or kind='mc' (unbiased per-sequence estimate)")
        with _preserved_grads(model):
            num_vectors = self._backward_all(model, terms)
        if self.statistics == "kronecker":
            return self._kronecker(terms)
        return GradientRows(self._sequence_rows(terms, num_vectors), terms.num_terms)

    def _backward_all(self, model, terms: Terms) -> int:
        k = 0
        for k, r in enumerate(self._vectors(terms)):
            self._recorder.backward_index = k
            r = r.to(terms.logits.dtype)
            if not self._use_backward:
                grads = torch.autograd.grad(terms.logits, self.lora.params, r, retain_graph=True, allow_unused=True)
                if all(g is not None for g in grads):
                    continue
                # Some LoRA parameters are out of reach of autograd.grad: reentrant checkpointing
                # hides them inside a node that only .backward() runs (and recomputes). Redo it so.
                self._use_backward = True
                self._recorder.drop_backward(k)
            torch.autograd.backward(terms.logits, r, retain_graph=True)
        return k + 1

    def _kronecker(self, terms: Terms) -> KroneckerBatch:
        mask = terms.position_mask
        calls = []
        for i in range(len(self.lora.layers)):
            layer_calls = []
            for ra, rb in self._recorder.layer_calls(i):
                keys = sorted(ra.grads)
                layer_calls.append(KroneckerCall(
                    inputs_A=_rows(ra.a, mask), inputs_B=_rows(rb.a, mask),
                    grads_A=[_rows(ra.grads[k], mask) for k in keys], grads_B=[_rows(rb.grads[k], mask) for k in keys],
                    input_key=(ra.a.data_ptr(), tuple(ra.a.shape), ra.a.dtype)))
            calls.append(layer_calls)
        return KroneckerBatch(calls, terms.num_terms)

    def _sequence_rows(self, terms: Terms, num_vectors: int) -> Tensor:
        """Per-sequence gradients ``Tensor[K * N, numel]`` (row ``k * N + b``), canonical order."""
        N, mask = terms.num_sequences, terms.position_mask
        blocks = []
        for i, layer in enumerate(self.lora.layers):
            gradA = torch.zeros(num_vectors, N, *layer.A.shape, dtype=self.dtype, device=layer.A.device)
            gradB = torch.zeros(num_vectors, N, *layer.B.shape, dtype=self.dtype, device=layer.B.device)
            calls = self._recorder.layer_calls(i)
            if not calls:
                raise ValueError(f"LoRA layer {layer.name} received no gradient: is it used in the forward pass?")
            for ra, rb in calls:
                xa, xb = ra.a.to(self.dtype), rb.a.to(self.dtype)
                if mask is not None and xa.ndim == 3:
                    m = mask.to(self.dtype)[..., None]
                    xa, xb = xa * m, xb * m
                eq = "bto,bti->boi" if xa.ndim == 3 else "bo,bi->boi"
                for k in ra.grads:  # several calls (and replays) in backward k add up
                    gradA[k] += torch.einsum(eq, ra.grads[k].to(self.dtype), xa)
                    gradB[k] += torch.einsum(eq, rb.grads[k].to(self.dtype), xb)
            blocks += [gradA.reshape(num_vectors * N, -1), gradB.reshape(num_vectors * N, -1)]
        return torch.cat(blocks, dim=1)


@contextlib.contextmanager
def _paused(recorder: LoRAHookRecorder):
    """Run without recording (the token path needs no activation records: it would keep one
    gradient record per term alive)."""
    recorder.__exit__(None, None, None)
    try:
        yield
    finally:
        recorder.__enter__()


@contextlib.contextmanager
def _preserved_grads(model):
    """``.backward()`` (needed under reentrant checkpointing) writes ``.grad``: keep the caller's."""
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, g in zip(params, saved):
            p.grad = g


#: bytes of one chunk of batched per-term backward vectors (``chunk x M x C`` floats)
_TOKEN_CHUNK_BYTES = 64 * 2**20


def per_term_rows(logits: Tensor, R: Tensor, lora, dtype: torch.dtype) -> Tensor:
    """Exact per-term gradients ``J_m^T r_m``: ``Tensor[M, numel]`` for ``R: Tensor[M, C]``.

    One backward per term, batched with ``is_grads_batched`` in chunks of at most
    ``_TOKEN_CHUNK_BYTES``; falls back to a loop where a model's backward cannot be vmapped.
    Cost grows with the number of terms ``M``: the reference path.
    """
    M, C = R.shape
    params = lora.params
    out = torch.empty(M, lora.numel, dtype=dtype, device=R.device)
    chunk = max(1, min(M, _TOKEN_CHUNK_BYTES // max(1, M * C * logits.element_size())))
    R = R.to(logits.dtype)
    start = 0
    batched = True
    while start < M:
        stop = min(M, start + chunk)
        idx = torch.arange(start, stop, device=R.device)
        if batched:
            E = torch.zeros(stop - start, M, C, dtype=R.dtype, device=R.device)
            E[torch.arange(stop - start), idx] = R[idx]
            try:
                grads = torch.autograd.grad(logits, params, E, retain_graph=True, allow_unused=True,
                                            is_grads_batched=True)
            except RuntimeError:  # an op without a batching rule: one backward per term
                batched = False
                continue
            n = stop - start
            out[start:stop] = torch.cat([(g if g is not None else p.new_zeros(n, *p.shape)).reshape(n, -1)
                                         for g, p in zip(grads, params)], 1).to(dtype)
        else:
            for m in range(start, stop):
                grads = torch.autograd.grad(logits[m], params, R[m], retain_graph=True, allow_unused=True)
                out[m] = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in
                                    zip(grads, params)]).to(dtype)
        start = stop
    return out
