"""Curvature structures (one module each), fitting, and save/load."""

from .base import CurvatureOperator, DenseTooLargeError, NonFiniteCurvatureError, SumCurvature
from .dense import DenseCurvature
from .diag import DiagCurvature
from .diag_lowrank import DiagLowRankCurvature
from .eigen_kfac import EigenKFACCurvature
from .fit import BACKENDS, CurvatureFitter, fit_curvature
from .io import CurvatureFileError, CurvatureMismatchError, load_curvature, save_curvature
from .kfac import KFACCurvature
from .kfac_delta_w import KFACDeltaWCurvature
from .kfac_tridiag import KFACTridiagCurvature
from .lowrank import LowRankCurvature
from .registry import STRUCTURES

__all__ = [
    "CurvatureOperator", "DenseCurvature", "DiagCurvature", "KFACCurvature", "KFACTridiagCurvature",
    "LowRankCurvature", "DiagLowRankCurvature", "KFACDeltaWCurvature", "SumCurvature", "EigenKFACCurvature",
    "fit_curvature", "CurvatureFitter", "load_curvature", "save_curvature", "STRUCTURES", "BACKENDS",
    "DenseTooLargeError",
    "NonFiniteCurvatureError", "CurvatureFileError", "CurvatureMismatchError",
]
