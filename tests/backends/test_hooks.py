"""The hooks backend under gradient checkpointing (forwards replayed inside backward)."""

from __future__ import annotations

import torch

import lalora_curv as lc
from lalora_curv.backends.hooks import KroneckerStats, LoRAHookRecorder, per_sequence_gradients
from lalora_curv.losses import backward_vectors, forward_terms
from tests.conftest import make_lm_batch, make_tiny_lm


def _stats(model, lora, batch, kind="mc"):
    stats = KroneckerStats(lora, torch.float64, "cpu")
    gen = torch.Generator().manual_seed(0)
    with LoRAHookRecorder(lora) as rec:
        terms = forward_terms(model, batch)
        R = backward_vectors(terms.logits, terms.targets, kind, mc_samples=2, generator=gen, dtype=torch.float64)
        for k in range(R.shape[0]):
            torch.autograd.grad((terms.logits * R[k]).sum(), lora.params, retain_graph=k < R.shape[0] - 1)
        stats.add_batch(rec, terms.position_mask)
        seq = per_sequence_gradients(rec, lora, terms.num_sequences, terms.position_mask, torch.float64)
        num_records = len(rec.records[0]["A"])
    U, V = stats.factors(terms.num_terms)
    return U, V, seq, num_records


def test_checkpointed_forward_is_not_double_counted():
    """Non-reentrant checkpointing replays each block's forward inside backward: the replayed
    records must not add statistics. (Reentrant checkpointing cannot be differentiated with
    ``torch.autograd.grad``; fit_curvature runs the model in eval mode, where transformers does
    not checkpoint at all: tests/curvature/test_fit_reference.py checks that path.)"""
    reentrant = False
    model = make_tiny_lm()
    model.train()  # dropout is 0; HF checkpoints only in training mode
    lora = lc.LoRAParams.from_model(model)
    batch = make_lm_batch(seed=11)
    U0, V0, seq0, n0 = _stats(model, lora, batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()
    try:
        U1, V1, seq1, n1 = _stats(model, lora, batch)
    finally:
        model.gradient_checkpointing_disable()
    assert n0 == 1
    assert n1 > 1, "checkpointing should have replayed the forward (else this test proves nothing)"
    for a, b in zip(U0 + V0, U1 + V1):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)
    assert torch.allclose(seq0, seq1, rtol=1e-10, atol=1e-14)
