"""lalora_curv.continual.sequence: TaskSequence on the tiny Llama (filtering/smoothing recursion
against dense references, save/load, bad files). Everything float64."""

from __future__ import annotations

import pytest
import torch

import lalora_curv as lc
from lalora_curv.continual import TaskSequence, process_noise
from lalora_curv.curvature import (
    CurvatureFileError,
    CurvatureMismatchError,
    DiagCurvature,
    DiagLowRankCurvature,
    NonFiniteCurvatureError,
    SumCurvature,
)
from lalora_curv.training import finetune

from ..helpers_continual import (
    make_batches,
    make_model,
    single_thread,  # noqa: F401  (autouse fixture: one torch thread)
)
from .operators import dense_predict, dense_rts, gen, make_operator

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
        predicted = dense_predict(filtered[-1], q)
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
    ref_means, ref_precisions = dense_rts([r.mean for r in seq.tasks], filtered, [q, q])
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
        mean = torch.randn(n, generator=gen(60 + t), dtype=torch.float64)
        exact.add_task(c, mean=mean)
        truncated.add_task(c, mean=mean)
    eye = torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(exact.tasks[0].precision.to_dense(), PRIOR * eye + 3.0 * curvatures[0].to_dense())
    assert [r.precision.rank for r in exact.tasks] == [4, 8, 12]
    assert [r.precision.rank for r in truncated.tasks] == [4, 5, 5]
    # task 2: both see the same exact filtered precision before truncation -> same diagonal
    torch.testing.assert_close(truncated.tasks[1].precision.diagonal(), exact.tasks[1].precision.diagonal())
    assert (truncated.tasks[1].precision.to_dense() - exact.tasks[1].precision.to_dense()).abs().max() > 1e-6


def _one_task_sequence():
    model = make_model(0)
    lora = lc.LoRAParams.from_model(model)
    seq = TaskSequence(model, "diag", prior_precision=0.1)
    curv = DiagCurvature(torch.rand(lora.numel, generator=gen(90), dtype=torch.float64), kind="empirical",
                         signature=lora.signature())
    seq.add_task(curv, mean=torch.randn(lora.numel, generator=gen(91), dtype=torch.float64))
    return seq, model


@pytest.mark.parametrize("where", ["mean", "precision"])
def test_task_sequence_save_refuses_non_finite_state(tmp_path, where):
    """Defect 6: a NaN/inf in a saved mean or precision is a named error at save time (and nothing is
    written), as for curvatures."""
    seq, _ = _one_task_sequence()
    if where == "mean":
        seq.tasks[0].mean[3] = float("nan")
    else:
        seq.tasks[0].precision.diag[5] = float("inf")
    path = tmp_path / "seq.safetensors"
    key = "task0.mean" if where == "mean" else "task0.precision.diag"
    with pytest.raises(NonFiniteCurvatureError, match=key):
        seq.save(path)
    assert not path.exists()


@pytest.mark.parametrize("key", ["task0.mean", "task0.precision.diag", "process_noise"])
def test_task_sequence_load_refuses_non_finite_state(tmp_path, key):
    """Defect 6, load side: a file whose tensors hold NaN/inf (written by another tool or corrupted)
    is a named error, never a silently poisoned prior."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    seq, model = _one_task_sequence()
    path = tmp_path / "seq.safetensors"
    seq.save(path)
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[key] = tensors[key].clone()
    tensors[key][0] = float("nan")
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=header)
    with pytest.raises(NonFiniteCurvatureError, match=key):
        TaskSequence.load(bad, model)
    TaskSequence.load(path, model)  # the untouched file still loads


@pytest.mark.parametrize("prior", [0.0, PRIOR])
def test_task_sequence_lowrank_noise_dynamics_matches_dense(prior):
    """lowrank is a task structure now that the list is read off the classes (its predict step is
    closed form and survives the update); filtering and smoothing against the dense recursion."""
    model = make_model(0)
    lora = lc.LoRAParams.from_model(model)
    n = lora.numel
    eye = torch.eye(n, dtype=torch.float64)
    q = torch.full((n,), 0.2, dtype=torch.float64)
    seq = TaskSequence(model, "lowrank", dynamics="noise", process_noise=q, prior_precision=prior)
    filtered, means, curvatures = [], [], []
    for t in range(3):
        op = make_operator("lowrank", 95 + t, p=n, rank=3)
        curv = lc.curvature.LowRankCurvature(op.U, op.C, kind="empirical", signature=lora.signature())
        curvatures.append(curv)
        means.append(torch.randn(n, generator=gen(98 + t), dtype=torch.float64))
        seq.add_task(curv, mean=means[-1])
        prev = prior * eye if t == 0 else filtered[-1] @ torch.linalg.inv(eye + torch.diag(q) @ filtered[-1])
        filtered.append(prev + curv.to_dense())
    for rec, ref in zip(seq.tasks, filtered):
        torch.testing.assert_close(rec.precision.to_dense() + rec.isotropic * eye, ref, rtol=1e-8, atol=1e-10)
    if prior == 0:
        assert [rec.precision.rank for rec in seq.tasks] == [3, 6, 9]
    smoothed = seq.smoothed().means
    if prior > 0:  # the textbook reference inverts the precisions
        ref_means, _ = dense_rts(means, filtered, [q, q])
        for got, ref in zip(smoothed, ref_means):
            torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-10)
    assert (smoothed[0] - means[0]).abs().max() > 1e-3
    truncated = TaskSequence(model, "lowrank", dynamics="noise", process_noise=q, prior_precision=prior, max_rank=4)
    for curv, mean in zip(curvatures, means):
        truncated.add_task(curv, mean=mean)
    assert [rec.precision.rank for rec in truncated.tasks] == [3, 4, 4]
