"""The hooks backend: gradient checkpointing (forwards replayed inside backward, training mode,
reentrant and not) and LoRA modules called more than once in one forward."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import lalora_curv as lc
from lalora_curv.backends.hooks import HooksBackend
from lalora_curv.curvature.statistics import KroneckerSums
from tests.conftest import make_lm_batch, make_tiny_lm


def _backend_stats(model, lora, batch, statistics, kind="mc"):
    """Run the backend directly on a model in TRAINING mode (fit_curvature would switch to eval,
    where transformers does not checkpoint): returns the stats and the number of A-records."""
    gen = torch.Generator().manual_seed(0)
    backend = HooksBackend(lora, statistics, kind=kind, terms="sequence", mc_samples=2, generator=gen,
                           dtype=torch.float64)
    with backend:
        stats = backend.batch(model, batch)
        num_records = len(backend._recorder.records[0]["A"])
    return stats, num_records


def _kfac_factors(lora, stats):
    sums = KroneckerSums(lora, torch.float64, cross=True, skip_zero_A=False)
    sums.update(stats)
    return sums.factors()


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_training_forward_matches_plain(reentrant):
    """Checkpointing replays each block's forward inside backward (reentrant: one replay per
    backward vector, under .backward(); non-reentrant: the replayed records get no gradient).
    Statistics must equal those without checkpointing, K-FAC factors and per-sequence rows."""
    model = make_tiny_lm()
    with torch.no_grad():  # non-zero B: A-blocks and cross blocks are non-trivial (SEMANTICS §2)
        for layer in lc.LoRAParams.from_model(model).layers:
            layer.B.normal_(0, 0.1)
    model.train()  # dropout is 0; transformers checkpoints only in training mode
    lora = lc.LoRAParams.from_model(model)
    batch = make_lm_batch(seed=11)
    kron0, n0 = _backend_stats(model, lora, batch, "kronecker")
    rows0, _ = _backend_stats(model, lora, batch, "gradients")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()
    try:
        kron1, n1 = _backend_stats(model, lora, batch, "kronecker")
        rows1, _ = _backend_stats(model, lora, batch, "gradients")
    finally:
        model.gradient_checkpointing_disable()
    assert n0 == 1
    assert n1 > 1, "checkpointing should have replayed the forward (else this test proves nothing)"
    U0, V0 = _kfac_factors(lora, kron0)
    U1, V1 = _kfac_factors(lora, kron1)
    for a, b in zip(U0 + V0, U1 + V1):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    assert rows0.rows.abs().max() > 0
    torch.testing.assert_close(rows0.rows, rows1.rows, rtol=1e-10, atol=1e-14)


def test_backward_leaves_caller_grads_alone():
    model = make_tiny_lm()
    lora = lc.LoRAParams.from_model(model)
    marker = [torch.full_like(p, 3.0) for p in lora.params]
    for p, g in zip(lora.params, marker):
        p.grad = g
    lc.fit_curvature(model, [make_lm_batch(seed=2)], structure="diag", kind="mc", progress=False)
    for p, g in zip(lora.params, marker):
        assert p.grad is g


class _TwiceApplied(nn.Module):
    """A classifier whose LoRA'd layer runs twice per forward (weight sharing)."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def _twice_model():
    torch.manual_seed(0)
    model = get_peft_model(_TwiceApplied().double(), LoraConfig(r=2, target_modules=["shared"], lora_alpha=2,
                                                                  init_lora_weights=False))
    return model


def test_lora_module_called_twice_per_forward_is_summed():
    """Per-sample gradients of a layer applied twice are the sum over both calls: the dense
    empirical curvature must equal the one from autograd's per-sample gradients."""
    model = _twice_model()
    lora = lc.LoRAParams.from_model(model)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(5, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=g)
    curv = lc.fit_curvature(model, [(X, y)], structure="dense", kind="empirical", progress=False,
                            factor_dtype=torch.float64)
    rows = []
    for i in range(5):
        loss = nn.functional.cross_entropy(model(X[i : i + 1]), y[i : i + 1], reduction="sum")
        rows.append(torch.cat([gr.reshape(-1) for gr in torch.autograd.grad(loss, lora.params)]))
    R = torch.stack(rows)
    torch.testing.assert_close(curv.to_dense(), R.T @ R / 5, rtol=1e-10, atol=1e-12)


def test_token_path_keeps_no_activation_records():
    """Defect 9: the per-token path needs no hook records; the old code kept one gradient record
    per term and LoRA module alive until the batch ended."""
    model = make_tiny_lm()
    lora = lc.LoRAParams.from_model(model)
    backend = HooksBackend(lora, "gradients", kind="empirical", terms="token", mc_samples=1,
                           generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with backend:
        stats = backend.batch(model, make_lm_batch(seed=3))
        assert all(not rec["A"] and not rec["B"] for rec in backend._recorder.records)
    assert stats.rows.shape == (stats.num_terms, lora.numel)


def test_exact_ggn_backward_vectors_come_class_by_class():
    """Defect 9: never one (classes x terms x classes) tensor; each vector is (terms, classes) and
    together they are a square root of the softmax Hessian."""
    from lalora_curv.losses import backward_vectors

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=g, dtype=torch.float64)
    vectors = backward_vectors(logits, torch.zeros(7, dtype=torch.long), "ggn", dtype=torch.float64)
    assert not isinstance(vectors, torch.Tensor)
    rs = list(vectors)
    assert len(rs) == 5 and all(r.shape == (7, 5) for r in rs)
    p = torch.softmax(logits, -1)
    H = torch.stack([torch.diag(pm) - torch.outer(pm, pm) for pm in p])
    RRt = sum(torch.einsum("mi,mj->mij", r, r) for r in rs)
    torch.testing.assert_close(RRt, H)
