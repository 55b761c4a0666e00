"""How fast and how lean is one revgnn_ext.nn.GENConv layer, forward+backward, against PyG's
GENConv with the same state_dict?

    python benchmarks/gen_conv.py [--device cpu|cuda] [--graphs powerlaw-20k-d30,...] [--aggr softmax,max] [--profile]

Each configuration first checks that both layers give the same output and gradients, then times
forward+backward (median after a warm-up, the two layers in interleaved rounds) and measures the
peak memory of one step above the inputs. Where PyG's layer would not fit in memory (on GPU, the
full proteins scale) its estimated footprint is shown instead. For ours, also the feature rows its
kernels gather per edge over the step's time, against the gather bandwidth measured in the same run
into a table of x's size (measure.gather_bandwidth).
"""
import argparse

import torch
import torch_geometric

from revgnn_ext import CSRGraph
from revgnn_ext.nn import GENConv

from graphs import PRESETS, make_graph
from measure import (PeakMemory, available_memory, check_gradients, gather_bandwidth, median_seconds, no_gpu,
                     output_arguments, report, set_malloc_thresholds)

AGGRS = {"softmax": dict(aggr="softmax", learn_t=True), "max": dict(aggr="max")}
PYG_EDGE_COPIES = 6  # [E, D] float32 tensors PyG's GENConv keeps for softmax's backward (embedding,
# message, scores, exp, weights, weighted message)
# Rows of D values that ours gathers per edge in a step: x[col_e] in the forward and again in the
# backward's per-edge pass, and in the backward of x, per transposed entry, the destination's
# grad_out, plus its out and log-normalizer (softmax) or its selected edge (max).
GATHERED_ROWS = {"softmax": 5, "max": 4}


def step(conv, x, adj, edge_attr, grad):
    out = conv(x, adj, edge_attr)
    out.backward(grad)
    return out


def check_same(ours, pyg, x, graph, g, grad) -> None:
    """Same output and gradients as PyG's layer."""
    out_ours, out_pyg = step(ours, x, graph, g.edge_attr, grad), step(pyg, x, g.edge_index, g.edge_attr, grad)
    torch.testing.assert_close(out_ours, out_pyg, rtol=1e-4, atol=1e-4)
    check_gradients({name: q.grad for name, q in pyg.named_parameters()},
                    {name: p.grad for name, p in ours.named_parameters()}, "revgnn_ext's GENConv against PyG's", 1e-4)


def where_time_goes(fn, device, top: int = 8) -> list:
    """One call of fn under torch.profiler: the `top` operators and kernels by self time (the
    device's on GPU), each with its calls, milliseconds and share of the step."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key) > 0]
    total = sum(getattr(e, key) for e in events)
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    return [dict(name=e.key[:90], calls=e.count, self_ms=getattr(e, key) / 1e3, share=getattr(e, key) / total)
            for e in events[:top]]


def run(graph_name: str, aggr: str, device, args, profiles: list) -> list:
    g = make_graph(graph_name, device, args.seed)
    n, num_edges, width = g.num_nodes, g.edge_index.size(1), args.width
    edge_dim = g.edge_attr.size(1) if g.edge_attr is not None else None
    torch.manual_seed(args.seed)
    pyg = torch_geometric.nn.GENConv(width, width, edge_dim=edge_dim, bias=True, **AGGRS[aggr]).to(device)
    ours = GENConv(width, width, edge_dim=edge_dim, bias=True, **AGGRS[aggr]).to(device)
    ours.load_state_dict(pyg.state_dict())
    x = torch.randn(n, width, device=device, requires_grad=True)
    grad = torch.randn(n, width, device=device)
    graph = CSRGraph.from_edge_index(g.edge_index, n)
    graph.transposed()
    pyg_bytes = PYG_EDGE_COPIES * num_edges * width * 4
    fits = pyg_bytes < 0.8 * available_memory(device)
    peers = {"revgnn_ext": (ours, graph)} | ({"PyG GENConv": (pyg, g.edge_index)} if fits else {})
    if fits:  # correctness first
        check_same(ours, pyg, x, graph, g, grad)
    fns = {name: (lambda conv=conv, adj=adj: step(conv, x, adj, g.edge_attr, grad))
           for name, (conv, adj) in peers.items()}
    medians, errors = median_seconds(fns, device, warmup=1, repeat=args.repeat, budget_s=args.budget)
    if errors:
        raise RuntimeError(f"gen_conv: {errors}")
    peaks = {}
    for name, fn in fns.items():
        with PeakMemory(device) as memory:
            fn()
        peaks[name] = memory.peak
    gather = gather_bandwidth(device, n, width)
    gathered = GATHERED_ROWS[aggr] * num_edges * width * 4
    if args.profile:
        profiles.extend(dict(graph=graph_name, aggr=aggr, **r) for r in where_time_goes(fns["revgnn_ext"], device))
    rows = []
    for name in ("revgnn_ext", "PyG GENConv"):
        row = dict(graph=graph_name, nodes=n, edges=num_edges, width=width, aggr=aggr, peer=name)
        if name in medians:
            row.update(ms=medians[name] * 1e3, peak_mb=peaks[name] / 2**20,
                       speedup=medians[name] / medians["revgnn_ext"], mem_ratio=peaks[name] / peaks["revgnn_ext"])
            if name == "revgnn_ext":
                row.update(gather_gbps=gathered / medians[name] / 1e9, gather_pct=100 * gathered / medians[name] /
                           gather["table"], gather_table=gather["table"] / 1e9, gather_cached=gather["cached"] / 1e9)
        else:
            row.update(est_mb=pyg_bytes / 2**20)
        rows.append(row)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--graphs", help=f"comma-separated presets from {', '.join(PRESETS)} (default: powerlaw-20k-d30 "
                                    "on cpu; powerlaw-20k-d30, proteins-10k-d600, products-100k-d50, proteins on cuda)")
    p.add_argument("--aggr", default="softmax,max")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--budget", type=float, default=20.0, help="seconds of timed runs per measurement at most")
    p.add_argument("--profile", action="store_true", help="also where one step of ours spends its time, by kernel")
    output_arguments(p)
    args = p.parse_args()
    if no_gpu(args.device, "the CUDA GENConv benchmark"):
        return
    set_malloc_thresholds()  # CPU: a freed block leaves the resident set, so each peak is the step's own
    graphs = args.graphs.split(",") if args.graphs else ["powerlaw-20k-d30"] + (
        ["proteins-10k-d600", "products-100k-d50", "proteins"] if args.device == "cuda" else [])
    profiles = []
    rows = [row for name in graphs for aggr in args.aggr.split(",")
            for row in run(name, aggr, args.device, args, profiles)]
    columns = [("graph", "graph", ""), ("nodes", "N", ","), ("edges", "E", ","), ("width", "D", "d"),
               ("aggr", "aggr", ""), ("peer", "peer", ""), ("ms", "fwd+bwd ms", ".1f"),
               ("peak_mb", "peak MB", ".1f"), ("est_mb", "PyG est. MB", ".0f"), ("speedup", "peer ms / ours", ".2f"),
               ("mem_ratio", "peer MB / ours", ".1f"), ("gather_gbps", "gathered GB/s", ".1f"),
               ("gather_pct", "% of gather BW", ".0f"), ("gather_table", "gather GB/s (x's table)", ".1f"),
               ("gather_cached", "gather GB/s (cached)", ".1f")]
    memory = ("torch.cuda.max_memory_allocated" if args.device == "cuda" else
              "the process's resident-set high-water mark (revgnn_ext.memory.PeakMemory, malloc thresholds fixed)")
    notes = ["forward+backward of one GENConv layer (MLP included), ours vs PyG's with the same state_dict; outputs "
             f"and gradients checked equal first; median of up to {args.repeat} runs after 1 warm-up, the two in "
             f"interleaved rounds",
             f"peak MB: one step above the inputs, {memory}; PyG est.: {PYG_EDGE_COPIES} [E, D] float32 tensors, "
             "shown where PyG is not run because it would not fit",
             "gathered GB/s (ours): E x D rows gathered per step (softmax 5, max 4: x twice, grad_out, and out and "
             "the log-normalizer or the selected edge) / step time, the whole step's (MLP included); % of gather BW: "
             "that against a random-index index_select into a table of x's size (and, for scale, into a cached one)"]
    tables = {"GENConv": (rows, columns)}
    if profiles:
        tables["where one step of ours spends its time (torch.profiler, self time)"] = (profiles, [
            ("graph", "graph", ""), ("aggr", "aggr", ""), ("name", "operator or kernel", ""), ("calls", "calls", "d"),
            ("self_ms", "self ms", ".2f"), ("share", "share", ".1%")])
    report(f"GENConv forward+backward ({args.device})", args.device, tables, notes,
           json_path=args.json, markdown_path=args.markdown)


if __name__ == "__main__":
    main()
