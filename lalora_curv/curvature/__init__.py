"""Curvature structures (one module each), fitting, and save/load."""

from .base import CurvatureOperator, DenseTooLargeError, NonFiniteCurvatureError
from .dense import DenseCurvature
from .diag import DiagCurvature
from .diag_lowrank import DiagLowRankCurvature
from .eigen_kfac import EigenKFACCurvature  # registers 'eigen_kfac' for load_curvature
from .fit import BACKENDS, STRUCTURES, fit_curvature
from .io import CurvatureFileError, CurvatureMismatchError, load_curvature, save_curvature
from .kfac import KFACCurvature
from .kfac_delta_w import KFACDeltaWCurvature
from .kfac_tridiag import KFACTridiagCurvature
from .lowrank import LowRankCurvature
from .sum import SumCurvature

__all__ = [
    "CurvatureOperator", "DenseCurvature", "DiagCurvature", "KFACCurvature", "KFACTridiagCurvature",
    "LowRankCurvature", "DiagLowRankCurvature", "KFACDeltaWCurvature", "SumCurvature", "EigenKFACCurvature",
    "fit_curvature", "load_curvature", "save_curvature", "STRUCTURES", "BACKENDS", "DenseTooLargeError",
    "NonFiniteCurvatureError", "CurvatureFileError", "CurvatureMismatchError",
]
