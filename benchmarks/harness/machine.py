"""What ran a benchmark: package versions, CPU/GPU facts, device and dtype names.

Nothing here imports ``lalora_curv``: the helpers serve any benchmark.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
from collections.abc import Iterable
from importlib import metadata
from typing import Any

import torch

from benchmarks.harness.gitstate import git_state

PACKAGES = ("torch", "transformers", "peft", "curvlinops-for-pytorch", "backpack-for-pytorch", "laplace-torch",
            "numpy", "scipy", "lalora-curv", "gguf", "matplotlib")


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    """Installed distribution versions (``None`` where a package is not installed)."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_ram() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def device_name(device: torch.device | str) -> str:
    """The CPU model, or the CUDA device's name."""
    device = torch.device(device)
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(idx).name
    return cpu_model()


def machine_info(device: torch.device | str) -> dict[str, Any]:
    """What ran the benchmark: host, CPU, threads, RAM, GPU name/memory, versions, time.

    Kept with the same keys as the committed result files (``machine``); the per-part record of
    commit, dirty tree, command line and start/end time is :class:`benchmarks.harness.Provenance`.
    """
    device = torch.device(device)
    info: dict[str, Any] = {
        "timestamp_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_bytes": _total_ram(),
        "device": str(device),
        "device_name": cpu_model() if device.type == "cpu" else None,
        "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda,
        "versions": package_versions(),
        "git": git_state(),
        "argv": list(sys.argv),
    }
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        info.update(device_name=props.name, gpu_memory_bytes=props.total_memory,
                    gpu_multiprocessors=props.multi_processor_count,
                    cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    return info


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``None``/``"auto"``: CUDA if available, else CPU; a CUDA request without CUDA is an error."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but torch.cuda.is_available() is False")
    return device


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[name]
