"""The continual operations owned by the structures: the capability lists are read off the classes,
unsupported structures are refused by name with the supporters listed from the registry, and
Delta-W operators are refused by their space attribute (never by a structure name)."""

from __future__ import annotations

import pytest
import torch

from lalora_curv.continual import NOISE_STRUCTURES, TASK_STRUCTURES, TRUNCATABLE_STRUCTURES, predict, with_isotropic
from lalora_curv.curvature import (
    STRUCTURES,
    CurvatureOperator,
    DiagCurvature,
    DiagLowRankCurvature,
    EigenKFACCurvature,
    KFACCurvature,
    KFACDeltaWCurvature,
    KFACTridiagCurvature,
)

from ..helpers_continual import (
    random_psd,
    single_thread,  # noqa: F401  (autouse fixture: one torch thread)
)
from .operators import F64, KFAC_SHAPES, P_KFAC, block_constant_noise, gen, make_operator

OPERATIONS = CurvatureOperator.CONTINUAL_OPERATIONS


def _tridiag(seed=0):
    """A random kfac_tridiag operator (one layer, r=2, d_in=3, d_out=4)."""
    r, d_in, d_out = 2, 3, 4
    return KFACTridiagCurvature([random_psd(r + d_out, seed=seed)], [random_psd(d_in + r, seed=seed + 1)],
                                [(r, d_in, d_out)], **F64)


def _call(op, operation):
    q = torch.full((op.num_params,), 0.1, dtype=torch.float64)
    if operation == "with_isotropic":
        return op.with_isotropic(0.1)
    if operation == "smoothed_precision":
        return op.smoothed_precision(op, q)
    return getattr(op, operation)(q)


@pytest.mark.parametrize("operation", OPERATIONS)
def test_unsupported_operation_names_structure_operation_and_supporters(operation):
    op = _tridiag()
    supporters = CurvatureOperator.structures_supporting(operation)
    assert supporters == tuple(sorted(n for n, c in CurvatureOperator.registry.items() if c.supports(operation)))
    assert "diag" in supporters and "kfac_tridiag" not in supporters and "kfac_delta_w" not in supporters
    with pytest.raises(NotImplementedError) as info:
        _call(op, operation)
    message = str(info.value)
    assert operation in message and "'kfac_tridiag'" in message
    assert message.endswith(", ".join(supporters))


def test_supporter_list_is_read_from_the_registry():
    """A structure registered later (one new file) shows up in the refusal message of the others."""

    class ScaledIdentity(CurvatureOperator):
        structure = "test_scaled_identity"

        def _predict(self, q):
            return self

    try:
        assert "test_scaled_identity" in CurvatureOperator.structures_supporting("predict")
        with pytest.raises(NotImplementedError, match="test_scaled_identity"):
            _tridiag().predict(0.1)
    finally:
        del CurvatureOperator.registry["test_scaled_identity"]


def _delta_w_operator():
    pairs = [(random_psd(d_out, seed=i), random_psd(d_in, seed=10 + i), f"layer{i}")
             for i, (d_out, d_in) in enumerate(KFAC_SHAPES)]
    return KFACDeltaWCurvature.from_factor_pairs(pairs, **F64)


@pytest.mark.parametrize("operation", OPERATIONS)
def test_delta_w_operators_are_refused_by_space(operation):
    op = _delta_w_operator()
    assert op.space == "delta_w" and not type(op).supports(operation)
    with pytest.raises(ValueError, match="'delta_w' space"):
        _call(op, operation)


def test_space_decides_not_the_structure_name():
    """A K-FAC subclass under another name but on the Delta-W space is refused as well, and the
    module functions refuse a Delta-W operator too."""

    class OtherDeltaW(KFACCurvature):
        structure = "test_other_delta_w"
        space = "delta_w"

    try:
        op = _delta_w_operator()
        other = OtherDeltaW(op.grad_factors, op.input_factors, op.blocks, **F64)
        with pytest.raises(ValueError, match="'delta_w' space"):
            other.predict(0.1)
        assert "test_other_delta_w" not in CurvatureOperator.structures_supporting("predict")
        with pytest.raises(ValueError, match="'delta_w' space"):
            predict(op, 0.1, dense_fallback=True)
        with pytest.raises(ValueError, match="'delta_w' space"):
            with_isotropic(op, 0.1)
        with pytest.raises(TypeError, match="space 'delta_w'"):
            EigenKFACCurvature.from_kfac(op)
    finally:
        del CurvatureOperator.registry["test_other_delta_w"]


def test_predict_options_are_checked_against_the_structure():
    with pytest.raises(ValueError, match=r"\['kfac_noise'\] do not apply to structure 'diag'; they apply to "
                                         r"eigen_kfac, kfac"):
        make_operator("diag", 1).predict(0.1, kfac_noise="exact")
    with pytest.raises(ValueError, match="unknown kfac_noise 'bogus'"):
        make_operator("kfac", 1).predict(block_constant_noise(2), kfac_noise="bogus")
    # the module function hands the option only to the structures that take it
    predict(make_operator("diag", 1), 0.1, kfac_noise="exact")


def test_capability_lists_are_derived_from_the_classes():
    registry = CurvatureOperator.registry
    assert set(TASK_STRUCTURES) == {s for s in STRUCTURES if registry[s].space == "theta"}
    assert "kfac_delta_w" not in TASK_STRUCTURES
    assert set(NOISE_STRUCTURES) == {s for s in TASK_STRUCTURES
                                     if registry[s].supports("predict") and registry[s].filtering_closed}
    assert set(TRUNCATABLE_STRUCTURES) == {s for s in TASK_STRUCTURES if hasattr(registry[s], "truncated")}


@pytest.mark.parametrize("structure", TASK_STRUCTURES)
def test_filtering_closed_is_true_of_each_structure(structure):
    """``filtering_closed`` (what NOISE_STRUCTURES reads) says whether ``predict(P) + C`` of the
    structure again has its own predict step; check that claim on operators of each structure."""
    cls = CurvatureOperator.registry[structure]
    if not cls.supports("predict"):
        assert structure not in NOISE_STRUCTURES
        with pytest.raises(NotImplementedError, match=structure):
            predict(_tridiag(), 0.1)
        return
    P, C = make_operator(structure, 1), make_operator(structure, 2)
    q = block_constant_noise(3) if P.num_params == P_KFAC else torch.rand(P.num_params, generator=gen(3),
                                                                          dtype=torch.float64)
    filtered = predict(P, q) + C
    assert type(filtered).supports("predict") == cls.filtering_closed == (structure in NOISE_STRUCTURES)


def test_with_isotropic_folds_where_the_structure_can_and_sums_exactly_otherwise():
    eye = lambda n: torch.eye(n, dtype=torch.float64)  # noqa: E731
    for structure, expected in [("diag", DiagCurvature), ("diag_lowrank", DiagLowRankCurvature),
                                ("lowrank", DiagLowRankCurvature), ("kfac", EigenKFACCurvature)]:
        P = make_operator(structure, 4)
        out = with_isotropic(P, 0.3)
        assert type(out) is expected, structure
        torch.testing.assert_close(out.to_dense(), P.to_dense() + 0.3 * eye(P.num_params), rtol=1e-10, atol=1e-12)
    tri = _tridiag()
    out = with_isotropic(tri, 0.3)
    assert out.structure == "sum"
    torch.testing.assert_close(out.to_dense(), tri.to_dense() + 0.3 * eye(tri.num_params), rtol=1e-12, atol=1e-12)
