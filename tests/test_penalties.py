"""Penalty values and gradients against the dense quadratic form (autograd, float64)."""

from __future__ import annotations

import pytest
import torch

import lalora_curv as lc
from tests.conftest import make_lm_batch, make_tiny_lm, options_for
from tests.reference import rel_err

ALL = ["dense", "diag", "kfac", "kfac_tridiag", "lowrank", "diag_lowrank", "kfac_delta_w"]


@pytest.fixture(scope="module")
def setup():
    model = make_tiny_lm()
    lora = lc.LoRAParams.from_model(model)
    batches = [make_lm_batch(seed=61), make_lm_batch(seed=62)]
    ops = {s: lc.fit_curvature(model, batches, structure=s, **options_for(s, rank=4), factor_dtype=torch.float64,
                                  progress=False)
           for s in ALL}
    return model, lora, ops


def _perturb(lora, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.params:
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _dense_objective(lora, op, anchor_flat, strength, prior):
    """The penalty written densely: theta-space (or Delta-W space) quadratic with the dense matrix."""
    P = op.to_dense()
    theta = lora.flatten()
    d = theta - anchor_flat
    if op.structure == "kfac_delta_w":
        parts = []
        for layer, (A0, B0) in zip(lora.layers, lora.split_layers(anchor_flat)):
            parts.append((layer.scaling * (layer.B @ layer.A - B0 @ A0)).reshape(-1))
        dw = torch.cat(parts)
        quad = dw @ P @ dw
    else:
        quad = d @ P @ d
    return 0.5 * strength * (quad + prior * (d @ d))


@pytest.mark.parametrize("structure", ALL + ["sum"])
@pytest.mark.parametrize("prior", [0.0, 0.3])
def test_value_and_gradient_match_dense(setup, structure, prior):
    model, lora, ops = setup
    op = ops["kfac"] + ops["diag_lowrank"] if structure == "sum" else ops[structure]
    anchor = lora.snapshot()
    pen = lc.LaplacePenalty(op, anchor=anchor, strength=1.7, lora=lora, prior_precision=prior)
    assert float(pen()) == 0.0  # zero at the anchor ...
    (g0,) = torch.autograd.grad(pen(), lora.params[1])
    # ... with zero gradient (round-off for kfac_delta_w, whose factorized dW = L R^T cancels numerically)
    assert g0.abs().max() <= 1e-15
    try:
        _perturb(lora)
        value = pen()
        grads = torch.autograd.grad(value, lora.params)
        ref_value = _dense_objective(lora, op, lora.flatten(anchor), 1.7, prior)
        ref_grads = torch.autograd.grad(ref_value, lora.params)
        assert abs(float(value - ref_value)) <= 1e-10 * abs(float(ref_value))
        assert rel_err(torch.cat([g.reshape(-1) for g in grads]), torch.cat([g.reshape(-1) for g in ref_grads])) < 1e-10
        pen.strength = 3.4  # linear in strength
        assert abs(float(pen() - 2 * value)) <= 1e-12 * abs(float(value))
    finally:
        with torch.no_grad():
            for p, a in zip(lora.params, anchor.values()):
                p.copy_(a)


def test_tridiag_cross_terms_enter_the_penalty(setup):
    """The tridiag penalty differs from kfac's exactly by the A-B cross terms (non-zero B)."""
    model, lora, ops = setup
    anchor = lora.snapshot()
    try:
        _perturb(lora, seed=3)
        d = lora.flatten().detach() - lora.flatten(anchor)
        diff = ops["kfac_tridiag"].quadratic_form(d) - ops["kfac"].quadratic_form(d)
        P = ops["kfac_tridiag"].to_dense()
        cross = 0.0
        for i in range(len(lora.layers)):
            a0, a1, b1 = lora.offsets[2 * i], lora.offsets[2 * i + 1], lora.offsets[2 * i + 2]
            cross += 2 * d[a0:a1] @ P[a0:a1, a1:b1] @ d[a1:b1]
        assert abs(float(cross)) > 0
        assert abs(float(diff - cross)) <= 1e-10 * abs(float(cross))
    finally:
        with torch.no_grad():
            for p, a in zip(lora.params, anchor.values()):
                p.copy_(a)


def test_delta_w_penalty_anchors_a_once_b_moves():
    """At B = 0 theta-space K-FAC has zero A-blocks (A drifts freely); the Delta-W penalty
    penalizes an A change as soon as B != 0."""
    model = make_tiny_lm(init="default")
    lora = lc.LoRAParams.from_model(model)
    batches = [make_lm_batch(seed=63)]
    kfac = lc.fit_curvature(model, batches, structure="kfac", factor_dtype=torch.float64, progress=False)
    dw = lc.fit_curvature(model, batches, structure="kfac_delta_w", factor_dtype=torch.float64, progress=False)
    anchor = lora.snapshot()
    pk = lc.LaplacePenalty(kfac, anchor=anchor, strength=1.0, lora=lora)
    pw = lc.LaplacePenalty(dw, anchor=anchor, strength=1.0, lora=lora)
    with torch.no_grad():
        for layer in lora.layers:
            layer.B.add_(0.1)
    base_k, base_w = float(pk()), float(pw())
    with torch.no_grad():
        for layer in lora.layers:
            layer.A.add_(0.1)
    assert float(pk()) == pytest.approx(base_k, rel=1e-12)  # A-blocks are zero at B = 0
    assert float(pw()) > base_w * 1.01


def test_l2_penalty(setup):
    model, lora, _ = setup
    anchor = lora.snapshot()
    pen = lc.L2Penalty(anchor=anchor, strength=2.0, lora=lora)
    assert float(pen()) == 0.0
    try:
        _perturb(lora, seed=5)
        d = lora.flatten() - lora.flatten(anchor)
        ref = (d * d).sum()
        assert abs(float(pen() - ref)) <= 1e-12 * float(ref)
        (g,) = torch.autograd.grad(pen(), lora.params[0])
        assert torch.allclose(g, 2.0 * (lora.params[0] - anchor[lora.names[0]]))
    finally:
        with torch.no_grad():
            for p, a in zip(lora.params, anchor.values()):
                p.copy_(a)


def test_bad_inputs(setup):
    _, lora, ops = setup
    with pytest.raises(ValueError, match="strength"):
        lc.LaplacePenalty(ops["diag"], anchor=lora.snapshot(), strength=float("nan"), lora=lora)
    with pytest.raises(ValueError, match="prior_precision"):
        lc.LaplacePenalty(ops["diag"], anchor=lora.snapshot(), strength=1.0, lora=lora, prior_precision=-1)
    with pytest.raises(KeyError, match="not LoRA parameters"):
        lc.L2Penalty(anchor={"x": torch.zeros(1)} | lora.snapshot(), strength=1.0, lora=lora)
    with pytest.raises(TypeError, match="CurvatureOperator"):
        lc.LaplacePenalty(torch.eye(3), anchor=lora.snapshot(), strength=1.0, lora=lora)


def test_penalty_is_fp32_under_bf16_autocast():
    model = make_tiny_lm(dtype=torch.float32)
    lora = lc.LoRAParams.from_model(model)
    op = lc.fit_curvature(model, [make_lm_batch(seed=64)], structure="kfac", progress=False)
    pen = lc.LaplacePenalty(op, anchor=lora.snapshot(), strength=1.0, lora=lora)
    _perturb(lora, seed=7)
    ref = pen()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = pen()
    assert value.dtype == torch.float32
    assert float(value) == pytest.approx(float(ref), rel=1e-6)
