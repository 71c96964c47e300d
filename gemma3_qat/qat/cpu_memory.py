"""How the trainer asks the C allocator for memory on a CPU: what makes a CPU training step fast.

A training step at Gemma 3's vocabulary allocates and frees gigabytes of large temporaries every micro-step: each
chunk of the loss (``qat.head``) makes a dozen ``[128, 262,144]`` buffers (logits, softmaxes, gradients; 64-128 MB
each), the backward pass and the fake quantization make ``[vocab, hidden]`` ones. glibc serves blocks above 32 MB
with fresh ``mmap`` calls and unmaps them on ``free``, so every one of them faulted all of its pages in again: at
the 270M shape that was a third to a half of the step. The trainer (on a CPU device, once its models are loaded)
calls ``configure_for_training``: torch then allocates large blocks on 2 MB pages (``THP_MEM_ALLOC_ENABLE``,
torch's own switch), and glibc serves blocks below ``MMAP_THRESHOLD`` (256 MiB, above the loss chunks' buffers)
from its heap and keeps freed memory there for reuse (``mallopt``: a fixed mmap threshold, no trimming); larger
blocks (the ``[vocab, hidden]`` transients) still map and unmap. Measured side by side
(``benchmarks/train_step.py --shape 270m``, docs/results.md): 1.5-1.9x faster steps; the cost is that the resident
set keeps the heap's high-water mark, which the training planner counts. With no mmap at all (every block in the
heap) a 2-step run of the 270m recipe peaked at 8.40 GB, with the 256 MiB threshold at 8.03 GB, in the same time.
``GEMMA3_QAT_CPU_ALLOCATOR=default`` leaves glibc as it is, and so does any ``MALLOC_*`` setting of the user's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 256 * 2**20  # blocks this large or larger are mapped and unmapped each time, smaller ones reused
ENV = "GEMMA3_QAT_CPU_ALLOCATOR"


def configure_for_training() -> str:
    """Set up the allocator for a CPU training run; returns what was done, for the log."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read by torch at each large allocation
    if os.environ.get(ENV) == "default":
        return "glibc's default allocation (GEMMA3_QAT_CPU_ALLOCATOR=default), large blocks on 2 MB pages"
    if any(k.startswith("MALLOC_") for k in os.environ):
        return "large blocks on 2 MB pages; glibc as the MALLOC_* environment says"
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        ok = (libc is not None and hasattr(libc, "mallopt") and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
              and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1)
    except OSError:
        ok = False
    if not ok:  # not glibc (macOS, musl): nothing to set
        return "large blocks on 2 MB pages (the C library has no mallopt)"
    return ("large blocks on 2 MB pages, freed memory kept in glibc's heap for reuse "
            "(GEMMA3_QAT_CPU_ALLOCATOR=default: glibc's own)")

