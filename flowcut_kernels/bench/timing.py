"""Timing, peak memory and a progress line for :mod:`flowcut_kernels.bench`.

- CPU: ``time.perf_counter`` around each call.
- CUDA: a pair of CUDA events around each call (optionally after overwriting a 256 MiB buffer, so
  the L2 cache holds none of the inputs — used by the kernel microbenchmark).
- Several methods are timed round-robin (A, B, C, A, B, C, …), so a change of load on a shared
  machine hits all of them alike instead of the one that happened to run at the time.
- Peak memory is the peak *above the level just before the call* (the call's activations,
  attention matrices and workspaces; the model weights are excluded), in MiB. CUDA:
  ``torch.cuda.max_memory_allocated`` after a reset. CPU: the process's resident set size, sampled
  every millisecond from ``/proc/self/statm`` by a thread, after glibc's ``malloc_trim(0)`` has handed
  the memory freed by earlier calls back to the system (else the call would reuse it unseen) —
  approximate (a millisecond can miss a short peak), and None where ``/proc`` does not exist.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: the median and the 20th/80th percentiles of ``times_ms``."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    times_ms: tuple[float, ...]


def quantile(values: list[float], q: float) -> float:
    """The q-quantile (0 ≤ q ≤ 1) of ``values``, interpolated linearly between order statistics."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(times_ms: list[float]) -> Timing:
    return Timing(quantile(times_ms, 0.5), quantile(times_ms, 0.2), quantile(times_ms, 0.8), tuple(times_ms))


class Timer:
    """Times one call of a function on ``device`` (see the module docstring)."""

    def __init__(self, device: torch.device, flush_cache: bool = False):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.cache = None
        if self.cuda and flush_cache:
            self.cache = torch.empty(256 * 2**20, dtype=torch.int8, device=self.device)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def once(self, fn: Callable[[], object]) -> float:
        """Milliseconds one call of ``fn`` takes."""
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        if self.cache is not None:
            self.cache.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def round_robin(
        self, fns: dict[str, Callable[[], object]], repeats: int, progress: "Progress | None" = None, label: str = ""
    ) -> dict[str, Timing]:
        """Time every function ``repeats`` times, interleaved; returns name -> :class:`Timing`.

        ``progress`` is told which call runs (``"{label} {name}"``) before it starts, and when it ends.
        """
        progress = progress or Progress(0, enabled=False)
        times: dict[str, list[float]] = {name: [] for name in fns}
        self.sync()
        for _ in range(repeats):
            for name, fn in fns.items():
                progress.running(f"{label} {name}")
                times[name].append(self.once(fn))
                progress.step()
        return {name: summarize(values) for name, values in times.items()}


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _malloc_trim() -> None:
    """Return the C heap's free memory to the system (glibc only; a no-op elsewhere)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Run ``fn`` once; the peak memory above the level before the call, in MiB (None if unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    _malloc_trim()
    base = _rss_bytes()
    if base is None:
        fn()
        return None
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes() or 0)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    peak[0] = max(peak[0], _rss_bytes() or 0)
    return (peak[0] - base) / 2**20


class Progress:
    """A one-line progress bar on stderr that names the call running now.

    Each call is announced with :meth:`running` before it starts and closed with :meth:`step`. On a
    terminal the line is redrawn in place at every call; in a log (no terminal) a line is written when
    the first call starts, when a call starts after a further ~10% of the calls, and at the end.
    """

    def __init__(self, total: int, enabled: bool = True, stream=None):
        self.total = max(total, 1)
        self.done = 0
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.label = ""
        self.last_decile = -1
        self.start = time.perf_counter()

    def running(self, label: str) -> None:
        """The call ``label`` starts now."""
        self.label = label
        decile = self.done * 10 // self.total
        if self.tty or decile > self.last_decile:
            self.last_decile = decile
            self._show(f"running {label}")

    def step(self) -> None:
        """The running call has ended."""
        self.done = min(self.done + 1, self.total)
        if self.done == self.total:
            self._show("done", final=True)

    def _show(self, text: str, final: bool = False) -> None:
        if not self.enabled:
            return
        bar = "#" * (self.done * 20 // self.total)
        line = f"[{bar:<20}] {self.done}/{self.total} {time.perf_counter() - self.start:6.1f}s {text}"
        if self.tty:
            self.stream.write("\r" + line[:110].ljust(110) + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
