"""A stateful sequence of tasks: filtered Laplace posteriors (means = trained adapters, precisions
= curvature operators), the prior penalty of the next task, smoothing, and save/load.

Which structures a sequence may hold is read off the structure classes (never a typed list):
:data:`TASK_STRUCTURES` are the fittable theta-space structures, :data:`NOISE_STRUCTURES` those
whose predict step is closed form and stays closed form under the filtering update
(``CurvatureOperator.supports("predict")`` and ``filtering_closed``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..curvature import STRUCTURES
from ..curvature.base import CurvatureOperator, NonFiniteCurvatureError
from ..curvature.files import write_safetensors_atomic
from ..curvature.io import CurvatureFileError, CurvatureMismatchError, validate_signature
from ..params import LoRAParams
from .filtering import predict, with_isotropic
from .noise import check_noise_value
from .smoothing import SmoothingResult, decay_smooth, rts_smooth

__all__ = ["TaskSequence", "TaskRecord", "TASK_STRUCTURES", "NOISE_STRUCTURES", "DYNAMICS"]

#: structures a TaskSequence can fit and hold: the fittable ones that act on theta
TASK_STRUCTURES = tuple(name for name in STRUCTURES if CurvatureOperator.registry[name].space == "theta")
#: those with a closed-form predict step that survives the filtering update (dynamics="noise")
NOISE_STRUCTURES = tuple(name for name in TASK_STRUCTURES if CurvatureOperator.registry[name].supports("predict")
                         and CurvatureOperator.registry[name].filtering_closed)
#: those with an explicit rank truncation (``max_rank``)
TRUNCATABLE_STRUCTURES = tuple(name for name in TASK_STRUCTURES if hasattr(CurvatureOperator.registry[name],
                                                                           "truncated"))
DYNAMICS = ("identity", "noise")


@dataclass
class TaskRecord:
    """One finished task: ``mean`` (``Tensor[p]``, the trained adapter = filtered mean), the
    filtered precision ``precision + isotropic * I`` and JSON-able ``info``."""

    name: str
    mean: Tensor
    precision: CurvatureOperator
    isotropic: float = 0.0
    info: dict = field(default_factory=dict)


SEQUENCE_META_KEY = "lalora_curv.task_sequence"
SEQUENCE_FORMAT = 1


class TaskSequence:
    """Sequential Laplace posteriors over a stream of tasks (online EWC / Gaussian filtering).

    Usage::

        seq = TaskSequence(model, structure="diag", kind="empirical", dynamics="noise",
                           process_noise=process_noise(lora, 1e-4, per_layer={"*.layers.1.*": 1e-3}),
                           prior_precision=1.0)
        for task in tasks:
            finetune(model, task.train, penalty=seq.prior_penalty(strength), steps=...)  # None for task 1
            seq.fit_task(task.proxy)          # curvature at the trained adapter + filtering update
        adapters = seq.smooth()               # per-task smoothed adapters (dicts name -> tensor)

    Precisions (``Lambda``) are in the curvature's units (mean over terms), times
    ``curvature_scale`` (e.g. the number of training terms, to make them posterior precisions;
    ``process_noise`` is a variance in the units of ``Lambda^{-1}``).

    * task 1: ``Lambda_1 = prior_precision * I + curvature_scale * C_1``
    * prior of task ``t+1`` (``predicted_precision``):
      ``dynamics="identity"``: ``gamma * Lambda_t`` (online EWC; ``gamma = 1``: plain accumulation);
      ``dynamics="noise"``: ``(Lambda_t^{-1} + Q)^{-1}`` (:func:`predict`; :data:`NOISE_STRUCTURES`);
    * update: ``Lambda_{t+1} = prior + curvature_scale * C_{t+1}``, anchor ``m_t`` = the adapter
      after task ``t``.

    With ``dynamics="identity"`` the isotropic part is kept as a scalar (``TaskRecord.isotropic``,
    passed to ``LaplacePenalty(prior_precision=...)``), so kfac/kfac_tridiag stay exact sums;
    with ``"noise"`` it is folded into the operator (:func:`with_isotropic`) before predicting.

    Args:
        model: the peft model being trained (its LoRA registry fixes the flat order).
        structure: one of :data:`TASK_STRUCTURES` (diag, diag_lowrank, lowrank, kfac, kfac_tridiag, dense).
        kind: curvature kind for ``fit_curvature`` ("empirical" | "mc" | "ggn").
        dynamics: "identity" (decay ``gamma``) or "noise" (process noise; needs a structure with a
            closed-form predict step that survives the update: :data:`NOISE_STRUCTURES`).
        gamma: online-EWC decay in [0, 1] (identity dynamics only).
        process_noise: float or ``Tensor[numel]`` (see :func:`process_noise`); noise dynamics only.
        prior_precision: isotropic precision of the initial prior (>= 0); > 0 makes every
            ``Lambda_t`` invertible.
        curvature_scale: factor on each fitted curvature (> 0).
        max_rank: structures with an explicit truncation only (diag_lowrank: keep the top
            ``max_rank`` eigenpairs of the low-rank part and move the rest's diagonal into ``D``;
            lowrank: the best rank-``max_rank`` approximation), after each update (explicit
            approximation; None keeps the exact, growing rank).
        fit_options: extra ``fit_curvature`` options (``terms``, ``rank``, ``mc_samples``, ``seed``,
            ``factor_dtype``, ...).
        lora: the registry (built from ``model`` if None).
    """

    def __init__(self, model: nn.Module, structure: str = "diag", kind: str = "empirical", *,
                 dynamics: str = "identity", gamma: float = 1.0, process_noise: float | Tensor = 0.0,
                 prior_precision: float = 0.0, curvature_scale: float = 1.0, max_rank: int | None = None,
                 fit_options: Mapping[str, Any] | None = None, lora: LoRAParams | None = None):
        if structure not in TASK_STRUCTURES:
            raise ValueError(f"unknown structure {structure!r}; choose one of {TASK_STRUCTURES}")
        if dynamics not in DYNAMICS:
            raise ValueError(f"unknown dynamics {dynamics!r}; choose one of {DYNAMICS}")
        if dynamics == "noise" and structure not in NOISE_STRUCTURES:
            raise NotImplementedError(
                f"dynamics='noise' needs a closed-form predict step every task, which {structure!r} lacks: the "
                "filtered precision becomes a sum of Kronecker terms (or a tridiag block) with no common "
                "eigenbasis (see lalora_curv.continual). Use dynamics='identity' (exact online accumulation), "
                f"or one of {NOISE_STRUCTURES}")
        gamma = float(gamma)
        if not (0 <= gamma <= 1):
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        if dynamics == "noise" and gamma != 1.0:
            raise ValueError("gamma applies to dynamics='identity'; with 'noise' forgetting comes from process_noise")
        if max_rank is not None and (structure not in TRUNCATABLE_STRUCTURES or int(max_rank) < 1):
            raise ValueError(f"max_rank (>= 1) applies to the structures with an explicit rank truncation only: "
                             f"{TRUNCATABLE_STRUCTURES}")
        self.model = model
        self.lora = lora if lora is not None else LoRAParams.from_model(model)
        self.structure, self.kind, self.dynamics = structure, kind, dynamics
        self.gamma = gamma
        self.prior_precision = check_noise_value(prior_precision, "prior_precision")
        self.curvature_scale = float(curvature_scale)
        if not (math.isfinite(self.curvature_scale) and self.curvature_scale > 0):
            raise ValueError(f"curvature_scale must be finite and > 0, got {curvature_scale}")
        self.max_rank = None if max_rank is None else int(max_rank)
        # dtypes as strings: fit_curvature accepts them, JSON stores them, load round-trips them
        self.fit_options = {k: (str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v)
                            for k, v in dict(fit_options or {}).items()}
        q_dtype = torch.promote_types(self.lora.params[0].dtype, torch.float32)
        if isinstance(process_noise, Tensor):
            q = process_noise.detach().to(device=self.lora.device, dtype=q_dtype).clone()
            if q.shape != (self.lora.numel,):
                raise ValueError(f"process_noise has shape {tuple(q.shape)}, expected ({self.lora.numel},)")
        else:
            q = torch.full((self.lora.numel,), check_noise_value(process_noise, "process_noise"), dtype=q_dtype,
                           device=self.lora.device)
        if not torch.isfinite(q).all() or (q < 0).any():
            raise ValueError("process_noise must be finite and >= 0")
        if dynamics == "identity" and bool((q != 0).any()):
            raise ValueError("process_noise applies to dynamics='noise'; identity dynamics forget through gamma")
        self.process_noise = q
        self.tasks: list[TaskRecord] = []

    # ------------------------------------------------------------------ filtering
    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def predicted_precision(self) -> tuple[CurvatureOperator | None, float]:
        """The prior of the next task as ``(operator, isotropic)``: precision ``op + iso * I``.

        Before any task: ``(None, prior_precision)``.
        """
        if not self.tasks:
            return None, self.prior_precision
        last = self.tasks[-1]
        if self.dynamics == "identity":
            return self.gamma * last.precision, self.gamma * last.isotropic
        return predict(with_isotropic(last.precision, last.isotropic), self.process_noise), 0.0

    def prior_penalty(self, strength: float) -> nn.Module | None:
        """``LaplacePenalty`` of the prior for the next task: anchor = the previous task's adapter,
        precision = the predicted precision (its isotropic part as ``prior_precision``).
        None before the first task (nothing to remember yet)."""
        from ..penalties import LaplacePenalty

        op, iso = self.predicted_precision()
        if op is None:
            return None
        return LaplacePenalty(op, anchor=self.tasks[-1].mean, strength=strength, lora=self.lora, prior_precision=iso)

    def fit_task(self, proxy_batches: Iterable[Any], *, name: str | None = None, progress: bool = False) -> TaskRecord:
        """After training a task: fit its curvature at the current adapter on ``proxy_batches`` and
        apply the filtering update (:meth:`add_task`)."""
        from ..curvature import fit_curvature

        curv = fit_curvature(self.model, proxy_batches, structure=self.structure, kind=self.kind, lora=self.lora,
                             progress=progress, **self.fit_options)
        return self.add_task(curv, name=name)

    def add_task(self, curvature: CurvatureOperator, *, mean: Tensor | Mapping[str, Tensor] | None = None,
                 name: str | None = None) -> TaskRecord:
        """Filtering update with a given curvature: ``Lambda_t = prior + curvature_scale * curvature``,
        ``m_t = mean`` (default: the model's current adapter)."""
        if curvature.structure != self.structure:
            raise CurvatureMismatchError(f"this sequence holds {self.structure!r} precisions, got a "
                                         f"{curvature.structure!r} curvature")
        validate_signature(curvature.signature, self.lora, what="curvature")
        curvature = curvature.to(self.lora.device) if curvature.device != self.lora.device else curvature
        if self.curvature_scale != 1.0:
            curvature = self.curvature_scale * curvature
        mean = self.lora.flatten() if mean is None else self.lora.as_flat(mean)
        mean = mean.detach().clone()
        prior, iso = self.predicted_precision()
        precision = curvature if prior is None else prior + curvature
        if self.dynamics == "noise":
            precision, iso = with_isotropic(precision, iso), 0.0
        if self.max_rank is not None and precision.rank > self.max_rank:
            precision = precision.truncated(self.max_rank)
        record = TaskRecord(name=name if name is not None else f"task{len(self.tasks)}", mean=mean,
                            precision=precision, isotropic=float(iso), info={"curvature": curvature.info})
        self.tasks.append(record)
        return record

    # ------------------------------------------------------------------ smoothing
    def smoothed(self) -> SmoothingResult:
        """Flat smoothed means (and precisions where cheap), one per task (module docstring)."""
        means = [t.mean for t in self.tasks]
        if self.dynamics == "identity":
            return SmoothingResult(decay_smooth(means, self.gamma), None)
        precisions = [with_isotropic(t.precision, t.isotropic) for t in self.tasks]
        return rts_smooth(means, precisions, self.process_noise)

    def smooth(self) -> list[dict[str, Tensor]]:
        """Per-task smoothed adapters, dicts ``name -> tensor`` (load one with :meth:`set_adapter`)."""
        return [{k: v.clone() for k, v in self.lora.unflatten(m).items()} for m in self.smoothed().means]

    def set_adapter(self, tensors: Mapping[str, Tensor] | Tensor) -> None:
        """Copy an adapter (dict or flat vector, e.g. a smoothed one) into the model's LoRA weights."""
        self.lora.assign(tensors)  # under FSDP2 each rank keeps its shard

    # ------------------------------------------------------------------ io
    def _config(self) -> dict:
        return {"structure": self.structure, "kind": self.kind, "dynamics": self.dynamics, "gamma": self.gamma,
                "prior_precision": self.prior_precision, "curvature_scale": self.curvature_scale,
                "max_rank": self.max_rank, "fit_options": self.fit_options}

    def save(self, path) -> None:
        """Write the sequence to one safetensors file (atomic): tensors ``process_noise``,
        ``task{t}.mean``, ``task{t}.precision.<key>`` (each operator's state tensors) and, under the
        metadata key ``lalora_curv.task_sequence``, JSON with the configuration, the LoRA registry
        signature and per task its name, isotropic part, info and the operator's structure/meta.

        Raises :class:`~lalora_curv.NonFiniteCurvatureError` (and writes nothing) if a mean, a
        precision or an isotropic part holds NaN/inf."""
        tensors: dict[str, Tensor] = {"process_noise": self.process_noise}
        tasks_meta = []
        for t, rec in enumerate(self.tasks):
            tensors[f"task{t}.mean"] = rec.mean
            for key, val in rec.precision.state_tensors().items():
                tensors[f"task{t}.precision.{key}"] = val
            common = rec.precision._common() | {"num_params": rec.precision.num_params}
            common.pop("signature", None)  # stored once, below
            tasks_meta.append({"name": rec.name, "isotropic": rec.isotropic, "info": rec.info,
                               "precision": {"structure": rec.precision.structure, "common": common,
                                             "meta": rec.precision.state_meta()}})
        meta = {"format": SEQUENCE_FORMAT, "config": self._config(), "signature": self.lora.signature(),
                "tasks": tasks_meta}
        # a NaN/inf would otherwise be saved silently and poison every later prior (as curvatures do)
        for key, val in tensors.items():
            if val.is_floating_point() and not torch.isfinite(val).all():
                raise NonFiniteCurvatureError(f"TaskSequence.save: {key!r} contains NaN/inf; nothing was written to "
                                              f"{path}")
        for rec in self.tasks:
            if not math.isfinite(rec.isotropic):
                raise NonFiniteCurvatureError(f"TaskSequence.save: task {rec.name!r} has a non-finite isotropic "
                                              f"precision {rec.isotropic}; nothing was written to {path}")
        write_safetensors_atomic(tensors, path, {SEQUENCE_META_KEY: json.dumps(meta)})

    @classmethod
    def load(cls, path, model: nn.Module, *, structure: str | None = None,
             lora: LoRAParams | None = None) -> TaskSequence:
        """Read a sequence saved with :meth:`save` for ``model``.

        Raises :class:`~lalora_curv.CurvatureFileError` (missing / corrupted / not a task sequence
        file / inconsistent state), :class:`~lalora_curv.CurvatureMismatchError` (saved for another
        LoRA registry: adapter, names, shapes; or ``structure`` given and different) or
        :class:`~lalora_curv.NonFiniteCurvatureError` (a stored tensor or isotropic part is NaN/inf).
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise CurvatureFileError(f"task sequence file not found: {path}")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors' own error types for corrupt files
            raise CurvatureFileError(f"{path} is not a valid safetensors file: {exc}") from None
        if SEQUENCE_META_KEY not in header:
            what = "a curvature file" if "lalora_curv" in header else "not a lalora_curv file"
            raise CurvatureFileError(f"{path} is not a TaskSequence file ({what}); use load_curvature for curvatures")
        try:
            meta = json.loads(header[SEQUENCE_META_KEY])
        except json.JSONDecodeError as exc:
            raise CurvatureFileError(f"{path}: corrupted task sequence metadata ({exc})") from None
        if meta.get("format") != SEQUENCE_FORMAT:
            raise CurvatureFileError(f"{path}: unsupported task sequence format {meta.get('format')!r}")
        for key, val in tensors.items():
            if val.is_floating_point() and not torch.isfinite(val).all():
                raise NonFiniteCurvatureError(f"{path}: tensor {key!r} contains NaN/inf")
        for t, spec in enumerate(meta.get("tasks", [])):
            if not math.isfinite(float(spec.get("isotropic", 0.0))):
                raise NonFiniteCurvatureError(f"{path}: task {t} has a non-finite isotropic precision "
                                              f"{spec.get('isotropic')}")
        config = meta["config"]
        if structure is not None and structure != config["structure"]:
            raise CurvatureMismatchError(
                f"{path} holds a {config['structure']!r} task sequence, expected {structure!r}")
        lora = lora if lora is not None else LoRAParams.from_model(model)
        validate_signature(meta["signature"], lora, what="task sequence")
        device = lora.device
        seq = cls(model, config["structure"], config["kind"], dynamics=config["dynamics"], gamma=config["gamma"],
                  process_noise=tensors["process_noise"].to(device), prior_precision=config["prior_precision"],
                  curvature_scale=config["curvature_scale"], max_rank=config["max_rank"],
                  fit_options=config["fit_options"], lora=lora)
        seq.process_noise = tensors["process_noise"].to(device)  # keep the stored dtype bit for bit
        for t, spec in enumerate(meta["tasks"]):
            prefix = f"task{t}.precision."
            state = {k[len(prefix):]: v.to(device) for k, v in tensors.items() if k.startswith(prefix)}
            pspec = spec["precision"]
            op_cls = CurvatureOperator.registry.get(pspec["structure"])
            if op_cls is None:
                raise CurvatureFileError(f"{path}: task {t} has an unknown precision structure {pspec['structure']!r}")
            try:
                op = op_cls.from_state(state, pspec["meta"], dict(pspec["common"]) | {"signature": meta["signature"]})
                mean = tensors[f"task{t}.mean"].to(device)
            except (KeyError, ValueError, TypeError) as exc:
                raise CurvatureFileError(f"{path}: inconsistent state of task {t} ({exc})") from None
            if op.num_params != lora.numel or mean.shape != (lora.numel,):
                raise CurvatureFileError(f"{path}: task {t} has {op.num_params} precision / {tuple(mean.shape)} mean "
                                         f"entries, the registry has {lora.numel} parameters")
            seq.tasks.append(TaskRecord(name=spec["name"], mean=mean, precision=op, isotropic=spec["isotropic"],
                                        info=spec["info"]))
        return seq

    def __repr__(self) -> str:
        return (f"TaskSequence(structure={self.structure!r}, kind={self.kind!r}, dynamics={self.dynamics!r}, "
                f"tasks={self.num_tasks}, numel={self.lora.numel})")
