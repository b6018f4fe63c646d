"""lalora_curv.continual against dense linear algebra: online accumulation, the predict step
(P^{-1} + Q)^{-1}, RTS smoothing, and TaskSequence on the tiny Llama (filtering/smoothing
recursion, save/load, bad files). Everything float64."""

from __future__ import annotations

import pytest
import torch

import lalora_curv as lc
from lalora_curv.continual import (
    EigenKFACCurvature,
    TaskSequence,
    accumulate,
    predict,
    process_noise,
    rts_smooth,
    smoothing_gain,
    with_isotropic,
)
from lalora_curv.curvature import (
    CurvatureFileError,
    CurvatureMismatchError,
    DenseCurvature,
    DiagCurvature,
    DiagLowRankCurvature,
    KFACCurvature,
    KFACTridiagCurvature,
    LowRankCurvature,
    SumCurvature,
)
from lalora_curv.training import finetune

from .helpers_continual import make_batches, make_model, random_psd
from .helpers_continual import single_thread  # noqa: F401  (autouse fixture: one torch thread)

F64 = dict(kind="empirical")
# Kronecker blocks (d_out, d_in) of the synthetic K-FAC operators; blocks 0 and 1 share an input factor
KFAC_SHAPES = [(3, 4), (2, 4), (5, 2)]
P_KFAC = sum(a * b for a, b in KFAC_SHAPES)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def make_operator(structure: str, seed: int, p: int = 30, rank: int = 3, pd: bool = True):
    """A random PSD operator of ``structure`` over ``p`` (kfac: ``P_KFAC``) coordinates; ``pd`` adds
    a positive floor so that dense references may invert it."""
    g = _gen(seed)
    floor = 0.05 if pd else 0.0
    if structure == "diag":
        d = torch.rand(p, generator=g, dtype=torch.float64) + floor
        if not pd:
            d[:3] = 0
        return DiagCurvature(d, **F64)
    if structure in ("diag_lowrank", "lowrank"):
        U = torch.randn(p, rank, generator=g, dtype=torch.float64)
        C = random_psd(rank, seed=seed + 1)
        if structure == "lowrank":
            return LowRankCurvature(U, C, **F64)
        return DiagLowRankCurvature(torch.rand(p, generator=g, dtype=torch.float64) + floor, U, C, **F64)
    if structure == "dense":
        return DenseCurvature(random_psd(p, seed=seed) + floor * torch.eye(p, dtype=torch.float64), **F64)
    if structure == "kfac":
        shared = random_psd(4, seed=seed + 7) + floor * torch.eye(4, dtype=torch.float64)
        pairs = []
        for i, (d_out, d_in) in enumerate(KFAC_SHAPES):
            G = random_psd(d_out, seed=seed + 10 * i) + floor * torch.eye(d_out, dtype=torch.float64)
            A = shared if d_in == 4 else random_psd(d_in, seed=seed + 10 * i + 1) + floor * torch.eye(d_in,
                                                                                                    dtype=torch.float64)
            pairs.append((G, A, f"block{i}"))
        op = KFACCurvature.from_factor_pairs(pairs, **F64)
        assert len(op.input_factors) == 2  # the shared factor is stored once
        return op
    raise ValueError(structure)


def _dense_predict(P: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The textbook formula (needs an invertible P)."""
    return torch.linalg.inv(torch.linalg.inv(P) + torch.diag(q))


def _block_constant_noise(seed):
    g = _gen(seed)
    return torch.cat([torch.full((a * b,), float(torch.rand(1, generator=g)), dtype=torch.float64)
                      for a, b in KFAC_SHAPES])


# ---------------------------------------------------------------------------------- functional API
@pytest.mark.parametrize("structure, result_type", [("diag", DiagCurvature), ("diag_lowrank", DiagLowRankCurvature),
                                                    ("dense", DenseCurvature), ("kfac", SumCurvature)])
def test_accumulate_equals_dense(structure, result_type):
    P_old, P_new = make_operator(structure, 1), make_operator(structure, 2)
    gamma = 0.7
    out = accumulate(P_old, P_new, gamma)
    assert isinstance(out, result_type)
    if structure == "diag_lowrank":
        assert out.rank == P_old.rank + P_new.rank  # exact: stacked, never truncated silently
    torch.testing.assert_close(out.to_dense(), gamma * P_old.to_dense() + P_new.to_dense(), rtol=1e-12, atol=1e-12)
    assert accumulate(None, P_new, gamma) is P_new
    with pytest.raises(ValueError):
        accumulate(P_old, P_new, -0.1)


@pytest.mark.parametrize("structure", ["diag", "diag_lowrank", "lowrank", "dense", "kfac"])
def test_predict_equals_dense(structure):
    P = make_operator(structure, 3)
    n = P.num_params
    q = _block_constant_noise(4) if structure == "kfac" else torch.rand(n, generator=_gen(4), dtype=torch.float64)
    out = predict(P, q)
    Pd = P.to_dense()
    # reference without inverting P (lowrank is singular): P (I + Q P)^{-1}
    reference = Pd @ torch.linalg.inv(torch.eye(n, dtype=torch.float64) + torch.diag(q) @ Pd)
    torch.testing.assert_close(out.to_dense(), 0.5 * (reference + reference.T), rtol=1e-10, atol=1e-10)
    if structure != "lowrank":
        torch.testing.assert_close(out.to_dense(), _dense_predict(Pd, q), rtol=1e-9, atol=1e-10)
    expected_type = {"kfac": EigenKFACCurvature}.get(structure, type(P))
    assert type(out) is expected_type
    if structure in ("diag_lowrank", "lowrank"):
        assert out.rank == P.rank  # exact with the rank unchanged
    # the noise really changed something (a test that cannot fail otherwise)
    assert (out.to_dense() - Pd).abs().max() > 1e-3
    # diagonal() and quadratic_form of the result agree with its dense form
    v = torch.randn(n, generator=_gen(5), dtype=torch.float64)
    torch.testing.assert_close(out.diagonal(), out.to_dense().diagonal(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.quadratic_form(v), v @ out.to_dense() @ v, rtol=1e-10, atol=1e-12)


def test_predict_scalar_noise_and_singular_diag():
    P = make_operator("diag", 6, pd=False)  # three zero entries: precision 0 stays 0
    out = predict(P, 0.5)
    assert torch.equal(out.diag[:3], torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(out.diag, P.diag / (1 + 0.5 * P.diag))
    out_iso = predict(make_operator("dense", 6), 0.5)
    torch.testing.assert_close(out_iso.to_dense(), _dense_predict(make_operator("dense", 6).to_dense(),
                                                                  torch.full((30,), 0.5, dtype=torch.float64)))


def test_predict_eigen_kfac_is_closed_and_isotropic_fold_is_exact(tmp_path):
    P = make_operator("kfac", 8)
    q1, q2 = _block_constant_noise(9), _block_constant_noise(10)
    twice = predict(predict(with_isotropic(P, 0.2), q1), q2)
    reference = _dense_predict(_dense_predict(P.to_dense() + 0.2 * torch.eye(P_KFAC, dtype=torch.float64), q1), q2)
    assert isinstance(twice, EigenKFACCurvature)
    torch.testing.assert_close(twice.to_dense(), reference, rtol=1e-9, atol=1e-10)
    v = torch.randn(P_KFAC, generator=_gen(1), dtype=torch.float64)
    torch.testing.assert_close(twice.solve(v, damping=0.1),
                               torch.linalg.solve(reference + 0.1 * torch.eye(P_KFAC, dtype=torch.float64), v))
    # eigen_kfac saves and loads through the generic curvature io
    twice.save(tmp_path / "eig.safetensors")
    loaded = lc.load_curvature(tmp_path / "eig.safetensors")
    assert isinstance(loaded, EigenKFACCurvature)
    a, b = twice.state_tensors(), loaded.state_tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(loaded.to_dense(), twice.to_dense())


def test_kfac_predict_with_noise_varying_inside_a_block():
    """Exact only for block-constant Q; the eigenbasis-diagonal approximation is opt-in, and its
    measured error must beat ignoring the noise altogether."""
    P = make_operator("kfac", 11)
    q = 0.5 * torch.rand(P_KFAC, generator=_gen(12), dtype=torch.float64)
    with pytest.raises(ValueError, match="varies within"):
        predict(P, q)
    approx = predict(P, q, kfac_noise="eigenbasis_diagonal").to_dense()
    exact = _dense_predict(P.to_dense(), q)
    err = float(torch.linalg.norm(approx - exact) / torch.linalg.norm(exact))
    err_no_predict = float(torch.linalg.norm(P.to_dense() - exact) / torch.linalg.norm(exact))
    err_mean_noise = float(torch.linalg.norm(predict(P, float(q.mean())).to_dense() - exact) / torch.linalg.norm(exact))
    print(f"eigenbasis-diagonal K-FAC predict: relative Frobenius error {err:.3e} (no predict: {err_no_predict:.3e}, "
          f"isotropic mean noise: {err_mean_noise:.3e})")
    assert err < err_no_predict
    assert err < err_mean_noise


def test_predict_without_closed_form_refuses_or_falls_back_to_dense():
    model = make_model(0)
    lora = lc.LoRAParams.from_model(model)
    tri = lc.fit_curvature(model, make_batches(2, seed=1), structure="kfac_tridiag", progress=False,
                           factor_dtype=torch.float64)
    assert isinstance(tri, KFACTridiagCurvature)
    with pytest.raises(NotImplementedError, match="kfac_tridiag"):
        predict(tri, 0.1)
    q = torch.full((lora.numel,), 0.1, dtype=torch.float64)
    dense = predict(tri, q, dense_fallback=True)
    T = tri.to_dense()
    reference = T @ torch.linalg.inv(torch.eye(lora.numel, dtype=torch.float64) + 0.1 * T)
    torch.testing.assert_close(dense.to_dense(), 0.5 * (reference + reference.T), rtol=1e-9, atol=1e-10)
    with pytest.raises(NotImplementedError):
        predict(make_operator("kfac", 1) + make_operator("kfac", 2), _block_constant_noise(3))


def _dense_rts(means, precisions, qs):
    """Textbook RTS (identity dynamics) with covariances S = Lambda^{-1}."""
    S = [torch.linalg.inv(L) for L in precisions]
    ms, Ss = [None] * len(means), [None] * len(means)
    ms[-1], Ss[-1] = means[-1], S[-1]
    for t in range(len(means) - 2, -1, -1):
        S_pred = S[t] + torch.diag(qs[t])
        J = S[t] @ torch.linalg.inv(S_pred)
        ms[t] = means[t] + J @ (ms[t + 1] - means[t])
        Ss[t] = S[t] + J @ (Ss[t + 1] - S_pred) @ J.T
    return ms, [torch.linalg.inv(s) for s in Ss]


@pytest.mark.parametrize("structure", ["diag", "diag_lowrank", "dense"])
def test_rts_smooth_equals_dense_recursion(structure):
    """Three tasks: filtered precisions Lambda_t = predict(Lambda_{t-1}) + C_t, then RTS."""
    p = 30
    qs = [torch.rand(p, generator=_gen(20 + t), dtype=torch.float64) for t in range(2)]
    means = [torch.randn(p, generator=_gen(30 + t), dtype=torch.float64) for t in range(3)]
    precisions = [make_operator(structure, 40)]
    for t in range(1, 3):
        precisions.append(predict(precisions[-1], qs[t - 1]) + make_operator(structure, 40 + t))
    result = rts_smooth(means, precisions, qs)
    ref_means, ref_precisions = _dense_rts(means, [P.to_dense() for P in precisions], qs)
    for got, ref in zip(result.means, ref_means):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10)
    assert (result.means[0] - means[0]).abs().max() > 1e-3  # smoothing moved the first task
    if structure == "diag_lowrank":
        assert result.precisions is None
    else:
        for got, ref in zip(result.precisions, ref_precisions):
            torch.testing.assert_close(got.to_dense(), ref, rtol=1e-8, atol=1e-9)


def test_smoothing_gain_kfac_matches_dense():
    P = with_isotropic(make_operator("kfac", 13), 0.1)
    q = _block_constant_noise(14)
    v = torch.randn(P_KFAC, generator=_gen(15), dtype=torch.float64)
    J = torch.linalg.inv(torch.eye(P_KFAC, dtype=torch.float64) + torch.diag(q) @ P.to_dense())
    torch.testing.assert_close(smoothing_gain(P, q)(v), J @ v, rtol=1e-10, atol=1e-12)


def test_process_noise_patterns():
    model = make_model(0)
    lora = lc.LoRAParams.from_model(model)
    q = process_noise(lora, 1e-4, per_layer={"*.layers.1.self_attn.*": 1e-2},
                      per_matrix={"*layers.1.self_attn.v_proj.lora_B*": 0.5})
    views = lora.unflatten(q)
    for layer in lora.layers:
        expected_a = 1e-2 if ".layers.1." in layer.name else 1e-4
        expected_b = 0.5 if (".layers.1." in layer.name and "v_proj" in layer.name) else expected_a
        assert torch.all(views[layer.A_name] == expected_a)
        assert torch.all(views[layer.B_name] == expected_b)
    with pytest.raises(KeyError, match="matches no LoRA layer"):
        process_noise(lora, per_layer={"*.layers.7.*": 1.0})
    with pytest.raises(ValueError):
        process_noise(lora, -1.0)


# ---------------------------------------------------------------------------------- TaskSequence
FIT = {"factor_dtype": torch.float64, "rank": 4}
PRIOR = 0.5


def _run_sequence(structure, dynamics, *, gamma=1.0, q=None, steps=3, strength=2.0):
    """Three tasks on the tiny Llama: train (with the sequence's prior penalty), fit, update.

    Returns the sequence, the model, and per task: the dense curvature fitted independently at the
    trained adapter, the dense prior the penalty used (None for task 1) and its value check."""
    model = make_model(0)
    lora = lc.LoRAParams.from_model(model)
    fit_options = dict(FIT) if structure == "diag_lowrank" else {"factor_dtype": torch.float64}
    kwargs = dict(dynamics=dynamics, prior_precision=PRIOR, fit_options=fit_options)
    if dynamics == "noise":
        kwargs["process_noise"] = q
    else:
        kwargs["gamma"] = gamma
    seq = TaskSequence(model, structure, "empirical", **kwargs)
    curvatures, priors = [], []
    for t in range(3):
        train = make_batches(2, seed=100 + t, vocab_range=(6 * t, 6 * t + 19))
        proxy = make_batches(2, seed=200 + t, vocab_range=(6 * t, 6 * t + 19))
        pen = seq.prior_penalty(strength)
        assert (pen is None) == (t == 0)
        if pen is not None:
            priors.append(pen.curv.to_dense() + pen.prior_precision * torch.eye(lora.numel, dtype=torch.float64))
            anchor = seq.tasks[-1].mean
        finetune(model, train, penalty=pen, steps=steps, lr=0.05, seed=t, progress=False)
        if pen is not None:  # the penalty's value at the trained weights, written out densely
            d = lora.flatten().detach() - anchor
            assert float(pen().detach()) == pytest.approx(float(0.5 * strength * d @ priors[-1] @ d), rel=1e-10)
        seq.fit_task(proxy, name=f"T{t}")
        curvatures.append(lc.fit_curvature(model, proxy, structure=structure, progress=False,
                                           **fit_options).to_dense())
    return seq, model, lora, curvatures, priors


@pytest.mark.parametrize("structure", ["diag", "diag_lowrank"])
def test_task_sequence_reproduces_dense_filtering_and_smoothing(structure):
    model0 = make_model(0)
    lora0 = lc.LoRAParams.from_model(model0)
    q = process_noise(lora0, 0.05, per_layer={"*.layers.1.*": 0.5})
    seq, model, lora, C, priors = _run_sequence(structure, "noise", q=q)
    eye = torch.eye(lora.numel, dtype=torch.float64)
    # dense filtering recursion
    filtered = [PRIOR * eye + C[0]]
    for t in range(1, 3):
        predicted = _dense_predict(filtered[-1], q)
        torch.testing.assert_close(priors[t - 1], predicted, rtol=1e-8, atol=1e-10)
        filtered.append(predicted + C[t])
    for rec, ref in zip(seq.tasks, filtered):
        assert rec.precision.structure == structure
        torch.testing.assert_close(rec.precision.to_dense() + rec.isotropic * eye, ref, rtol=1e-8, atol=1e-10)
    if structure == "diag_lowrank":
        assert [rec.precision.rank for rec in seq.tasks] == [4, 8, 12]
    # the tasks really differ and the prior really anchors: a test that could fail
    assert (seq.tasks[1].mean - seq.tasks[0].mean).abs().max() > 1e-3
    # dense RTS smoothing
    ref_means, ref_precisions = _dense_rts([r.mean for r in seq.tasks], filtered, [q, q])
    smoothed = seq.smooth()
    for got, ref in zip(smoothed, ref_means):
        torch.testing.assert_close(lora.flatten(got), ref, rtol=1e-8, atol=1e-10)
    assert (lora.flatten(smoothed[0]) - seq.tasks[0].mean).abs().max() > 1e-4
    if structure == "diag":
        for got, ref in zip(seq.smoothed().precisions, ref_precisions):
            torch.testing.assert_close(got.to_dense(), ref, rtol=1e-8, atol=1e-9)
    seq.set_adapter(smoothed[1])
    torch.testing.assert_close(lora.flatten().detach(), ref_means[1], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("structure", ["kfac", "kfac_tridiag"])
def test_task_sequence_identity_dynamics_accumulates_exactly(structure):
    gamma = 0.8
    seq, model, lora, C, priors = _run_sequence(structure, "identity", gamma=gamma, steps=2)
    eye = torch.eye(lora.numel, dtype=torch.float64)
    filtered = [PRIOR * eye + C[0]]
    for t in range(1, 3):
        torch.testing.assert_close(priors[t - 1], gamma * filtered[-1], rtol=1e-10, atol=1e-12)
        filtered.append(gamma * filtered[-1] + C[t])
    for rec, ref in zip(seq.tasks, filtered):
        torch.testing.assert_close(rec.precision.to_dense() + rec.isotropic * eye, ref, rtol=1e-10, atol=1e-12)
    assert isinstance(seq.tasks[-1].precision, SumCurvature)  # exact sum, not a merged Kronecker pair
    means = [r.mean for r in seq.tasks]
    smoothed = [lora.flatten(s) for s in seq.smooth()]
    torch.testing.assert_close(smoothed[2], means[2])
    torch.testing.assert_close(smoothed[1], means[1] + gamma * (means[2] - means[1]))
    torch.testing.assert_close(smoothed[0], means[0] + gamma * (smoothed[1] - means[0]))


def test_task_sequence_refuses_noise_without_closed_form():
    with pytest.raises(NotImplementedError, match="closed-form predict"):
        TaskSequence(make_model(0), "kfac", dynamics="noise", process_noise=0.1)
    with pytest.raises(ValueError, match="process_noise applies"):
        TaskSequence(make_model(0), "diag", dynamics="identity", process_noise=0.1)


def _assert_same_sequence(a: TaskSequence, b: TaskSequence):
    assert a._config() == b._config()
    assert torch.equal(a.process_noise, b.process_noise) and a.process_noise.dtype == b.process_noise.dtype
    assert len(a.tasks) == len(b.tasks)
    for ra, rb in zip(a.tasks, b.tasks):
        assert (ra.name, ra.isotropic, ra.info) == (rb.name, rb.isotropic, rb.info)
        assert torch.equal(ra.mean, rb.mean)
        assert type(ra.precision) is type(rb.precision)
        sa, sb = ra.precision.state_tensors(), rb.precision.state_tensors()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)
        assert ra.precision._common() == rb.precision._common()


@pytest.mark.parametrize("structure, dynamics", [("diag_lowrank", "noise"), ("kfac", "identity")])
def test_task_sequence_save_load_round_trip(tmp_path, structure, dynamics):
    q = 0.1 if dynamics == "noise" else 0.0
    seq, model, lora, _, _ = _run_sequence(structure, dynamics, gamma=0.9 if dynamics == "identity" else 1.0, q=q,
                                           steps=1)
    path = tmp_path / "seq.safetensors"
    seq.save(path)
    loaded = TaskSequence.load(path, model)
    _assert_same_sequence(seq, loaded)
    assert float(loaded.prior_penalty(1.5)().detach()) == float(seq.prior_penalty(1.5)().detach())
    for x, y in zip(seq.smooth(), loaded.smooth()):
        assert all(torch.equal(x[k], y[k]) for k in x)
    # save -> load -> save is byte-identical
    path2 = tmp_path / "seq2.safetensors"
    loaded.save(path2)
    assert path.read_bytes() == path2.read_bytes()


def test_task_sequence_bad_files(tmp_path):
    model = make_model(0)
    seq = TaskSequence(model, "diag", prior_precision=0.1, fit_options={"factor_dtype": torch.float64})
    seq.fit_task(make_batches(1, seed=3))
    path = tmp_path / "seq.safetensors"
    seq.save(path)
    with pytest.raises(CurvatureMismatchError, match="expected 'kfac'"):
        TaskSequence.load(path, model, structure="kfac")
    with pytest.raises(CurvatureMismatchError, match="shapes"):
        TaskSequence.load(path, make_model(0, r=3))
    with pytest.raises(CurvatureMismatchError, match="LoRA targets"):
        TaskSequence.load(path, make_model(0, targets=("q_proj",)))
    curv_path = tmp_path / "curv.safetensors"
    seq.tasks[0].precision.save(curv_path)
    with pytest.raises(CurvatureFileError, match="not a TaskSequence file"):
        TaskSequence.load(curv_path, model)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(CurvatureFileError):
        TaskSequence.load(broken, model)
    with pytest.raises(CurvatureFileError, match="not found"):
        TaskSequence.load(tmp_path / "missing.safetensors", model)
    with pytest.raises(CurvatureMismatchError):
        seq.add_task(lc.fit_curvature(model, make_batches(1, seed=3), structure="kfac", progress=False))


def test_task_sequence_curvature_scale_and_explicit_rank_truncation():
    """``curvature_scale`` multiplies each curvature; ``max_rank`` truncates the low-rank part
    after each update and keeps the diagonal (the documented approximation)."""
    model = make_model(0)
    lora = lc.LoRAParams.from_model(model)
    n = lora.numel
    curvatures = []
    for t in range(3):
        op = make_operator("diag_lowrank", 50 + t, p=n, rank=4)
        curvatures.append(DiagLowRankCurvature(op.D, op.U, op.C, kind="empirical", signature=lora.signature()))
    q = torch.full((n,), 0.2, dtype=torch.float64)
    exact = TaskSequence(model, "diag_lowrank", dynamics="noise", process_noise=q, prior_precision=PRIOR,
                         curvature_scale=3.0)
    truncated = TaskSequence(model, "diag_lowrank", dynamics="noise", process_noise=q, prior_precision=PRIOR,
                             curvature_scale=3.0, max_rank=5)
    for t, c in enumerate(curvatures):
        mean = torch.randn(n, generator=_gen(60 + t), dtype=torch.float64)
        exact.add_task(c, mean=mean)
        truncated.add_task(c, mean=mean)
    eye = torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(exact.tasks[0].precision.to_dense(), PRIOR * eye + 3.0 * curvatures[0].to_dense())
    assert [r.precision.rank for r in exact.tasks] == [4, 8, 12]
    assert [r.precision.rank for r in truncated.tasks] == [4, 5, 5]
    # task 2: both see the same exact filtered precision before truncation -> same diagonal
    torch.testing.assert_close(truncated.tasks[1].precision.diagonal(), exact.tasks[1].precision.diagonal())
    assert (truncated.tasks[1].precision.to_dense() - exact.tasks[1].precision.to_dense()).abs().max() > 1e-6
