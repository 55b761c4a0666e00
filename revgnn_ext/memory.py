"""Memory on CPU as the operating system sees it: glibc malloc thresholds under which a deep
model's resident set follows what it allocates (why: docs/design.md §4), and the peak memory of
a code region."""
import ctypes
import gc
import os
import sys

import torch

__all__ = ["set_malloc_thresholds", "PeakMemory", "available_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (glibc's malloc.h)
_MAX_MMAP_THRESHOLD = 32 * 2**20  # the largest glibc takes on 64-bit
# glibc reads these at start-up; a process started with either keeps what its user chose.
_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def _glibc():
    """The C library of this process if it is glibc, else None."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "gnu_get_libc_version") else None


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
    libc = _glibc()
    if libc is None or any(name in os.environ for name in _ENV):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))


def _proc_bytes(path: str, field: str) -> int:
    with open(path) as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


class PeakMemory:
    """The peak memory of a code region above what was in use when it began:

        with PeakMemory(device) as memory:
            train_step()
        memory.peak, memory.start   # bytes

    CUDA: the caching allocator's (torch.cuda.max_memory_allocated above memory_allocated at the
    start). CPU: the process's resident set, what a system monitor shows, memory that libraries
    allocate outside torch included (Linux's high-water mark VmHWM, reset at the start: how,
    docs/design.md §4); freed memory is handed back first, so that the start is what is in use.
    CPU needs Linux.
    """

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.start = self.peak = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        if not os.path.exists("/proc/self/clear_refs"):
            raise RuntimeError("revgnn_ext.memory.PeakMemory: CPU peak memory needs Linux's /proc/self/clear_refs")
        gc.collect()
        libc = _glibc()
        if libc is not None:
            libc.malloc_trim(0)
        self.start = _proc_bytes("/proc/self/status", "VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            high = torch.cuda.max_memory_allocated(self.device)
        else:
            high = _proc_bytes("/proc/self/status", "VmHWM")
        self.peak = max(high - self.start, 0)


def available_memory(device="cpu") -> int:
    """Bytes that new tensors on ``device`` can still take: on CUDA the free memory plus what
    PyTorch's caching allocator holds unused; on CPU, Linux's MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return _proc_bytes("/proc/meminfo", "MemAvailable")
