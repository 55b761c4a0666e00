"""glibc malloc settings under which a deep model's resident set on CPU follows what it allocates.

PyTorch's CPU tensors come from malloc. glibc maps a block on its own, and unmaps it when freed,
only from M_MMAP_THRESHOLD up, and raises that threshold to the size of every mapped block freed,
up to 32 MiB: importing torch and revgnn_ext.nn leaves it near 2 MiB, and any larger block
freed later raises it again. Smaller blocks come from the heap, which goes back to the OS only from its top (past
M_TRIM_THRESHOLD, raised alongside). There a reversible forward, which frees each layer's input
as it goes, leaves one freed hole per layer under blocks still in use that the next layer's
blocks do not fit: the heap grows by 1.1 MB per layer of a 5,000 x 64 stack during the forward
while the bytes in use grow by 40 KB (mallinfo2), and the process keeps about one activation per
layer resident. Measured on a 2-core VM: benchmarks/memory_depth.py's GENConv stack (5,000
nodes, 100k edges, hidden 64) keeps +148 MB after its first step at 100 layers and +285 MB at
200; examples/demo.py's 200 layers peak 550 MB above the model in the first step, 234 MB in the
second. Fixed thresholds (fixing either one stops glibc raising both) of 64 KiB and 0 map every
block of 64 KiB or more on its own and trim the heap's top at once: the stack keeps +7 MB at 50
layers as at 100, the demo peaks at 38 and 20 MB.

The price is page faults: a block's pages go back to the OS when it is freed and are faulted in
again for the next one, 0.95 us per 4 KiB page on that VM. The stack's step took 20-30% longer
at 50 layers on the 5,000-node graph (14,500 pages per layer and step), and 13% more CPU time at
30 layers on a 20,000-node, 600k-edge graph. So importing revgnn_ext changes nothing:
examples/demo.py, the OGB examples and benchmarks/memory_depth.py call
``set_malloc_thresholds()`` at start-up, as a training script may (or start it with
``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0``); either variable in the environment,
e.g. ``MALLOC_MMAP_THRESHOLD_=33554432``, opts a run out.
"""
import ctypes
import os
import sys

__all__ = ["set_malloc_thresholds"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (glibc's malloc.h)
_MAX_MMAP_THRESHOLD = 32 * 2**20  # the largest glibc takes on 64-bit
# glibc reads these at start-up; a process started with either keeps what its user chose.
_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def set_malloc_thresholds(mmap_threshold: int = 64 * 1024, trim_threshold: int = 0) -> bool:
    """Fixes glibc's M_MMAP_THRESHOLD and M_TRIM_THRESHOLD for this process (see the module's
    docstring): blocks of ``mmap_threshold`` bytes or more are mapped on their own and unmapped
    when freed, and the heap's free top is returned to the OS past ``trim_threshold`` bytes.

    Call it once at start-up, before training. Returns True where the thresholds were set; False,
    changing nothing, outside glibc (e.g. macOS, musl, Windows) or where the process was started
    with MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ in its environment (glibc read them at
    start-up: the user's choice stands).
    """
    if not (0 < mmap_threshold <= _MAX_MMAP_THRESHOLD and 0 <= trim_threshold < 2**31):
        raise ValueError(f"set_malloc_thresholds: mmap_threshold must be in (0, 32 MiB] and trim_threshold in "
                         f"[0, 2 GiB) bytes, got {mmap_threshold} and {trim_threshold}")
    if not sys.platform.startswith("linux") or any(name in os.environ for name in _ENV):
        return False
    libc = ctypes.CDLL(None)  # the C library this process runs on
    if not hasattr(libc, "gnu_get_libc_version"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
