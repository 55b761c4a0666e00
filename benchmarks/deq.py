"""RevGNN-DEQ against unrolled weight-tied stacks: peak memory and time of one training step
against the number of solver iterations, and the solvers' residual against iterations.

    python benchmarks/deq.py [--device cpu|cuda] [--iterations 5,20,50] [--graph powerlaw-20k-d30]
        [--hidden 64] [--solver anderson|broyden] [--repeat 1] [--out DIR]

The model: Linear(8 node features, hidden) -> block -> LayerNorm -> ReLU -> Linear(hidden, 112
tasks), BCE-with-logits over the tasks, Adam. The block's 2 groups are RevGNN's res+ groups
(ReLU(LayerNorm(x)) -> GENConv(c, c, aggr='softmax', learn_t=True, edge_dim=8, norm='layer'),
c = hidden / 2, each GENConv encoding the raw edge features itself) with the same weights in
every configuration:

- deq: revgnn_ext.nn.deq.DEQ of the groups, K solver iterations forward and K in the adjoint
  solve (tol=0 forces exactly K; its non-convergence warnings are silenced here);
- revgnn-wt: RevGNN-WT, the groups' GroupAddRev applied K times (reversible, weight-tied);
- plain-wt: the same K-layer weight-tied stack with plain autograd (GroupAddRev(disable=True)),
  every activation stored.

Memory: revgnn_ext.memory.PeakMemory around a training step (forward, loss, backward, Adam step)
above what is held before it (model, graph, gradients, Adam state), each K after the model's
warm-up step at the smallest K; on CPU the resident set, with set_malloc_thresholds() as the
examples set it. Time: the same steps, median of --repeat (wall clock: on a shared machine, see
the load average in the notes). Residuals: each solver's relative residual ||f(z) - z|| / ||f(z)|| per
iteration of the forward solve at the largest K, beside the plain iteration z <- f(z).
Output: deq.md, deq.json and (with matplotlib) deq.png in --out (default
benchmarks/results/<date>-<machine>/), with the acceptance lines of issue 14.
"""
import argparse
import os
import statistics
import sys
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from graphs import make_graph  # noqa: E402
from measure import PeakMemory, report, results_dir, set_malloc_thresholds, timed  # noqa: E402

from revgnn_ext import CSRGraph  # noqa: E402
from revgnn_ext.nn import GENConv, GroupAddRev  # noqa: E402
from revgnn_ext.nn.deq import DEQ, SOLVERS  # noqa: E402
from revgnn_ext.nn.rev_gnn import ResPlusGroup  # noqa: E402

KINDS = ("deq", "revgnn-wt", "plain-wt")
NODE_FEATURES, TASKS = 8, 112
MB = 2**20


class Net(torch.nn.Module):
    def __init__(self, kind: str, iterations: int, hidden: int, edge_dim: int, solver: str):
        super().__init__()
        c = hidden // 2
        groups = torch.nn.ModuleList(
            ResPlusGroup(torch.nn.LayerNorm(c),
                         GENConv(c, c, aggr="softmax", learn_t=True, edge_dim=edge_dim, norm="layer", bias=True))
            for _ in range(2))
        self.kind, self.iterations = kind, iterations
        self.encoder = torch.nn.Linear(NODE_FEATURES, hidden)
        self.block = (DEQ(groups, solver=solver, max_iter=iterations, tol=0.0) if kind == "deq"
                      else GroupAddRev(groups, disable=kind == "plain-wt"))
        self.norm = torch.nn.LayerNorm(hidden)
        self.head = torch.nn.Linear(hidden, TASKS)

    def forward(self, x, graph, edge_attr):
        h = self.encoder(x)
        for _ in range(1 if self.kind == "deq" else self.iterations):
            h = self.block(h, graph, None, edge_attr)
        return self.head(F.relu(self.norm(h)))


def make_data(name: str, device):
    g = make_graph(name, device)
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(g.num_nodes, NODE_FEATURES, device=device, generator=gen)
    y = (torch.rand(g.num_nodes, TASKS, device=device, generator=gen) < 0.3).float()
    return CSRGraph.from_edge_index(g.edge_index, g.num_nodes), x, y, g.edge_attr


def build(kind: str, iterations: int, args, edge_dim: int, device) -> Net:
    torch.manual_seed(0)  # the same weights in every configuration
    return Net(kind, iterations, args.hidden, edge_dim, args.solver).to(device)


def measure(kind: str, iterations, args, data, device) -> list:
    """One model of ``kind``, one warm-up step at the first K, then --repeat measured steps at each
    K (the model's weights stay as they are: the optimizer's learning rate is 0)."""
    graph, x, y, edge_attr = data
    model = build(kind, iterations[0], args, edge_attr.size(1), device)
    params = list(model.parameters())
    for p in params:  # gradients and Adam state before the steps
        p.grad = torch.zeros_like(p)
    optimizer = torch.optim.Adam(params, lr=0.0)
    optimizer.step()

    def step():
        optimizer.zero_grad(set_to_none=False)
        F.binary_cross_entropy_with_logits(model(x, graph, edge_attr), y).backward()
        optimizer.step()

    step()  # warm-up: what the process keeps from a model's first step
    rows = []
    for k in iterations:
        model.iterations = k
        if kind == "deq":
            model.block.max_iter = model.block.backward_max_iter = k
        runs = []
        for _ in range(args.repeat):
            with PeakMemory(device) as memory:
                _, seconds = timed(step, device)
            runs.append((seconds, memory.peak))
        row = dict(kind=kind, iterations=k, seconds=statistics.median(r[0] for r in runs),
                   peak_mb=max(r[1] for r in runs) / MB)
        if kind == "deq":
            row.update(forward_residual=model.block.forward_trace.residuals[-1],
                       backward_residual=model.block.backward_trace.residuals[-1])
        print(row, flush=True)
        rows.append(row)
    return rows


@torch.no_grad()
def residual_traces(args, data, device, iterations: int) -> dict:
    """The forward solve's residual per iteration of each solver, and of the plain iteration."""
    graph, x, _, edge_attr = data
    model = build("deq", iterations, args, edge_attr.size(1), device)
    h = model.encoder(x)
    traces = {}
    for solver in SOLVERS:
        model.block.solver = solver
        model.block(h, graph, None, edge_attr)
        traces[solver] = model.block.forward_trace.residuals
    z, picard = torch.zeros_like(h), []
    for _ in range(iterations):
        fz = model.block.f(z, h, graph, None, edge_attr)
        picard.append(((fz - z).norm() / fz.norm()).item())
        z = fz
    traces["plain iteration"] = picard
    return traces


def plot(rows, traces, path: str) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot: none (matplotlib is not installed)"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for kind in KINDS:
        mine = [r for r in rows if r["kind"] == kind]
        axes[0].plot([r["iterations"] for r in mine], [r["peak_mb"] for r in mine], "o-", label=kind)
        axes[1].plot([r["iterations"] for r in mine], [r["seconds"] for r in mine], "o-", label=kind)
    for name, trace in traces.items():
        axes[2].plot(range(1, len(trace) + 1), trace, label=name)
    labels = (("solver iterations / layers", "peak MB of a training step"),
              ("solver iterations / layers", "training step s"), ("iteration", "relative residual"))
    for ax, (xlabel, ylabel) in zip(axes, labels):
        ax.set(yscale="log", xlabel=xlabel, ylabel=ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {os.path.basename(path)}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--iterations", default="5,20,50", help="solver iterations / layers (comma-separated)")
    p.add_argument("--graph", default="powerlaw-20k-d30")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--solver", choices=list(SOLVERS), default="anderson")
    p.add_argument("--repeat", type=int, default=1, help="measured steps per configuration (median time, max peak)")
    p.add_argument("--out", help="output directory (default benchmarks/results/<date>-<machine>)")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        set_malloc_thresholds()
    iterations = sorted(int(k) for k in args.iterations.split(","))
    warnings.filterwarnings("ignore", message="DEQ: the .* solver", category=RuntimeWarning)
    data = make_data(args.graph, device)

    rows = [row for kind in KINDS for row in measure(kind, iterations, args, data, device)]
    traces = residual_traces(args, data, device, iterations[-1])

    out = args.out or results_dir(device)
    os.makedirs(out, exist_ok=True)
    peak = {(r["kind"], r["iterations"]): r["peak_mb"] for r in rows}
    few, many = iterations[0], iterations[-1]
    growth = peak["deq", many] / peak["deq", few]
    versus_plain = peak["deq", many] / peak["plain-wt", many]
    notes = [f"graph {args.graph} ({data[0].num_dst:,} nodes, {data[0].num_edges:,} edges), hidden {args.hidden}, "
             f"2 groups of GENConv softmax, solver {args.solver} (tol=0: exactly K iterations forward and backward)",
             f"issue 14: DEQ step peak at {many} iterations / at {few}: {growth:.3f} (needs <= 1.1): "
             f"{'pass' if growth <= 1.1 else 'FAIL'}",
             f"issue 14: DEQ step peak at {many} iterations / plain unrolled weight-tied stack at {many} layers: "
             f"{versus_plain:.3f} (needs <= 0.2): {'pass' if versus_plain <= 0.2 else 'FAIL'}",
             "CPU load average (1, 5, 15 min) at the end: " + ", ".join(f"{v:.1f}" for v in os.getloadavg()),
             plot(rows, traces, os.path.join(out, "deq.png"))]
    marks = sorted({1, 2, 5, 10, 20, 30, 40, many} & set(range(1, many + 1)))
    residual_rows = [dict(name=name, **{str(m): trace[m - 1] for m in marks if m <= len(trace)})
                     for name, trace in traces.items()]
    tables = {
        "training step": (rows, [("kind", "model", ""), ("iterations", "iterations / layers", "d"),
                                 ("peak_mb", "peak MB", ".1f"), ("seconds", "step s", ".2f"),
                                 ("forward_residual", "forward residual", ".1e"),
                                 ("backward_residual", "adjoint residual", ".1e")]),
        f"forward-solve relative residual after n iterations (K = {many})":
            (residual_rows, [("name", "solver", "")] + [(str(m), f"n = {m}", ".1e") for m in marks]),
    }
    report("RevGNN-DEQ: training step against solver iterations", device, tables, notes,
           markdown_path=os.path.join(out, "deq.md"), json_path=os.path.join(out, "deq.json"),
           raw=dict(args=vars(args), residuals=traces))


if __name__ == "__main__":
    main()
