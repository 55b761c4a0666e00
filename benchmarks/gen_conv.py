"""GENConv forward+backward: revgnn_ext.nn.GENConv against PyG's GENConv (same state_dict),
time and peak memory, on seeded synthetic graphs.

    python benchmarks/gen_conv.py [--device cpu|cuda] [--graphs issue-3,...] [--aggr softmax,max]

Each configuration first checks that both layers give the same output and gradients; then
times forward+backward (median after warm-up) and measures the peak memory of one step above
the inputs. A peer that does not fit in memory is reported as n/a. On GPU, the full proteins
scale (79M edges) runs for ours, with PyG's estimated footprint shown instead when it cannot fit.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import available_memory, machine_info, peak_memory, time_fn, Table, write_report  # noqa: E402
from graphs import PRESETS, make_graph  # noqa: E402

import torch_geometric  # noqa: E402
from revgnn_ext import CSRGraph  # noqa: E402
from revgnn_ext.nn import GENConv  # noqa: E402

AGGRS = {"softmax": dict(aggr="softmax", learn_t=True), "max": dict(aggr="max")}


def pyg_bytes_estimate(num_edges: int, width: int) -> int:
    """PyG's GENConv keeps about 6 [E, D] float32 tensors alive for softmax backward
    (edge embedding, message, scores, exp, weights, weighted message)."""
    return 6 * num_edges * width * 4


def step(conv, x, adj, edge_attr, grad):
    out = conv(x, adj, edge_attr)
    out.backward(grad)
    return out


def run(graph_name, aggr, device, width, repeat, budget, seed):
    g = make_graph(graph_name, device, seed)
    n, num_edges = g.num_nodes, g.edge_index.size(1)
    edge_dim = g.edge_attr.size(1) if g.edge_attr is not None else None
    torch.manual_seed(seed)
    pyg = torch_geometric.nn.GENConv(width, width, edge_dim=edge_dim, bias=True, **AGGRS[aggr]).to(device)
    ours = GENConv(width, width, edge_dim=edge_dim, bias=True, **AGGRS[aggr]).to(device)
    ours.load_state_dict(pyg.state_dict())
    x = torch.randn(n, width, device=device, requires_grad=True)
    grad = torch.randn(n, width, device=device)
    graph = CSRGraph.from_edge_index(g.edge_index, n)
    graph.transposed()
    fits = pyg_bytes_estimate(num_edges, width) < 0.8 * available_memory(device)
    rows = []
    if fits:  # correctness first
        a, b = step(ours, x, graph, g.edge_attr, grad), step(pyg, x, g.edge_index, g.edge_attr, grad)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        largest = max(q.grad.norm().item() for q in pyg.parameters())
        for (name, p), q in zip(ours.named_parameters(), pyg.parameters()):
            if q.grad.norm().item() < 1e-3 * largest:
                continue  # zero in exact arithmetic (a bias before a BatchNorm): round-off in both
            rel = ((p.grad - q.grad).norm() / q.grad.norm()).item()
            # t's gradient is a sum over N x D terms that cancel: float32 leaves ~1e-3 in both.
            assert rel < (1e-2 if name == "aggr_module.t" else 1e-4), \
                f"{name}: gradients differ from PyG's by {rel:.2e} (relative norm)"
    peers = [("revgnn_ext", ours, graph)] + ([("PyG GENConv", pyg, g.edge_index)] if fits else [])
    results = {}
    for name, conv, adj in peers:
        seconds = time_fn(lambda: step(conv, x, adj, g.edge_attr, grad), warmup=1, repeat=repeat, device=device,
                          budget_s=budget)
        results[name] = (seconds, peak_memory(lambda: step(conv, x, adj, g.edge_attr, grad), device))
    ours_s, ours_b = results["revgnn_ext"]
    for name in ("revgnn_ext", "PyG GENConv"):
        seconds, nbytes = results.get(name, (None, None))
        rows.append(dict(graph=graph_name, nodes=n, edges=num_edges, width=width, aggr=aggr, peer=name,
                         ms=seconds * 1e3 if seconds else None, peak_mb=nbytes / 2**20 if nbytes else None,
                         est_mb=pyg_bytes_estimate(num_edges, width) / 2**20 if name != "revgnn_ext" and not seconds
                         else None,
                         speedup=seconds / ours_s if seconds else None,
                         mem_ratio=nbytes / ours_b if nbytes else None))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--graphs", help=f"comma-separated presets from {', '.join(PRESETS)} (default: issue-3 on cpu; "
                                    "issue-3, proteins-like, products-like, proteins on cuda)")
    p.add_argument("--aggr", default="softmax,max")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--budget", type=float, default=20.0, help="seconds of timed runs per measurement at most")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    p.add_argument("--markdown")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no GPU: skipping the CUDA GENConv benchmark")
        return
    graphs = args.graphs.split(",") if args.graphs else (
        ["issue-3"] if args.device == "cpu" else ["issue-3", "proteins-like", "products-like", "proteins"])
    table = Table([("graph", "graph", ""), ("nodes", "N", ","), ("edges", "E", ","), ("width", "D", "d"),
                   ("aggr", "aggr", ""), ("peer", "peer", ""), ("ms", "fwd+bwd ms", ".1f"),
                   ("peak_mb", "peak MB", ".1f"), ("est_mb", "PyG est. MB", ".0f"),
                   ("speedup", "peer ms / ours", ".2f"), ("mem_ratio", "peer MB / ours", ".1f")])
    for graph_name in graphs:
        for aggr in args.aggr.split(","):
            for row in run(graph_name, aggr, args.device, args.width, args.repeat, args.budget, args.seed):
                table.add(**row)
    notes = ["forward+backward of one GENConv layer (MLP included), ours vs PyG's with the same state_dict; "
             "outputs and gradients checked equal first",
             "peak MB: one step's allocations above the inputs; PyG est.: 6 [E, D] float32 tensors, shown "
             "where PyG is not run because it would not fit"]
    write_report(f"GENConv forward+backward ({args.device})", machine_info(args.device), {"GENConv": table}, notes,
                 json_path=args.json, markdown_path=args.markdown)


if __name__ == "__main__":
    main()
