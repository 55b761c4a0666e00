"""How fast is revgnn_ext.ops.spmm, forward and forward+backward, against its peers?

    python benchmarks/spmm.py [--device cpu|cuda] [--graphs issue-2,products-like,...] [--width 64]
                              [--reduce sum,mean] [--dtype float32] [--repeat N]
                              [--json out.json] [--markdown out.md]

For each graph x reduction: check revgnn_ext against revgnn_ext.reference (output and gradient
of x; the script stops on a mismatch), then time every peer on the same inputs: median of up
to --repeat runs after a warm-up, peak memory of one run, and the ratio peer time / our time
(> 1: we are faster). A peer that cannot run a case shows as n/a with the reason; peers whose
modules are not installed are listed in the notes. Graphs are seeded synthetic power-law graphs
(benchmarks/graphs.py).
"""
import argparse
import importlib
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

import revgnn_ext
from revgnn_ext import CSRGraph, ops, reference

from common import (PEAK_MEMORY_METHOD, Table, available_memory, device_copy_bandwidth, machine_info,
                    peak_memory, time_fns, wall_clock, write_report)
from graphs import PRESETS, make_graph

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
# (rtol, atol) against the reference; low precision is compared with the reference run in float32
TOLERANCES = {torch.float64: (1e-9, 1e-11), torch.float32: (1e-4, 1e-5), torch.float16: (2e-3, 1e-3),
              torch.bfloat16: (1.6e-2, 1e-2)}
CPU_GRAPHS = ["issue-2", "products-like", "proteins-like"]
ROTATING_INPUTS = 3      # input sets used in turn, so that no run finds its x in cache
REFERENCE_EDGE_COPIES = 5  # [E, D] tensors the reference's forward+backward holds at its peak (mean: ~4)
SCATTER_EDGE_COPIES = 2    # the same for x[col] followed by a scatter or segment reduction (~1)
MEMORY_HEADROOM = 0.8    # fraction of the available memory a run may plan to use
SAMPLED_ROWS = 4096      # rows checked when the reference cannot run on the whole graph


@dataclass
class Case:
    name: str
    graph: CSRGraph
    width: int
    dtype: torch.dtype
    reduce: str

    @property
    def message_bytes(self) -> int:
        """Size of one [E, D] tensor of messages."""
        return self.graph.num_edges * self.width * self.dtype.itemsize

    def min_bytes(self, backward: bool) -> int:
        """Bytes a pass must move at least: rowptr, col, x and out, each once (the backward is
        the same product over the transpose, so forward+backward moves twice as much)."""
        g = self.graph
        index = g.rowptr.element_size() * (g.num_dst + 1 + g.num_edges)
        features = (g.num_src + g.num_dst) * self.width * self.dtype.itemsize
        return (index + features) * (2 if backward else 1)


class Unavailable(Exception):
    """A peer that cannot run a case; the message is the reason shown in the table."""


def _memory_shortfall(case: Case, device, copies: int) -> Optional[str]:
    """Why a peer that holds `copies` [E, D] tensors cannot run this case; None if it can."""
    need, free = copies * case.message_bytes, available_memory(device)
    if need <= MEMORY_HEADROOM * free:
        return None
    return f"skipped: materializes [E, D] messages, ~{need / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free"


def _require_memory(case: Case, device, copies: int) -> None:
    why = _memory_shortfall(case, device, copies)
    if why:
        raise Unavailable(why)


def _optional_import(module: str):
    """The module, or the reason it cannot be imported (a string)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(module)
    except Exception as err:  # ImportError, or a binary built for another torch
        return f"{module} not importable ({type(err).__name__}: {err})"


OPTIONAL = {name: _optional_import(name) for name in ("torch_sparse", "torch_scatter", "torch_geometric.utils")}


def _destinations(graph: CSRGraph) -> Tensor:
    """int64 destination of each edge, in CSR order."""
    degree = (graph.rowptr[1:] - graph.rowptr[:-1]).long()
    return torch.repeat_interleave(torch.arange(graph.num_dst, device=graph.device), degree,
                                   output_size=graph.num_edges)


# ---------------------------------------------------------------------------- peers
# Each takes a case and returns x -> spmm(case.graph, x, reduce=case.reduce), or raises
# Unavailable. Whatever they precompute (sparse tensors, int64 indices) is not timed.
def _ours(case: Case, device) -> Callable[[Tensor], Tensor]:
    return lambda x: ops.spmm(case.graph, x, reduce=case.reduce)


def _reference(case: Case, device) -> Callable[[Tensor], Tensor]:
    _require_memory(case, device, REFERENCE_EDGE_COPIES)
    return lambda x: reference.spmm(case.graph, x, reduce=case.reduce)


def _torch_sparse_mm(case: Case, device) -> Callable[[Tensor], Tensor]:
    """torch.sparse.mm with a CSR adjacency (rows = destinations); sum only, so mean is
    emulated with values 1/in-degree."""
    g = case.graph
    if case.reduce == "sum":
        values = torch.ones(g.num_edges, dtype=case.dtype, device=device)
    elif case.reduce == "mean":
        degree = (g.rowptr[1:] - g.rowptr[:-1]).long()
        values = (1.0 / degree.clamp(min=1).to(case.dtype)).repeat_interleave(degree, output_size=g.num_edges)
    else:
        raise Unavailable("sum only (mean as 1/deg values)")
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        adj = torch.sparse_csr_tensor(g.rowptr, g.col, values, size=(g.num_dst, g.num_src), check_invariants=False)
    return lambda x: torch.sparse.mm(adj, x)


def _torch_sparse_matmul(case: Case, device) -> Callable[[Tensor], Tensor]:
    torch_sparse = OPTIONAL["torch_sparse"]
    g = case.graph
    adj = torch_sparse.SparseTensor(rowptr=g.rowptr.long(), col=g.col.long(), sparse_sizes=(g.num_dst, g.num_src))
    return lambda x: torch_sparse.matmul(adj, x, reduce=case.reduce)


def _torch_scatter_segment_csr(case: Case, device) -> Callable[[Tensor], Tensor]:
    torch_scatter = OPTIONAL["torch_scatter"]
    _require_memory(case, device, SCATTER_EDGE_COPIES)
    rowptr, col = case.graph.rowptr.long(), case.graph.col.long()
    return lambda x: torch_scatter.segment_csr(x[col], rowptr, reduce=case.reduce)


def _pyg_scatter(case: Case, device) -> Callable[[Tensor], Tensor]:
    utils = OPTIONAL["torch_geometric.utils"]
    _require_memory(case, device, SCATTER_EDGE_COPIES)
    col, dst = case.graph.col.long(), _destinations(case.graph)
    return lambda x: utils.scatter(x[col], dst, dim=0, dim_size=case.graph.num_dst, reduce=case.reduce)


PEERS = {  # name: (factory, the optional module it needs)
    "revgnn_ext": (_ours, None),
    "reference": (_reference, None),
    "torch.sparse.mm": (_torch_sparse_mm, None),
    "torch_sparse.matmul": (_torch_sparse_matmul, "torch_sparse"),
    "torch_scatter.segment_csr": (_torch_scatter_segment_csr, "torch_scatter"),
    "pyg scatter": (_pyg_scatter, "torch_geometric.utils"),
}
OURS = "revgnn_ext"


def importable_peers() -> Tuple[Dict[str, Callable], Dict[str, str]]:
    """({name: factory} of the peers whose modules import, {name: reason} of the others)."""
    usable, missing = {}, {}
    for name, (make, module) in PEERS.items():
        if module is None or not isinstance(OPTIONAL[module], str):
            usable[name] = make
        else:
            missing[name] = OPTIONAL[module]
    return usable, missing


# ---------------------------------------------------------------------------- correctness
def _row_subgraph(graph: CSRGraph, rows: Tensor) -> CSRGraph:
    """The in-edges of `rows` only, as a graph whose destination i is rows[i]."""
    start, degree = graph.rowptr[:-1].long()[rows], (graph.rowptr[1:] - graph.rowptr[:-1]).long()[rows]
    rowptr = torch.zeros(rows.numel() + 1, dtype=torch.long, device=graph.device)
    torch.cumsum(degree, 0, out=rowptr[1:])
    total = int(rowptr[-1])
    offset_in_row = torch.arange(total, device=graph.device) - rowptr[:-1].repeat_interleave(degree, output_size=total)
    edges = start.repeat_interleave(degree, output_size=total) + offset_in_row
    return CSRGraph.from_csr(rowptr, graph.col[edges], graph.num_src)


def _checked_rows(case: Case, device, gen: torch.Generator) -> Tensor:
    """All rows when the reference fits in memory; else a random sample plus the largest row."""
    if _memory_shortfall(case, device, REFERENCE_EDGE_COPIES) is None:
        return torch.arange(case.graph.num_dst, device=device)
    degree = case.graph.rowptr[1:] - case.graph.rowptr[:-1]
    sample = torch.randperm(case.graph.num_dst, device=device, generator=gen)[:SAMPLED_ROWS]
    return torch.unique(torch.cat([sample, degree.argmax().view(1)]))


def _check_input(case: Case, device, gen: torch.Generator) -> Tuple[Tensor, bool]:
    """(x, whether its gradient can be compared). Where max/min tie between different sources,
    ours routes the gradient to the first edge and the reference splits it, so for them every
    column of x is a random permutation of 1..N: no ties unless the dtype cannot hold N
    distinct integers (float16, bfloat16), where the gradient is not compared. (No zeros either:
    the reference's scatter_reduce(include_self=False) counts its zero initial value as tied
    with an extremum of exactly 0 and halves that gradient.)"""
    n = case.graph.num_src
    if case.reduce not in ("max", "min"):
        return torch.randn(n, case.width, device=device, dtype=case.dtype, generator=gen), True
    keys = torch.rand(n, case.width, device=device, generator=gen)
    return (keys.argsort(dim=0) + 1).to(case.dtype), n <= 2 / torch.finfo(case.dtype).eps


def check_against_reference(case: Case, device, gen: torch.Generator) -> str:
    """Compares ours with the reference, output and gradient of x, on every row (or on sampled
    rows when the reference would not fit: the gradient then flows from those rows only).
    Exits with a message on a mismatch; returns what was checked."""
    rows = _checked_rows(case, device, gen)
    x, compare_grad = _check_input(case, device, gen)
    ref_dtype = torch.float32 if case.dtype in (torch.float16, torch.bfloat16) else case.dtype
    x_ours = x.detach().requires_grad_()
    x_ref = x.detach().to(ref_dtype).requires_grad_()
    grad_rows = torch.randn(rows.numel(), case.width, device=device, dtype=case.dtype, generator=gen)

    out = ops.spmm(case.graph, x_ours, reduce=case.reduce)
    grad_out = torch.zeros_like(out).index_copy_(0, rows, grad_rows)
    (grad_ours,) = torch.autograd.grad(out, x_ours, grad_out)
    out_ref = reference.spmm(_row_subgraph(case.graph, rows), x_ref, reduce=case.reduce)
    (grad_ref,) = torch.autograd.grad(out_ref, x_ref, grad_rows.to(ref_dtype))

    rtol, atol = TOLERANCES[case.dtype]
    compared = [("output", out[rows], out_ref)] + ([("gradient of x", grad_ours, grad_ref)] if compare_grad else [])
    for what, ours, ref in compared:
        try:
            torch.testing.assert_close(ours.to(ref_dtype), ref, rtol=rtol, atol=atol)
        except AssertionError as err:
            sys.exit(f"MISMATCH: revgnn_ext.ops.spmm differs from revgnn_ext.reference.spmm in the {what} "
                     f"on {case.name}, reduce={case.reduce}, D={case.width}, {case.dtype}:\n{err}")
    checked = ("output and gradient" if compare_grad else "output (gradient not compared: ties)") + " on "
    if rows.numel() == case.graph.num_dst:
        return checked + "all rows"
    return checked + f"{rows.numel()} sampled rows (the reference is too large for the whole graph)"


# ---------------------------------------------------------------------------- measurement
def _forward_backward(run: Callable[[Tensor], Tensor]) -> Callable[[Tensor, Tensor], None]:
    def step(x: Tensor, grad_out: Tensor) -> None:
        torch.autograd.grad(run(x), x, grad_out)
    return step


def _short(err: BaseException) -> str:
    first_line = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first_line[:120]}"


def make_inputs(case: Case, device, gen: torch.Generator) -> Dict[str, List[tuple]]:
    """Rotating input sets: (x,) for the forward; (x requiring grad, grad_out) for forward+backward."""
    g = case.graph
    xs = [torch.randn(g.num_src, case.width, device=device, dtype=case.dtype, generator=gen)
          for _ in range(ROTATING_INPUTS)]
    return {"fwd": [(x,) for x in xs],
            "fwd+bwd": [(x.detach().requires_grad_(),
                         torch.randn(g.num_dst, case.width, device=device, dtype=case.dtype, generator=gen))
                        for x in xs]}


def measure(runners: Dict[str, Callable[[Tensor], Tensor]], case: Case, device, args,
            failures: Dict[str, str]) -> Dict[Tuple[str, str], dict]:
    """(peer, pass) -> {median_ms, peak_mb} for the forward and the forward+backward of each
    runner, all timed in the same interleaved rounds; a peer that raises goes to `failures`."""
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    inputs = make_inputs(case, device, gen)
    results = {}
    for pass_name in ("fwd", "fwd+bwd"):
        fns = {peer: run if pass_name == "fwd" else _forward_backward(run)
               for peer, run in runners.items() if peer not in failures}
        medians, errors = time_fns(fns, warmup=args.warmup, repeat=args.repeat, device=device,
                                   inputs=inputs[pass_name], budget_s=args.budget)
        failures.update({peer: _short(err) for peer, err in errors.items()})
        for peer, seconds in medians.items():
            try:
                peak = peak_memory(lambda: fns[peer](*inputs[pass_name][0]), device)
            except Exception as err:  # a peer that breaks is reported, never fatal
                failures[peer] = _short(err)
                continue
            results[peer, pass_name] = {"median_ms": seconds * 1e3, "peak_mb": peak / 1e6}
    return results


def bench_case(case: Case, peers: Dict[str, Callable], device, args, table: Table,
               roofline_bandwidth: Optional[float]) -> None:
    """Checks ours on `case`, measures `peers`, adds a row per pass x peer to `table`; with
    `roofline_bandwidth` (bytes/s) also the achieved minimum-bytes bandwidth against it."""
    gen = torch.Generator(device=device).manual_seed(args.seed)
    checked = check_against_reference(case, device, gen)
    print(f"  {case.name} reduce={case.reduce}: matches the reference ({checked})", flush=True)

    runners: Dict[str, Callable[[Tensor], Tensor]] = {}
    failures: Dict[str, str] = {}
    for peer, make in peers.items():
        try:
            runners[peer] = make(case, device)
        except Unavailable as why:
            failures[peer] = str(why)
        except Exception as err:
            failures[peer] = _short(err)
    measured = measure(runners, case, device, args, failures)
    del runners
    if device.type == "cuda":
        torch.cuda.empty_cache()  # what the peers' structures, and any failed run, left cached

    g = case.graph
    for pass_name in ("fwd", "fwd+bwd"):
        ours = measured.get((OURS, pass_name))
        for peer in peers:
            result = measured.get((peer, pass_name))
            row = {"graph": case.name, "N": g.num_dst, "E": g.num_edges, "D": case.width, "reduce": case.reduce,
                   "pass": pass_name, "peer": peer, "median_ms": None, "peak_mb": None, "speedup": None,
                   "note": "" if result else failures.get(peer, "")}
            if result is not None:
                row.update(result)
                if ours is not None:
                    row["speedup"] = result["median_ms"] / ours["median_ms"]
                if roofline_bandwidth is not None:
                    gbps = case.min_bytes(pass_name == "fwd+bwd") / (result["median_ms"] / 1e3) / 1e9
                    row.update(gbps=gbps, roofline=100 * gbps * 1e9 / roofline_bandwidth)
            table.add(**row)
            print(f"    {pass_name:7} {peer:25} " + (f"{result['median_ms']:9.2f} ms {result['peak_mb']:9.1f} MB"
                                                    if result else row["note"]), flush=True)


def results_table(with_roofline: bool) -> Table:
    columns = [("graph", "graph", ""), ("N", "N", ","), ("E", "E", ","), ("D", "D", "d"),
               ("reduce", "reduce", ""), ("pass", "pass", ""), ("peer", "peer", ""),
               ("median_ms", "median ms", ".2f"), ("peak_mb", "peak MB", ".1f"),
               ("speedup", "ours ×", ".2f")]
    if with_roofline:
        columns += [("gbps", "GB/s (min bytes)", ".0f"), ("roofline", "% of copy BW", ".0f")]
    return Table(columns + [("note", "note", "")])


def parse_args() -> argparse.Namespace:
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
                   help="seconds per measurement: slow peers get fewer runs (at least 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the raw rows here")
    p.add_argument("--markdown", help="write the report here")
    args = p.parse_args()
    cuda = args.device == "cuda"
    args.graphs = args.graphs.split(",") if args.graphs else CPU_GRAPHS + (["proteins", "products"] if cuda else [])
    unknown = [name for name in args.graphs if name not in PRESETS]
    if unknown:
        p.error(f"unknown graphs {unknown}; presets: {', '.join(PRESETS)}")
    args.reduce = args.reduce.split(",")
    bad = [r for r in args.reduce if r not in ops.REDUCES]
    if bad:
        p.error(f"unknown reductions {bad}; choose from {', '.join(ops.REDUCES)}")
    args.repeat = args.repeat or (50 if cuda else 10)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("no GPU: skipping")
            return
        if not revgnn_ext.with_cuda():
            sys.exit("revgnn_ext was built without its CUDA kernels; rebuild it on this machine with "
                     "`pip install --no-build-isolation -e .` (nvcc must be found)")
    dtype = DTYPES[args.dtype]
    info = machine_info(device)
    copy_bandwidth = device_copy_bandwidth(device)
    graphs = Table([("graph", "graph", ""), ("N", "N", ","), ("E", "E", ","), ("max_in_degree", "max in-degree", ","),
                    ("generate_s", "generate s", ".2f"), ("build_s", "CSRGraph s", ".2f"),
                    ("transpose_s", "transposed() s", ".2f")])
    results = results_table(with_roofline=device.type == "cuda")
    peers, missing = importable_peers()

    for name in args.graphs:
        print(f"{name}: generating", flush=True)
        synthetic, generate_s = wall_clock(lambda: make_graph(name, device, args.seed, with_edge_attr=False), device)
        graph, build_s = wall_clock(lambda: CSRGraph.from_edge_index(synthetic.edge_index, synthetic.num_nodes), device)
        del synthetic
        _, transpose_s = wall_clock(graph.transposed, device)  # built once, outside every timing
        graphs.add(graph=name, N=graph.num_dst, E=graph.num_edges,
                   max_in_degree=int((graph.rowptr[1:] - graph.rowptr[:-1]).max()),
                   generate_s=generate_s, build_s=build_s, transpose_s=transpose_s)
        for reduce in args.reduce:
            bench_case(Case(name, graph, args.width, dtype, reduce), peers, device, args, results,
                       copy_bandwidth if device.type == "cuda" else None)
        del graph
        if device.type == "cuda":
            torch.cuda.empty_cache()

    notes = [f"{args.dtype}, D = {args.width}; median of up to {args.repeat} runs after {args.warmup} warm-up "
             f"(fewer, at least 3, where they would take over {args.budget:g} s), {ROTATING_INPUTS} rotating input sets"
             + ("; CUDA events" if device.type == "cuda" else "; wall clock"),
             f"peak MB: one run, {PEAK_MEMORY_METHOD[device.type]}",
             "ours ×: this peer's time / revgnn_ext's time in the same pass (> 1: revgnn_ext is faster)",
             "fwd+bwd: the forward, then the gradient of x for a random grad_out (torch.autograd.grad)",
             "torch.sparse.mm: mean as precomputed 1/deg values",
             f"device copy bandwidth (read + write): {copy_bandwidth / 1e9:.1f} GB/s"]
    notes += [f"not measured: {peer}: {why}" for peer, why in missing.items()]
    if device.type == "cuda":
        notes.append("GB/s: minimum bytes (rowptr + col + x + out, each once; twice that for fwd+bwd) / median "
                     "time; % of copy BW: that against the device copy bandwidth")
    write_report("spmm benchmark", info, {"graphs": graphs, "spmm": results}, notes,
                 json_path=args.json, markdown_path=args.markdown)


if __name__ == "__main__":
    main()
