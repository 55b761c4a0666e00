"""How fast is revgnn_ext.ops.spmm, forward and forward+backward, against its peers?

    python benchmarks/spmm.py [--device cpu|cuda] [--graphs powerlaw-100k-d20,...] [--width 64]
                              [--reduce sum,mean] [--dtype float32] [--repeat N] [--json F] [--markdown F]

For each graph x reduction: check ours against revgnn_ext.reference (output and gradient of x;
the script stops on a mismatch), then time every peer on the same inputs in interleaved rounds,
measure the peak memory of one run and the ratio peer time / our time (> 1: we are faster). On
GPU also the bytes each pass must move over its time, against the measured copy bandwidth; on any
device the feature rows each pass gathers (one per edge) over its time, against the gather
bandwidth measured in the same run into a table of x's size (measure.gather_bandwidth). A peer
that cannot run a case shows as n/a with the reason; peers whose modules are not installed are
listed in the notes. Graphs: benchmarks/graphs.py.
"""
import argparse
import importlib
import sys
import warnings

import torch

import revgnn_ext
from revgnn_ext import CSRGraph, ops, reference

from graphs import PRESETS, make_graph
from measure import (PeakMemory, available_memory, copy_bandwidth, gather_bandwidth, median_seconds, no_gpu,
                     output_arguments, report, set_malloc_thresholds, short, timed)

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
# (rtol, atol) against the reference; low precision is compared with the reference run in float32
CPU_GRAPHS = ["powerlaw-100k-d20", "products-100k-d50", "proteins-10k-d600"]
ROTATING_INPUTS = 3    # input sets used in turn, so that no run finds its x in cache
# [E, D] message tensors a peer holds at its forward+backward peak: where they would take over
# MEMORY_HEADROOM of the available memory, the peer is not run (and the check samples rows)
EDGE_COPIES = {"reference": 5, "torch_scatter.segment_csr": 2, "pyg scatter": 2}
MEMORY_HEADROOM = 0.8
SAMPLED_ROWS = 4096


def _module(name: str):
    """The module, or why it cannot be imported (a string)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except Exception as err:  # ImportError, or a binary built for another torch
        return f"{name} not importable ({short(err)})"


torch_sparse, torch_scatter, pyg_utils = (_module(m) for m in ("torch_sparse", "torch_scatter",
                                                                  "torch_geometric.utils"))
MISSING = {peer: why for peer, why in (("torch_sparse.matmul", torch_sparse), ("pyg scatter", pyg_utils),
                                       ("torch_scatter.segment_csr", torch_scatter)) if isinstance(why, str)}


def _too_large(peer: str, g: CSRGraph, width: int, dtype, device):
    """Why `peer` cannot hold its [E, D] messages in memory, or None."""
    need, free = EDGE_COPIES[peer] * g.num_edges * width * dtype.itemsize, available_memory(device)
    if need > MEMORY_HEADROOM * free:
        return f"skipped: materializes [E, D] messages, ~{need / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free"
    return None


def _destinations(g: CSRGraph):
    """int64 destination of each edge, in CSR order."""
    return torch.repeat_interleave(torch.arange(g.num_dst, device=g.rowptr.device), g.rowptr.diff().long(),
                                   output_size=g.num_edges)


def peers(g: CSRGraph, reduce: str, width: int, dtype, device) -> dict:
    """Each installed peer's x -> spmm(g, x, reduce), or why it cannot run this case (a string).
    What they precompute (sparse tensors, int64 indices) is not timed."""
    out = {"revgnn_ext": lambda x: ops.spmm(g, x, reduce=reduce),
           "reference": _too_large("reference", g, width, dtype, device)
           or (lambda x: reference.spmm(g, x, reduce=reduce))}
    if reduce in ("sum", "mean"):  # torch.sparse.mm sums: mean as 1/in-degree values
        degree = g.rowptr.diff().long()
        values = torch.ones(g.num_edges, dtype=dtype, device=device) if reduce == "sum" else \
            (1.0 / degree.clamp(min=1).to(dtype)).repeat_interleave(degree, output_size=g.num_edges)
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore")
            adj = torch.sparse_csr_tensor(g.rowptr, g.col, values, size=(g.num_dst, g.num_src), check_invariants=False)
        out["torch.sparse.mm"] = lambda x: torch.sparse.mm(adj, x)
    else:
        out["torch.sparse.mm"] = "sum only (mean as 1/deg values)"
    col, rowptr = g.col.long(), g.rowptr.long()
    if "torch_sparse.matmul" not in MISSING:
        sparse = torch_sparse.SparseTensor(rowptr=rowptr, col=col, sparse_sizes=(g.num_dst, g.num_src))
        out["torch_sparse.matmul"] = lambda x: torch_sparse.matmul(sparse, x, reduce=reduce)
    if "torch_scatter.segment_csr" not in MISSING:
        out["torch_scatter.segment_csr"] = _too_large("torch_scatter.segment_csr", g, width, dtype, device) or (
            lambda x: torch_scatter.segment_csr(x[col], rowptr, reduce=reduce))
    if "pyg scatter" not in MISSING:
        dst = _destinations(g)
        out["pyg scatter"] = _too_large("pyg scatter", g, width, dtype, device) or (
            lambda x: pyg_utils.scatter(x[col], dst, dim=0, dim_size=g.num_dst, reduce=reduce))
    return out


def check(g: CSRGraph, name: str, reduce: str, width: int, dtype, device, gen) -> str:
    """Ours against the reference, output and gradient of x, on every row, or on SAMPLED_ROWS random
    rows plus the largest where the reference would not fit (the gradient then flows from those
    rows only). Exits on a mismatch; returns what was checked.

    For max/min, where ties between different sources route the gradient differently (ours to
    the first edge, the reference splits it), each column of x is a random permutation of 1..N:
    no ties unless the dtype cannot hold N distinct integers, where the gradient is not compared
    (no zeros either: scatter_reduce(include_self=False) counts its initial 0 as a tie)."""
    sampled = _too_large("reference", g, width, torch.float64, device) is not None  # checked in float64
    rows = torch.arange(g.num_dst, device=device)
    if sampled:
        sample = torch.randperm(g.num_dst, device=device, generator=gen)[:SAMPLED_ROWS]
        rows = torch.unique(torch.cat([sample, g.rowptr.diff().argmax().view(1)]))
    if reduce in ("max", "min"):
        keys = torch.rand(g.num_src, width, device=device, generator=gen)
        x, compare_grad = (keys.argsort(dim=0) + 1).to(dtype), g.num_src <= 2 / torch.finfo(dtype).eps
    else:
        x, compare_grad = torch.randn(g.num_src, width, device=device, dtype=dtype, generator=gen), True
    x_ours = x.detach().requires_grad_()
    grad_rows = torch.randn(rows.numel(), width, device=device, dtype=dtype, generator=gen)
    out = ops.spmm(g, x_ours, reduce=reduce)
    (grad_ours,) = torch.autograd.grad(out, x_ours, torch.zeros_like(out).index_copy_(0, rows, grad_rows))
    sub = g
    if sampled:  # the in-edges of `rows` only, destination i being rows[i]
        dst = _destinations(g)
        keep = torch.isin(dst, rows)
        sub = CSRGraph.from_edge_index(torch.stack([g.col.long()[keep], torch.searchsorted(rows, dst[keep])]),
                                       (g.num_src, rows.numel()))

    def exact(x64: torch.Tensor, grad64: torch.Tensor) -> tuple:
        """The reference's output and gradient of x in float64."""
        x64 = x64.requires_grad_()
        out64 = reference.spmm(sub, x64, reduce=reduce)
        return (out64.detach(),) + torch.autograd.grad(out64, x64, grad64)

    # The truth in float64, and the same sums over absolute values: a sum in `dtype` of terms
    # whose magnitudes add up to S is off by a few eps * S, in whatever order it is taken.
    x64, grad64 = x.detach().double(), grad_rows.double()
    truths, scales = exact(x64, grad64), exact(x64.abs(), grad64.abs())
    eps = torch.finfo(dtype).eps
    for what, ours, truth, scale in list(zip(("output", "gradient of x"), (out[rows], grad_ours), truths,
                                             scales))[:1 + compare_grad]:
        excess = ((ours.double() - truth).abs() - 16 * eps * scale).max().item() if truth.numel() else 0.0
        if excess > 0 or ours.isnan().any():
            sys.exit(f"MISMATCH: revgnn_ext.ops.spmm differs from revgnn_ext.reference.spmm (float64) in the {what} "
                     f"on {name}, reduce={reduce}, D={width}, {dtype}: an error exceeds 16 eps times the sum of the "
                     f"terms' magnitudes by {excess:.3g}")
    where = f"{rows.numel()} sampled rows (the reference is too large for the whole graph)" if sampled else "all rows"
    return ("output and gradient" if compare_grad else "output (gradient not compared: ties)") + " on " + where


def bench_case(g: CSRGraph, name: str, reduce: str, args, device, bandwidth: float, gather: float) -> list:
    """Checks ours on one case, then times and measures every peer: the case's table rows."""
    gen = torch.Generator(device=device).manual_seed(args.seed)
    checked = check(g, name, reduce, args.width, args.dtype, device, gen)
    print(f"  {name} reduce={reduce}: matches the reference ({checked})", flush=True)
    runners = peers(g, reduce, args.width, args.dtype, device)
    failures = {peer: run for peer, run in runners.items() if isinstance(run, str)}
    xs = [torch.randn(g.num_src, args.width, device=device, dtype=args.dtype, generator=gen)
          for _ in range(ROTATING_INPUTS)]
    passes = {"fwd": [(x,) for x in xs],
              "fwd+bwd": [(x.detach().requires_grad_(), torch.randn(g.num_dst, args.width, device=device,
                                                                    dtype=args.dtype, generator=gen)) for x in xs]}
    rows = []
    for pass_name, inputs in passes.items():
        fns = {peer: run if pass_name == "fwd" else (lambda x, grad, run=run: torch.autograd.grad(run(x), x, grad))
               for peer, run in runners.items() if peer not in failures}
        medians, errors = median_seconds(fns, device, inputs=inputs, warmup=args.warmup, repeat=args.repeat,
                                         budget_s=args.budget)
        failures.update(errors)
        min_bytes = (g.rowptr.element_size() * (g.num_dst + 1 + g.num_edges)
                     + (g.num_src + g.num_dst) * args.width * args.dtype.itemsize) * (1 if pass_name == "fwd" else 2)
        # a row of x per edge; backward, a row of grad_out per transposed entry
        gathered = g.num_edges * args.width * args.dtype.itemsize * (1 if pass_name == "fwd" else 2)
        for peer in runners:
            row = {"graph": name, "N": g.num_dst, "E": g.num_edges, "D": args.width, "reduce": reduce,
                   "pass": pass_name, "peer": peer}
            if peer in medians:
                try:
                    with PeakMemory(device) as memory:
                        fns[peer](*inputs[0])
                    seconds = medians[peer]
                    row.update(median_ms=seconds * 1e3, peak_mb=memory.peak / 1e6,
                               speedup=seconds / medians["revgnn_ext"] if "revgnn_ext" in medians else None,
                               gather_gbps=gathered / seconds / 1e9, gather_pct=100 * gathered / seconds / gather)
                    if device.type == "cuda":
                        row.update(gbps=min_bytes / seconds / 1e9, roofline=100 * min_bytes / seconds / bandwidth)
                except Exception as err:  # a peer that breaks is reported, never fatal
                    failures[peer] = short(err)
            row["note"] = failures.get(peer, "")
            rows.append(row)
            measured = f"{row['median_ms']:9.2f} ms {row['peak_mb']:9.1f} MB" if "peak_mb" in row else row["note"]
            print(f"    {pass_name:7} {peer:25} {measured}", flush=True)
        del fns
    if device.type == "cuda":
        torch.cuda.empty_cache()  # what the peers' structures, and any failed run, left cached
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--graphs", help=f"comma-separated presets from {', '.join(PRESETS)} (default: "
                   f"{', '.join(CPU_GRAPHS)}, plus the full-scale ones on cuda)")
    p.add_argument("--width", type=int, default=64, help="feature width D")
    p.add_argument("--reduce", default="sum,mean", help="comma-separated, from sum, mean, max, min")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--repeat", type=int, help="most timed runs per measurement (default: 10 on cpu, 50 on cuda)")
    p.add_argument("--warmup", type=int, help="untimed runs first (default: 1 on cpu, 3 on cuda)")
    p.add_argument("--budget", type=float, default=5.0, 
                   help="seconds per measurement: slow peers get fewer runs (>= 3)")
    output_arguments(p)
    args = p.parse_args()
    cuda = args.device == "cuda"
    graphs = args.graphs.split(",") if args.graphs else CPU_GRAPHS + (["proteins", "products"] if cuda else [])
    reduces = args.reduce.split(",")
    if set(graphs) - set(PRESETS):
        p.error(f"--graphs from {', '.join(PRESETS)}")
    args.repeat = args.repeat or (50 if cuda else 10)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.dtype = DTYPES[args.dtype]
    if no_gpu(args.device, "the CUDA spmm benchmark"):
        return
    if cuda and not revgnn_ext.with_cuda():
        sys.exit("revgnn_ext was built without its CUDA kernels; rebuild it on this machine with "
                 "`pip install --no-build-isolation -e .` (nvcc must be found)")
    set_malloc_thresholds()  # CPU: a freed block leaves the resident set, so each peak is the run's own
    device = torch.device(args.device)
    bandwidth = copy_bandwidth(device)
    graph_rows, rows = [], []
    for name in graphs:
        print(f"{name}: generating", flush=True)
        synthetic, generate_s = timed(lambda: make_graph(name, device, args.seed, with_edge_attr=False), device)
        g, build_s = timed(CSRGraph.from_edge_index, device, synthetic.edge_index, synthetic.num_nodes)
        del synthetic
        _, transpose_s = timed(g.transposed, device)  # built once, outside every timing
        gather = gather_bandwidth(device, g.num_src, args.width, args.dtype)
        graph_rows.append(dict(graph=name, N=g.num_dst, E=g.num_edges, max_in=int(g.rowptr.diff().max()),
                               generate_s=generate_s, build_s=build_s, transpose_s=transpose_s,
                               gather_table=gather["table"] / 1e9, gather_cached=gather["cached"] / 1e9))
        for reduce in reduces:
            rows += bench_case(g, name, reduce, args, device, bandwidth, gather["table"])
        del g
    dtype = str(args.dtype).split(".")[-1]
    notes = [f"{dtype}, D = {args.width}; median of up to {args.repeat} runs after {args.warmup} warm-up (fewer, at "
             f"least 3, where they would take over {args.budget:g} s), {ROTATING_INPUTS} rotating input sets, peers in "
             f"interleaved rounds; {'CUDA events' if cuda else 'wall clock'}",
             "peak MB: one run, " + ("torch.cuda.max_memory_allocated above the memory allocated before it" if cuda else
                                     "the process's resident-set high-water mark above the resident set before it "
                                     "(revgnn_ext.memory.PeakMemory, malloc thresholds fixed)"),
             "ours ×: this peer's time / revgnn_ext's in the same pass (> 1: revgnn_ext is faster)",
             "fwd+bwd: the forward, then the gradient of x for a random grad_out (torch.autograd.grad)",
             "torch.sparse.mm: mean as precomputed 1/deg values",
             f"device copy bandwidth (read + write): {bandwidth / 1e9:.1f} GB/s"]
    notes += [f"not measured: {peer}: {why}" for peer, why in MISSING.items()]
    notes.append("gathered GB/s: the rows of x (fwd) and of grad_out (bwd) gathered, one per edge, / median time; % of "
                 "gather BW: that against the graph's gather bandwidth into x's table (graphs table: random-index "
                 "index_select, into x's table and into a cached one)")
    if cuda:
        notes.append("GB/s: minimum bytes (rowptr + col + x + out, each once; twice that for fwd+bwd) / median time; "
                     "% of copy BW: that against the device copy bandwidth")
    columns = [("graph", "graph", ""), ("N", "N", ","), ("E", "E", ","), ("D", "D", "d"), ("reduce", "reduce", ""),
               ("pass", "pass", ""), ("peer", "peer", ""), ("median_ms", "median ms", ".2f"),
               ("peak_mb", "peak MB", ".1f"), ("speedup", "ours ×", ".2f"), ("gather_gbps", "gathered GB/s", ".1f"),
               ("gather_pct", "% of gather BW", ".0f")]
    columns += [("gbps", "GB/s (min bytes)", ".0f"), ("roofline", "% of copy BW", ".0f")] if cuda else []
    graph_columns = [("graph", "graph", ""), ("N", "N", ","), ("E", "E", ","), ("max_in", "max in-degree", ","),
                     ("generate_s", "generate s", ".2f"), ("build_s", "CSRGraph s", ".2f"),
                     ("transpose_s", "transposed() s", ".2f"), ("gather_table", "gather GB/s (x's table)", ".1f"),
                     ("gather_cached", "gather GB/s (cached)", ".1f")]
    columns.append(("note", "note", ""))
    report("spmm benchmark", device, {"graphs": (graph_rows, graph_columns), "spmm": (rows, columns)}, notes,
           json_path=args.json, markdown_path=args.markdown)


if __name__ == "__main__":
    main()
