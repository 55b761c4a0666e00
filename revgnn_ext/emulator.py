"""The CUDA kernels on the CPU: ``revgnn_ext._emu`` holds ``csrc/cuda/*.cu`` compiled by the host
compiler under our emulator of the CUDA execution model (``csrc/simt.h``; what it checks and what
only a GPU shows: docs/design.md, testing). Built when ``REVGNN_EXT_EMULATOR=1`` (``make test``).

    with revgnn_ext.emulator.emulated(seed=1):
        out = revgnn_ext.ops.spmm(graph, x)  # CPU tensors, the CUDA kernels

Inside the context every revgnn_ext op on CPU tensors runs its CUDA kernel instead of its CPU
kernel, in forward and backward, with the ops' autograd, fake kernels and checks unchanged.
"""
import contextlib
from typing import Iterator

import torch

try:
    from . import _emu
except ImportError:  # built without REVGNN_EXT_EMULATOR=1
    _emu = None

# The ops with kernels: each is registered under torch.ops.revgnn_ext_emu with the same schema.
OPS = ("spmm", "spmm_accumulate_", "spmm_backward_x", "spmm_backward_weight", "gen_aggregate",
       "gen_aggregate_backward", "gat_aggregate", "gat_aggregate_accumulate_", "gat_aggregate_backward")


def available() -> bool:
    """Whether the emulated kernels were built."""
    return _emu is not None


@contextlib.contextmanager
def emulated(seed: int = 0) -> Iterator[None]:
    """Runs revgnn_ext's ops on CPU tensors with their CUDA kernels, under the emulator.

    Args:
        seed: shuffles the order in which the emulator runs blocks and lanes between
            synchronization points; a kernel whose result changes with it has a race.
    """
    if _emu is None:
        raise RuntimeError("revgnn_ext.emulator: the emulated kernels are not built; rebuild with "
                           "REVGNN_EXT_EMULATOR=1 pip install --no-build-isolation -e .")
    _emu.configure(seed)
    lib = torch.library.Library("revgnn_ext", "IMPL")
    try:
        for name in OPS:
            lib.impl(name, getattr(torch.ops.revgnn_ext_emu, name).default, "CPU")
        yield
    finally:
        lib._destroy()
