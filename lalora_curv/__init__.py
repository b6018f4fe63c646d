"""lalora_curv: curvature approximations over LoRA parameters and Laplace penalties (LaLoRA).

Public API (see docs/api.md)::

    import lalora_curv as lc
    lora = lc.LoRAParams.from_model(model)
    curv = lc.fit_curvature(model, batches, structure="kfac", kind="empirical")
    pen = lc.LaplacePenalty(curv, anchor=lora.snapshot(), strength=lam, lora=lora)
"""

from .curvature import (
    BACKENDS,
    STRUCTURES,
    CurvatureFileError,
    CurvatureMismatchError,
    CurvatureOperator,
    DenseTooLargeError,
    NonFiniteCurvatureError,
    fit_curvature,
    load_curvature,
)
from .losses import KINDS
from .params import LoRADiscoveryError, LoRALayer, LoRAParams
from .penalties import L2Penalty, LaplacePenalty

__version__ = "0.1.0"

__all__ = [
    "LoRAParams", "LoRALayer", "LoRADiscoveryError", "fit_curvature", "load_curvature", "CurvatureOperator",
    "LaplacePenalty", "L2Penalty", "STRUCTURES", "KINDS", "BACKENDS", "CurvatureFileError",
    "CurvatureMismatchError", "DenseTooLargeError", "NonFiniteCurvatureError", "__version__",
]
