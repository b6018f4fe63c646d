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


def _dense_objective(lora, op, anchor_flat, strength, prior, anchor_scaling=None):
    """The penalty written densely: theta-space (or Delta-W space) quadratic with the dense matrix;
    ``dW_l = s_l B A - s0_l B0 A0`` with ``s0`` = ``anchor_scaling`` (default: the live scaling)."""
    P = op.to_dense()
    theta = lora.flatten()
    d = theta - anchor_flat
    if op.space == "delta_w":
        parts = []
        s0 = anchor_scaling or [layer.scaling for layer in lora.layers]
        for layer, (A0, B0), s0_l in zip(lora.layers, lora.split_layers(anchor_flat), s0):
            parts.append((layer.scaling * layer.B @ layer.A - s0_l * B0 @ A0).reshape(-1))
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


def _restore(lora, anchor):
    with torch.no_grad():
        for p, a in zip(lora.params, anchor.values()):
            p.copy_(a)


def _flat_grads(value, lora):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, lora.params)])


# ------------------------------------------------------------------ Delta-W sums and spaces (defects 2, 11)
@pytest.fixture(scope="module")
def square_lm():
    """q_proj only with r = d/2: the theta space and the Delta-W space have the SAME size
    (r (d_in + d_out) = d_out d_in), so only ``curv.space`` can tell them apart."""
    model = make_tiny_lm(targets=("q_proj",), r=8)
    lora = lc.LoRAParams.from_model(model)
    assert lora.numel == sum(layer.d_out * layer.d_in for layer in lora.layers)
    fit = lambda seed, structure: lc.fit_curvature(model, [make_lm_batch(seed=seed)], structure=structure,  # noqa: E731
                                                   factor_dtype=torch.float64, progress=False)
    return model, lora, {"dw1": fit(71, "kfac_delta_w"), "dw2": fit(72, "kfac_delta_w"),
                         "dw3": fit(73, "kfac_delta_w"), "kfac": fit(71, "kfac")}


@pytest.mark.parametrize("combo", ["a+b", "sum3", "scaled"])
def test_penalty_of_a_delta_w_sum_is_the_sum_of_penalties(square_lm, combo, monkeypatch):
    _, lora, ops = square_lm
    dw1, dw2, dw3 = ops["dw1"], ops["dw2"], ops["dw3"]
    parts = {"a+b": [(1.0, dw1), (1.0, dw2)], "sum3": [(1.0, dw1), (1.0, dw2), (1.0, dw3)],
             "scaled": [(0.5, dw1), (2.0, dw2)]}[combo]
    op = dw1 + dw2 if combo == "a+b" else sum(alpha * t for alpha, t in parts)
    assert op.space == "delta_w" and op.num_params == lora.numel  # sizes match the theta space
    anchor = lora.snapshot()
    pen = lc.LaplacePenalty(op, anchor=anchor, strength=1.3, lora=lora, prior_precision=0.2)
    singles = [lc.LaplacePenalty(alpha * t, anchor=anchor, strength=1.3, lora=lora) for alpha, t in parts]
    try:
        _perturb(lora, seed=11)
        # the fast low-rank path sums the Kronecker terms' quadratics: no term's flat quadratic_form runs
        monkeypatch.setattr(type(dw1), "quadratic_form", lambda *a, **k: pytest.fail("flat Delta-W path used"))
        value = pen()
        grads = _flat_grads(value, lora)
        monkeypatch.undo()
        ref = _dense_objective(lora, op, lora.flatten(anchor), 1.3, 0.2)
        assert abs(float(value - ref)) <= 1e-10 * abs(float(ref))
        assert rel_err(grads, _flat_grads(ref, lora)) < 1e-10
        d = lora.flatten() - lora.flatten(anchor)
        total = sum(p() for p in singles) + 0.5 * 1.3 * 0.2 * (d @ d)
        assert abs(float(value - total)) <= 1e-10 * abs(float(total))
        assert rel_err(grads, _flat_grads(total, lora)) < 1e-10
    finally:
        _restore(lora, anchor)


def test_spaces_never_mix_even_when_sizes_match(square_lm):
    _, lora, ops = square_lm
    theta_op = ops["kfac"]
    assert theta_op.num_params == ops["dw1"].num_params
    with pytest.raises(ValueError, match="different spaces"):
        theta_op + ops["dw1"]
    with pytest.raises(ValueError, match="different spaces"):
        sum([ops["dw1"], ops["dw2"], theta_op])
    # each penalty follows its operator's space: theta-space K-FAC on theta, Delta-W on Delta W
    anchor = lora.snapshot()
    try:
        _perturb(lora, seed=12)
        for op in (theta_op, 2.0 * theta_op, ops["dw1"] + ops["dw2"]):
            pen = lc.LaplacePenalty(op, anchor=anchor, strength=1.0, lora=lora)
            ref = _dense_objective(lora, op, lora.flatten(anchor), 1.0, 0.0)
            assert abs(float(pen() - ref)) <= 1e-10 * abs(float(ref)), op.structure
    finally:
        _restore(lora, anchor)


def test_wrong_sized_operator_names_its_space(setup):
    _, lora, ops = setup
    from lalora_curv.curvature.diag import DiagCurvature

    dw_sized = DiagCurvature(torch.ones(ops["kfac_delta_w"].num_params, dtype=torch.float64), kind="ggn")
    with pytest.raises(ValueError, match="'theta' space.*spaces never mix"):
        lc.LaplacePenalty(dw_sized, anchor=lora.snapshot(), strength=1.0, lora=lora)


def test_anchor_scaling_is_stored_with_the_anchor():
    """peft's set_scale after the anchor was taken changes the current Delta W only."""
    model = make_tiny_lm()
    lora = lc.LoRAParams.from_model(model)
    dw = lc.fit_curvature(model, [make_lm_batch(seed=74)], structure="kfac_delta_w", factor_dtype=torch.float64,
                          progress=False)
    anchor = lora.snapshot()
    s0 = [layer.scaling for layer in lora.layers]
    pen = lc.LaplacePenalty(dw, anchor=anchor, strength=1.0, lora=lora)
    explicit = lc.LaplacePenalty(dw, anchor=anchor, strength=1.0, lora=lora, anchor_scaling=s0)
    assert float(pen()) == 0.0
    for layer in lora.layers:
        layer.module.set_scale("default", 3.0)  # scaling = 3 * alpha / r
    s1 = [layer.scaling for layer in lora.layers]
    assert s1 != s0
    ref = _dense_objective(lora, dw, lora.flatten(anchor), 1.0, 0.0, anchor_scaling=s0)
    assert float(ref) > 0  # dW = (s1 - s0) B0 A0 != 0 with theta unchanged
    for p in (pen, explicit):
        value = p()
        ref = _dense_objective(lora, dw, lora.flatten(anchor), 1.0, 0.0, anchor_scaling=s0)
        assert abs(float(value - ref)) <= 1e-10 * float(ref)
        assert rel_err(_flat_grads(value, lora), _flat_grads(ref, lora)) < 1e-10
    assert "anchor_scaling" in pen.state_dict()
    # an anchor taken under another scaling: given explicitly
    other = lc.LaplacePenalty(dw, anchor=anchor, strength=1.0, lora=lora, anchor_scaling=[0.5] * len(s0))
    ref_other = _dense_objective(lora, dw, lora.flatten(anchor), 1.0, 0.0, anchor_scaling=[0.5] * len(s0))
    assert abs(float(other() - ref_other)) <= 1e-10 * float(ref_other)
    with pytest.raises(ValueError, match="anchor_scaling has 1 entries"):
        lc.LaplacePenalty(dw, anchor=anchor, strength=1.0, lora=lora, anchor_scaling=[1.0])


# ------------------------------------------------------------------ strength / prior_precision (defect 5)
@pytest.mark.parametrize("name", ["strength", "prior_precision"])
def test_strength_and_prior_precision_validated_on_every_assignment(setup, name):
    _, lora, ops = setup
    pen = lc.LaplacePenalty(ops["diag"], anchor=lora.snapshot(), strength=1.0, lora=lora, prior_precision=0.1)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=name):
            setattr(pen, name, bad)
        with pytest.raises(ValueError, match=name):
            lc.LaplacePenalty(ops["diag"], anchor=lora.snapshot(), lora=lora, **{"strength": 1.0, name: bad})
    for bad in (True, "0.5", torch.tensor(0.5), None):
        with pytest.raises(TypeError, match=f"{name} must be a real number"):
            setattr(pen, name, bad)
    assert getattr(pen, name) in (1.0, 0.1)  # unchanged by the refused assignments
    import numpy as np

    setattr(pen, name, np.float64(0.25))
    assert getattr(pen, name) == 0.25 and type(getattr(pen, name)) is float
    setattr(pen, name, 2)
    assert getattr(pen, name) == 2.0
