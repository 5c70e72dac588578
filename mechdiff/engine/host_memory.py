"""How the host's allocator treats the large, short-lived tensors of CPU forward passes.

Each activation of a CPU forward pass (a ``[tokens, d_mlp]`` MLP input, a norm's output...) is a few MiB,
made and freed once per layer. glibc serves allocations that size with fresh ``mmap`` pages and hands them
back on free, so every elementwise op pays a page fault per page it writes: on the benchmark Llama
~0.5 M faults per extraction, and ~40% of the elementwise ops' time (``silu`` 4x slower). Keeping freed memory in the
process (no ``mmap`` for large blocks, no trimming of the heap) makes the next batch reuse the same pages.
The process's peak is unchanged (it is the same working set); its memory is not returned to the system
until it exits, which an extraction process or an actor that lives for a sweep does not need.

Opt out with ``MECHDIFF_MALLOC=system`` (the allocator as it was); on a C library other than glibc this does
nothing and says why in :func:`retain_freed_memory`'s return value.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

__all__ = ["retain_freed_memory", "ENV"]

ENV = "MECHDIFF_MALLOC"
_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_MAX = -4
_lock = threading.Lock()
_state: str | None = None


def retain_freed_memory() -> str:
    """Set the process's allocator to keep freed memory for reuse, once per process; returns what it did:
    ``"retained"`` (now or by an earlier call), ``"system"`` (opted out through ``MECHDIFF_MALLOC=system``)
    or ``"unavailable: <why>"`` (not glibc, or it refused)."""
    global _state
    with _lock:
        if _state is None:
            _state = _apply()
        return _state


def _apply() -> str:
    choice = os.environ.get(ENV, "retain").strip().lower()
    if choice == "system":
        return "system"
    if choice != "retain":
        raise ValueError(f"{ENV}={os.environ[ENV]!r}: retain (the default) or system")
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as e:
        return f"unavailable: no glibc mallopt ({e})"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success. Large blocks then come from the heap, which is never trimmed.
    if mallopt(_M_MMAP_MAX, 0) != 1 or mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) != 1:
        return "unavailable: mallopt refused the settings"
    return "retained"
