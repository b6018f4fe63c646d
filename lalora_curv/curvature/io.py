"""Save/load curvature operators: ONE safetensors file, metadata in its header, no pickle.

The file holds every state tensor and, under the header metadata key ``lalora_curv``, a JSON
document with the format version, the structure, the common fields (kind, info, damping,
num_params), the structure's own metadata and the LoRA registry signature (adapter, parameter
names and shapes, layer names) it was fitted on. There is no sidecar file. :func:`load_curvature`
validates that signature against the ``LoRAParams`` it is given and names the first mismatch.

Beside the adapter: :func:`save_pretrained` writes the file as ``lalora_curvature.safetensors``
(:data:`CURVATURE_FILENAME`) into a peft adapter folder, next to ``adapter_model.safetensors``
(for a non-``"default"`` adapter into its subfolder, as peft's ``save_pretrained`` does); peft
neither reads nor removes it, so it survives ``PeftModel.from_pretrained`` and later
``save_pretrained`` calls into the same folder. :func:`load_curvature` accepts the folder or the
file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from .base import CurvatureOperator, NonFiniteCurvatureError

__all__ = ["save_curvature", "save_pretrained", "load_curvature", "curvature_file", "check_psd", "CurvatureFileError",
           "CurvatureMismatchError", "FORMAT_VERSION", "CURVATURE_FILENAME"]

FORMAT_VERSION = 1
META_KEY = "lalora_curv"
#: the curvature's file name inside a peft adapter folder (beside ``adapter_model.safetensors``)
CURVATURE_FILENAME = "lalora_curvature.safetensors"
#: peft writes the ``"default"`` adapter at the folder's root, any other adapter into a subfolder
#: named after it (``PeftModel.save_pretrained``); the curvature follows the same rule
PEFT_DEFAULT_ADAPTER = "default"


class CurvatureFileError(ValueError):
    """The file is not a readable lalora_curv curvature (missing, truncated, corrupted, wrong format)."""


class CurvatureMismatchError(ValueError):
    """A saved curvature does not fit the model's LoRA registry (adapter, names, shapes, structure)."""


def _current_umask() -> int:
    """The process umask (``os.umask`` can only be read by setting it: set and restore at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_path(path, *, directory: bool = False) -> None:
    """Flush ``path`` to disk. For a directory (after a rename) this is best effort: some
    platforms/filesystems cannot open or fsync directories."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def write_safetensors_atomic(tensors: dict, path, metadata: dict[str, str]) -> None:
    """Write ``tensors`` (any device) with string ``metadata`` to ``path`` atomically: a temp file
    in the same folder, fsynced, then ``os.replace`` (then the folder is fsynced where supported);
    a failure leaves any previous file untouched. The file gets the permissions a plain ``open``
    would give (``0o666`` minus the umask; the temp file starts as ``0o600``). If ``path`` is a
    symlink, its final target is written and the link stays a link.
    safetensors refuses tensors sharing storage, so repeats are stored as copies."""
    from safetensors.torch import save_file

    path = Path(os.path.realpath(path))  # write through symlinks: replace the target, not the link
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
        os.chmod(tmp, 0o666 & ~_current_umask())
        _fsync_path(tmp)  # the data is on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_path(path.parent, directory=True)  # the rename itself survives a crash


def _state_dtype_problem(tensors: dict[str, Tensor]) -> str | None:
    """Why a state cannot be saved/loaded as is (non-floating or mixed float dtypes), or None."""
    if not tensors:
        return "the state has no tensors"
    wrong = [f"{k} ({t.dtype})" for k, t in tensors.items() if not t.is_floating_point()]
    if wrong:
        return f"state tensors must be floating point, got {', '.join(wrong[:3])}"
    dtypes: dict[torch.dtype, str] = {}
    for k, t in tensors.items():
        dtypes.setdefault(t.dtype, k)
    if len(dtypes) > 1:
        listed = ", ".join(f"{dt} (e.g. {k!r})" for dt, k in dtypes.items())
        return f"state tensors have mixed float dtypes: {listed}; one operator has one dtype"
    return None


def save_curvature(curv: CurvatureOperator, path) -> None:
    """Write ``curv`` to ``path`` atomically (temp file in the same folder, then rename).

    Refuses (``ValueError``) a state of mixed float dtypes, which :func:`load_curvature` would
    refuse: cast first with ``curv.to(dtype=...)``."""
    problem = _state_dtype_problem(curv.state_tensors())
    if problem:
        raise ValueError(f"cannot save this {curv.structure} curvature: {problem} (cast with curv.to(dtype=...))")
    meta = {
        "format": FORMAT_VERSION,
        "structure": curv.structure,
        "common": curv._common() | {"num_params": curv.num_params},
        "meta": curv.state_meta(),
    }
    write_safetensors_atomic(curv.state_tensors(), path, {META_KEY: json.dumps(meta)})


def _adapter_subfolder(adapter_dir: Path, adapter_name: str | None) -> Path:
    if adapter_name and adapter_name != PEFT_DEFAULT_ADAPTER:
        return adapter_dir / adapter_name
    return adapter_dir


def save_pretrained(curv: CurvatureOperator, adapter_dir) -> Path:
    """Write ``curv`` into the peft adapter folder ``adapter_dir`` as :data:`CURVATURE_FILENAME`.

    Like peft, a curvature fitted on an adapter other than ``"default"`` goes into the subfolder
    ``adapter_dir/<adapter_name>``. The folder is created if needed. Returns the file's path.
    """
    folder = _adapter_subfolder(Path(adapter_dir), curv.signature.get("adapter_name"))
    path = folder / CURVATURE_FILENAME
    save_curvature(curv, path)
    return path


def curvature_file(path, adapter_name: str | None = None) -> Path:
    """The curvature file that ``path`` names: ``path`` itself if it is not a folder, else the
    :data:`CURVATURE_FILENAME` in it (or in its ``adapter_name`` subfolder, peft's layout for a
    non-``"default"`` adapter). A folder without one raises :class:`CurvatureFileError`."""
    path = Path(path)
    if not path.is_dir():
        return path
    candidates = [path / CURVATURE_FILENAME]
    sub = _adapter_subfolder(path, adapter_name)
    if sub != path:
        candidates.append(sub / CURVATURE_FILENAME)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise CurvatureFileError(
        f"the folder {path} holds no curvature: expected {CURVATURE_FILENAME!r} in it"
        + (f" or in its adapter subfolder {sub.name!r}" if sub != path else "")
        + " (written by curv.save_pretrained(adapter_dir))")


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
    if not isinstance(meta, dict):
        raise CurvatureFileError(f"{path}: malformed curvature metadata: a JSON {type(meta).__name__}, "
                                 "expected an object")
    if meta.get("format") != FORMAT_VERSION:
        raise CurvatureFileError(f"{path}: unsupported curvature format {meta.get('format')!r} "
                                 f"(this version reads format {FORMAT_VERSION})")
    _check_metadata(meta, path)
    return tensors, meta


# JSON types of the metadata fields (a bool never passes for a number)
_TOP_FIELDS = {"format": int, "structure": str, "common": dict, "meta": dict}
_COMMON_FIELDS = {"kind": str, "signature": dict, "info": dict, "damping": (int, float), "num_params": int}
_SIGNATURE_FIELDS = {"adapter_name": str, "names": list, "shapes": list, "layers": list}


def _require_fields(obj: dict, fields: dict, path: Path, where: str) -> None:
    for key, types in fields.items():
        if key not in obj:
            raise CurvatureFileError(f"{path}: malformed curvature metadata: {where} has no {key!r}")
        value = obj[key]
        if isinstance(value, bool) or not isinstance(value, types):
            expected = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
            raise CurvatureFileError(f"{path}: malformed curvature metadata: {where}[{key!r}] is a JSON "
                                     f"{type(value).__name__} ({value!r:.60}), expected {expected}")


def _check_metadata(meta: dict, path: Path) -> None:
    """Every key ``load_curvature`` reads, with its JSON type; a missing signature is refused."""
    _require_fields(meta, _TOP_FIELDS, path, "the document")
    _require_fields(meta["common"], _COMMON_FIELDS, path, "'common'")
    signature = meta["common"]["signature"]
    if not signature:  # an operator built by hand, never fitted on a model: nothing to validate
        return
    _require_fields(signature, _SIGNATURE_FIELDS, path, "the signature")
    names, shapes, layers = signature["names"], signature["shapes"], signature["layers"]
    if not all(isinstance(n, str) for n in names) or not all(isinstance(n, str) for n in layers):
        raise CurvatureFileError(f"{path}: malformed curvature metadata: signature names/layers must be strings")
    if len(shapes) != len(names) or not all(
            isinstance(s, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in s) for s in shapes):
        raise CurvatureFileError(f"{path}: malformed curvature metadata: signature shapes must be one list of "
                                 f"integers per name ({len(names)} names, {len(shapes)} shapes)")


def _tensor_name(curv: CurvatureOperator, t: Tensor) -> str:
    """The state key of ``t`` (or of the tensor it is a view of), for error messages."""
    for key, s in curv.state_tensors().items():
        if s.data_ptr() == t.data_ptr() and s.numel() == t.numel():
            return repr(key)
    return f"a {tuple(t.shape)} tensor"


def _psd_tolerance(dtype: torch.dtype) -> float:
    """Relative roundoff allowance: 100 machine epsilons of the state's dtype."""
    return 100 * torch.finfo(dtype).eps


def check_psd(curv: CurvatureOperator, path) -> None:
    """Raise :class:`CurvatureFileError` unless ``curv``'s ``psd_parts()`` hold to roundoff.

    Vectors: no entry below ``-tol * max|entry|``. Matrices: symmetric to ``sqrt(eps)`` relative
    and no eigenvalue below ``-tol * ||M||_F`` (tested by a Cholesky of ``M + tol ||M||_F I``,
    ``O(d^3)`` like one factorization; eigenvalues are computed only to report a failure).
    ``tol = 100 eps`` of the dtype (half precision is checked in fp32).
    """
    try:
        vectors, matrices = curv.psd_parts()
    except NotImplementedError as exc:
        raise CurvatureFileError(f"{path}: cannot check that the curvature is PSD: {exc}") from None
    for v in vectors:
        tol = _psd_tolerance(v.dtype)
        low, scale = v.min(), v.abs().max()
        if v.numel() and float(low) < -tol * float(scale):
            raise CurvatureFileError(
                f"{path}: the {curv.structure} curvature is not PSD: state {_tensor_name(curv, v)} has a negative "
                f"entry {float(low):.4g} (beyond roundoff: below -{tol:.1e} x max |entry| {float(scale):.4g})")
    for M in matrices:
        where = f"state {_tensor_name(curv, M)}"
        if M.ndim != 2 or M.shape[0] != M.shape[1]:
            raise CurvatureFileError(f"{path}: {where} must be a square matrix, got shape {tuple(M.shape)}")
        work = M if M.dtype in (torch.float32, torch.float64) else M.float()
        tol = _psd_tolerance(M.dtype)
        scale = float(torch.linalg.matrix_norm(work))
        if scale == 0.0:
            continue  # the zero matrix (e.g. K-FAC A-blocks at B = 0) is PSD
        asym = float((work - work.T).abs().max())
        if asym > torch.finfo(M.dtype).eps ** 0.5 * float(work.abs().max()):
            raise CurvatureFileError(f"{path}: the {curv.structure} curvature is not symmetric: {where} has "
                                     f"|M - M^T| up to {asym:.4g}")
        sym = 0.5 * (work + work.T)
        eye = torch.eye(sym.shape[0], dtype=sym.dtype, device=sym.device)
        _, info = torch.linalg.cholesky_ex(sym + tol * scale * eye)
        if int(info) != 0:
            lowest = float(torch.linalg.eigvalsh(sym.double()).min())
            raise CurvatureFileError(
                f"{path}: the {curv.structure} curvature is not PSD: {where} has eigenvalue {lowest:.4g} (beyond "
                f"roundoff: below -{tol:.1e} x ||M||_F {scale:.4g})")


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


def load_curvature(path, lora=None, *, device=None, structure: str | None = None,
                   validate_psd: bool = True) -> CurvatureOperator:
    """Load a curvature saved with ``curv.save(path)`` or ``curv.save_pretrained(adapter_dir)``.

    Args:
        path: the ``.safetensors`` file, or a peft adapter folder holding
            :data:`CURVATURE_FILENAME` (for a non-``"default"`` adapter, ``lora``'s adapter
            subfolder is looked in too).
        lora: a :class:`~lalora_curv.LoRAParams` to validate against (adapter, names, shapes).
        device: where to put the tensors (default CPU).
        structure: if given, the structure the file must hold.
        validate_psd: check that the operator is PSD (:func:`check_psd`; one ``O(d^3)``
            factorization per factor matrix). Pass False only for files you trust.

    Raises :class:`CurvatureFileError` (naming the file and the problem) for a missing,
    truncated, corrupted or foreign file, malformed metadata (a missing key or a wrong JSON
    type), a missing signature (or an empty one when ``lora`` is given), non-floating or mixed
    float state dtypes, or a state that is not PSD beyond roundoff;
    :class:`CurvatureMismatchError` when the file does not fit ``lora`` or ``structure``;
    :class:`NonFiniteCurvatureError` for NaN/inf.
    """
    path = curvature_file(path, getattr(lora, "adapter_name", None))
    tensors, meta = _read(path)
    name = meta.get("structure")
    cls = CurvatureOperator.registry.get(name)
    if cls is None:
        raise CurvatureFileError(f"{path}: unknown structure {name!r}")
    if structure is not None and structure != name:
        raise CurvatureMismatchError(f"{path} holds a {name!r} curvature, expected {structure!r}")
    common = dict(meta["common"])
    if lora is not None and not common["signature"]:
        raise CurvatureFileError(f"{path}: the curvature has no LoRA signature (built by hand, never fitted on a "
                                 "model), so it cannot be validated against lora; load it with lora=None")
    validate_signature(common["signature"], lora)
    problem = _state_dtype_problem(tensors)
    if problem:
        raise CurvatureFileError(f"{path}: wrong dtype: {problem}")
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
    if validate_psd:
        check_psd(curv, path)
    return curv.to(device) if device is not None else curv
