"""Keep freed host memory in the process on a CPU run (glibc's allocator), so that a training
step reuses the pages of the previous one instead of faulting in fresh ones.

glibc serves every allocation above its mmap threshold (128 KiB, adapting up to 32 MiB) with
a fresh `mmap` and returns it with `munmap` when freed. A training step allocates the same
large tensors every time (activations, logits, gradients; DeepSpeed's ZeRO gradient bucket,
its flattened partitions and the parameter copy-back; Adam's temporaries), so on a CPU every
step faulted in and zero-filled hundreds of MB again: measured on the 2-core machine
(bench/RESULTS.md, CPU profile), 172,000 page faults per step of the 16-expert MoE under
DeepSpeed against 7,700 in a plain transformers loop, and about 20% of the step's CPU time.
With mmap off and trimming at its maximum, freed blocks stay on the heap and the next step
reuses them: no page faults after the first steps. The cost is that the process keeps its
peak heap (as any caching allocator does, CUDA's included).

CPU runs only: on a GPU the large tensors live in CUDA's caching allocator. A no-op where the
C library is not glibc (macOS, musl): `mallopt` is glibc's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_MAX = -4
INT_MAX = 2**31 - 1  # mallopt takes an int: the largest trim threshold it accepts

_applied = False


def keep_freed_host_memory() -> bool:
    """Serve large allocations from the heap (no mmap) and never trim it back to the kernel,
    for the rest of the process. Returns whether it is in effect (glibc only); idempotent."""
    global _applied
    if _applied:
        return True
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, INT_MAX) == 1
    except (OSError, AttributeError):
        return False
    _applied = ok
    return ok
