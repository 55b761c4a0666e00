"""How fast and how lean are revgnn_ext.nn.GATConv and GCNConv, forward+backward, against PyG's
GATConv and GCNConv with the same state_dict (issue 13)?

    python benchmarks/gat.py [--device cpu|cuda] [--graphs powerlaw-20k-d15,arxiv:0.1,...] [--convs gat,gcn]

A graph is a preset of graphs.py, or NAME:SCALE for the preset with its nodes and edges times
SCALE (the mean degree kept): arxiv:0.1 is an arxiv-shaped graph of 16,934 nodes. The input width
is the preset's node features (128 where it has none); GAT maps it to heads x channels
(concatenated), GCN to --gcn-channels. Both layers get the same edge_index, as a drop-in user
passes it: ours converts it to CSR (and, for GAT, builds the self-looped graph) once and caches
that; PyG adds the self loops on each call; both normalize GCN's weights on each call.

Each (graph, conv) first checks that ours gives PyG's output and gradients (input and parameters),
then times forward+backward (median after a warm-up, the layers in interleaved rounds) and
measures one step's peak memory above the inputs. On a GPU, PyG's FusedGATConv (dgNN's kernels)
joins the GAT rows where dgNN is importable. A PyG layer that would not fit in memory is not run;
its estimated footprint is shown instead.
"""
import argparse
import importlib.util

import torch
import torch_geometric
from torch_geometric.utils import add_self_loops, remove_self_loops

from revgnn_ext.nn import GATConv, GCNConv

from graphs import PRESETS, make_graph
from measure import (PeakMemory, available_memory, check_gradients, median_seconds, no_gpu, output_arguments, report,
                     set_malloc_thresholds)

DEFAULT_IN = 128  # input width on a preset without node features
# [E + N, width] float32 tensors (edges with the self loops) PyG's layers hold at their peak in
# forward+backward: GAT's gathered x_j, weighted messages and their gradients; GCN's messages and
# their gradient. A lower bound: the resident-set peaks of 2026-11-26 on CPU were 4.1-4.2 and 2.1-2.2.
PYG_EDGE_COPIES = {"gat": 4, "gcn": 2}


def step(conv, args, grad):
    out = conv(*args)
    out.backward(grad)
    return out


def parse_graph(spec: str):
    """NAME or NAME:SCALE -> (name, scale)."""
    name, _, scale = spec.partition(":")
    return name, float(scale) if scale else 1.0


def layers(conv: str, in_channels: int, args, device) -> dict:
    """{peer: module} with one state_dict: ours, PyG's, and on a GPU PyG's FusedGATConv when dgNN
    is importable; and the output width."""
    torch.manual_seed(args.seed)
    if conv == "gat":
        kwargs = dict(heads=args.heads)
        pyg = torch_geometric.nn.GATConv(in_channels, args.channels, **kwargs).to(device)
        mods = {"revgnn_ext": GATConv(in_channels, args.channels, **kwargs), "PyG GATConv": pyg}
        if torch.device(device).type == "cuda" and importlib.util.find_spec("dgNN"):
            mods["PyG FusedGATConv"] = torch_geometric.nn.FusedGATConv(in_channels, args.channels,
                                                                      add_self_loops=False, **kwargs)
        width = args.heads * args.channels
    else:
        pyg = torch_geometric.nn.GCNConv(in_channels, args.gcn_channels).to(device)
        mods = {"revgnn_ext": GCNConv(in_channels, args.gcn_channels), "PyG GCNConv": pyg}
        width = args.gcn_channels
    for mod in mods.values():
        mod.to(device).load_state_dict(pyg.state_dict())
    return mods, width


def inputs(name: str, mod, edge_index, num_nodes: int, x):
    """The forward arguments of peer `name`: FusedGATConv takes the self-looped graph in its own
    (csr, csc, perm) format (built here, outside the timed step: it cannot add the loops itself)."""
    if name != "PyG FusedGATConv":
        return (x, edge_index)
    looped, _ = add_self_loops(remove_self_loops(edge_index)[0], num_nodes=num_nodes)
    return (x, *mod.to_graph_format(looped, size=(num_nodes, num_nodes)))


def check_same(mods, peer_args, x, grad) -> None:
    """Every peer gives PyG's output, input gradient and parameter gradients (fresh leaves and
    gradients per peer)."""
    def run(name):
        leaf = x.detach().requires_grad_()
        mod = mods[name]
        mod.zero_grad(set_to_none=True)
        out = step(mod, (leaf, *peer_args[name][1:]), grad)
        return out.detach(), {"input": leaf.grad} | {n: p.grad for n, p in mod.named_parameters()}
    pyg_name = next(n for n in mods if n.startswith("PyG") and "Fused" not in n)
    ref_out, ref_grads = run(pyg_name)
    for name in mods:
        if name != pyg_name:
            out, grads = run(name)
            torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name} vs {pyg_name}: {m}")
            check_gradients(ref_grads, grads, f"{name} against {pyg_name}", 1e-4)
    for mod in mods.values():
        mod.zero_grad(set_to_none=True)


def run(spec: str, conv: str, device, args) -> list:
    name, scale = parse_graph(spec)
    g = make_graph(name, device, args.seed, with_edge_attr=False, scale=scale)
    n, num_edges = g.num_nodes, g.edge_index.size(1)
    in_channels = PRESETS[name].get("node_features", DEFAULT_IN)
    mods, width = layers(conv, in_channels, args, device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    x = torch.randn(n, in_channels, device=device, generator=gen).requires_grad_()
    grad = torch.randn(n, width, device=device, generator=gen)
    pyg_bytes = PYG_EDGE_COPIES[conv] * (num_edges + n) * width * 4
    fits = pyg_bytes < 0.8 * available_memory(device)
    peers = {peer: inputs(peer, mod, g.edge_index, n, x) for peer, mod in mods.items()
             if peer == "revgnn_ext" or fits}
    if fits:  # correctness first
        check_same({peer: mods[peer] for peer in peers}, peers, x, grad)
    fns = {peer: (lambda mod=mods[peer], a=a: step(mod, a, grad)) for peer, a in peers.items()}
    medians, errors = median_seconds(fns, device, warmup=1, repeat=args.repeat, budget_s=args.budget)
    if "revgnn_ext" in errors:
        raise RuntimeError(f"gat: revgnn_ext's {conv} failed: {errors['revgnn_ext']}")
    peaks = {}
    for peer in medians:
        with PeakMemory(device) as memory:
            fns[peer]()
        peaks[peer] = memory.peak
    layer = (f"GAT {in_channels}→{args.heads}×{args.channels}" if conv == "gat"
             else f"GCN {in_channels}→{args.gcn_channels}")
    rows = []
    for peer in mods:
        row = dict(graph=spec, nodes=n, edges=num_edges, layer=layer, peer=peer, note="")
        if peer in medians:
            row.update(ms=medians[peer] * 1e3, peak_mb=peaks[peer] / 2**20,
                       time_ratio=medians["revgnn_ext"] / medians[peer], mem_ratio=peaks["revgnn_ext"] / peaks[peer])
        elif peer in errors:
            row.update(note=errors[peer])
        else:
            row.update(note=f"not run: needs ~{pyg_bytes / 2**30:.1f} GiB (estimate)")
        rows.append(row)
    del fns, peers, mods
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--graphs", help=f"comma-separated NAME[:SCALE], NAME from {', '.join(PRESETS)} (default: "
                                    "powerlaw-20k-d15,arxiv:0.1,products:0.008 on cpu; powerlaw-20k-d15, arxiv, "
                                    "products-100k-d50, products on cuda)")
    p.add_argument("--convs", default="gat,gcn")
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--channels", type=int, default=64, help="GAT's channels per head")
    p.add_argument("--gcn-channels", type=int, default=128)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--budget", type=float, default=20.0, help="seconds of timed runs per measurement at most")
    output_arguments(p)
    args = p.parse_args()
    if no_gpu(args.device, "the CUDA GAT/GCN benchmark"):
        return
    convs = args.convs.split(",")
    if set(convs) - {"gat", "gcn"}:
        p.error("--convs: choose from gat, gcn")
    set_malloc_thresholds()  # CPU: a freed block leaves the resident set, so each peak is the step's own
    graphs = (args.graphs.split(",") if args.graphs else ["powerlaw-20k-d15", "arxiv:0.1", "products:0.008"]
              if args.device == "cpu" else ["powerlaw-20k-d15", "arxiv", "products-100k-d50", "products"])
    rows = [row for spec in graphs for conv in convs for row in run(spec, conv, args.device, args)]
    columns = [("graph", "graph", ""), ("nodes", "N", ","), ("edges", "E", ","), ("layer", "layer", ""),
               ("peer", "peer", ""), ("ms", "fwd+bwd ms", ".1f"), ("peak_mb", "peak MB", ".1f"),
               ("time_ratio", "ours / peer time", ".2f"), ("mem_ratio", "ours / peer MB", ".3f"), ("note", "note", "")]
    memory = ("torch.cuda.max_memory_allocated" if args.device == "cuda" else
              "the process's resident-set high-water mark (revgnn_ext.memory.PeakMemory, malloc thresholds fixed)")
    fused = ("PyG's FusedGATConv: not run (dgNN is not installed)" if args.device == "cuda"
             and not importlib.util.find_spec("dgNN") else "PyG's FusedGATConv: GPU only (dgNN's CUDA kernels)"
             if args.device == "cpu" else "PyG's FusedGATConv: given the self-looped graph in its (csr, csc, perm) "
                                          "format, built outside the timed step")
    notes = ["forward+backward of one layer (float32, input gradient included), ours vs PyG's with the same "
             "state_dict and the same edge_index; outputs and gradients checked equal first; median of up to "
             f"{args.repeat} runs after 1 warm-up, the layers in interleaved rounds",
             f"peak MB: one step above the inputs, {memory}; E: the graph's edges before self loops (both layers "
             "add one per node); a PyG layer estimated at over 80% of the free memory (GAT: "
             f"{PYG_EDGE_COPIES['gat']}, GCN: {PYG_EDGE_COPIES['gcn']} [E + N, width] float32 tensors) is not run",
             "ours / peer < 1: ours is faster or leaner (issue 13's targets on powerlaw-20k-d15, 2-core CPU: GAT "
             "time ≤ 0.33 and memory ≤ 0.2, GCN time ≤ 0.5)", fused]
    report(f"GATConv and GCNConv forward+backward ({args.device})", args.device, {"GAT and GCN": (rows, columns)},
           notes, json_path=args.json, markdown_path=args.markdown)


if __name__ == "__main__":
    main()
