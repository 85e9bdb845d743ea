"""Give a process's freed heap memory back to the operating system.

glibc serves allocations below its mmap threshold (which grows to 32 MB as big blocks are freed) from heap
arenas and keeps their pages when they are freed. After a round of a full model's optimiser moments,
gradients and copies, a long-lived actor would hold those pages resident until later allocations reuse
them; `malloc_trim` returns them (`release`). During the round, a training step's large activations land in
the same heap once the threshold has grown, between the gradients and moments that outlive them, and the
holes they leave add to the process's peak; `map_large_blocks` fixes the threshold so that they get mappings
of their own, unmapped when freed. Elsewhere (another C library) there is nothing to do.
"""

from __future__ import annotations

import ctypes
import functools

# Blocks of at least this many bytes get their own mapping in a process that trains a full model (a batch of
# 32 images through ViT-B-32: the MLP's hidden activations are 20 MB a layer). Measured on one client's round
# of ViT-B-32 at batch 32 (2-core VM): the peak 5.8-5.9 GB by default, 5.5 GB at 16 MB and 5.1 GB at 4 MB,
# which took 20% longer (a fresh mapping's pages are faulted in and zeroed on every allocation).
LARGE_BYTES = 16 << 20
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter

# Below this many bytes moved through a call (a state, a batch of images), trimming is not worth its time.
WORTH_BYTES = 64 << 20


@functools.lru_cache(maxsize=None)
def _libc(name: str, argtypes: tuple):
    try:
        fn = getattr(ctypes.CDLL(None), name)  # the C library this process already runs on
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None
    fn.argtypes, fn.restype = list(argtypes), ctypes.c_int
    return fn


def _trim():
    return _libc("malloc_trim", (ctypes.c_size_t,))


def map_large_blocks(nbytes: int = LARGE_BYTES) -> bool:
    """From now on, serve allocations of at least `nbytes` from mappings of their own, returned to the OS as
    soon as they are freed (glibc's mmap threshold, fixed instead of growing with the largest block freed so
    far). For processes that train through a model: their steps' activations then never stay resident as
    heap holes. True when set."""
    mallopt = _libc("mallopt", (ctypes.c_int, ctypes.c_int))
    return mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, int(nbytes)))


def release(nbytes: int = WORTH_BYTES) -> bool:
    """Return freed heap pages to the OS, if the work that freed them moved at least `WORTH_BYTES`
    (`nbytes`: the size of the state it handled). True when something was trimmed."""
    trim = _trim()
    if trim is None or nbytes < WORTH_BYTES:
        return False
    return bool(trim(0))
