"""Host memory on a CPU: keep freed tensor memory in the process instead of handing it back to the OS.

Why: on a CPU, PyTorch allocates tensors with the C library's ``malloc``. glibc serves large blocks with ``mmap``
(above a threshold that starts at 128 KiB and rises as such blocks are freed) and hands the top of its heap back to
the OS once enough of it lies free. A pipeline stage allocates and frees activation-sized blocks every micro-batch,
in an order that keeps moving those thresholds: memory goes back to the OS and returns as fresh pages, each one a
fault that the kernel fills with zeros. On the benchmark LLaMA that is 20,000 to 70,000 page faults per step per
rank, and close to none with fixed thresholds. :func:`keep_freed_host_memory` fixes them (blocks up to 32 MiB from
the heap, which is never trimmed), as glibc's ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` variables
would, and as an allocator such as jemalloc or tcmalloc does by design. The price is that the process keeps its
peak heap until it exits, which a training process does anyway.

It is left alone when the user chose (either glibc variable set, or ``LIGHTNING_MP_HOST_MALLOC=0``), and outside
Linux with glibc.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

OPT_OUT = "LIGHTNING_MP_HOST_MALLOC"  # "0" leaves the C library's allocator as it is
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks up to this size come from the heap
TRIM_THRESHOLD = 2**31 - 1  # free memory at the top of the heap is never handed back


def keep_freed_host_memory() -> bool:
    """Fix glibc's mmap and trim thresholds for this process; return whether they were set."""
    if os.environ.get(OPT_OUT, "1") == "0" or any(name in os.environ for name in _USER_SETTINGS):
        return False
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
