"""The one list of curvature structures.

Adding a structure: one new file with its operator class (``structure = "name"``, its algebra, and
an ``accumulator`` classmethod if it can be fitted) and one line in ``_CLASSES`` below. Everything
else (``fit_curvature``'s choices, the CLI, loading files) derives from this list.
"""

from __future__ import annotations

from .base import CurvatureOperator, SumCurvature
from .dense import DenseCurvature
from .diag import DiagCurvature
from .diag_lowrank import DiagLowRankCurvature
from .eigen_kfac import EigenKFACCurvature
from .kfac import KFACCurvature
from .kfac_delta_w import KFACDeltaWCurvature
from .kfac_tridiag import KFACTridiagCurvature
from .lowrank import LowRankCurvature

__all__ = ["STRUCTURES", "structure_class", "all_structures"]

#: every operator class, in the order docs and the CLI list them
_CLASSES: tuple[type[CurvatureOperator], ...] = (
    DenseCurvature, DiagCurvature, KFACCurvature, KFACTridiagCurvature, LowRankCurvature, DiagLowRankCurvature,
    KFACDeltaWCurvature, SumCurvature, EigenKFACCurvature,
)

#: the structures ``fit_curvature`` can build, in that order
STRUCTURES: tuple[str, ...] = tuple(cls.structure for cls in _CLASSES if cls.fittable())


def all_structures() -> tuple[str, ...]:
    """Every structure name a saved file may hold."""
    return tuple(CurvatureOperator.registry)


def structure_class(name: str, *, fittable: bool = False) -> type[CurvatureOperator]:
    """The class of structure ``name``; a clear error naming the choices otherwise."""
    choices = STRUCTURES if fittable else all_structures()
    if name not in choices:
        raise ValueError(f"unknown structure {name!r}; choose one of: {', '.join(choices)}")
    return CurvatureOperator.registry[name]
