"""Helpers shared by the benchmarks (cost, approximation accuracy, forgetting).

* :func:`machine_info` - versions, device name, CPU/GPU facts for the result JSON;
* :func:`measure` - wall-clock timing (warmup + median of repeats, CUDA synchronised) together
  with the peak memory of each repeat (:class:`PeakMemory`: CUDA ``max_memory_allocated`` after
  a reset, or CPU peak RSS sampled from ``/proc/self/statm`` by a background thread);
* :func:`write_json`, :func:`markdown_table`, :func:`fmt` - outputs;
* :func:`plot_style`, :func:`save_figure` - one matplotlib look (Agg backend, PNG).

Nothing here imports ``lalora_curv``: the helpers are usable by any benchmark.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

__all__ = [
    "machine_info", "package_versions", "git_info", "resolve_device", "resolve_dtype", "sync", "release_memory",
    "current_rss", "PeakMemory", "measure", "Timing", "write_json", "to_jsonable", "markdown_table", "fmt",
    "fmt_bytes", "plot_style", "save_figure", "annotate_bars", "PACKAGES", "COLORS",
]

PACKAGES = ("torch", "transformers", "peft", "curvlinops-for-pytorch", "backpack-for-pytorch", "laplace-torch",
            "numpy", "scipy", "lalora-curv", "gguf", "matplotlib")


# ------------------------------------------------------------------------------------ machine facts
def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    """Installed distribution versions (``None`` where a package is not installed)."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _cpu_model() -> str:
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


def git_info(path: str | Path | None = None) -> dict[str, Any] | None:
    """Commit and dirty flag of the checkout holding ``path`` (None outside git)."""
    import subprocess

    cwd = Path(path or Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: torch.device | str) -> dict[str, Any]:
    """What ran the benchmark: host, CPU, threads, RAM, GPU name/memory, versions, time."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_bytes": _total_ram(),
        "device": str(device),
        "device_name": _cpu_model() if device.type == "cpu" else None,
        "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda,
        "versions": package_versions(),
        "git": git_info(),
        "argv": list(sys.argv),
    }
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        info.update(device_name=props.name, gpu_memory_bytes=props.total_memory,
                    gpu_multiprocessors=props.multi_processor_count,
                    cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    return info


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but torch.cuda.is_available() is False")
    return device


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` arguments as a dict; VALUE is parsed as JSON where it is JSON, else kept as text."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    dtypes = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
              "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(dtypes)}")
    return dtypes[name]


# ------------------------------------------------------------------------------------ memory
def sync(device: torch.device | str) -> None:
    """Wait for queued kernels (CUDA); no-op on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_LIBC = None


def _malloc_trim() -> None:
    """Give glibc's freed heap pages back to the OS, so the next RSS peak measures fresh allocations."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC:
        try:
            _LIBC.malloc_trim(0)
        except AttributeError:  # not glibc
            pass


def release_memory(device: torch.device | str, collect: bool = True) -> None:
    """Garbage-collect (if ``collect``), empty the CUDA cache / trim the C heap."""
    if collect:
        gc.collect()
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    else:
        _malloc_trim()


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss() -> int:
    """Resident set size of this process in bytes (``/proc/self/statm``, field 2)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Context manager: peak memory while the block runs.

    CUDA: ``torch.cuda.reset_peak_memory_stats`` on entry, ``max_memory_allocated`` on exit.
    CPU: a daemon thread samples the RSS every ``interval`` seconds (torch ops release the GIL,
    so it keeps sampling during long kernels). Call :func:`release_memory` before entering so that
    glibc's cached pages do not hide allocations.

    Attributes after exit: ``start`` (bytes at entry), ``peak`` (absolute peak bytes), ``delta``
    (``peak - start``: what the block added at its worst), ``method`` (how it was measured).
    """

    def __init__(self, device: torch.device | str, interval: float = 0.002):
        self.device = torch.device(device)
        self.interval = interval
        self.start = self.peak = self.delta = 0
        self.method = "cuda.max_memory_allocated" if self.device.type == "cuda" else "rss(/proc/self/statm) sampled"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = current_rss()
            if rss > self.peak:
                self.peak = rss
            self._stop.wait(self.interval)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = self.peak = current_rss()
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak = max(self.peak, current_rss())
        self.delta = max(0, self.peak - self.start)
        return False


# ------------------------------------------------------------------------------------ timing
class Timing(dict):
    """Result of :func:`measure` (a dict, JSON-able): ``median_s``, ``min_s``, ``times_s``,
    ``warmup``, ``repeats``, ``peak_bytes``, ``peak_delta_bytes``, ``memory_method``, ``value``
    (the last return value of ``fn`` is kept on the attribute ``.result``, not in the dict)."""

    result: Any = None

    @property
    def median(self) -> float:
        return self["median_s"]


def measure(fn: Callable[[], Any], device: torch.device | str, *, warmup: int = 1, repeats: int = 3,
            memory: bool = True, setup: Callable[[], Any] | None = None, collect: bool = True) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones (median reported).

    Each timed call is bracketed by ``sync(device)`` (CUDA kernels finished) and, when ``memory``,
    measured by :class:`PeakMemory` after :func:`release_memory` (outside the timed region).
    ``setup()`` (untimed) runs before every call, e.g. to zero gradients or restore parameters.
    ``collect``: run a full ``gc.collect()`` before the first timed call (slow with big libraries
    imported; tests may skip it).
    The result of the last call is available as ``.result``.
    """
    device = torch.device(device)
    result = None
    for _ in range(warmup):
        if setup is not None:
            setup()
        result = fn()
        sync(device)
    times, peaks, deltas = [], [], []
    for i in range(max(1, repeats)):
        if setup is not None:
            setup()
        result = None
        if memory:  # a full gc pass is slow with transformers loaded: once per measurement
            release_memory(device, collect=collect and i == 0)
        mem = PeakMemory(device) if memory else contextlib.nullcontext()
        with mem:
            sync(device)
            t0 = time.perf_counter()
            result = fn()
            sync(device)
            times.append(time.perf_counter() - t0)
        if memory:
            peaks.append(mem.peak)
            deltas.append(mem.delta)
    out = Timing(median_s=statistics.median(times), min_s=min(times), times_s=times, warmup=warmup,
                 repeats=len(times))
    if memory:
        out.update(peak_bytes=max(peaks), peak_delta_bytes=max(deltas), memory_method=PeakMemory(device).method)
    out.result = result
    return out


# ------------------------------------------------------------------------------------ outputs
def to_jsonable(obj: Any) -> Any:
    """Turn tensors, dtypes, devices, paths, numpy scalars and NaN/inf into JSON values."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return to_jsonable(obj.item())
    return repr(obj)


def write_json(path: str | Path, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(data), indent=1) + "\n")
    return path


def fmt(x: Any, digits: int = 3) -> str:
    """Compact number formatting for tables (``-`` for missing)."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            return "-"
        if x == 0:
            return "0"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        if abs(x) < 1e-3:
            return f"{x:.2e}"
        return f"{x:.{digits}g}"
    return str(x)


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    """GitHub markdown table; cells are formatted with :func:`fmt` unless already strings."""
    headers = list(headers)
    align = list(align) if align is not None else ["l"] + ["r"] * (len(headers) - 1)
    sep = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep[a] for a in align) + " |"]
    for row in rows:
        cells = [c if isinstance(c, str) else fmt(c) for c in row]
        cells = [c.replace("|", "\\|").replace("\n", " ") for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ plots
_STYLE = {
    "figure.figsize": (7.0, 4.2), "figure.dpi": 110, "savefig.dpi": 130, "savefig.bbox": "tight",
    "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
    "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 8, "xtick.labelsize": 9, "ytick.labelsize": 9,
    "font.family": "DejaVu Sans",
}
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf"]


def plot_style():
    """Import pyplot with the Agg backend and apply the shared style; returns ``pyplot``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update(_STYLE)
    plt.rcParams["axes.prop_cycle"] = matplotlib.cycler(color=COLORS)
    return plt


def annotate_bars(ax, bars, values, fmt_str: str = "{:.2f}", fontsize: int = 7) -> None:
    """Write each (finite) value above its bar."""
    for bar, v in zip(bars, values):
        if v is None or not math.isfinite(v):
            continue
        ax.annotate(fmt_str.format(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom", fontsize=fontsize, xytext=(0, 1), textcoords="offset points")


def save_figure(fig, path: str | Path, footnote: str | None = None) -> Path:
    """Save ``fig`` as PNG (with an optional small footnote, e.g. device/preset) and close it."""
    plt = plot_style()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if footnote:
        fig.tight_layout()
        fig.text(0.01, 0.0, footnote, fontsize=7, color="0.35", ha="left", va="top")
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
