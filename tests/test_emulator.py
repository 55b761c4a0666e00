"""revgnn_ext.emulator: each fault a GPU would hang on, fault on or leave undefined is reported naming the
kernel; the emulated kernels give the same bits whatever the scheduling seed."""
import pytest
import torch

from revgnn_ext import CSRGraph, emulator, ops

from conftest import make_graph

pytestmark = pytest.mark.skipif(not emulator.available(), reason="emulated CUDA kernels not built")

# A kernel of csrc/emu/selftest.cpp with each fault, and the names its error must carry.
FAULTS = {
    "exited_lane": ["exited_lane_kernel", "names thread 0"],
    "diverged_shuffle": ["diverged_shuffle_kernel", "__shfl_sync", "selftest.cpp"],
    "skipped_barrier": ["skipped_barrier_kernel", "__syncthreads", "3"],
    "unsynced_read": ["unsynced_read_kernel", "tile[", "selftest.cpp"],
    "unsynced_write": ["unsynced_write_kernel", "tile[", "selftest.cpp"],
    "unsynced_staging": ["unsynced_staging_kernel", "__syncwarp", "selftest.cpp"],
    "shared_out_of_bounds": ["shared_out_of_bounds_kernel", "tile[64]"],
    "misaligned_pack": ["misaligned_pack_kernel", "16"],
    "assert": ["assert_kernel", "selftest: negative entry"],
    "large_shared": ["large_shared_kernel", "65536"],
    "block_too_large": ["empty_kernel", "(2048, 1, 1)"],
    "empty_grid": ["empty_kernel", "(0, 1, 1)"],
}


@pytest.mark.parametrize("fault", FAULTS)
def test_fault_is_reported_naming_the_kernel(fault):
    with pytest.raises(RuntimeError) as err:
        emulator._emu.selftest(fault)
    for name in FAULTS[fault]:
        assert name in str(err.value)


@pytest.mark.parametrize("seed", range(4))
def test_shared_memory_races_whatever_the_seed(seed):
    """The races are found in any order of the lanes, and the synchronized kernel passes."""
    emulator._emu.configure(seed)
    for fault in ("unsynced_read", "unsynced_write", "unsynced_staging"):
        with pytest.raises(RuntimeError, match=f"{fault}_kernel"):
            emulator._emu.selftest(fault)
    emulator._emu.selftest("synced_shared")


def _every_kernel(seed):
    """Outputs and gradients of spmm, gen_aggregate and gat_aggregate (edge features) under the emulator's `seed`."""
    ei, n = make_graph("power_law")
    g = CSRGraph.from_edge_index(ei, n)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 24, generator=gen, requires_grad=True)
    w = torch.rand(g.num_edges, generator=gen, requires_grad=True)
    attr = torch.randn(g.num_edges, 5, generator=gen, requires_grad=True)
    weight = torch.randn(24, 5, generator=gen, requires_grad=True)
    scores = torch.randn(n, 2, generator=gen, requires_grad=True)
    att_weight = torch.randn(2, 5, generator=gen, requires_grad=True)
    leaves = [x, w, attr, weight, scores, att_weight]
    with emulator.emulated(seed):
        outs = [ops.spmm(g, x, w, "sum"), ops.spmm(g, x, w, "max"),
                ops.gen_aggregate(g, x, attr, weight, aggr="softmax", t=0.7),
                ops.gat_aggregate(g, x, scores, scores, edge_attr=attr, edge_weight=att_weight)]
        grads = torch.autograd.grad(sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outs), leaves)
    return [o.detach() for o in outs] + list(grads)


def test_same_bits_across_scheduling_seeds():
    for a, b in zip(_every_kernel(1), _every_kernel(2)):
        assert torch.equal(a, b)
