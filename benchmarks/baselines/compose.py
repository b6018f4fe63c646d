"""LaLoRA on a non-zero LoRA init (MiLoRA, CorDA, PiSSA, ...): curvature fitted at the init.

At peft's standard init ``B = 0`` the curvature's A-blocks and A-B cross blocks vanish
(SEMANTICS §2). After a non-zero init (MiLoRA/CorDA put the minor components into ``B A`` and
move the base weight to the residual) ``theta0`` is the initialized adapter, ``B != 0``, and the
A-blocks are non-zero, so a Laplace penalty fitted there anchors ``A`` too. This helper fits the
curvature of the prepared model on the source proxy batches at ``theta0`` = the current (init)
LoRA weights and returns the ``LaplacePenalty`` anchored there.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lalora_curv import LaplacePenalty, LoRAParams, fit_curvature

__all__ = ["lalora_on_init"]


def lalora_on_init(model_prepared, proxy_batches: Iterable[Any], structure: str, strength: float, *,
                   prior_precision: float = 0.0, adapter_name: str = "default", **fit_options) -> LaplacePenalty:
    """Fit ``fit_curvature(model, proxy_batches, structure=structure, **fit_options)`` at the adapter's
    current weights and return ``LaplacePenalty(curv, anchor=lora.snapshot(), strength=strength)``.

    Args:
        model_prepared: a :class:`~benchmarks.baselines.Prepared` (its ``.model``) or a peft LoRA model,
            right after a baseline's ``setup`` (before training), so the anchor is the init.
        proxy_batches: the source proxy batches (HF causal-LM dicts), as for plain LaLoRA.
        structure: any ``lalora_curv`` structure ("kfac", "kfac_tridiag", "dense", ...).
        strength: the penalty strength ``lambda``.
        prior_precision: isotropic precision added in the penalty (``LaplacePenalty``).
        adapter_name: the peft adapter.
        **fit_options: passed to ``fit_curvature`` (``kind``, ``backend``, ``terms``, ``rank``, ...);
            ``progress`` defaults to False.
    """
    model = getattr(model_prepared, "model", model_prepared)
    lora = LoRAParams.from_model(model, adapter_name=adapter_name)
    fit_options.setdefault("progress", False)
    curv = fit_curvature(model, proxy_batches, structure=structure, lora=lora, **fit_options)
    return LaplacePenalty(curv, anchor=lora.snapshot(), strength=strength, lora=lora,
                          prior_precision=prior_precision)
