"""Prediction terms of a batch (lalora_curv.losses.forward_terms): padding, model inputs, labels.

Each test here failed before its fix (left padding counted the last pad as a term; extra batch
keys were dropped; invalid labels went through).
"""

from __future__ import annotations

import pytest
import torch

import lalora_curv as lc
from lalora_curv.losses import forward_terms
from lalora_curv.training import count_terms
from tests.conftest import (
    FullLogitsOnly,
    make_classifier,
    make_classifier_batch,
    make_lm_batch,
    make_tiny_lm,
    options_for,
)
from tests.reference import rel_err

VOCAB = 11  # kind="ggn" runs one backward per class
STRUCTURES = ["dense", "diag", "kfac", "kfac_tridiag", "lowrank", "diag_lowrank", "kfac_delta_w"]
PER_TERM_GRADIENT = {"dense", "diag", "lowrank", "diag_lowrank"}  # kind="ggn" needs terms="token" there
LENGTHS = (5, 3, 4)
T = 5


def _sequences(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in LENGTHS]


def _padded(seqs, side, pad_id=0):
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        where = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        ids[i, where], mask[i, where] = s, 1
    return {"input_ids": ids, "attention_mask": mask}


def _three_layouts(seqs):
    """The same tokens: unpadded (one batch per sequence), right-padded, left-padded."""
    unpadded = [{"input_ids": s[None], "attention_mask": torch.ones(1, len(s), dtype=torch.long)} for s in seqs]
    return {"unpadded": unpadded, "right": [_padded(seqs, "right")], "left": [_padded(seqs, "left")]}


@pytest.fixture(scope="module")
def lm():
    # fp32, not the usual fp64: transformers' eager attention takes the softmax in fp32, where an
    # fp64 mask's minimum becomes -inf, so a fully masked (left-padding) query row gives NaN that
    # then reaches every position of the next layer; fp32/bf16 models (real use) are unaffected
    return make_tiny_lm(vocab=VOCAB, dtype=torch.float32)


@pytest.mark.parametrize("kind", ["ggn", "mc", "empirical"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_left_right_and_unpadded_give_the_same_terms_and_curvature(lm, structure, kind):
    options = options_for(structure, kind, rank=3, seed=0, factor_dtype=torch.float64,
                          **({"terms": "token"} if kind == "ggn" else {}))
    fits = {name: lc.fit_curvature(lm, batches, structure=structure, kind=kind, progress=False, **options)
            for name, batches in _three_layouts(_sequences()).items()}
    expected_terms = sum(n - 1 for n in LENGTHS)
    for name, curv in fits.items():
        assert curv.info["num_terms"] == expected_terms, name
    reference = fits["unpadded"].to_dense()
    assert reference.abs().max() > 0
    for name in ("right", "left"):
        assert rel_err(fits[name].to_dense(), reference) < 1e-4, name  # fp32 model


def test_count_terms_agrees_with_forward_terms_under_any_padding(lm):
    seqs = _sequences(1)
    for side in ("right", "left"):
        batch = _padded(seqs, side)
        assert count_terms(batch) == forward_terms(lm, batch).num_terms == sum(n - 1 for n in LENGTHS), side
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        batch["labels"][:, T - 2] = -100  # a -100 inside the real tokens removes only that term
        assert count_terms(batch) == forward_terms(lm, batch).num_terms, side


def test_padded_positions_never_reach_the_statistics(lm):
    """Pad token ids (and so the hidden states at padded positions) must not change any curvature:
    neither through a term nor through the K-FAC input factors."""
    seqs = _sequences(2)
    a, b = _padded(seqs, "left", pad_id=0), _padded(seqs, "left", pad_id=7)
    for structure in ("kfac", "kfac_tridiag", "kfac_delta_w", "diag"):
        ca = lc.fit_curvature(lm, [a], structure=structure, factor_dtype=torch.float64, progress=False)
        cb = lc.fit_curvature(lm, [b], structure=structure, factor_dtype=torch.float64, progress=False)
        assert rel_err(ca.to_dense(), cb.to_dense()) < 1e-6, structure


@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_only_where_scored_give_the_same_terms_gradients_and_curvature(lm, side):
    """A batch whose labels cover few positions (SFT: answers after prompts of different lengths):
    projecting to the vocabulary only where some row is scored (``logits_to_keep``) must give the
    terms, gradients and curvature of the full logits."""
    batch = _padded(_sequences(3), side)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, : T - 2] = -100  # only the last two positions carry labels
    batch["labels"] = labels
    full = FullLogitsOnly(lm)
    lora = [p for n, p in lm.named_parameters() if "lora_" in n]

    def terms_and_grads(model):
        terms = forward_terms(model, batch)
        loss = torch.nn.functional.cross_entropy(terms.logits.double(), terms.targets, reduction="sum")
        grads = torch.autograd.grad(loss, lora)
        return terms, grads

    widths = []  # positions the vocabulary projection sees
    hook = lm.get_output_embeddings().register_forward_hook(lambda m, args, out: widths.append(args[0].shape[1]))
    try:
        kept, kept_grads = terms_and_grads(lm)
        ref, ref_grads = terms_and_grads(full)
    finally:
        hook.remove()
    assert widths[0] < T - 1 and widths[1] == T  # projected where scored vs everywhere
    assert kept.num_terms == ref.num_terms == count_terms(batch) > 0
    torch.testing.assert_close(kept.logits, ref.logits, rtol=1e-5, atol=1e-6)
    assert torch.equal(kept.targets, ref.targets) and torch.equal(kept.seq_index, ref.seq_index)
    for a, b in zip(kept_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for structure in ("kfac", "diag"):
        a = lc.fit_curvature(lm, [batch], structure=structure, kind="mc", seed=0, factor_dtype=torch.float64,
                             progress=False)
        b = lc.fit_curvature(full, [batch], structure=structure, kind="mc", seed=0, factor_dtype=torch.float64,
                             progress=False)
        assert rel_err(a.to_dense(), b.to_dense()) < 1e-4, structure


# ------------------------------------------------------------------ other model inputs (defect 3)
def test_position_ids_reach_the_model(lm):
    batch = make_lm_batch(vocab=VOCAB, lengths=(6, 6), T=6, seed=5)
    packed = dict(batch, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]] * 2))  # two packed sequences per row
    direct = lm(input_ids=packed["input_ids"], attention_mask=packed["attention_mask"],
                position_ids=packed["position_ids"]).logits[:, :-1].reshape(-1, VOCAB)
    plain = forward_terms(lm, batch).logits.detach()
    got = forward_terms(lm, packed).logits.detach()
    assert torch.allclose(got, direct.detach(), atol=1e-6)
    assert not torch.allclose(got, plain, atol=1e-3)  # the position ids make a difference here
    with_pos = lc.fit_curvature(lm, [packed], structure="diag", progress=False)
    without = lc.fit_curvature(lm, [batch], structure="diag", progress=False)
    assert rel_err(with_pos.diagonal(), without.diagonal()) > 1e-3


def test_unknown_batch_key_is_named(lm):
    batch = dict(make_lm_batch(vocab=VOCAB), sample_weight=torch.ones(3))
    with pytest.raises(ValueError, match="'sample_weight'.*not inputs of"):
        forward_terms(lm, batch)
    with pytest.raises(ValueError, match="'token_type_ids'"):  # Llama has none
        lc.fit_curvature(lm, [dict(make_lm_batch(vocab=VOCAB), token_type_ids=torch.zeros(3, 6, dtype=torch.long))],
                         structure="kfac", progress=False)


def test_left_padding_gets_positions_that_count_tokens():
    """An absolute-position model (GPT-2) sees the same positions left-padded as unpadded."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    model = get_peft_model(GPT2LMHeadModel(cfg), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True,
                                                            init_lora_weights="gaussian"))
    layouts = _three_layouts(_sequences(3))
    fits = {name: lc.fit_curvature(model, batches, structure="kfac", factor_dtype=torch.float64, progress=False)
            for name, batches in layouts.items()}
    for name in ("right", "left"):
        assert rel_err(fits[name].to_dense(), fits["unpadded"].to_dense()) < 1e-4, name


# ------------------------------------------------------------------ labels (defect 4)
@pytest.mark.parametrize("bad, message", [(-5, "contain -5.*-100"), (-1, "contain -1"),
                                          (VOCAB, f"contain {VOCAB}.*{VOCAB} classes")])
def test_invalid_lm_labels_are_named(lm, bad, message):
    batch = make_lm_batch(vocab=VOCAB)
    batch["labels"][0, 2] = bad
    with pytest.raises(ValueError, match=message):
        forward_terms(lm, batch)
    with pytest.raises(ValueError, match=message):
        lc.fit_curvature(lm, [batch], structure="kfac", progress=False)


@pytest.mark.parametrize("bad, message", [(-3, "contain -3"), (4, "contain 4.*4 classes")])
def test_invalid_classifier_labels_are_named(bad, message):
    model = make_classifier()
    X, y = make_classifier_batch()
    y[1] = bad
    with pytest.raises(ValueError, match=message):
        lc.fit_curvature(model, [(X, y)], structure="diag", progress=False)


def test_float_labels_are_refused(lm):
    X, y = make_classifier_batch()
    with pytest.raises(TypeError, match="integer tensor of class ids"):
        forward_terms(make_classifier(), (X, y.double()))
    batch = make_lm_batch(vocab=VOCAB)
    batch["labels"] = batch["labels"].double()
    with pytest.raises(TypeError, match="integer tensor"):
        forward_terms(lm, batch)
