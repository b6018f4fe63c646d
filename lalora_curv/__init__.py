"""lalora_curv: curvature approximations over LoRA parameters and Laplace penalties (LaLoRA).

Public API (see docs/api.md)::

    import lalora_curv as lc
    lora = lc.LoRAParams.from_model(model)
    curv = lc.fit_curvature(model, batches, structure="kfac", kind="empirical")
    pen = lc.LaplacePenalty(curv, anchor=lora.snapshot(), strength=lam, lora=lora)
"""

from .continual import TaskSequence
from .curvature import (
    BACKENDS,
    STRUCTURES,
    CurvatureFileError,
    CurvatureFitter,
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

_LAZY = {"PenalizedTrainer": "training", "PenaltyLoop": "training", "finetune": "training",
         "PenaltyTrainerMixin": "training", "FitCurvatureCallback": "integrations.callbacks",
         "suggest_strength": "strength"}


def __getattr__(name):
    # training.py subclasses transformers.Trainer (strength.py uses it): import on first use, not at
    # `import lalora_curv`
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'lalora_curv' has no attribute {name!r}")

__all__ = [
    "LoRAParams", "LoRALayer", "LoRADiscoveryError", "fit_curvature", "CurvatureFitter", "load_curvature",
    "CurvatureOperator",
    "LaplacePenalty", "L2Penalty", "STRUCTURES", "KINDS", "BACKENDS", "CurvatureFileError",
    "CurvatureMismatchError", "DenseTooLargeError", "NonFiniteCurvatureError", "TaskSequence", "finetune",
    "PenalizedTrainer", "PenaltyLoop", "PenaltyTrainerMixin", "FitCurvatureCallback", "suggest_strength",
    "__version__",
]
