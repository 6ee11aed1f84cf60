"""Host memory on Linux with glibc: freed memory stays in malloc's heap for the next step.

glibc's malloc serves an allocation above its mmap threshold from pages mapped for it alone and unmaps them
when it is freed; the threshold rises with the blocks a process frees, but never past 32 MiB. It also returns
free memory at the top of its heap to the system once that passes the trim threshold (twice the mmap
threshold). Either way the pages come back as fresh ones, faulted in and zeroed again, every step that needs
them (an LM head's log-probabilities and their gradient, [B * L, vocab], are 32 MiB at 8192 rows of a
1024-token vocabulary). `keep_freed_memory` has malloc serve every allocation from its heap and keep what is
freed there, as PyTorch's caching allocator does on a GPU: the resident memory stays near the process's peak
instead of falling between steps.
`benchmarks/host_memory.py` times a training step under both policies.
"""

import ctypes
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # mallopt's parameters (malloc.h)
KEEP_FREED = 1 << 30  # free memory at the heap's top that malloc keeps before returning any to the system
GLIBC_MMAP_THRESHOLD = 32 << 20  # the highest glibc's threshold rises to (64-bit)


def _mallopt():
    """glibc's mallopt, or None where malloc is not glibc's (macOS, musl, Windows)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(None).mallopt


def keep_freed_memory() -> bool:
    """Serve every allocation from the heap and keep freed memory there -> whether malloc took it (False,
    and nothing changed, where malloc is not glibc's)."""
    mallopt = _mallopt()
    return mallopt is not None and bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_FREED))


def glibc_policy() -> bool:
    """glibc's own policy as a training loop settles it (blocks from 32 MiB mapped on their own, the heap
    trimmed above twice that): the baseline `keep_freed_memory` is measured against -> whether malloc took it."""
    mallopt = _mallopt()
    return (
        mallopt is not None
        and bool(mallopt(M_MMAP_MAX, 65536))
        and bool(mallopt(M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD))
        and bool(mallopt(M_TRIM_THRESHOLD, 2 * GLIBC_MMAP_THRESHOLD))
    )
