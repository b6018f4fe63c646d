"""Save/load curvature operators: safetensors tensors + JSON metadata, no pickle.

The file holds every state tensor and, under the metadata key ``lalora_curv``, a JSON document
with the format version, the structure, the common fields (kind, info, damping, num_params), the
structure's own metadata and the LoRA registry signature (adapter, parameter names and shapes,
layer names) it was fitted on. :func:`load_curvature` validates that signature against the
``LoRAParams`` it is given and names the first mismatch.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from .base import CurvatureOperator, NonFiniteCurvatureError

__all__ = ["save_curvature", "load_curvature", "CurvatureFileError", "CurvatureMismatchError", "FORMAT_VERSION"]

FORMAT_VERSION = 1
META_KEY = "lalora_curv"


class CurvatureFileError(ValueError):
    """The file is not a readable lalora_curv curvature (missing, truncated, corrupted, wrong format)."""


class CurvatureMismatchError(ValueError):
    """A saved curvature does not fit the model's LoRA registry (adapter, names, shapes, structure)."""


def write_safetensors_atomic(tensors: dict, path, metadata: dict[str, str]) -> None:
    """Write ``tensors`` (any device) with string ``metadata`` to ``path`` atomically: a temp file
    in the same folder, then ``os.replace``; a failure leaves any previous file untouched.
    safetensors refuses tensors sharing storage, so repeats are stored as copies."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out, seen = {}, set()
    for key, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[key] = t.clone() if ptr in seen else t
        seen.add(ptr)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_file(out, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_curvature(curv: CurvatureOperator, path) -> None:
    """Write ``curv`` to ``path`` atomically (temp file in the same folder, then rename)."""
    meta = {
        "format": FORMAT_VERSION,
        "structure": curv.structure,
        "common": curv._common() | {"num_params": curv.num_params},
        "meta": curv.state_meta(),
    }
    write_safetensors_atomic(curv.state_tensors(), path, {META_KEY: json.dumps(meta)})


def _read(path: Path):
    from safetensors import safe_open

    if not path.is_file():
        raise CurvatureFileError(f"curvature file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers/data
        raise CurvatureFileError(f"{path} is not a valid safetensors file (truncated or corrupted?): {exc}") from None
    if META_KEY not in header:
        raise CurvatureFileError(f"{path} is a safetensors file but not a lalora_curv curvature (no metadata)")
    try:
        meta = json.loads(header[META_KEY])
    except json.JSONDecodeError as exc:
        raise CurvatureFileError(f"{path}: corrupted curvature metadata ({exc})") from None
    if meta.get("format") != FORMAT_VERSION:
        raise CurvatureFileError(f"{path}: unsupported curvature format {meta.get('format')!r} "
                                 f"(this version reads format {FORMAT_VERSION})")
    return tensors, meta


def validate_signature(saved: dict, lora, *, what: str = "curvature") -> None:
    """Raise :class:`CurvatureMismatchError` naming the first difference between a saved registry
    signature and ``lora``."""
    if lora is None or not saved:
        return
    current = lora.signature()
    if saved.get("adapter_name") != current["adapter_name"]:
        raise CurvatureMismatchError(
            f"saved {what} was fitted for adapter {saved.get('adapter_name')!r}, the model's registry is for "
            f"adapter {current['adapter_name']!r}")
    s_names, c_names = saved.get("names", []), current["names"]
    if s_names != c_names:
        missing = [n for n in s_names if n not in c_names]
        extra = [n for n in c_names if n not in s_names]
        detail = []
        if missing:
            detail.append(f"in the file but not the model: {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        if extra:
            detail.append(f"in the model but not the file: {extra[:3]}{' ...' if len(extra) > 3 else ''}")
        if not detail:
            detail.append("same names in a different order")
        raise CurvatureMismatchError(f"saved {what} does not match the model's LoRA targets: " + "; ".join(detail))
    for name, s_shape, c_shape in zip(c_names, saved.get("shapes", []), current["shapes"]):
        if list(s_shape) != list(c_shape):
            raise CurvatureMismatchError(
                f"saved {what} does not match the model's LoRA shapes: {name} is {tuple(s_shape)} in the file "
                f"but {tuple(c_shape)} in the model (different rank or layer size?)")


def load_curvature(path, lora=None, *, device=None, structure: str | None = None) -> CurvatureOperator:
    """Load a curvature saved with ``curv.save(path)``.

    Args:
        path: the ``.safetensors`` file.
        lora: a :class:`~lalora_curv.LoRAParams` to validate against (adapter, names, shapes).
        device: where to put the tensors (default CPU).
        structure: if given, the structure the file must hold.
    """
    path = Path(path)
    tensors, meta = _read(path)
    name = meta.get("structure")
    cls = CurvatureOperator.registry.get(name)
    if cls is None:
        raise CurvatureFileError(f"{path}: unknown structure {name!r}")
    if structure is not None and structure != name:
        raise CurvatureMismatchError(f"{path} holds a {name!r} curvature, expected {structure!r}")
    common = dict(meta["common"])
    validate_signature(common.get("signature", {}), lora)
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise NonFiniteCurvatureError(f"{path}: state tensor {key!r} contains NaN/inf")
    try:
        curv = cls.from_state(tensors, meta["meta"], common)
    except (KeyError, ValueError, TypeError) as exc:
        raise CurvatureFileError(f"{path}: inconsistent curvature state ({exc})") from None
    if curv.num_params != common.get("num_params"):
        raise CurvatureFileError(f"{path}: state has {curv.num_params} parameters, metadata says "
                                 f"{common.get('num_params')}")
    return curv.to(device) if device is not None else curv
