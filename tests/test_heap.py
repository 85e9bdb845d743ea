import subprocess
import sys

import pytest

# Run in a process of its own: in the test session's process, Ray's and the other tests' threads allocate
# from the same heap between the frees and the trim, and can take the freed pages back before it runs.
TRIM = """
import numpy as np, psutil
from raycache import heap

proc = psutil.Process()
blocks, keep = [], []
for _ in range(3000):  # 3000 x 64 KB = 192 MB, each followed by a small block that stays
    blocks.append(np.ones(8192))
    keep.append(np.ones(64))
del blocks
before = proc.memory_info().rss
assert heap.release(heap.WORTH_BYTES - 1) is False
assert proc.memory_info().rss > before - (16 << 20)  # nothing trimmed below the threshold
assert heap.release(heap.WORTH_BYTES) is True
assert proc.memory_info().rss < before - (100 << 20), (before, proc.memory_info().rss)
assert len(keep) == 3000
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_returns_freed_heap_pages_to_the_os():
    """Blocks below glibc's mmap threshold come from the heap; freed behind a block still in use, their pages
    stay resident (glibc trims only the heap's top) until `release` trims them. A call that moved less than
    `WORTH_BYTES` does not trim."""
    out = subprocess.run([sys.executable, "-c", TRIM], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
