"""A LaLoRA strength from a short pilot of plain LoRA, without a full plain run.

The forgetting benchmark puts every penalty on one axis with *relative* strengths: ``lambda = rel *
lam_ratio1``, ``lam_ratio1 = 2 * task_loss / q``, where ``task_loss`` is plain LoRA's final task loss
(the mean of its last 5 steps) and ``q = d^T (P + prior I) d`` is the quadratic of plain LoRA's final
displacement ``d`` from the anchor. ``rel = 1`` is the strength at which plain LoRA's solution would
pay a penalty equal to its task loss; the benchmark's useful range is ``rel`` = 1-3.

:func:`suggest_strength` aims at the same point from a pilot of plain LoRA of at most about 10 % of
the training budget. It cannot see the final displacement, so it extrapolates:

* **growth model.** Early in training with Adam(W) at a constant learning rate, every coordinate
  moves by about ``lr`` per step in a steady direction, so the displacement grows linearly in the
  step count and ``q`` grows like ``t^2``; noisy gradients whose directions decorrelate give a
  random walk, ``q ~ t``. The pilot measures ``q(t)`` after each of its steps, fits the exponent
  ``p`` of ``q ~ t^p`` by least squares on ``log q`` against ``log t`` (step 1 left out when later
  steps exist: Adam's bias-corrected first step is a pure sign step) and clips it to
  ``exponent_range`` (default ``[1, 2]``, the two regimes above).
* **extrapolation.** The parameters are assumed to keep moving in the pilot's direction with a
  distance that grows like ``t^(p/2)``: the final point is ``theta_start + s * (theta_pilot -
  theta_start)`` with ``s = (steps / pilot_steps)^(p/2)``, and ``q`` is measured there under the
  penalty's quadratic (for an anchor at the pilot's start and a theta-space curvature this is
  ``q(pilot) * (steps / pilot_steps)^p``).
* **task loss.** The mean task loss of the pilot's last (up to) 5 steps: an over-estimate of the
  final loss (training lowers it), which errs toward a stronger penalty.

On the tiny Llama the early exponent is close to 2 while the full run's growth slows later, so the
extrapolated ``q`` over-estimates the final one and the suggested strength comes out below the
calibrated one: 0.5-0.7x for the benchmark's 40 steps at lr 1e-3 (``tests/test_strength.py``), down
to 0.1-0.3x for longer runs or a larger lr (docs/choosing.md), which the pilot cannot foresee.

The model is left exactly as it was: the weights of every trainable parameter, their ``.grad``,
``requires_grad`` flags and every module's train/eval mode are restored, and the pilot's optimizer
is discarded (the global RNG state is untouched: :func:`~lalora_curv.training.finetune` forks it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .curvature import CurvatureOperator
from .curvature.statistics import all_reduce_sum, dist_world_size, resolve_distributed
from .params import LoRAParams
from .penalties import LaplacePenalty
from .training import finetune

__all__ = ["suggest_strength", "StrengthSuggestion", "fit_growth_exponent"]

#: the benchmark's task loss is the mean of plain LoRA's last steps; the pilot uses as many
TASK_LOSS_WINDOW = 5
#: largest pilot, as a fraction of the training budget, before a warning says it is no longer short
PILOT_FRACTION = 0.1


@dataclass
class StrengthSuggestion:
    """The result of :func:`suggest_strength`.

    Attributes:
        strength: the suggested ``lambda = relative * 2 * task_loss / quadratic``.
        relative: the relative strength aimed at (the benchmark's ``rel``).
        task_loss: the pilot's estimate of the final task loss (mean of its last <= 5 steps).
        quadratic: the extrapolated ``q = d^T (P + prior I) d`` at the end of the budget.
        steps, pilot_steps: the training budget and the pilot's length (optimizer steps).
        exponent: the growth exponent ``p`` of ``q ~ t^p`` used (after clipping).
        exponent_fitted: the least-squares exponent before clipping (NaN when too few points).
        scale: ``s = (steps / pilot_steps)^(p/2)``, the factor on the pilot's parameter movement.
        pilot_quadratic: ``q(t)`` of the movement from the pilot's start after each pilot step
            (``t = 1 .. pilot_steps``), under the same quadratic.
        pilot_task_loss: the task loss of each pilot step.
        prior_precision: the isotropic precision included in ``q``.
    """

    strength: float
    relative: float
    task_loss: float
    quadratic: float
    steps: int
    pilot_steps: int
    exponent: float
    exponent_fitted: float
    scale: float
    pilot_quadratic: list[float] = field(default_factory=list)
    pilot_task_loss: list[float] = field(default_factory=list)
    prior_precision: float = 0.0

    @property
    def lam_ratio1(self) -> float:
        """``2 * task_loss / quadratic``: the strength of ``relative = 1``."""
        return self.strength / self.relative


def fit_growth_exponent(quadratics: list[float], exponent_range: tuple[float, float] = (1.0, 2.0)
                        ) -> tuple[float, float]:
    """``(clipped, fitted)`` exponent ``p`` of ``q(t) ~ t^p`` from ``quadratics[t-1] = q(t)``.

    Least squares on ``(log t, log q)`` over the steps with ``q > 0``, leaving out step 1 when at
    least two later steps remain (Adam's first step is a pure sign step). With fewer than two
    usable points ``fitted`` is NaN and ``clipped`` the upper end of ``exponent_range``.
    """
    low, high = exponent_range
    if not 0 < low <= high:
        raise ValueError(f"exponent_range must satisfy 0 < low <= high, got {exponent_range}")
    points = [(math.log(t), math.log(q)) for t, q in enumerate(quadratics, start=1) if q > 0 and math.isfinite(q)]
    if len(points) >= 3 and points[0][0] == 0.0:
        points = points[1:]
    if len(points) < 2:
        return high, float("nan")
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    var_x = sum((x - mean_x) ** 2 for x, _ in points)
    fitted = sum((x - mean_x) * (y - mean_y) for x, y in points) / var_x
    return min(max(fitted, low), high), fitted


class _ModelState:
    """Everything the pilot may change, to put back exactly: trainable weights and their ``.grad``,
    ``requires_grad`` flags and every module's ``training`` flag."""

    def __init__(self, model: nn.Module):
        self.modes = [(module, module.training) for module in model.modules()]
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        trainable = [p for p, flag in self.flags if flag]
        self.values = [(p, p.detach().clone()) for p in trainable]
        self.grads = [(p, None if p.grad is None else p.grad.detach().clone()) for p in trainable]

    def restore(self) -> None:
        with torch.no_grad():
            for p, value in self.values:
                p.copy_(value)
        for p, grad in self.grads:
            p.grad = grad
        for p, flag in self.flags:
            p.requires_grad_(flag)
        for module, mode in self.modes:
            module.training = mode


def suggest_strength(curv: CurvatureOperator, model: nn.Module, pilot_batches: Iterable[Any], *, steps: int,
                     lr: float, lora: LoRAParams | None = None, anchor: Mapping[str, Tensor] | Tensor | None = None,
                     relative: float = 2.0, pilot_steps: int | None = None, prior_precision: float = 0.0,
                     seed: int = 0, grad_accum: int = 1, max_grad_norm: float | None = None,
                     optimizer: str = "adamw", weight_decay: float = 0.0,
                     exponent_range: tuple[float, float] = (1.0, 2.0), distributed: bool | str = "auto",
                     progress: bool = False) -> StrengthSuggestion:
    """The LaLoRA strength for a run of ``steps`` optimizer steps, from a short plain-LoRA pilot.

    Aims at the forgetting benchmark's ``relative * lam_ratio1`` (module docstring): ``strength =
    relative * 2 * task_loss / q`` with ``q`` the extrapolated final ``d^T (P + prior I) d``.

    Args:
        curv: the curvature the penalty will use (``lc.LaplacePenalty(curv, ...)``).
        model: the peft model about to be trained (LoRA at its starting point). It is left exactly
            as given: weights, gradients, ``requires_grad`` and train/eval flags are restored.
        pilot_batches: training batches (HF causal-LM dicts or ``(X, y)``), the same kind as the
            real run's; cycled like :func:`~lalora_curv.training.finetune`.
        steps: the real run's budget in optimizer steps.
        lr: the real run's learning rate; ``optimizer``, ``weight_decay``, ``grad_accum``,
            ``max_grad_norm`` and ``seed`` should match the real run too (the pilot is
            ``finetune`` without a penalty).
        lora: the registry (built from ``model`` if None).
        anchor: ``theta0`` of the penalty (default: the LoRA weights now, i.e. the pilot's start).
        relative: the benchmark's relative strength (1 = plain LoRA's solution would pay a penalty
            equal to its task loss; 1-3 is the useful range).
        pilot_steps: pilot length (default ``max(1, round(0.1 * steps))``); a warning when it is
            more than 10 % of ``steps``.
        prior_precision: the penalty's isotropic precision, included in ``q``.
        exponent_range: clip range of the fitted growth exponent.
        distributed: "auto" (default: on when ``torch.distributed`` is initialized with more than
            one process), True or False. On, every rank runs the pilot on its own batches (FSDP2 /
            DDP average the gradients) and the task loss is averaged over the ranks, so every
            rank gets the same strength; every rank must then call this. ``pilot_task_loss``
            stays this rank's own.
        progress: tqdm bar over the pilot steps.

    Returns:
        A :class:`StrengthSuggestion` with the strength, the pilot's numbers and the extrapolation.
    """
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"steps (the training budget) must be >= 1, got {steps}")
    if not relative > 0:
        raise ValueError(f"relative must be positive, got {relative}")
    if pilot_steps is None:
        pilot_steps = max(1, round(PILOT_FRACTION * steps))
    pilot_steps = int(pilot_steps)
    if not 1 <= pilot_steps <= steps:
        raise ValueError(f"pilot_steps must be between 1 and steps={steps}, got {pilot_steps}")
    if pilot_steps > max(1, round(PILOT_FRACTION * steps)):
        import warnings

        warnings.warn(f"suggest_strength: a pilot of {pilot_steps} steps is more than {PILOT_FRACTION:.0%} of the "
                      f"budget of {steps} steps", stacklevel=2)
    sync = resolve_distributed(distributed)
    lora = LoRAParams.from_model(model) if lora is None else lora
    state = _ModelState(model)
    start = lora.snapshot()
    # q(t) of the movement from the start; ``2 * pen()`` = d^T (P + prior I) d with strength 1
    movement = LaplacePenalty(curv, anchor=start, strength=1.0, lora=lora, prior_precision=prior_precision)
    final = LaplacePenalty(curv, anchor=start if anchor is None else anchor, strength=1.0, lora=lora,
                           prior_precision=prior_precision)

    def measure(_model: nn.Module) -> dict[str, float]:
        return {"pilot_quadratic": 2.0 * float(movement())}

    try:
        result = finetune(model, pilot_batches, steps=pilot_steps, lr=lr, grad_accum=grad_accum, seed=seed,
                          eval_fn=measure, eval_every=1, progress=progress, optimizer=optimizer,
                          weight_decay=weight_decay, max_grad_norm=max_grad_norm, lora=lora)
        quadratics = result.column("pilot_quadratic")
        losses = result.column("task_loss")
        exponent, fitted = fit_growth_exponent(quadratics, exponent_range)
        scale = (steps / pilot_steps) ** (exponent / 2)
        start_flat = lora.flatten(start).detach()
        pilot_flat = lora.flatten().detach()
        lora.assign(start_flat + scale * (pilot_flat - start_flat))
        with torch.no_grad():
            quadratic = 2.0 * float(final())
    finally:
        state.restore()
    window = losses[-TASK_LOSS_WINDOW:]
    task_loss = sum(window) / len(window)
    if sync:  # each rank saw only its own batches: without this, each would get its own strength
        total = torch.tensor([task_loss], dtype=torch.float64, device=lora.device)
        all_reduce_sum([total])
        task_loss = float(total) / dist_world_size()
    if not (quadratic > 0 and math.isfinite(quadratic)):
        raise ValueError(f"the extrapolated quadratic is {quadratic}: the pilot did not move the LoRA weights in any "
                         "direction the curvature (plus prior) sees; raise lr or pilot_steps, or add prior_precision")
    return StrengthSuggestion(strength=relative * 2.0 * task_loss / quadratic, relative=float(relative),
                              task_loss=task_loss, quadratic=quadratic, steps=steps, pilot_steps=pilot_steps,
                              exponent=exponent, exponent_fitted=fitted, scale=scale, pilot_quadratic=quadratics,
                              pilot_task_loss=losses, prior_precision=float(prior_precision))
