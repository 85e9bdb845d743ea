import sys

import numpy as np
import pytest

from raycache import heap


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_returns_freed_heap_pages_to_the_os():
    """Blocks below glibc's mmap threshold come from the heap; freed behind a block still in use, their pages
    stay resident (glibc trims only the heap's top) until `release` trims them. A call that moved less than
    `WORTH_BYTES` does not trim."""
    import psutil

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


PROBE = """
import sys
import numpy as np
import psutil
from raycache import heap

if sys.argv[1] == "mapped":
    assert heap.map_large_blocks(16 << 20)
rss = psutil.Process().memory_info
n = (20 << 20) // 8  # a 20 MB block, like one layer's MLP activations for 32 images through ViT-B-32
first = np.ones(n)
del first  # by default, freeing a mapped block raises glibc's threshold to its size
block = np.ones(n)  # by default now from the heap
keep = np.ones(2048)  # a block allocated after it that stays (gradients, moments, the next step's tensors)
before = rss().rss
del block
print((before - rss().rss) >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_blocks_freed_during_training_are_returned_at_once_when_mapped():
    """By default, once a large block has been freed, glibc serves blocks of its size from the heap, and a
    freed one behind a live block stays resident (how a training step's activations inflated a host's peak);
    after `map_large_blocks` such a block has its own mapping and its pages leave when it is freed. Each case
    runs in a process of its own (the setting is process-wide and lasting)."""
    import subprocess

    def returned(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    assert returned("default") < 4
    assert returned("mapped") >= 19
