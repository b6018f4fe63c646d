"""Timing and peak memory of a benchmark measurement.

* :func:`measure` - wall-clock timing (warmup + repeats, CUDA synchronised; median and spread)
  together with the peak memory of each repeat (:class:`PeakMemory`: CUDA ``max_memory_allocated``
  after a reset, or CPU peak RSS sampled from ``/proc/self/statm`` by a background thread);
* :func:`sync`, :func:`release_memory`, :func:`current_rss`.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import torch


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
    """Result of :func:`measure` (a dict, JSON-able): ``median_s``, ``min_s``, ``max_s``,
    ``spread_s`` (max - min), ``iqr_s`` (interquartile range; 0 with fewer than 2 repeats),
    ``times_s``, ``warmup``, ``repeats``, ``peak_bytes``, ``peak_delta_bytes``, ``memory_method``
    (the last return value of ``fn`` is kept on the attribute ``.result``, not in the dict)."""

    result: Any = None

    @property
    def median(self) -> float:
        return self["median_s"]


def interquartile_range(values: list[float]) -> float:
    """Q3 - Q1 of ``values`` (``statistics.quantiles``, inclusive method); 0.0 for fewer than 2 values."""
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q3 - q1


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
    out = Timing(median_s=statistics.median(times), min_s=min(times), max_s=max(times),
                 spread_s=max(times) - min(times), iqr_s=interquartile_range(times), times_s=times, warmup=warmup,
                 repeats=len(times))
    if memory:
        out.update(peak_bytes=max(peaks), peak_delta_bytes=max(deltas), memory_method=PeakMemory(device).method)
    out.result = result
    return out
