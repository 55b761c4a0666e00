"""Per-block overhead: milliseconds per reversible block, forward + backward, on a graph so small
that the kernels cost nothing (64 nodes, 256 edges, 16 channels per group, 2 groups), for ours
reversible (GroupAddRev + GENConv), ours plain (the same stack, disable=True) and PyG's
GroupAddRev + GENConv; interleaved rounds in one process, medians. With 1001 layers this cost is
paid 1001 times per step, and on a GPU it is what remains once the kernels are fast."""
import argparse
import statistics
import time

import torch

import revgnn_ext.nn as ours


def stack(GroupAddRev, GENConv, layers: int, channels: int, **kwargs) -> torch.nn.ModuleList:
    return torch.nn.ModuleList(GroupAddRev(GENConv(channels, channels), num_groups=2, **kwargs) for _ in range(layers))


def step(blocks, x, edge_index) -> None:
    h = x.clone().requires_grad_()
    out = h * 1.0  # an activation, which the reversible blocks may release
    for block in blocks:
        out = block(out, edge_index)
    out.sum().backward()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=64)
    parser.add_argument("--edges", type=int, default=256)
    parser.add_argument("--channels", type=int, default=16, help="channels per group")
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    import torch_geometric.nn as pyg

    torch.manual_seed(0)
    torch.set_num_threads(1)
    edge_index = torch.randint(args.nodes, (2, args.edges))
    x = torch.randn(args.nodes, 2 * args.channels)
    runs = {
        "ours reversible": stack(ours.GroupAddRev, ours.GENConv, args.layers, args.channels),
        "ours plain": stack(ours.GroupAddRev, ours.GENConv, args.layers, args.channels, disable=True),
        "PyG reversible": stack(pyg.GroupAddRev, pyg.GENConv, args.layers, args.channels),
    }
    times = {name: [] for name in runs}
    for round_ in range(args.rounds + 2):
        for name, blocks in runs.items():
            begin = time.process_time()
            step(blocks, x, edge_index)
            if round_ >= 2:  # two warm-up rounds
                times[name].append((time.process_time() - begin) / args.layers * 1e3)
    ms = {name: statistics.median(t) for name, t in times.items()}
    for name, value in ms.items():
        print(f"{name:16s} {value:6.3f} ms per block (forward + backward)")
    print(f"ours reversible / PyG reversible: {ms['ours reversible'] / ms['PyG reversible']:.2f}")
    print(f"ours reversible / ours plain:     {ms['ours reversible'] / ms['ours plain']:.2f}")


if __name__ == "__main__":
    main()
