"""Keep freed memory in the process, so training steps stop page-faulting their tensors back in.

PyTorch's CPU tensors come from malloc. glibc hands large blocks back to the kernel when they
are freed (mmap'd blocks, and a heap top above the trim threshold), so each training step of
the default ensemble faulted about 2 MB of fresh pages back in: ~500 minor faults and 1-2 ms
of a ~20 ms step on the 2-core VM of docs/results/dynamics.md. A fixed mmap threshold and a trim
threshold above it keep those blocks in the heap for reuse; the process keeps its peak heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024
"""Blocks above this size are still mmap'd (glibc's largest allowed value on 64-bit)."""
TRIM_THRESHOLD = 256 * 1024 * 1024
"""Free memory at the heap's top beyond this goes back to the kernel."""


def keep_freed_memory() -> bool:
    """Set glibc's malloc thresholds (mallopt); returns False where malloc is not glibc's."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    return bool(
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
