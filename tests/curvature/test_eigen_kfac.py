"""The eigenbasis K-FAC structure (curvature/eigen_kfac.py): registered by lalora_curv.curvature
itself, exact re-expression of K-FAC, bit-exact save/load through load_curvature."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import lalora_curv as lc
from lalora_curv.curvature import (
    CurvatureMismatchError,
    CurvatureOperator,
    EigenKFACCurvature,
    KFACCurvature,
    eigen_kfac,
)


def _psd(n, seed):
    X = torch.randn(n, n + 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return X @ X.T / n


def _kfac():
    shared = _psd(4, 0)
    pairs = [(_psd(3, 1), shared, "a"), (_psd(2, 2), shared, "b"), (_psd(5, 3), _psd(2, 4), "c")]
    return KFACCurvature.from_factor_pairs(pairs, kind="empirical", info={"note": "test"}, damping=0.01)


def test_registered_by_the_curvature_package():
    assert CurvatureOperator.registry["eigen_kfac"] is eigen_kfac.EigenKFACCurvature is EigenKFACCurvature
    from lalora_curv import continual

    assert continual.EigenKFACCurvature is EigenKFACCurvature  # still importable from its old place


def test_loadable_without_the_continual_package(tmp_path):
    """load_curvature finds eigen_kfac even when lalora_curv.continual never runs (it is stubbed out
    here): the registration lives in lalora_curv.curvature."""
    path = tmp_path / "eig.safetensors"
    EigenKFACCurvature.from_kfac(_kfac(), 0.5).save(path)
    code = (
        "import sys, types\n"
        "stub = types.ModuleType('lalora_curv.continual'); stub.TaskSequence = None\n"
        "sys.modules['lalora_curv.continual'] = stub\n"
        "import lalora_curv as lc\n"
        f"op = lc.load_curvature({str(path)!r})\n"
        "print(op.structure)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "eigen_kfac"


def test_from_kfac_is_exact_and_save_load_is_bit_exact(tmp_path):
    kfac = _kfac()
    op = EigenKFACCurvature.from_kfac(kfac, 0.5)
    eye = torch.eye(kfac.num_params, dtype=torch.float64)
    torch.testing.assert_close(op.to_dense(), kfac.to_dense() + 0.5 * eye, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.diagonal(), op.to_dense().diagonal(), rtol=1e-10, atol=1e-12)
    path = tmp_path / "eig.safetensors"
    op.save(path)
    loaded = lc.load_curvature(path, structure="eigen_kfac")
    assert type(loaded) is EigenKFACCurvature and loaded._common() == op._common()
    a, b = op.state_tensors(), loaded.state_tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    v = torch.randn(kfac.num_params, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.equal(loaded.matvec(v), op.matvec(v)) and torch.equal(loaded.solve(v), op.solve(v))
    with pytest.raises(CurvatureMismatchError, match="expected 'kfac'"):
        lc.load_curvature(path, structure="kfac")
