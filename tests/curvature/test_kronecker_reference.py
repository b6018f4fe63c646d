"""The K-FAC family on causal LMs against references built here, independently of our hooks and
Kronecker code: activations and output gradients captured with plain module hooks and
``retain_grad``, factors summed by hand, blocks formed with ``torch.kron``.

Causal LMs are where "expand" K-FAC is an approximation (so the one-sample exactness tests of
test_fit_reference.py do not apply): here the reference is the definition itself,
``U = (1/M) sum_t u_t u_t^T`` over positions and ``V = (1/P) sum_t v_t v_t^T`` over attended
positions (SEMANTICS §1, §3), for ``kind="empirical"`` (one backward of the summed loss gives
every ``r = softmax(z) - onehot(y)`` at once).
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from torch.nn import functional as F

import lalora_curv as lc
from tests.conftest import make_lm_batch, make_tiny_lm
from tests.reference import rel_err

F64 = dict(factor_dtype=torch.float64, progress=False)


def _capture(modules):
    """Forward hooks keeping each module's input and (grad-retaining) output."""
    store, handles = {}, []
    for key, module in modules.items():
        def hook(mod, inputs, output, key=key):
            output.retain_grad()
            store[key] = (inputs[0], output)
        handles.append(module.register_forward_hook(hook))
    return store, handles


def _empirical_backward(model, batch):
    """Forward + one backward of the summed token loss; returns (num_terms, attended mask)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    labels, mask = batch["labels"], batch["attention_mask"].bool()
    term = (labels[:, 1:] != -100) & mask[:, 1:] & mask[:, :-1]
    logits = out.logits[:, :-1][term]
    F.cross_entropy(logits, labels[:, 1:][term], reduction="sum").backward()
    return int(term.sum()), mask


def test_tridiag_cross_blocks_on_a_causal_lm_match_the_definition():
    model = make_tiny_lm()  # non-zero A and B: A-blocks and A-B cross blocks are non-trivial
    lora = lc.LoRAParams.from_model(model)
    batches = [make_lm_batch(seed=21), make_lm_batch(seed=22, lengths=(6, 6, 3))]
    tri = lc.fit_curvature(model, batches, structure="kfac_tridiag", kind="empirical", **F64).to_dense()

    modules = {(i, w): getattr(layer, f"lora_{w}") for i, layer in enumerate(lora.layers) for w in "AB"}
    U = [0.0] * len(lora.layers)
    V = [0.0] * len(lora.layers)
    M = P = 0
    for batch in batches:
        store, handles = _capture(modules)
        try:
            num_terms, mask = _empirical_backward(model, batch)
        finally:
            for h in handles:
                h.remove()
        for i in range(len(lora.layers)):
            (aA, outA), (aB, outB) = store[(i, "A")], store[(i, "B")]
            u = torch.cat([outA.grad[mask], outB.grad[mask]], 1)
            v = torch.cat([aA.detach()[mask], aB.detach()[mask]], 1)
            U[i] = U[i] + u.T @ u
            V[i] = V[i] + v.T @ v
        M += num_terms
        P += int(mask.sum())
    model.zero_grad(set_to_none=True)

    offset = 0
    cross_norm = 0.0
    for i, layer in enumerate(lora.layers):
        r, d_in, d_out = layer.rank, layer.d_in, layer.d_out
        Ui, Vi = U[i] / M, V[i] / P
        blocks = [[torch.kron(Ui[:r, :r], Vi[:d_in, :d_in]), torch.kron(Ui[:r, r:], Vi[:d_in, d_in:])],
                  [torch.kron(Ui[r:, :r], Vi[d_in:, :d_in]), torch.kron(Ui[r:, r:], Vi[d_in:, d_in:])]]
        expected = torch.cat([torch.cat(row, 1) for row in blocks], 0)
        n = r * d_in + d_out * r
        got = tri[offset:offset + n, offset:offset + n]
        assert rel_err(got, expected) < 1e-10, layer.name
        cross_norm += float(blocks[0][1].norm())
        offset += n
    assert cross_norm > 1e-3 * float(tri.norm()), "the cross blocks must be non-trivial (else this proves nothing)"
    assert tri[: lora.layers[0].numel, lora.layers[0].numel:].abs().max() == 0, "no coupling across layers"


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=23, n_embd=8, n_layer=1, n_head=2, n_positions=16, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    model = get_peft_model(GPT2LMHeadModel(cfg).double(), LoraConfig(r=2, target_modules=["c_attn"],
                                                                       fan_in_fan_out=True, lora_dropout=0.0,
                                                                       init_lora_weights="gaussian"))
    with torch.no_grad():
        for layer in lc.LoRAParams.from_model(model).layers:
            layer.B.normal_(0, 0.3)
    return model.eval()


def test_kfac_delta_w_on_gpt2_conv1d_matches_the_definition():
    """GPT-2's Conv1D stores its weight as (d_in, d_out); the Delta-W space is (d_out, d_in)
    row-major all the same. Reference: inputs and output gradients of the adapted layer itself."""
    model = _tiny_gpt2()
    lora = lc.LoRAParams.from_model(model)
    assert all(layer.fan_in_fan_out for layer in lora.layers)
    batch = make_lm_batch(seed=5)
    dw = lc.fit_curvature(model, [batch], structure="kfac_delta_w", kind="empirical", **F64)

    store, handles = _capture({i: layer.module for i, layer in enumerate(lora.layers)})
    try:
        num_terms, mask = _empirical_backward(model, batch)
    finally:
        for h in handles:
            h.remove()
    offset = 0
    dense = dw.to_dense()
    for i, layer in enumerate(lora.layers):
        a, out = store[i]
        g, x = out.grad[mask], a.detach()[mask]
        G, X = g.T @ g / num_terms, x.T @ x / int(mask.sum())
        n = layer.d_out * layer.d_in
        assert (layer.d_out, layer.d_in) == (G.shape[0], X.shape[0])
        assert rel_err(dense[offset:offset + n, offset:offset + n], torch.kron(G, X)) < 1e-10
        offset += n

    # the penalty's Delta W is peft's own delta weight, transposed to (d_out, d_in) for Conv1D
    anchor = lora.snapshot()
    with torch.no_grad():
        for p in lora.params:
            p.add_(0.05 * torch.randn_like(p))
    pen = lc.LaplacePenalty(dw, anchor=anchor, strength=2.0, lora=lora)
    dW = []
    for layer in lora.layers:
        now = layer.module.get_delta_weight(layer.adapter_name).T  # stored (d_in, d_out) for Conv1D
        A0, B0 = anchor[layer.A_name], anchor[layer.B_name]
        dW.append((now - layer.scaling * B0 @ A0).reshape(-1))
    d = torch.cat(dW)
    torch.testing.assert_close(pen(), 0.5 * 2.0 * d @ dense @ d, rtol=1e-10, atol=1e-12)
