"""The one interface every curvature structure implements.

A :class:`CurvatureOperator` is a symmetric PSD linear operator ``P`` on the flat LoRA vector
(``lora.flatten()`` order: layers in module order, per layer ``A`` then ``B``, each row-major),
or, for ``kfac_delta_w``, on the flat Delta-W space of the adapted layers.

Subclasses implement ``_matmat`` (``Tensor[num_params, k] -> Tensor[num_params, k]``),
``diagonal``, ``state_tensors``/``from_state`` (serialization), ``_scaled`` (scalar product) and
may implement ``solve`` and cheaper ``quadratic_form``/``to_dense``. Everything else
(matvec, ``@``, ``+``, ``*``, ``to``, ``save``, ``nbytes``) lives here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from .files import (
    CURVATURE_FILENAME,
    FORMAT_VERSION,
    META_KEY,
    adapter_subfolder,
    state_dtype_problem,
    write_safetensors_atomic,
)

__all__ = ["CurvatureOperator", "DenseTooLargeError", "NonFiniteCurvatureError", "DEFAULT_MAX_DENSE"]

#: default size limit for ``to_dense`` and the dense structure (a 20k x 20k fp32 matrix is 1.6 GB)
DEFAULT_MAX_DENSE = 20_000


class DenseTooLargeError(RuntimeError):
    """Refused to materialize a dense matrix above the size limit."""


class NonFiniteCurvatureError(FloatingPointError):
    """Curvature statistics contain NaN or inf."""


class CurvatureOperator:
    """Base class: a PSD operator ``P`` over ``num_params`` coordinates.

    Attributes:
        structure: name of the structure ("dense", "diag", "kfac", ...).
        kind: "ggn" | "mc" | "empirical" (or "sum" of kinds).
        num_params: dimension of the space ``P`` acts on.
        signature: the LoRA registry signature (adapter, names, shapes, layers) it was fitted on.
        info: JSON-able fit metadata (terms, backend, number of terms, options...).
        damping: added to the spectrum in :meth:`solve` only (never in ``matvec``).
    """

    structure: ClassVar[str] = "base"
    #: the space the operator acts on (SEMANTICS §4-5): "theta" (the flat LoRA vector) or "delta_w"
    #: (the flat Delta-W of the adapted layers). Sums and scalings inherit it; every decision that
    #: depends on the space reads this attribute, never a structure name.
    space: str = "theta"
    #: name -> class of every operator class defined (filled by ``__init_subclass__``; used to
    #: load files and sums). Which structures exist is listed once, in ``curvature/registry.py``.
    registry: ClassVar[dict[str, type[CurvatureOperator]]] = {}
    #: the ``fit_curvature`` options a structure reads besides the common ones (see ``accumulator``)
    fit_options: ClassVar[frozenset] = frozenset()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.structure != "base":
            CurvatureOperator.registry[cls.structure] = cls

    def __init__(self, num_params: int, *, kind: str, signature: dict | None = None,
                 info: dict | None = None, damping: float = 0.0):
        self.num_params = int(num_params)
        self.kind = kind
        self.signature = signature or {}
        self.info = dict(info or {})
        self.damping = float(damping)

    # ------------------------------------------------------------------ fitting
    @classmethod
    def accumulator(cls, lora, *, dtype: torch.dtype, **options):
        """The structure's :class:`~lalora_curv.curvature.statistics.Accumulator` for ``lora``.

        ``options`` are the structure's own ``fit_options``. Structures that are only built from
        other operators (sums, the eigenbasis K-FAC of filtering) cannot be fitted."""
        raise TypeError(f"structure {cls.structure!r} cannot be fitted with fit_curvature; it is built from "
                        "fitted curvatures")

    @classmethod
    def fittable(cls) -> bool:
        return "accumulator" in {k for c in cls.__mro__[:-1] if c is not CurvatureOperator for k in vars(c)}

    # ------------------------------------------------------------------ to implement
    def _matmat(self, X: Tensor) -> Tensor:
        raise NotImplementedError

    def diagonal(self) -> Tensor:
        """``diag(P)`` as ``Tensor[num_params]``."""
        raise NotImplementedError

    def state_tensors(self) -> dict[str, Tensor]:
        """All tensors of the state (serialized with safetensors)."""
        raise NotImplementedError

    def psd_parts(self) -> tuple[list[Tensor], list[Tensor]]:
        """The state that makes ``P`` PSD by the structure's construction: ``(vectors, matrices)``,
        every vector entry must be >= 0 and every (square) matrix symmetric PSD. ``load_curvature``
        checks them to roundoff and refuses a file that breaks them."""
        raise NotImplementedError(f"structure {self.structure!r} ({type(self).__name__}) does not declare "
                                  "psd_parts(), so its PSD-ness cannot be checked")

    def state_meta(self) -> dict[str, Any]:
        """Structure-specific JSON metadata needed by :meth:`from_state` (besides the common keys)."""
        return {}

    @classmethod
    def from_state(cls, tensors: Mapping[str, Tensor], meta: dict, common: dict) -> CurvatureOperator:
        raise NotImplementedError

    def _scaled(self, alpha: float) -> CurvatureOperator:
        raise NotImplementedError

    # ------------------------------------------------------------------ common behaviour
    def _common(self) -> dict:
        return dict(kind=self.kind, signature=self.signature, info=self.info, damping=self.damping)

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.state_tensors().values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.state_tensors().values())).device

    def _check_vector(self, v: Tensor, name: str = "v") -> Tensor:
        if not isinstance(v, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
        if v.shape[0] != self.num_params:
            raise ValueError(
                f"{name} has leading dimension {v.shape[0]}, but this {self.structure} curvature acts on "
                f"{self.num_params} parameters"
            )
        if v.device != self.device:
            raise ValueError(
                f"{name} is on {v.device} but the curvature is on {self.device}; call curv.to({str(v.device)!r})"
            )
        if not v.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {v.dtype}")
        return v.to(self.dtype)

    def matmat(self, X: Tensor) -> Tensor:
        """``P @ X`` for ``X: Tensor[num_params, k]`` (computed in the operator's dtype)."""
        X = self._check_vector(X, "X")
        if X.ndim != 2:
            raise ValueError(f"matmat expects a 2-D tensor, got shape {tuple(X.shape)}")
        return self._matmat(X)

    def matvec(self, v: Tensor) -> Tensor:
        """``P @ v`` for ``v: Tensor[num_params]`` -> ``Tensor[num_params]``."""
        v = self._check_vector(v)
        if v.ndim != 1:
            raise ValueError(f"matvec expects a 1-D tensor, got shape {tuple(v.shape)}; use matmat")
        return self._matmat(v[:, None])[:, 0]

    def __matmul__(self, v: Tensor) -> Tensor:
        return self.matvec(v) if v.ndim == 1 else self.matmat(v)

    def quadratic_form(self, delta: Tensor | Mapping[str, Tensor], lora=None) -> Tensor:
        """``delta^T P delta`` (scalar), differentiable w.r.t. ``delta``.

        ``delta`` is ``Tensor[num_params]`` or a dict ``name -> tensor`` (then ``lora`` or the
        stored signature gives the order).
        """
        delta = self._flat_delta(delta, lora)
        delta = self._check_vector(delta, "delta")
        return torch.dot(delta, self._matmat(delta[:, None])[:, 0])

    def _flat_delta(self, delta, lora) -> Tensor:
        if isinstance(delta, Mapping):
            if lora is not None:
                return lora.flatten(delta)
            names = self.signature.get("names")
            if not names:
                raise ValueError("pass lora= to use a dict delta with a curvature that has no stored names")
            return torch.cat([delta[n].reshape(-1) for n in names])
        return delta

    def to_dense(self, max_params: int = DEFAULT_MAX_DENSE) -> Tensor:
        """The matrix ``Tensor[num_params, num_params]``; refuses above ``max_params``."""
        if self.num_params > max_params:
            raise DenseTooLargeError(
                f"to_dense refused: {self.num_params} parameters > max_params={max_params} "
                f"({self.num_params ** 2 * 4 / 1e9:.1f} GB in fp32); pass max_params= to override"
            )
        eye = torch.eye(self.num_params, dtype=self.dtype, device=self.device)
        dense = self._matmat(eye)
        return 0.5 * (dense + dense.T)

    def solve(self, v: Tensor, damping: float | None = None) -> Tensor:
        """``(P + damping I)^{-1} v``; only structures with a cheap exact inverse implement it."""
        raise NotImplementedError(
            f"solve is not available for structure {self.structure!r}; use diag, kfac, diag_lowrank or dense"
        )

    @property
    def nbytes(self) -> int:
        """Bytes held by the operator's state tensors (shared tensors counted once)."""
        seen: set[int] = set()
        total = 0
        for t in self.state_tensors().values():
            key = t.untyped_storage().data_ptr()
            if key in seen:
                continue
            seen.add(key)
            total += t.numel() * t.element_size()
        return total

    # ------------------------------------------------------------------ algebra
    def _check_compatible(self, other: CurvatureOperator) -> None:
        if not isinstance(other, CurvatureOperator):
            raise TypeError(f"cannot add a curvature and a {type(other).__name__}")
        if other.space != self.space:
            raise ValueError(f"cannot add curvatures over different spaces: {self.space!r} ({self.structure}) and "
                             f"{other.space!r} ({other.structure}); a Delta-W curvature (kfac_delta_w) and a theta "
                             "curvature never add, even when their dimensions match")
        if other.num_params != self.num_params:
            raise ValueError(
                f"cannot add curvatures over different spaces: {self.num_params} vs {other.num_params} parameters"
            )
        a, b = self.signature.get("names"), other.signature.get("names")
        if a and b and a != b:
            raise ValueError("cannot add curvatures fitted on different LoRA registries (parameter names differ)")
        if other.device != self.device:
            raise ValueError(f"cannot add curvatures on different devices: {self.device} vs {other.device}")

    def _add_same(self, other: CurvatureOperator) -> CurvatureOperator | None:
        """Structure-specific exact sum, or None to fall back on the generic sum operator."""
        return None

    #: exact closed-form sums of two different structures, ``(class a, class b) -> fn(a, b)``;
    #: registered by the module of the result's structure (see :meth:`register_sum_rule`)
    _sum_rules: ClassVar[dict[tuple[type, type], Callable]] = {}

    @staticmethod
    def register_sum_rule(first: type, second: type, rule: Callable) -> None:
        """Register ``rule(a, b)`` as the exact sum of an ``a: first`` and a ``b: second`` (both orders)."""
        CurvatureOperator._sum_rules[(first, second)] = rule
        CurvatureOperator._sum_rules[(second, first)] = lambda b, a: rule(a, b)

    def __add__(self, other):
        if isinstance(other, (int, float)) and other == 0:  # lets sum([...]) work
            return self
        self._check_compatible(other)
        rule = CurvatureOperator._sum_rules.get((type(self), type(other)))
        result = rule(self, other) if rule is not None else self._add_same(other)
        if result is None:
            result = other._add_same_reflected(self)
        if result is None:
            result = SumCurvature([self, other])
        return result

    def _add_same_reflected(self, other: CurvatureOperator) -> CurvatureOperator | None:
        return None

    __radd__ = __add__

    def __mul__(self, alpha):
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
            return NotImplemented
        if not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"a curvature can only be scaled by a finite non-negative number, got {alpha}")
        return self._scaled(float(alpha))

    __rmul__ = __mul__

    # ------------------------------------------------------------------ device / dtype / io
    def to(self, device=None, dtype: torch.dtype | None = None) -> CurvatureOperator:
        """A copy with every state tensor moved (``dtype`` applies to floating tensors)."""
        tensors = {
            k: t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)
            for k, t in self.state_tensors().items()
        }
        return type(self).from_state(tensors, self.state_meta(), self._common() | {"num_params": self.num_params})

    def save(self, path) -> None:
        """Write one safetensors file, JSON metadata in its header (no pickle, no sidecar),
        atomically (temp file + rename)."""
        problem = state_dtype_problem(self.state_tensors())
        if problem:
            raise ValueError(f"cannot save this {self.structure} curvature: {problem} (cast with curv.to(dtype=...))")
        meta = {"format": FORMAT_VERSION, "structure": self.structure,
                "common": self._common() | {"num_params": self.num_params}, "meta": self.state_meta()}
        write_safetensors_atomic(self.state_tensors(), path, {META_KEY: json.dumps(meta)})

    def save_pretrained(self, adapter_dir):
        """Write the curvature beside a peft adapter: ``adapter_dir/lalora_curvature.safetensors``
        (``io.CURVATURE_FILENAME``; a non-``"default"`` adapter's subfolder, as peft does). Read it
        back with ``lc.load_curvature(adapter_dir, lora=...)``. Returns the file's path."""
        path = adapter_subfolder(Path(adapter_dir), self.signature.get("adapter_name")) / CURVATURE_FILENAME
        self.save(path)
        return path

    def check_finite(self) -> None:
        for key, t in self.state_tensors().items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise NonFiniteCurvatureError(
                    f"{self.structure} curvature state {key!r} contains NaN/inf (check the model's loss and "
                    "inputs; a bf16 overflow or a diverged model are common causes)"
                )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(structure={self.structure!r}, kind={self.kind!r}, "
            f"num_params={self.num_params}, nbytes={self.nbytes})"
        )

    # -- interop: scipy, curvlinops, trace, logdet --
    # helpers in curvature/interop.py (imported here, function-locally: scipy and curvlinops are
    # optional and loaded only when called; interop.py does not import this module)

    def to_scipy(self, dtype=None):
        """``P`` as a ``scipy.sparse.linalg.LinearOperator`` of shape ``(num_params, num_params)``
        (symmetric; ``matvec``/``matmat`` run this operator in torch on its device and dtype).
        ``dtype``: numpy dtype of the scipy side, default ``float64``. Needs scipy."""
        from .interop import scipy_operator

        return scipy_operator(self, dtype)

    def to_curvlinops(self):
        """``P`` as a curvlinops ``PyTorchLinearOperator`` (self-adjoint) on tensor lists shaped
        like the LoRA parameters in flat order (``signature["shapes"]``), or, in the Delta-W space,
        like each adapted layer's ``(d_out, d_in)``. Needs curvlinops-for-pytorch."""
        from .interop import curvlinops_operator

        return curvlinops_operator(self)

    def trace(self) -> Tensor:
        """``tr(P)`` exactly (0-dim tensor in the operator's dtype); structures override it where a
        closed form is cheaper than the diagonal."""
        return self.diagonal().sum()

    def logdet(self, prior_precision: float, *, max_dense: int = DEFAULT_MAX_DENSE) -> Tensor:
        """``log det(P + prior_precision * I)`` exactly, in float64 (0-dim float64 tensor on the
        operator's device). ``prior_precision > 0`` is required (``P`` is often singular).
        Structures with a closed form use it; the others (sums, kfac_tridiag) build dense blocks
        of at most ``max_dense`` coordinates and raise :class:`DenseTooLargeError` above it."""
        from .interop import check_prior_precision

        if self.space not in ("theta", "delta_w"):
            raise ValueError(f"logdet: unknown space {self.space!r} of this {self.structure} operator")
        return self._logdet(check_prior_precision(prior_precision), max_dense)

    def _logdet(self, prior_precision: float, max_dense: int) -> Tensor:
        # no closed form: eigenvalues of the dense matrix, built in float64, under the size limit
        from .interop import logdet_psd_dense

        if self.num_params > max_dense:
            raise DenseTooLargeError(
                f"logdet of this {self.structure} curvature has no closed form and needs its dense "
                f"{self.num_params} x {self.num_params} matrix, above max_dense={max_dense}; pass max_dense= "
                "to allow it")
        return logdet_psd_dense(self.to(dtype=torch.float64).to_dense(max_dense), prior_precision)

    # -- continual: filtering and smoothing (lalora_curv.continual) --
    # Identity dynamics with diagonal process noise ``Q = diag(q)`` (``q: Tensor[num_params]``,
    # >= 0); ``self`` is a precision ``Lambda``. A structure implements the underscored methods it
    # has a closed form for; the public ones validate once (space, noise vector, options) and the
    # defaults below refuse by name. Only theta-space operators take part (SEMANTICS §4-5).

    #: the continual operations a structure may implement (its own ``_<operation>``)
    CONTINUAL_OPERATIONS: ClassVar[tuple[str, ...]] = ("with_isotropic", "predict", "smoothing_gain",
                                                       "smoothed_precision")
    #: keyword options this structure's :meth:`predict` accepts besides the noise
    predict_options: ClassVar[tuple[str, ...]] = ()
    #: True when ``predict(P) + C`` (``C`` a fresh curvature of this structure) is again an operator
    #: with its own predict step, so that filtering with process noise stays closed form task after task
    filtering_closed: ClassVar[bool] = False

    @classmethod
    def supports(cls, operation: str) -> bool:
        """Whether this structure has its own closed form for a continual ``operation``."""
        if operation not in CurvatureOperator.CONTINUAL_OPERATIONS:
            raise ValueError(f"unknown continual operation {operation!r}; "
                             f"choose one of {CurvatureOperator.CONTINUAL_OPERATIONS}")
        own = getattr(cls, f"_{operation}") is not getattr(CurvatureOperator, f"_{operation}")
        return cls.space == "theta" and own

    @staticmethod
    def structures_supporting(operation: str) -> tuple[str, ...]:
        """Registered structures with their own closed form for ``operation`` (sorted names)."""
        return tuple(sorted(name for name, cls in CurvatureOperator.registry.items() if cls.supports(operation)))

    def _unsupported(self, operation: str) -> NotImplementedError:
        return NotImplementedError(
            f"{operation} is not available for structure {self.structure!r} (no closed form in this "
            f"structure); structures that have it: {', '.join(self.structures_supporting(operation))}")

    def _require_theta(self, operation: str) -> None:
        if self.space != "theta":
            raise ValueError(f"{operation}: this {self.structure} operator acts on the {self.space!r} space, not on "
                             "the LoRA parameters theta; filtering and smoothing are defined for theta-space "
                             "precisions only")

    def _noise_vector(self, noise) -> Tensor:
        """Process noise (a number or ``Tensor[num_params]``/scalar tensor, finite, >= 0) as a
        ``Tensor[num_params]`` in this operator's dtype and device."""
        if isinstance(noise, Tensor):
            if noise.ndim == 0:
                noise = noise.expand(self.num_params)
            if noise.shape != (self.num_params,):
                raise ValueError(f"process noise has shape {tuple(noise.shape)}, expected ({self.num_params},) "
                                 "or a scalar")
            q = noise.to(device=self.device, dtype=self.dtype)
        else:
            q = torch.full((self.num_params,), float(noise), dtype=self.dtype, device=self.device)
        if not torch.isfinite(q).all() or (q < 0).any():
            raise ValueError("process noise must be finite and >= 0")
        return q

    def with_isotropic(self, value: float) -> CurvatureOperator:
        """``P + value * I`` exactly, in a structure whose predict step is closed form."""
        self._require_theta("with_isotropic")
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"isotropic precision must be a finite number >= 0, got {value}")
        return self._with_isotropic(value)

    def predict(self, noise, **options) -> CurvatureOperator:
        """Gaussian-filtering predict step: the precision ``(P^{-1} + diag(q))^{-1}`` (exact;
        written as ``P (I + Q P)^{-1}``, so a singular ``P`` is fine). ``options``: see
        ``predict_options`` of the structure."""
        self._require_theta("predict")
        unknown = sorted(set(options) - set(self.predict_options))
        if unknown:
            takers = sorted(n for n, c in CurvatureOperator.registry.items() if set(unknown) <= set(c.predict_options))
            raise ValueError(f"predict option(s) {unknown} do not apply to structure {self.structure!r}"
                             + (f"; they apply to {', '.join(takers)}" if takers else ""))
        return self._predict(self._noise_vector(noise), **options)

    def smoothing_gain(self, noise) -> Callable[[Tensor], Tensor]:
        """The RTS gain ``J = (I + Q P)^{-1}`` (``P`` the filtered precision of the earlier task) as
        a function ``v: Tensor[num_params] -> J v``. ``I + Q P`` is always invertible."""
        self._require_theta("smoothing_gain")
        return self._smoothing_gain(self._noise_vector(noise))

    def smoothed_precision(self, next_smoothed: CurvatureOperator, noise) -> CurvatureOperator:
        """RTS smoothed precision of this (filtered) task from the next task's smoothed precision,
        in precision form (no inverse of a precision)::

            Lambda_t^s = Lambda_t + pred(Lambda_{t+1}^s - pred(Lambda_t))

        ``pred`` the predict step; ``Lambda_{t+1}^s - pred(Lambda_t)`` is the information of the
        later tasks' data (PSD), carried back one transition by ``pred``."""
        self._require_theta("smoothed_precision")
        if type(next_smoothed) is not type(self):
            raise TypeError(f"smoothed_precision of a {self.structure} precision needs the next task's smoothed "
                            f"precision in the same structure, got {getattr(next_smoothed, 'structure', None)!r}")
        return self._smoothed_precision(next_smoothed, self._noise_vector(noise))

    def _with_isotropic(self, value: float) -> CurvatureOperator:
        raise self._unsupported("with_isotropic")

    def _predict(self, q: Tensor, **options) -> CurvatureOperator:
        raise self._unsupported("predict")

    def _smoothing_gain(self, q: Tensor) -> Callable[[Tensor], Tensor]:
        raise self._unsupported("smoothing_gain")

    def _smoothed_precision(self, next_smoothed: CurvatureOperator, q: Tensor) -> CurvatureOperator:
        raise self._unsupported("smoothed_precision")


def merged_common(a: CurvatureOperator, b: CurvatureOperator) -> dict:
    """Common metadata of an exact sum ``a + b`` (kind and info of both recorded)."""
    kind = a.kind if a.kind == b.kind else "sum"
    info = {"sum_of": [a.info, b.info]}
    return dict(kind=kind, signature=a.signature or b.signature, info=info, damping=max(a.damping, b.damping))


class SumCurvature(CurvatureOperator):
    """``P = sum_i P_i``; flattens nested sums. ``terms`` keep their own structure."""

    structure = "sum"

    def __init__(self, terms, **common):
        flat = []
        for t in terms:
            flat.extend(t.terms if isinstance(t, SumCurvature) else [t])
        if not flat:
            raise ValueError("SumCurvature needs at least one term")
        spaces = {t.space for t in flat}
        if len(spaces) > 1:
            raise ValueError(f"cannot sum curvatures over different spaces: {sorted(spaces)}")
        self.terms = flat
        self.space = flat[0].space
        if not common:
            merged = flat[0]._common()
            for t in flat[1:]:
                merged = merged_common(_Proxy(merged), t)
            common = merged
        common.pop("num_params", None)
        super().__init__(flat[0].num_params, **common)

    def _matmat(self, X: Tensor) -> Tensor:
        out = self.terms[0]._matmat(X)
        for t in self.terms[1:]:
            out = out + t._matmat(X)
        return out

    def quadratic_form(self, delta, lora=None) -> Tensor:
        return sum(t.quadratic_form(delta, lora) for t in self.terms)

    def diagonal(self) -> Tensor:
        return torch.stack([t.diagonal() for t in self.terms]).sum(0)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.terms)

    @property
    def dtype(self):
        return self.terms[0].dtype

    @property
    def device(self):
        return self.terms[0].device

    def psd_parts(self):
        # a sum of PSD terms is PSD: the union of the terms' parts
        vectors, matrices = [], []
        for t in self.terms:
            v, m = t.psd_parts()
            vectors += v
            matrices += m
        return vectors, matrices

    def state_tensors(self):
        return {f"term{i}.{k}": v for i, t in enumerate(self.terms) for k, v in t.state_tensors().items()}

    def state_meta(self):
        return {"terms": [{"structure": t.structure, "meta": t.state_meta(), "common": t._common()
                           | {"num_params": t.num_params}} for t in self.terms]}

    @classmethod
    def from_state(cls, tensors, meta, common):
        terms = []
        for i, spec in enumerate(meta["terms"]):
            prefix = f"term{i}."
            sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            sub_cls = CurvatureOperator.registry[spec["structure"]]
            terms.append(sub_cls.from_state(sub, spec["meta"], dict(spec["common"])))
        common = dict(common)
        return cls(terms, **common)

    def _scaled(self, alpha):
        return SumCurvature([alpha * t for t in self.terms], **self._common())

    def _add_same(self, other):
        # another exact term; structures that add in closed form were handled by their own _add_same
        return SumCurvature(self.terms + [other])
    # -- interop: scipy, curvlinops, trace, logdet --
    # the sum of the terms' exact traces; logdet has no closed form for a sum (the base class's
    # dense fallback, under the size limit)

    def trace(self) -> Tensor:
        return sum(t.trace().to(self.dtype) for t in self.terms)


class _Proxy:
    """Lets ``_merged_common`` fold over several operators' metadata."""

    def __init__(self, common: dict):
        self.kind, self.signature, self.info, self.damping = (
            common["kind"], common["signature"], common["info"], common["damping"])
