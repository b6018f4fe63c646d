"""Writing curvature files: one safetensors file, JSON metadata in its header, written atomically.

Kept apart from :mod:`.io` (reading and validation) so that ``CurvatureOperator.save`` can write
without importing the reader, which imports the base class (no import cycle).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["FORMAT_VERSION", "META_KEY", "CURVATURE_FILENAME", "PEFT_DEFAULT_ADAPTER", "write_safetensors_atomic",
           "state_dtype_problem", "adapter_subfolder"]

FORMAT_VERSION = 1
META_KEY = "lalora_curv"
#: the curvature's file name inside a peft adapter folder (beside ``adapter_model.safetensors``)
CURVATURE_FILENAME = "lalora_curvature.safetensors"
#: peft writes the ``"default"`` adapter at the folder's root, any other adapter into a subfolder
#: named after it (``PeftModel.save_pretrained``); the curvature follows the same rule
PEFT_DEFAULT_ADAPTER = "default"



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


def state_dtype_problem(tensors: dict[str, Tensor]) -> str | None:
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


def adapter_subfolder(adapter_dir: Path, adapter_name: str | None) -> Path:
    if adapter_name and adapter_name != PEFT_DEFAULT_ADAPTER:
        return adapter_dir / adapter_name
    return adapter_dir
