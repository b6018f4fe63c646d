"""Forgetting-mitigation baselines (benchmarks/baselines) on the tiny Llama: exact rules, peft runs,
LaLoRA on a non-zero init."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.baselines import BASELINES, Baseline, Prepared, lalora_on_init
from benchmarks.baselines.migu import MIGUHooks
from lalora_curv import LoRAParams
from lalora_curv.experiments.models import tiny_llama, tiny_tokenizer

LORA = dict(r=2, alpha=4, target_modules=("q_proj", "v_proj"), dropout=0.0)
TEXTS = [
    ["the quick brown fox jumps over", "hello world, this is", "abc def", "lorem ipsum dolor sit amet, co"],
    ["pack my box with five dozen", "sphinx of black quartz", "judge my vow", "zz top 1234 !?"],
]


def _batches(texts=TEXTS):
    tok = tiny_tokenizer()
    out = []
    for group in texts:
        enc = tok(group, return_tensors="pt", padding=True)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def _inputs(batch):
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**_inputs(batch)).logits


def _lora_layers(model):
    from peft.tuners.lora import Linear

    return [(n, m) for n, m in model.named_modules() if isinstance(m, Linear)]


@torch.no_grad()
def _randomize_adapter(model, seed, scale_a=0.5, scale_b=0.5):
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            scale = scale_a if "lora_A" in name else scale_b
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


# ----------------------------------------------------------------------------------------- registry
def test_registry_interface():
    assert list(BASELINES) == ["migu", "milora", "corda_kpm", "intruders", "osf"]
    for name, b in BASELINES.items():
        assert isinstance(b, Baseline) and b.name == name and len(b.paper) > 80
        small, full = b.grid("small"), b.grid("full")
        assert 1 <= len(small) <= 3 and len(full) >= len(small)
        assert all(isinstance(hp, dict) for hp in small + full)
        with pytest.raises(ValueError):
            b.grid("huge")
    assert BASELINES["milora"].post_train(None, {}) is None  # default no-op


# ------------------------------------------------------------------------------------------- MiLoRA
def test_milora_init_keeps_output_and_uses_minor_components():
    batch = _batches()[0]
    model = tiny_llama(seed=3)
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules()
                 if n.endswith(("q_proj", "v_proj"))}
    ref = _logits(model, batch)
    prep = BASELINES["milora"].setup(model, lora_kwargs=LORA, proxy_batches=[batch], hp={}, seed=0)
    assert isinstance(prep, Prepared)
    out = _logits(prep.model, batch)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    layers = _lora_layers(prep.model)
    assert len(layers) == 4
    for name, layer in layers:
        s = layer.scaling["default"]
        assert s == LORA["alpha"] / LORA["r"]
        A = layer.lora_A["default"].weight.detach().double()
        B = layer.lora_B["default"].weight.detach().double()
        W = originals[name.removeprefix("base_model.model.")].double()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        r = LORA["r"]
        minor = U[:, -r:] @ torch.diag(S[-r:]) @ Vh[-r:]
        torch.testing.assert_close(s * B @ A, minor, atol=1e-6, rtol=0)  # s B A = the r minor components
        torch.testing.assert_close(B.T @ B, torch.diag(S[-r:] / s), atol=1e-6, rtol=0)  # B = U_min sqrt(S/s)
        residual = layer.get_base_layer().weight.detach().double()
        torch.testing.assert_close(residual + s * B @ A, W, atol=1e-6, rtol=0)
        assert B.abs().max() > 0
    assert all(p.requires_grad == ("lora_" in n) for n, p in prep.model.named_parameters())


# --------------------------------------------------------------------------------------------- MIGU
def test_migu_masks_exactly_the_top_channels():
    batch = _batches()[0]
    threshold = 0.3
    model = tiny_llama(seed=1, dtype=torch.float64)
    prep = BASELINES["migu"].setup(model, lora_kwargs=LORA, proxy_batches=[batch], hp={"threshold": threshold},
                                   seed=0)
    peft_model = prep.model
    hooks: MIGUHooks = prep.cleanup.__self__
    _randomize_adapter(peft_model, seed=5)  # B != 0: A receives gradients, the LoRA output enters the magnitude
    emb = peft_model.get_input_embeddings().weight
    emb.requires_grad_(True)  # to check that the gradient reaching earlier layers is not masked
    layers = _lora_layers(peft_model)

    def run(enabled):
        hooks.enabled = enabled
        rec = {name: {} for name, _ in layers}
        handles = []
        for name, layer in layers:
            def out_hook(mod, inp, out, name=name):
                out.retain_grad()
                rec[name]["out"] = out
            def a_hook(mod, inp, out, name=name):
                rec[name]["x"] = inp[0].detach()
            handles += [layer.register_forward_hook(out_hook),
                        layer.lora_A["default"].register_forward_hook(a_hook)]
        peft_model.train()
        peft_model.zero_grad(set_to_none=True)
        loss = peft_model(**batch).loss
        loss.backward()
        for h in handles:
            h.remove()
        grads = {name: (layer.lora_A["default"].weight.grad.clone(), layer.lora_B["default"].weight.grad.clone())
                 for name, layer in layers}
        return loss.detach(), rec, grads, emb.grad.clone()

    loss0, rec0, plain, emb0 = run(False)
    loss1, rec1, masked, emb1 = run(True)
    assert torch.equal(loss0, loss1)  # forward values bit-identical
    torch.testing.assert_close(emb1, emb0, atol=1e-12, rtol=1e-10)  # upstream gradient unmasked
    att = batch["attention_mask"].double()
    for name, layer in layers:
        out, g, x = rec0[name]["out"].detach(), rec0[name]["out"].grad, rec0[name]["x"]
        A = layer.lora_A["default"].weight.detach()
        B = layer.lora_B["default"].weight.detach()
        s = layer.scaling["default"]
        d_out = out.shape[-1]
        # manual MIGU mask: mean |out| over attended tokens, L1-normalized, top ceil(T d_out)
        mag = (out.abs() * att[..., None]).sum((0, 1)) / att.sum()
        mag = mag / mag.sum()
        k = math.ceil(threshold * d_out)
        chosen = torch.topk(mag, k).indices
        M = torch.zeros(d_out, dtype=out.dtype)
        M[chosen] = 1
        assert torch.equal(hooks.last_masks[name], M)
        h = x @ A.T
        # reference formulas reproduce the plain LoRA gradients (M = 1) ...
        torch.testing.assert_close(plain[name][1], s * torch.einsum("btc,btr->cr", g, h), atol=1e-12, rtol=1e-9)
        # ... and with M the MIGU ones
        gm = g * M
        torch.testing.assert_close(masked[name][1], s * torch.einsum("btc,btr->cr", gm, h), atol=1e-12, rtol=1e-9)
        torch.testing.assert_close(masked[name][0], s * torch.einsum("btc,cr,bti->ri", gm, B, x),
                                   atol=1e-12, rtol=1e-9)
        # rows of unselected channels exactly zero, selected rows = plain LoRA's
        unselected = M == 0
        assert torch.all(masked[name][1][unselected] == 0)
        torch.testing.assert_close(masked[name][1][~unselected], plain[name][1][~unselected], atol=1e-13, rtol=1e-11)
        assert masked[name][0].abs().max() > 0 and not torch.allclose(masked[name][0], plain[name][0])
    # eval mode / cleanup: no masking
    prep.cleanup()
    _, _, after, _ = run(True)
    for name in plain:
        torch.testing.assert_close(after[name][1], plain[name][1], atol=1e-13, rtol=1e-11)


# -------------------------------------------------------------------------------------------- CorDA
def _manual_corda_kpm_delta(W, inputs, r):
    """peft's KPM rule redone by hand: covariance of max-scaled per-sequence inputs, damped, SVD of W C."""
    cov = sum((x / x.max().abs()).T @ (x / x.max().abs()) for x in inputs) / len(inputs)
    damp = 0.01
    while True:
        fixed = cov + torch.eye(cov.shape[0], dtype=cov.dtype) * cov.diagonal().mean() * damp
        inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inv, torch.eye(cov.shape[0], dtype=cov.dtype)) < 0.05:
            break
        damp *= 2
    U, S, Vh = torch.linalg.svd(W @ fixed, full_matrices=False)
    V = (Vh @ inv).T
    return U[:, -r:] @ torch.diag(S[-r:]) @ V[:, -r:].T


def test_corda_kpm_runs_through_peft_with_proxy_covariance():
    batches = _batches()
    model = tiny_llama(seed=2)
    ref = _logits(model, batches[0])
    # the inputs the covariance must come from: every unpadded proxy sequence, one at a time
    targets = {n: m for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))}
    seen = {n: [] for n in targets}
    handles = [m.register_forward_hook(lambda mod, inp, out, n=n: seen[n].append(inp[0][0].detach().double()))
               for n, m in targets.items()]
    with torch.no_grad():
        for b in batches:
            for i in range(b["input_ids"].shape[0]):
                model(input_ids=b["input_ids"][i][b["attention_mask"][i].bool()][None])
    for h in handles:
        h.remove()
    originals = {n: m.weight.detach().double().clone() for n, m in targets.items()}

    prep = BASELINES["corda_kpm"].setup(model, lora_kwargs=LORA, proxy_batches=batches, hp={}, seed=0)
    torch.testing.assert_close(_logits(prep.model, batches[0]), ref, atol=1e-5, rtol=0)  # residual + sBA = W
    for name, layer in _lora_layers(prep.model):
        key = name.removeprefix("base_model.model.")
        s = layer.scaling["default"]
        A = layer.lora_A["default"].weight.detach().double()
        B = layer.lora_B["default"].weight.detach().double()
        delta = s * B @ A
        assert B.abs().max() > 0
        torch.testing.assert_close(layer.get_base_layer().weight.detach().double() + delta, originals[key],
                                   atol=1e-5, rtol=0)
        expected = _manual_corda_kpm_delta(originals[key], seen[key], LORA["r"])
        torch.testing.assert_close(delta, expected, atol=1e-4, rtol=1e-3)
    assert sum(p.numel() for p in prep.trainable_parameters()) == LoRAParams.from_model(prep.model).numel


# ---------------------------------------------------------------------------------------- intruders
def test_intruder_reduction_runs_through_peft_and_changes_adapter():
    batch = _batches()[0]
    b = BASELINES["intruders"]
    deltas = {}
    for lam in (1.0, 0.25):
        model = tiny_llama(seed=4)
        prep = b.setup(model, lora_kwargs=LORA, proxy_batches=[batch], hp={"mitigation_lambda": lam}, seed=0)
        _randomize_adapter(prep.model, seed=9, scale_a=1.0, scale_b=1.0)  # a "trained" adapter with intruders
        layers = _lora_layers(prep.model)
        before = {n: (l.get_delta_weight("default").detach().double(), l.get_base_layer().weight.detach().double(),
                      l.scaling["default"]) for n, l in layers}
        b.post_train(prep.model, {"mitigation_lambda": lam})
        report = prep.model.intruder_report
        assert report["intruders"] > 0 and report["layers"] == 4
        lora = LoRAParams.from_model(prep.model)  # one adapter, "default", active
        assert len(lora.layers) == 4 and all(set(l.module.lora_A) == {"default"} for l in lora.layers)
        deltas[lam] = {}
        for name, layer in layers:
            dW0, W, s = before[name]
            dW1 = layer.get_delta_weight("default").detach().double()
            deltas[lam][name] = (dW0, dW1)
            # manual rule: scale intruder components of W + dW by lambda, truncate (.)/s to rank r
            U0 = torch.linalg.svd(W, full_matrices=False)[0]
            U, S, Vh = torch.linalg.svd(W + dW0, full_matrices=False)
            cos = (U.T @ U0).abs().max(dim=1).values
            idx = torch.where(cos[:10] < 0.5)[0]
            mitigated = (W + dW0 + (lam - 1) * U[:, idx] @ torch.diag(S[idx]) @ Vh[idx] - W) / s
            Ud, Sd, Vd = torch.linalg.svd(mitigated, full_matrices=False)
            r = LORA["r"]
            expected = s * Ud[:, :r] @ torch.diag(Sd[:r]) @ Vd[:r]
            torch.testing.assert_close(dW1, expected, atol=1e-4, rtol=1e-4)
    for _name, (dW0, dW1) in deltas[1.0].items():  # lambda = 1 keeps the adapter (rank-r truncation is exact)
        torch.testing.assert_close(dW1, dW0, atol=1e-4, rtol=1e-4)
    assert any((dW1 - dW0).abs().max() > 1e-2 for dW0, dW1 in deltas[0.25].values())


# ---------------------------------------------------------------------------------------------- OSF
def test_osf_one_training_step():
    batch = _batches()[0]
    model = tiny_llama(seed=5)
    ref = _logits(model, batch)
    prep = BASELINES["osf"].setup(model, lora_kwargs=LORA, proxy_batches=[batch], hp={"trainable_rank": None},
                                  seed=0)
    m = prep.model
    assert m.peft_type == "OSF" and prep.info["lora"] is False
    torch.testing.assert_close(_logits(m, batch), ref, atol=1e-5, rtol=0)
    params = prep.trainable_parameters()
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert names and all("osf_svd_params" in n for n in names)
    from peft.tuners.osf.layer import OSFLayer

    layers = [l for l in m.modules() if isinstance(l, OSFLayer)]
    assert len(layers) == 4
    for l in layers:  # trainable rank = LoRA r
        assert l.osf_svd_params["default"]["S_low"].numel() == LORA["r"]
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    m.train()
    loss = m(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    for l in layers:  # gradients projected off the frozen high subspace
        U_low = l.osf_svd_params["default"]["U_low"]
        W = l.get_base_layer().weight.detach()
        k = l.effective_rank["default"]
        U_high = torch.linalg.svd(W, full_matrices=False)[0][:, :k]
        assert U_low.grad.abs().max() > 0
        assert (U_high.T @ U_low.grad).abs().max() < 1e-5 * U_low.grad.abs().max() + 1e-7
    opt.step()
    assert all(not torch.equal(a, p.detach()) for a, p in zip(before, params))
    assert all(torch.equal(frozen[n], p) for n, p in m.named_parameters() if not p.requires_grad)
    m.eval()
    with torch.no_grad():
        assert m(**batch).loss < loss  # one step on the same batch lowers its loss


# ------------------------------------------------------------------------------ LaLoRA on a non-zero init
def _check_lalora_on_init(model, batches, structure):
    pen = lalora_on_init(model, batches, structure, strength=0.7, kind="empirical",
                         factor_dtype=torch.float64)
    lora = pen.lora
    assert any(layer.B.abs().max() > 0 for layer in lora.layers)  # non-zero init
    assert float(pen().detach()) == 0.0  # anchored at the init
    P = pen.curv.to_dense()
    assert P.dtype == torch.float64
    a_idx = torch.cat([torch.arange(a, a + n) for name, a, n in zip(lora.names, lora.offsets, lora.numels)
                       if "lora_A" in name])
    diag = P.diagonal()
    assert diag[a_idx].sum() > 1e-6 * diag.sum() and diag[a_idx].sum() > 0  # A-blocks non-zero
    # perturb, then penalty gradient == autograd of the dense quadratic form
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in lora.params:
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    value = pen()
    grads = torch.autograd.grad(value, lora.params)
    d = lora.flatten() - pen.anchor_flat
    dense = 0.5 * pen.strength * d @ P @ d
    dense_grads = torch.autograd.grad(dense, lora.params)
    torch.testing.assert_close(value, dense, atol=1e-12, rtol=1e-9)
    for a, b in zip(grads, dense_grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-9)
    assert value > 0
    with torch.no_grad():  # back to the init
        for p, a in zip(lora.params, lora.unflatten(pen.anchor_flat).values()):
            p.copy_(a)


def test_lalora_on_milora_init():
    batches = _batches()
    model = tiny_llama(seed=6, dtype=torch.float64)
    prep = BASELINES["milora"].setup(model, lora_kwargs=LORA, proxy_batches=batches, hp={}, seed=0)
    for structure in ("kfac_tridiag", "dense"):
        _check_lalora_on_init(prep, batches, structure)


def test_lalora_on_corda_init():
    batches = _batches()
    model = tiny_llama(seed=7)  # peft's CorDA init needs float32; cast afterwards
    prep = BASELINES["corda_kpm"].setup(model, lora_kwargs=LORA, proxy_batches=batches, hp={}, seed=0)
    prep.model.to(torch.float64)
    _check_lalora_on_init(prep, batches, "kfac_tridiag")
