"""Save -> load is bit-exact; mismatches and corrupt files fail with named errors; no pickle."""

from __future__ import annotations

import json

import pytest
import torch

import lalora_curv as lc
from lalora_curv.curvature.io import CurvatureFileError, CurvatureMismatchError
from tests.conftest import make_classifier, make_classifier_batch, make_lm_batch, make_tiny_lm

ALL = ["dense", "diag", "kfac", "kfac_tridiag", "lowrank", "diag_lowrank", "kfac_delta_w"]


@pytest.fixture(scope="module")
def setup():
    model = make_tiny_lm()
    lora = lc.LoRAParams.from_model(model)
    batches = [make_lm_batch(seed=51)]
    ops = {s: lc.fit_curvature(model, batches, structure=s, rank=3, progress=False) for s in ALL}
    return model, lora, ops


@pytest.mark.parametrize("structure", ALL + ["sum"])
def test_round_trip_bit_exact(setup, tmp_path, structure):
    _, lora, ops = setup
    op = ops["kfac"] + 0.5 * ops["kfac_tridiag"] if structure == "sum" else ops[structure]
    path = tmp_path / "curv.safetensors"
    op.save(path)
    loaded = lc.load_curvature(path, lora=lora)
    assert type(loaded) is type(op)
    assert loaded.structure == op.structure and loaded.kind == op.kind and loaded.info == op.info
    a, b = op.state_tensors(), loaded.state_tensors()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    v = torch.randn(op.num_params)
    # same state bits; BLAS may round differently on differently aligned buffers, hence allclose
    a, b = op.matvec(v), loaded.matvec(v)
    assert float((a - b).norm()) <= 1e-5 * float(a.norm())
    assert not list(tmp_path.glob(".tmp-*")), "temporary file left behind"


def test_file_is_safetensors_with_json_metadata(setup, tmp_path):
    _, _, ops = setup
    path = tmp_path / "c.safetensors"
    ops["diag"].save(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["lalora_curv"])
    assert meta["structure"] == "diag" and meta["format"] == 1
    assert meta["common"]["signature"]["names"][0].endswith("lora_A.default.weight")


def test_load_into_other_rank_targets_or_adapter_fails(setup, tmp_path):
    _, _, ops = setup
    path = tmp_path / "c.safetensors"
    ops["kfac"].save(path)
    other_rank = lc.LoRAParams.from_model(make_tiny_lm(r=4))
    with pytest.raises(CurvatureMismatchError, match="shapes.*rank"):
        lc.load_curvature(path, lora=other_rank)
    other_targets = lc.LoRAParams.from_model(make_tiny_lm(targets=("q_proj", "k_proj")))
    with pytest.raises(CurvatureMismatchError, match="k_proj"):
        lc.load_curvature(path, lora=other_targets)
    model = make_tiny_lm()
    from peft import LoraConfig

    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.set_adapter("other")
    with pytest.raises(CurvatureMismatchError, match="adapter 'default'"):
        lc.load_curvature(path, lora=lc.LoRAParams.from_model(model, adapter_name="other"))
    with pytest.raises(CurvatureMismatchError, match="expected 'diag'"):
        lc.load_curvature(path, structure="diag")


def test_penalty_refuses_curvature_of_other_registry(setup):
    _, _, ops = setup
    other = lc.LoRAParams.from_model(make_tiny_lm(r=4))
    with pytest.raises(CurvatureMismatchError):
        lc.LaplacePenalty(ops["diag"], anchor=other.snapshot(), strength=1.0, lora=other)


def test_corrupted_truncated_and_foreign_files(setup, tmp_path):
    _, lora, ops = setup
    path = tmp_path / "c.safetensors"
    ops["kfac"].save(path)
    data = path.read_bytes()
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CurvatureFileError, match="truncated or corrupted"):
        lc.load_curvature(truncated, lora=lora)
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(b"\x80\x04K\x01." + b"0" * 64)  # a pickle, never unpickled
    with pytest.raises(CurvatureFileError):
        lc.load_curvature(garbage)
    from safetensors.torch import save_file

    foreign = tmp_path / "f.safetensors"
    save_file({"x": torch.ones(2)}, str(foreign))
    with pytest.raises(CurvatureFileError, match="not a lalora_curv"):
        lc.load_curvature(foreign)
    with pytest.raises(CurvatureFileError, match="not found"):
        lc.load_curvature(tmp_path / "missing.safetensors")


def test_nan_in_saved_state_is_refused(setup, tmp_path):
    _, lora, ops = setup
    bad = 1.0 * ops["diag"]
    bad.diag[0] = float("nan")
    path = tmp_path / "nan.safetensors"
    bad.save(path)
    with pytest.raises(lc.NonFiniteCurvatureError, match="NaN"):
        lc.load_curvature(path, lora=lora)


def test_save_failure_keeps_previous_file(setup, tmp_path, monkeypatch):
    _, lora, ops = setup
    path = tmp_path / "c.safetensors"
    ops["diag"].save(path)
    before = path.read_bytes()
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        ops["kfac"].save(path)
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".tmp-*"))


def test_nan_curvature_raises_at_fit_time():
    model = make_classifier()
    X, y = make_classifier_batch()
    X[0, 0] = float("nan")
    with pytest.raises(lc.NonFiniteCurvatureError, match="NaN"):
        lc.fit_curvature(model, [(X, y)], structure="kfac", progress=False)
    with pytest.raises(lc.NonFiniteCurvatureError, match="NaN"):
        lc.fit_curvature(model, [(X, y)], structure="diag", progress=False)


# ------------------------------------------------------------------ saved beside the adapter (issue 16)
def test_save_pretrained_beside_adapter_survives_peft_round_trips(setup, tmp_path):
    from peft import PeftModel

    from lalora_curv.curvature.io import CURVATURE_FILENAME

    model, lora, ops = setup
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    written = ops["kfac"].save_pretrained(adapter_dir)
    assert written == adapter_dir / CURVATURE_FILENAME == adapter_dir / "lalora_curvature.safetensors"
    # one file, metadata in its header: nothing but peft's files and ours
    ours = {p.name for p in adapter_dir.iterdir()} - {"adapter_model.safetensors", "adapter_config.json",
                                                      "README.md"}
    assert ours == {CURVATURE_FILENAME}

    def reloaded_matches(folder, lora_now):
        for source in (folder, folder / CURVATURE_FILENAME):  # a folder or the file
            loaded = lc.load_curvature(source, lora=lora_now)
            a, b = ops["kfac"].state_tensors(), loaded.state_tensors()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    base = make_tiny_lm().unload()  # same base weights (same seed), LoRA removed
    peft_model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    lora_loaded = lc.LoRAParams.from_model(peft_model)
    reloaded_matches(adapter_dir, lora_loaded)
    peft_model.save_pretrained(adapter_dir)  # a second save into the same folder keeps the curvature
    reloaded_matches(adapter_dir, lora_loaded)
    with pytest.raises(CurvatureMismatchError, match="rank"):
        lc.load_curvature(adapter_dir, lora=lc.LoRAParams.from_model(make_tiny_lm(r=4)))


def test_load_from_folder_without_curvature_names_folder_and_file(tmp_path, setup):
    model, lora, _ = setup
    model.save_pretrained(tmp_path / "plain_adapter")
    with pytest.raises(CurvatureFileError, match=r"plain_adapter.*lalora_curvature\.safetensors"):
        lc.load_curvature(tmp_path / "plain_adapter", lora=lora)


def test_save_pretrained_follows_peft_layout_for_named_adapters(tmp_path):
    from peft import LoraConfig

    model = make_tiny_lm()
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.set_adapter("other")
    lora = lc.LoRAParams.from_model(model, adapter_name="other")
    curv = lc.fit_curvature(model, [make_lm_batch(seed=3)], structure="diag", lora=lora, progress=False)
    model.save_pretrained(tmp_path)
    path = curv.save_pretrained(tmp_path)
    assert path.parent == tmp_path / "other" and (tmp_path / "other" / "adapter_model.safetensors").is_file()
    loaded = lc.load_curvature(tmp_path, lora=lora)
    assert torch.equal(loaded.diag, curv.diag)


# ------------------------------------------------------------------ how the file is written (defect 14)
def test_saved_file_follows_the_umask(setup, tmp_path):
    import os
    import stat

    _, _, ops = setup
    old = os.umask(0o022)
    try:
        ops["diag"].save(tmp_path / "a.safetensors")
        os.umask(0o077)
        ops["diag"].save(tmp_path / "b.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.safetensors").stat().st_mode) == 0o600


def test_fsync_of_the_file_precedes_the_rename(setup, tmp_path, monkeypatch):
    import os

    _, _, ops = setup
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        is_dir = os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")) if os.path.exists("/proc/self/fd") else None
        calls.append(("fsync_dir" if is_dir else "fsync_file"))
        return real_fsync(fd)

    def replace(src, dst):
        calls.append("replace")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    ops["diag"].save(tmp_path / "c.safetensors")
    assert "replace" in calls and "fsync_file" in calls[: calls.index("replace")], calls
    assert "fsync_dir" in calls[calls.index("replace"):], calls


def test_symlinked_target_is_written_through(setup, tmp_path):
    _, lora, ops = setup
    real = tmp_path / "store" / "curv.safetensors"
    real.parent.mkdir()
    ops["diag"].save(real)
    link = tmp_path / "link.safetensors"
    link.symlink_to(real)
    ops["kfac"].save(link)
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert lc.load_curvature(real, lora=lora).structure == "kfac"
    assert not list(real.parent.glob(".tmp-*")) and not list(tmp_path.glob(".tmp-*"))


# ------------------------------------------------------------------ load validation (defect 6)
def _rewrite(src, dst, *, edit_tensors=None, edit_meta=None, raw_meta=None):
    """Copy a saved curvature with its tensors and/or its JSON metadata edited."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        header = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(header["lalora_curv"])
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, str(dst), metadata={"lalora_curv": raw_meta if raw_meta is not None else json.dumps(meta)})
    return dst


def _deep_copy(op):
    return type(op).from_state({k: v.clone() for k, v in op.state_tensors().items()}, op.state_meta(),
                               op._common() | {"num_params": op.num_params})


def _with_eigen_kfac(ops):
    eigen_cls = lc.CurvatureOperator.registry["eigen_kfac"]  # wherever the class lives
    return {**ops, "sum": ops["kfac"] + 0.5 * ops["kfac_tridiag"], "eigen_kfac": eigen_cls.from_kfac(ops["kfac"])}


@pytest.mark.parametrize("structure", ALL + ["sum", "eigen_kfac"])
def test_every_structure_declares_psd_parts_and_loading_refuses_a_broken_one(setup, tmp_path, structure):
    _, lora, ops = setup
    op = _deep_copy(_with_eigen_kfac(ops)[structure])
    vectors, matrices = op.psd_parts()
    assert vectors or matrices
    ok = tmp_path / "ok.safetensors"
    op.save(ok)
    lc.load_curvature(ok, lora=lora)  # a fitted operator passes
    # break the last part: a vector entry below zero, or a matrix with a negative eigenvalue
    if matrices:
        M = matrices[-1]
        M[0, 0] -= 2 * float(torch.linalg.matrix_norm(M)) + 1.0
    else:
        v = vectors[-1]
        v.view(-1)[0] = -(float(v.abs().max()) + 1.0)
    bad = tmp_path / "bad.safetensors"
    op.save(bad)
    with pytest.raises(CurvatureFileError, match=r"bad\.safetensors.*not PSD"):
        lc.load_curvature(bad, lora=lora)
    assert lc.load_curvature(bad, lora=lora, validate_psd=False).structure == op.structure


def test_base_psd_parts_names_the_structure():
    class Unchecked(lc.CurvatureOperator):
        pass

    with pytest.raises(NotImplementedError, match="'base'.*Unchecked"):
        Unchecked(3, kind="ggn").psd_parts()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_psd_tolerance_is_roundoff_not_more(tmp_path, dtype):
    from lalora_curv.curvature.dense import DenseCurvature

    eps = torch.finfo(dtype).eps
    Q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))

    def with_lowest(relative):
        evals = torch.tensor([1.0, 0.5, 0.2, 0.1, 0.0, relative], dtype=torch.float64)
        M = (Q * evals) @ Q.T
        M = (0.5 * (M + M.T)).to(dtype)
        path = tmp_path / f"dense_{relative}.safetensors"
        DenseCurvature(M, kind="ggn").save(path)
        return path

    lc.load_curvature(with_lowest(-20 * eps))  # roundoff of a rank-deficient fit: accepted
    with pytest.raises(CurvatureFileError, match="not PSD.*eigenvalue"):
        lc.load_curvature(with_lowest(-1000 * eps))


def test_wrong_dtypes_are_refused(setup, tmp_path):
    _, lora, ops = setup
    path = tmp_path / "k.safetensors"
    ops["kfac"].save(path)

    def to_int(ts):
        ts["grad.0"] = ts["grad.0"].round().to(torch.int64)

    def mixed(ts):
        ts["grad.0"] = ts["grad.0"].to(torch.float64 if ts["grad.0"].dtype == torch.float32 else torch.float32)

    with pytest.raises(CurvatureFileError, match=r"i\.safetensors.*floating point.*grad\.0"):
        lc.load_curvature(_rewrite(path, tmp_path / "i.safetensors", edit_tensors=to_int), lora=lora)
    with pytest.raises(CurvatureFileError, match=r"m\.safetensors.*mixed float dtypes"):
        lc.load_curvature(_rewrite(path, tmp_path / "m.safetensors", edit_tensors=mixed), lora=lora)
    mixed_op = _deep_copy(ops["kfac"])
    mixed_op.grad_factors[0] = mixed_op.grad_factors[0].to(torch.float16)
    with pytest.raises(ValueError, match="mixed float dtypes"):  # refused when saving already
        mixed_op.save(tmp_path / "never.safetensors")


def test_missing_signature_is_refused(setup, tmp_path):
    _, lora, ops = setup
    path = tmp_path / "d.safetensors"
    ops["diag"].save(path)

    def drop(meta):
        del meta["common"]["signature"]

    def empty(meta):
        meta["common"]["signature"] = {}

    with pytest.raises(CurvatureFileError, match=r"n\.safetensors.*no 'signature'"):
        lc.load_curvature(_rewrite(path, tmp_path / "n.safetensors", edit_meta=drop))
    unsigned = _rewrite(path, tmp_path / "e.safetensors", edit_meta=empty)
    with pytest.raises(CurvatureFileError, match=r"e\.safetensors.*no LoRA signature"):
        lc.load_curvature(unsigned, lora=lora)
    assert lc.load_curvature(unsigned).structure == "diag"  # a hand-built operator without lora is fine


@pytest.mark.parametrize("case, message", [
    (lambda m: m["common"].pop("kind"), "'common' has no 'kind'"),
    (lambda m: m["common"].update(damping="0.1"), r"'common'\['damping'\] is a JSON str"),
    (lambda m: m["common"].update(num_params=True), r"'common'\['num_params'\] is a JSON bool"),
    (lambda m: m.update(meta=[1]), r"\['meta'\] is a JSON list"),
    (lambda m: m.pop("structure"), "has no 'structure'"),
    (lambda m: m["common"]["signature"].update(names="q_proj"), r"signature\['names'\] is a JSON str"),
    (lambda m: m["common"]["signature"]["shapes"].pop(), "one list of integers per name"),
    (lambda m: m["common"].update(info=None), r"'common'\['info'\] is a JSON NoneType"),
])
def test_malformed_metadata_is_refused(setup, tmp_path, case, message):
    _, _, ops = setup
    path = tmp_path / "d.safetensors"
    ops["diag"].save(path)
    bad = _rewrite(path, tmp_path / "bad.safetensors", edit_meta=case)
    with pytest.raises(CurvatureFileError, match=r"bad\.safetensors: malformed curvature metadata.*" + message):
        lc.load_curvature(bad)
    with pytest.raises(CurvatureFileError, match="malformed curvature metadata: a JSON list"):
        lc.load_curvature(_rewrite(path, tmp_path / "list.safetensors", raw_meta="[1, 2]"))
