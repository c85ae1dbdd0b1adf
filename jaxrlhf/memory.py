"""This process's resident memory, read from the kernel (Linux `/proc/self/status`): the peak
of a stage of a run, as the demo's report and the benchmarks give it. JAX's CPU buffers are
host memory, so on CPU the process's resident set is the run's whole footprint."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path
from typing import Any


def status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (`VmRSS`, `VmHWM`, ...) in bytes; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def release_free_heap() -> None:
    """Return freed heap to the OS (glibc), so the resident set shows what is live."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_during(fn: Callable[[], Any]) -> tuple[Any, int | None, int | None]:
    """`fn()`, the process's peak resident bytes while it ran and that peak above the
    resident bytes just before (both None where the peak mark cannot be reset)."""
    release_free_heap()
    before = status_bytes("VmRSS")
    if before is None or not reset_peak():
        return fn(), None, None
    out = fn()
    peak = status_bytes("VmHWM")
    return out, peak, None if peak is None else max(peak - before, 0)
