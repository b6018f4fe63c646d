"""Fitting: :class:`CurvatureFitter` (streaming: ``update(batch)`` / ``finalize()``) and
:func:`fit_curvature`, a short loop over it.

A backend (``lalora_curv.backends``) turns a batch into statistics; the structure's own
accumulator (``structure_class.accumulator``) reduces them into its operator. Neither knows the
other's names: the accumulator says which statistics it consumes (``statistics``) and which
extra capabilities it needs (``requires``), the backend refuses what it cannot provide.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..losses import KINDS
from ..params import LoRAParams
from .base import CurvatureOperator
from .registry import STRUCTURES, structure_class
from .statistics import dist_rank, dist_world_size, resolve_distributed

__all__ = ["fit_curvature", "CurvatureFitter", "STRUCTURES", "BACKENDS", "TERMS", "COMMON_OPTIONS"]

logger = logging.getLogger("lalora_curv")

BACKENDS = ("auto", "hooks", "curvlinops", "backpack")
TERMS = ("token", "sequence")
#: options every structure accepts; each structure adds its own ``fit_options``
COMMON_OPTIONS = frozenset({"mc_samples", "seed", "factor_dtype", "damping", "distributed"})


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Fit with dropout off (peft's LoRA dropout included); restore the caller's mode after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def _progress(batches, progress: bool, desc: str):
    if not progress:
        return batches
    from tqdm.auto import tqdm

    total = len(batches) if hasattr(batches, "__len__") else None
    return tqdm(batches, desc=desc, total=total, unit="batch")


def _factor_dtype(value) -> torch.dtype:
    dtype = getattr(torch, value, None) if isinstance(value, str) else value
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"factor_dtype must be a floating torch dtype (or its name), got {value!r}")
    return dtype


def _check_options(cls, kind: str, backend: str, options: dict) -> None:
    """Every option is used by this structure/kind/backend, or a named error (never ignored)."""
    allowed = COMMON_OPTIONS | cls.fit_options
    unknown = sorted(set(options) - allowed)
    if unknown:
        users = {o: [c for c in STRUCTURES if o in structure_class(c).fit_options] for o in unknown}
        detail = "; ".join(f"{o!r} applies to {', '.join(u)}" if u else f"{o!r} is not an option" for o, u in
                           users.items())
        raise TypeError(f"fit_curvature(structure={cls.structure!r}) does not take {unknown}: {detail}; "
                        f"{cls.structure} takes {sorted(allowed)}")
    if "mc_samples" in options and kind != "mc":
        raise TypeError(f"mc_samples applies to kind='mc' only (kind={kind!r})")
    if options.get("terms") == "sequence" and backend == "curvlinops":
        raise ValueError("backend='curvlinops' gives token-level curvature only (terms='token'); use "
                         "backend='hooks' or 'backpack' for terms='sequence'")
    if options.get("terms") == "token" and backend == "backpack":
        raise ValueError("backend='backpack' gives per-sequence gradients only; use terms='sequence'")


class CurvatureFitter:
    """Streaming curvature fit: ``update(batch)`` for each batch, then ``finalize()``.

    Same arguments as :func:`fit_curvature` (without ``batches``/``progress``);
    ``fit_curvature(model, batches, ...)`` equals::

        fitter = CurvatureFitter(model, structure=..., kind=..., lora=lora, **options)
        for batch in batches:
            fitter.update(batch)
        curv = fitter.finalize()

    The model runs in eval mode inside each ``update`` (dropout off) and gets its training flags
    back after; no ``.grad`` is left changed. Hooks are only attached during ``update``.
    """

    def __init__(self, model: nn.Module, structure: str = "kfac", kind: str = "empirical", backend: str = "auto",
                 lora: LoRAParams | None = None, **options):
        cls = structure_class(structure, fittable=True)
        _check_choice("kind", kind, KINDS)
        _check_choice("backend", backend, BACKENDS)
        _check_options(cls, kind, backend, options)
        self.model, self.structure = model, structure
        if lora is None:
            lora = LoRAParams.from_model(model)  # warns about trainable parameters outside the registry
        else:
            untracked = lora.untracked_trainable()
            if untracked:
                warnings.warn(lora.untracked_message(untracked), UserWarning, stacklevel=3)
        self.lora = lora
        self.lora.check_live()  # a registry of an adapter no longer active is a named error, not a stray one
        dtype = _factor_dtype(options.get("factor_dtype", torch.float32))
        damping = float(options.get("damping", 0.0))
        if not math.isfinite(damping) or damping < 0:
            raise ValueError(f"damping must be finite and >= 0, got {damping}")
        mc_samples = int(options.get("mc_samples", 1))
        if mc_samples < 1:
            raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
        seed = int(options.get("seed", 0))
        own = {k: options[k] for k in cls.fit_options if k in options and k != "terms"}
        self.accumulator = cls.accumulator(self.lora, dtype=dtype, **own)
        gradient_stats = self.accumulator.statistics == "gradients"
        terms = options.get("terms", "token" if backend == "curvlinops" else "sequence") if gradient_stats \
            else "expand"
        if gradient_stats:
            _check_choice("terms", terms, TERMS)
        if backend == "auto":
            backend = "hooks"
            logger.info("fit_curvature: backend='auto' uses 'hooks'")
        self.sync = resolve_distributed(options.get("distributed", "auto"))
        if self.sync and backend == "curvlinops":
            raise ValueError("backend='curvlinops' does not support distributed fitting; use backend='hooks'")
        rank = dist_rank() if self.sync else 0
        # independent MC draws per rank (the same seed everywhere would duplicate samples)
        generator = torch.Generator(device=self.lora.device).manual_seed(seed + rank)
        self.backend = _make_backend(backend, self.lora, self.accumulator.statistics, kind=kind, terms=terms,
                                     mc_samples=mc_samples, seed=seed, generator=generator, dtype=dtype,
                                     max_dense=options.get("max_dense"))
        missing = self.accumulator.requires - self.backend.provides
        if missing:
            raise ValueError(f"backend={backend!r} cannot provide {sorted(missing)} statistics needed by "
                             f"structure={structure!r}; use backend='hooks'")
        info = {"backend": backend, "terms": terms, "mc_samples": mc_samples if kind == "mc" else None,
                "seed": seed if kind == "mc" else None, "distributed_world_size": dist_world_size() if self.sync else 1}
        self.common = dict(kind=kind, signature=self.lora.signature(), info=info, damping=damping)
        self._finalized = False

    def update(self, batch: Any) -> None:
        """Add one batch (an HF causal-LM dict or an ``(X, y)`` tuple) to the statistics."""
        if self._finalized:
            raise RuntimeError("this CurvatureFitter was finalized; start a new one to fit again")
        self.lora.check_live()
        with _eval_mode(self.model), self.backend:
            stats = self.backend.batch(self.model, batch)
        if stats is not None:
            self.accumulator.update(stats)

    def finalize(self) -> CurvatureOperator:
        """The operator (mean over the terms of every batch given, on every rank)."""
        if self._finalized:
            raise RuntimeError("finalize() was already called on this CurvatureFitter")
        finish = getattr(self.backend, "finish", None)
        if finish is not None:
            with _eval_mode(self.model):
                for stats in finish(self.model):
                    self.accumulator.update(stats)
        if self.sync:
            self.accumulator.all_reduce()
        curv = self.accumulator.finalize(self.common)
        curv.check_finite()
        self._finalized = True
        return curv


def _make_backend(name: str, lora, statistics: str, *, kind, terms, mc_samples, seed, generator, dtype, max_dense):
    if name == "curvlinops":
        from ..backends.curvlinops import CurvlinopsBackend

        extra = {} if max_dense is None else {"max_dense": int(max_dense)}
        return CurvlinopsBackend(lora, statistics, kind=kind, mc_samples=mc_samples, seed=seed, dtype=dtype, **extra)
    if name == "backpack":
        from ..backends.backpack import BackpackBackend

        return BackpackBackend(lora, statistics, kind=kind, mc_samples=mc_samples, generator=generator, dtype=dtype)
    from ..backends.hooks import HooksBackend

    return HooksBackend(lora, statistics, kind=kind, terms=terms, mc_samples=mc_samples, generator=generator,
                        dtype=dtype)


def fit_curvature(model: nn.Module, batches: Iterable[Any], structure: str = "kfac", kind: str = "empirical",
                  backend: str = "auto", lora: LoRAParams | None = None, progress: bool = True,
                  **options) -> CurvatureOperator:
    """Estimate the curvature of the loss on ``batches`` w.r.t. the LoRA parameters.

    Args:
        model: a peft model (or any module with peft LoRA layers). It is run in eval mode (dropout
            off); its training flags are restored afterwards and no ``.grad`` is touched.
        batches: iterable of HF causal-LM dicts (``input_ids``, ``attention_mask``, ``labels`` with
            ``-100`` = ignored) or ``(X, y)`` tuples for classifiers. Read once.
        structure: one of ``lalora_curv.STRUCTURES`` ("dense" | "diag" | "kfac" | "kfac_tridiag" |
            "lowrank" | "diag_lowrank" | "kfac_delta_w").
        kind: "ggn" (exact GGN, one backward per class) | "mc" (Monte-Carlo Fisher) |
            "empirical" (per-term gradient outer products).
        backend: "auto" (= "hooks", fastest and the only one that masks) | "hooks" |
            "curvlinops" | "backpack".
        lora: the registry; built with ``LoRAParams.from_model(model)`` if None.
        progress: show a tqdm bar over batches.
        **options: every option is used or refused by name, never ignored.
            Common: ``mc_samples`` (kind="mc" only; default 1), ``seed`` (MC sampling, default 0),
            ``factor_dtype`` (statistics dtype, default torch.float32, also for bf16 models),
            ``damping`` (stored on the operator, used by ``solve`` only; default 0),
            ``distributed`` ("auto" (default: on when ``torch.distributed`` is initialized with
            more than one process), True or False; each rank fits on its own batches, sums and
            term counts are all-reduced, so every rank ends with the curvature of the union of
            the data; MC labels use ``seed + rank``).
            dense/diag/lowrank/diag_lowrank: ``terms`` "sequence" (default for causal LMs with the
            hooks and backpack backends; one backward per batch) or "token" (exact per-token
            reference; curvlinops' only mode). Classifiers: a term is a sample, both coincide.
            lowrank/diag_lowrank: ``rank`` (default 16; ``info["rank"]`` is the rank kept, which
            is smaller when the data have lower numerical rank, with a warning).
            dense: ``max_dense`` (size limit, default 20000 parameters).
            kfac/kfac_delta_w: ``share_inputs`` (store identical input factors once; default True).

    Returns:
        a :class:`CurvatureOperator` whose scale is the mean over non-ignored terms.
    """
    if isinstance(batches, (str, bytes)) or not hasattr(batches, "__iter__"):
        raise TypeError(f"batches must be an iterable of batches, got {type(batches).__name__}")
    fitter = CurvatureFitter(model, structure=structure, kind=kind, backend=backend, lora=lora, **options)
    show = progress and (dist_rank() == 0 or not fitter.sync)
    for batch in _progress(batches, show, f"fit {structure}/{kind}"):
        fitter.update(batch)
    return fitter.finalize()
