"""glibc malloc settings for the processes that stream model files.

Streaming a body through asyncio makes one new ``bytes`` object of about 256 KiB for each
read from the socket, and frees it a moment later. glibc serves allocations of 128 KiB
and up with a fresh ``mmap`` and returns them with ``munmap``, and gives back the free
top of its heaps as soon as it passes a threshold, so every read touched new pages and
paid their page faults again: on the 2-core VMs AIWM is tested on, a uvicorn app that
only read a request body and discarded it ran at 650 MB/s, with its event loop busy
1.5 CPU-seconds per GB. With the settings below the same app read 2,200 MB/s at
0.35 CPU-seconds per GB (measured with uvicorn 0.55, uvloop 0.23, Python 3.11).

:func:`tune_malloc` raises the ``mmap`` threshold (blocks below it come from the heap
and are reused) and lets a heap keep up to ``trim_threshold`` bytes free before it is
shrunk: a process keeps at most that much more memory than it uses. It is called by
the API replicas and the node agent at start. It changes nothing where the operator set
any ``MALLOC_*`` variable of their own, with ``AIWM_MALLOC_TUNE=off``, or off glibc.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 4 * 1024 * 1024
TRIM_THRESHOLD = 64 * 1024 * 1024


def tune_malloc(*, mmap_threshold: int = MMAP_THRESHOLD,
                trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Apply the settings to this process; True when they were applied."""
    if os.environ.get("AIWM_MALLOC_TUNE", "").lower() in ("off", "0", "false", "no"):
        return False
    if not sys.platform.startswith("linux") or "GLIBC_TUNABLES" in os.environ or \
            any(name.startswith("MALLOC_") for name in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no tunable mallopt)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and \
        bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
