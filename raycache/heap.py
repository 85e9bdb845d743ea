"""Give a process's freed heap memory back to the operating system.

glibc serves allocations below its mmap threshold (which grows to 32 MB as big blocks are freed) from heap
arenas and keeps their pages when they are freed. After a round of a full model's optimiser moments,
gradients and copies, a long-lived actor would hold those pages resident until later allocations reuse
them; `malloc_trim` returns them. Elsewhere (another C library) there is nothing to do.
"""

from __future__ import annotations

import ctypes
import functools

# Below this many bytes moved through a call (a state, a batch of images), trimming is not worth its time.
WORTH_BYTES = 64 << 20


@functools.lru_cache(maxsize=1)
def _trim():
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library this process already runs on
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release(nbytes: int = WORTH_BYTES) -> bool:
    """Return freed heap pages to the OS, if the work that freed them moved at least `WORTH_BYTES`
    (`nbytes`: the size of the state it handled). True when something was trimmed."""
    trim = _trim()
    if trim is None or nbytes < WORTH_BYTES:
        return False
    return bool(trim(0))
