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

import math
from typing import Any, ClassVar, Mapping

import torch
from torch import Tensor

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
    #: registry of structure name -> class, filled by ``__init_subclass__`` (used by load)
    registry: ClassVar[dict[str, type["CurvatureOperator"]]] = {}

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
    def from_state(cls, tensors: Mapping[str, Tensor], meta: dict, common: dict) -> "CurvatureOperator":
        raise NotImplementedError

    def _scaled(self, alpha: float) -> "CurvatureOperator":
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

    def trace(self) -> Tensor:
        return self.diagonal().sum()

    # ------------------------------------------------------------------ algebra
    def _check_compatible(self, other: "CurvatureOperator") -> None:
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

    def _add_same(self, other: "CurvatureOperator") -> "CurvatureOperator | None":
        """Structure-specific exact sum, or None to fall back on the generic sum operator."""
        return None

    def __add__(self, other):
        if isinstance(other, (int, float)) and other == 0:  # lets sum([...]) work
            return self
        self._check_compatible(other)
        result = self._add_same(other)
        if result is None:
            result = other._add_same_reflected(self)
        if result is None:
            from .sum import SumCurvature

            result = SumCurvature([self, other])
        return result

    def _add_same_reflected(self, other: "CurvatureOperator") -> "CurvatureOperator | None":
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
    def to(self, device=None, dtype: torch.dtype | None = None) -> "CurvatureOperator":
        """A copy with every state tensor moved (``dtype`` applies to floating tensors)."""
        tensors = {
            k: t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)
            for k, t in self.state_tensors().items()
        }
        return type(self).from_state(tensors, self.state_meta(), self._common() | {"num_params": self.num_params})

    def save(self, path) -> None:
        """Write one safetensors file, JSON metadata in its header (no pickle, no sidecar),
        atomically (temp file + rename)."""
        from .io import save_curvature

        save_curvature(self, path)

    def save_pretrained(self, adapter_dir):
        """Write the curvature beside a peft adapter: ``adapter_dir/lalora_curvature.safetensors``
        (``io.CURVATURE_FILENAME``; a non-``"default"`` adapter's subfolder, as peft does). Read it
        back with ``lc.load_curvature(adapter_dir, lora=...)``. Returns the file's path."""
        from .io import save_pretrained

        return save_pretrained(self, adapter_dir)

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
