"""Keep freed memory inside the process for reuse (CPU training on glibc Linux).

glibc's malloc serves large blocks with fresh ``mmap`` pages (above a threshold that
starts at 128 KiB and adapts up to 32 MiB) and hands the free top of its heap back to
the OS (above a trim threshold), so a training step's activations, a few to a few dozen
MiB each, are faulted in page by page on every step. At batch 16 on the p100 shape that
cost about a fifth of a CPU step (docs/benchmarks.md). Fixing the ``mmap`` threshold at
its maximum and raising the trim threshold keeps those blocks in the heap, where the next
step reuses them; the process's resident memory then stays near its peak, which a
training process reaches every step anyway.

The setting is process-wide, so only the ``fraglm`` command calls it, in its own process
and only to train on a CPU (:func:`fraglm.cli.app.command`); importing fraglm, a ``Trainer``
used as a library and the test runner leave malloc alone. Any process gets the same from
the environment, set before it starts: ``MALLOC_MMAP_THRESHOLD_=33554432
MALLOC_TRIM_THRESHOLD_=2147483647``, or a preloaded allocator that keeps freed memory
itself (``LD_PRELOAD`` of jemalloc or tcmalloc).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # from glibc's <malloc.h>
_MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)  # glibc's ceiling
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: keep up to 2 GiB of free heap top


def keep_freed_memory() -> bool:
    """Tune glibc's malloc as above; False (and nothing changed) elsewhere."""
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return (
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
        and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    )
