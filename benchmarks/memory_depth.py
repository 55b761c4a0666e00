"""Peak memory and time of one training step against depth, for four stacks of the same function.

    python benchmarks/memory_depth.py [--device cpu|cuda] [--depths 1,10,100,1001]
        [--stacks plain,checkpoint,PyG,ours] [--hidden 64] [--graph issue-3] [--budget-s 600]
        [--malloc flat|default] [--out DIR]

The model: Linear(node features, hidden) -> L blocks -> LayerNorm -> ReLU -> Linear(hidden, tasks),
BCE-with-logits over the tasks, Adam. Each block has 2 groups of c = hidden / 2 channels; each
group's F = GENConv(c, c, aggr='softmax', learn_t=True, edge_dim, bias=True, norm='layer') applied to
ReLU(LayerNorm(x)), with the raw edge features given to every block (each GENConv encodes them
with its own lin_edge: PyG's materializes [E, c] per call, ours applies it inside the kernel).
The stacks:

- plain: revgnn_ext's GroupAddRev(disable=True) and GENConv, plain autograd (every activation kept);
- checkpoint: the plain stack with torch.utils.checkpoint (use_reentrant=False) around each block;
- PyG: torch_geometric.nn.GroupAddRev with torch_geometric.nn.GENConv;
- ours: revgnn_ext.nn.GroupAddRev with revgnn_ext.nn.GENConv.

All stacks get the same weights (ours's state_dict for the seed); before measuring, a
CHECK_DEPTH-layer model of each is checked to give ours's loss and gradients.

Memory: the peak of one training step (forward, loss, backward, Adam step) above what is held
before it: the model, graph, inputs, gradients and Adam state (the gradients are allocated as
zeros and Adam's state by one step on them, which leaves the weights as they are). The peak is
that of a training loop's steady state: the model's first step is measured and reported as the
first step's peak, not judged, and the peak is that of the steps after it. The first step also
allocates what the process keeps from then on: thread pools and kernels' first-use state, and
autograd's per-parameter gradient accumulator (made by the first backward and held through a
weak reference of the parameter: about 480 bytes per parameter tensor, here 22 tensors and
10.5 KB per layer, which stay allocated between steps like the gradients do). On CPU, each
(depth, stack) runs in a fresh process that first calls revgnn_ext.memory.set_malloc_thresholds(),
as the examples do (--malloc default: it does not, and glibc's dynamic thresholds keep about one
freed activation per layer resident: see that module); before each step, freed heap memory is
handed back to the OS (gc, glibc's malloc_trim), the resident set is read (VmRSS) and the
kernel's high-water mark reset (/proc/self/clear_refs); the peak is VmHWM after the step minus
that. The kernel raises the mark before any page leaves the resident set, so no peak is missed,
and memory that a library allocates outside torch (MKL, OpenMP) or that glibc keeps is counted.
Cross-check: torch's CPU allocator peak (common.peak_memory) from one more step where steps are
short. On GPU: torch.cuda.max_memory_allocated above the memory allocated before the step, every
configuration in this process.

Time: the same steps (after the first), wall clock on CPU, CUDA events on GPU; median of up to
--repeat steps, more than one only while the configuration's steps total under --repeat-s.

A configuration whose memory (baseline + peak) or step time, extrapolated from the smaller depths
of the same stack, would exceed MEMORY_FRACTION of the available memory or --budget-s is not run:
its row says why. Output: a Markdown table, the acceptance lines of issue 4, JSON with every
number and a PNG plot (peak memory and step time against depth), in --out (default
benchmarks/results/<date>-<machine>/) as memory_depth.md, .json and .png; --markdown and --json
name those two files instead.
"""
import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (available_memory, machine_info, peak_memory, results_dir, time_fn, Table,  # noqa: E402
                    write_report)
from graphs import PRESETS, make_graph  # noqa: E402

import torch_geometric  # noqa: E402
from revgnn_ext import CSRGraph  # noqa: E402
from revgnn_ext.memory import set_malloc_thresholds  # noqa: E402
from revgnn_ext.nn import GENConv, GroupAddRev  # noqa: E402

STACKS = ("plain", "checkpoint", "PyG", "ours")
NODE_FEATURES = 8       # node input width, for presets that do not name one
TASKS = 8               # binary tasks of the loss, for presets that do not name them
CHECK_DEPTH = 2         # layers of the models checked against ours before measuring
MEMORY_FRACTION = 0.7   # of the available memory that a configuration may be predicted to use
ALLOCATOR_CHECK_S = 30  # CPU: the allocator cross-check runs where a step takes less
# issue 4's acceptance: (ours's peak at 1001 layers) / (at 10) at most 1.1; ours / plain step time at
# 100 layers at most 1.4; PyG / ours step time at least 5 at every depth.
MAX_PEAK_GROWTH, MAX_OVERHEAD, MIN_SPEEDUP = 1.1, 1.4, 5.0
MB = 2**20


# ---------------------------------------------------------------------------- model and data
class Group(torch.nn.Module):
    """One group's F: conv(ReLU(LayerNorm(x)), adj, edge_attr)."""

    def __init__(self, channels: int, conv_cls, edge_dim: Optional[int]):
        super().__init__()
        self.norm = torch.nn.LayerNorm(channels)
        self.conv = conv_cls(channels, channels, aggr="softmax", learn_t=True, edge_dim=edge_dim, bias=True,
                             norm="layer")

    def forward(self, x: Tensor, adj, edge_attr: Optional[Tensor]) -> Tensor:
        return self.conv(F.relu(self.norm(x)), adj, edge_attr)


class Net(torch.nn.Module):
    """Linear encoder -> `depth` 2-group blocks of `stack` -> LayerNorm -> ReLU -> Linear head."""

    def __init__(self, stack: str, depth: int, in_channels: int, hidden: int, edge_dim: Optional[int], tasks: int):
        super().__init__()
        pyg = stack == "PyG"
        conv_cls = torch_geometric.nn.GENConv if pyg else GENConv
        rev_cls = torch_geometric.nn.GroupAddRev if pyg else GroupAddRev
        self.encoder = torch.nn.Linear(in_channels, hidden)
        self.blocks = torch.nn.ModuleList(
            rev_cls(Group(hidden // 2, conv_cls, edge_dim), num_groups=2, disable=stack in ("plain", "checkpoint"))
            for _ in range(depth))
        self.checkpointed = stack == "checkpoint"
        self.norm = torch.nn.LayerNorm(hidden)
        self.head = torch.nn.Linear(hidden, tasks)

    def forward(self, x: Tensor, adj, edge_attr: Optional[Tensor]) -> Tensor:
        h = self.encoder(x)
        for block in self.blocks:
            h = checkpoint(block, h, adj, edge_attr, use_reentrant=False) if self.checkpointed \
                else block(h, adj, edge_attr)
        return self.head(F.relu(self.norm(h)))


@dataclass
class Data:
    x: Tensor                    # [N, node features]
    labels: Tensor               # [N, tasks] in {0, 1}
    edge_index: Tensor           # PyG's adjacency, with edge_attr in its edge order
    edge_attr: Optional[Tensor]
    graph: CSRGraph              # ours: the same edges numbered in CSR order, with graph_edge_attr
    graph_edge_attr: Optional[Tensor]

    def inputs(self, stack: str) -> Tuple[object, Optional[Tensor]]:
        """(adjacency, edge features) that `stack`'s blocks take."""
        return (self.edge_index, self.edge_attr) if stack == "PyG" else (self.graph, self.graph_edge_attr)


def make_data(graph_name: str, device, seed: int) -> Data:
    """The preset graph, random node features and labels; our stacks get the graph in CSR order with
    the edge features reordered once (CSRGraph.csr_ordered), as a model that reuses them should."""
    g = make_graph(graph_name, device, seed)
    preset = PRESETS[graph_name]
    gen = torch.Generator(device=device).manual_seed(seed + 2)
    x = torch.randn(g.num_nodes, preset.get("node_features", NODE_FEATURES), device=device, generator=gen)
    labels = (torch.rand(g.num_nodes, preset.get("tasks", TASKS), device=device, generator=gen) < 0.5).float()
    graph = CSRGraph.from_edge_index(g.edge_index, g.num_nodes)
    graph.transposed()
    graph_edge_attr = graph.edges_to_csr(g.edge_attr, "edge_attr") if g.edge_attr is not None else None
    return Data(x, labels, g.edge_index, g.edge_attr, graph.csr_ordered(), graph_edge_attr)


def build(stack: str, depth: int, data: Data, hidden: int, seed: int) -> Net:
    """`stack` at `depth` layers with ours's weights for `seed`."""
    edge_dim = data.edge_attr.size(1) if data.edge_attr is not None else None

    def net(name):
        torch.manual_seed(seed)
        return Net(name, depth, data.x.size(1), hidden, edge_dim, data.labels.size(1)).to(data.x.device)

    model = net(stack)
    if stack != "ours":
        model.load_state_dict(net("ours").state_dict())
    return model


def loss_and_backward(model: Net, data: Data, stack: str) -> Tensor:
    loss = F.binary_cross_entropy_with_logits(model(data.x, *data.inputs(stack)), data.labels)
    loss.backward()
    return loss.detach()


def train_step(model: Net, optimizer: torch.optim.Optimizer, data: Data, stack: str) -> None:
    optimizer.zero_grad(set_to_none=False)
    loss_and_backward(model, data, stack)
    optimizer.step()


def adam_with_state(model: Net) -> torch.optim.Adam:
    """Adam with its state and the gradients allocated: one step on zero gradients creates
    exp_avg and exp_avg_sq and leaves the weights as they are."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    optimizer.step()
    return optimizer


def check_same_function(data: Data, stacks: List[str], hidden: int, seed: int) -> None:
    """Each stack's loss and gradients equal ours's at CHECK_DEPTH layers (float32 round-off)."""
    grads = {}
    for stack in dict.fromkeys(["ours"] + stacks):
        model = build(stack, CHECK_DEPTH, data, hidden, seed)
        loss = loss_and_backward(model, data, stack)
        grads[stack] = (loss, {name: p.grad for name, p in model.named_parameters()})
    ref_loss, ref = grads["ours"]
    largest = max(g.norm().item() for g in ref.values())
    for stack in stacks:
        loss, theirs = grads[stack]
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0, msg=lambda m: f"{stack}: loss differs: {m}")
        for name, g in ref.items():
            if g.norm().item() < 1e-3 * largest:
                continue  # round-off in both
            rel = ((theirs[name] - g).norm() / g.norm()).item()
            # t's gradient is a sum over N x c terms that cancel: float32 leaves ~1e-3 of it.
            assert rel < (1e-2 if name.endswith(".t") else 1e-3), \
                f"{stack}: gradient of {name} differs from ours's by {rel:.1e} (relative norm)"


# ---------------------------------------------------------------------------- one configuration
def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_step(fn, device: torch.device, libc) -> Tuple[float, int, int]:
    """(seconds, peak bytes above the baseline, baseline bytes) of one fn(): see the module's
    docstring."""
    if device.type == "cuda":
        baseline = torch.cuda.memory_allocated(device)
        seconds = []
        peak = peak_memory(lambda: seconds.append(time_fn(fn, warmup=0, repeat=1, device=device)), device)
        return seconds[0], peak, baseline
    gc.collect()
    libc.malloc_trim(0)
    baseline = _proc_status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    seconds = time_fn(fn, warmup=0, repeat=1, device=device)
    return seconds, _proc_status_bytes("VmHWM") - baseline, baseline


def measure(config: dict) -> dict:
    """One (depth, stack): its steps' times, peaks and baselines, parameter count and the bytes
    of parameters, gradients and Adam state."""
    device = torch.device(config["device"])
    libc = None
    if device.type == "cpu":
        if not os.path.exists("/proc/self/clear_refs"):
            raise RuntimeError("memory_depth: CPU peak memory needs Linux's /proc/self/clear_refs")
        libc = ctypes.CDLL("libc.so.6")  # glibc, for malloc_trim
        if config["malloc"] == "flat" and not set_malloc_thresholds():
            raise RuntimeError("memory_depth: --malloc flat needs glibc and no MALLOC_MMAP_THRESHOLD_ or "
                               "MALLOC_TRIM_THRESHOLD_ in the environment (or run with --malloc default)")
    stack, depth, hidden, seed = config["stack"], config["depth"], config["hidden"], config["seed"]
    data = make_data(config["graph"], device, seed)
    model = build(stack, depth, data, hidden, seed)
    optimizer = adam_with_state(model)
    params = list(model.parameters())
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, Tensor)]
    first = measure_step(lambda: train_step(model, optimizer, data, stack), device, libc)
    runs = []
    while len(runs) < config["repeat"] and (not runs or sum(r[0] for r in runs) + runs[-1][0] <= config["repeat_s"]):
        runs.append(measure_step(lambda: train_step(model, optimizer, data, stack), device, libc))
    seconds = [r[0] for r in runs]
    allocator = None
    if device.type == "cpu" and statistics.median(seconds) < ALLOCATOR_CHECK_S:
        allocator = peak_memory(lambda: train_step(model, optimizer, data, stack), device)
    return dict(params=sum(p.numel() for p in params),
                state_bytes=sum(t.numel() * t.element_size() for t in params + [p.grad for p in params] + state),
                seconds=seconds, peaks=[r[1] for r in runs], baselines=[r[2] for r in runs], allocator_peak=allocator,
                first_seconds=first[0], first_peak=first[1], first_baseline=first[2])


def measure_in_child(config: dict) -> dict:
    """measure(config) in a fresh process of this script (CPU: a clean resident set)."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(config)],
                          stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
        raise RuntimeError(f"measuring process failed ({how}; its error is printed above)")
    return json.loads(proc.stdout.splitlines()[-1])


# ---------------------------------------------------------------------------- the run
def extrapolate(points: List[Tuple[int, float]], depth: int) -> Optional[float]:
    """The value at `depth` from measured (depth, value) points: the line through the last two;
    proportional to depth from one; None from none."""
    if not points:
        return None
    if len(points) == 1:
        return points[0][1] * depth / points[0][0]
    (d1, v1), (d2, v2) = points[-2:]
    return v2 + (v2 - v1) / (d2 - d1) * (depth - d2)


def skip_reason(history: List[Tuple[int, dict]], depth: int, device, budget_s: float) -> Optional[str]:
    """Why `depth` is not run, judged from the stack's measured (depth, result) history, or None."""
    seconds = extrapolate([(d, statistics.median(r["seconds"])) for d, r in history], depth)
    peak = extrapolate([(d, max(r["peaks"])) for d, r in history], depth)
    if peak is not None:
        last_depth, last = history[-1]  # the baseline grows by the parameters, gradients and Adam state
        total = peak + max(last["baselines"]) + last["state_bytes"] * (depth / last_depth - 1)
        limit = MEMORY_FRACTION * available_memory(device)
        if total > limit:
            return (f"skipped: predicted {total / 2**30:.1f} GiB > {MEMORY_FRACTION:.0%} of the available "
                    f"{limit / MEMORY_FRACTION / 2**30:.1f} GiB")
    if seconds is not None and seconds > budget_s:
        return f"skipped: predicted {seconds:.0f} s > budget {budget_s:.0f} s"
    return None


def run(args) -> Tuple[Dict[Tuple[int, str], dict], Dict[Tuple[int, str], str]]:
    """Measured results and reasons for the configurations not measured, by (depth, stack)."""
    results, missing = {}, {}
    for depth in args.depths:
        for stack in args.stacks:
            history = [(d, results[d, stack]) for d in args.depths if (d, stack) in results]
            reason = skip_reason(history, depth, args.device, args.budget_s)
            if reason:
                missing[depth, stack] = reason
                print(f"{stack} at {depth} layers: {reason}", flush=True)
                continue
            config = dict(device=args.device, graph=args.graph, hidden=args.hidden, seed=args.seed, stack=stack,
                          depth=depth, repeat=args.repeat, repeat_s=args.repeat_s, malloc=args.malloc)
            try:
                results[depth, stack] = measure_in_child(config) if args.device == "cpu" else measure(config)
            except (RuntimeError, torch.OutOfMemoryError) as err:
                missing[depth, stack] = f"failed: {err}"
                gc.collect()
            r = results.get((depth, stack))
            print(f"{stack} at {depth} layers: " + (f"{statistics.median(r['seconds']):.2f} s, peak "
                                                    f"{max(r['peaks']) / MB:.1f} MB" if r else missing[depth, stack]),
                  flush=True)
    return results, missing


def tables(args, results, missing) -> Tuple[Table, Table]:
    """The results table and issue 4's acceptance table."""
    table = Table([("depth", "layers", "d"), ("stack", "stack", ""), ("params", "params", ","),
                   ("state_mb", "params+grads+Adam MB", ".1f"), ("baseline_mb", "baseline MB", ".0f"),
                   ("first_mb", "1st step peak MB", ".1f"), ("peak_mb", "peak MB", ".1f"),
                   ("allocator_mb", "allocator MB", ".1f"),
                   ("step_s", "step s", ".2f"), ("runs", "runs", "d"), ("peak_ratio", "peak / ours", ".2f"),
                   ("time_ratio", "time / ours", ".2f"), ("note", "note", "")])
    med = {k: statistics.median(r["seconds"]) for k, r in results.items()}
    peak = {k: max(r["peaks"]) for k, r in results.items()}
    for depth in args.depths:
        for stack in args.stacks:
            key, ours = (depth, stack), (depth, "ours")
            r = results.get(key)
            if r is None:
                table.add(depth=depth, stack=stack, note=missing[key])
                continue
            table.add(depth=depth, stack=stack, params=r["params"], state_mb=r["state_bytes"] / MB,
                      baseline_mb=max(r["baselines"]) / MB, first_mb=r["first_peak"] / MB, peak_mb=peak[key] / MB,
                      allocator_mb=r["allocator_peak"] / MB if r["allocator_peak"] is not None else None,
                      step_s=med[key], runs=len(r["seconds"]),
                      peak_ratio=peak[key] / peak[ours] if ours in peak else None,
                      time_ratio=med[key] / med[ours] if ours in med else None, note="")
    accept = Table([("criterion", "criterion", ""), ("target", "target", ""), ("measured", "measured", ".2f"),
                    ("verdict", "verdict", "")])

    def criterion(text, target, a, b, values, ok):
        """values[a] / values[b] against `target` (ok: the comparison), or why it is missing."""
        gone = [f"{k[1]} at {k[0]}: {missing.get(k, 'not in --depths/--stacks')}" for k in (a, b) if k not in values]
        value = None if gone else values[a] / values[b]
        accept.add(criterion=text, target=target, measured=value,
                   verdict="; ".join(gone) if gone else ("pass" if ok(value) else "FAIL"))

    criterion("ours: peak at 1001 layers / peak at 10", f"<= {MAX_PEAK_GROWTH}", (1001, "ours"), (10, "ours"), peak,
              lambda v: v <= MAX_PEAK_GROWTH)
    criterion("ours / plain step time at 100 layers", f"<= {MAX_OVERHEAD}", (100, "ours"), (100, "plain"), med,
              lambda v: v <= MAX_OVERHEAD)
    for depth in args.depths:
        criterion(f"PyG / ours step time at {depth} layers", f">= {MIN_SPEEDUP}", (depth, "PyG"), (depth, "ours"),
                  med, lambda v: v >= MIN_SPEEDUP)
    return table, accept


def plot(args, results, path: str) -> str:
    """Draws the plot to `path`; returns what the report says of it."""
    try:
        import matplotlib
    except ImportError:
        return "plot: none (matplotlib is not installed)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for stack in args.stacks:
        depths = [d for d in args.depths if (d, stack) in results]
        ax_mem.plot(depths, [max(results[d, stack]["peaks"]) / MB for d in depths], "o-", label=stack)
        ax_time.plot(depths, [statistics.median(results[d, stack]["seconds"]) for d in depths], "o-", label=stack)
    for ax, ylabel in ((ax_mem, "peak MB above parameters and Adam state"), (ax_time, "training step s")):
        ax.set(xscale="log", yscale="log", xlabel="layers", ylabel=ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"one training step, {args.graph}, hidden {args.hidden}, {args.device}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {os.path.basename(path)}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--depths", default="1,10,100,1001", help="comma-separated layer counts")
    p.add_argument("--stacks", default=",".join(STACKS), help=f"comma-separated, from {', '.join(STACKS)}")
    p.add_argument("--hidden", type=int, default=64, help="channels (2 groups of hidden / 2)")
    p.add_argument("--graph", default="issue-3", choices=list(PRESETS))
    p.add_argument("--budget-s", type=float, default=600,
                   help="a configuration whose step is predicted to take longer is skipped")
    p.add_argument("--repeat", type=int, default=3, help="steps per configuration at most")
    p.add_argument("--repeat-s", type=float, default=100,
                   help="a further step only while the configuration's steps total under this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--malloc", default="flat", choices=["flat", "default"],
                   help="CPU: flat, revgnn_ext.memory.set_malloc_thresholds() in each measuring process as in "
                        "the examples (default); default, glibc's own dynamic thresholds")
    p.add_argument("--out", help="results folder (default: benchmarks/results/<date>-<machine>)")
    p.add_argument("--json", help="JSON path (default: <out>/memory_depth.json)")
    p.add_argument("--markdown", help="Markdown path (default: <out>/memory_depth.md; the plot goes beside it)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: measure one configuration, print JSON
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no GPU: skipping the CUDA memory-depth benchmark")
        return
    args.depths = sorted({int(d) for d in args.depths.split(",")})
    args.stacks = args.stacks.split(",")
    unknown = set(args.stacks) - set(STACKS)
    if unknown or args.hidden % 2 or min(args.depths) < 1:
        p.error(f"--stacks from {STACKS}, --hidden even, --depths >= 1 (got unknown stacks {sorted(unknown)}, "
                f"hidden {args.hidden}, depths {args.depths})")
    out = args.out or results_dir(args.device)
    os.makedirs(out, exist_ok=True)
    markdown = args.markdown or os.path.join(out, "memory_depth.md")
    json_path = args.json or os.path.join(out, "memory_depth.json")

    start = time.perf_counter()
    check_same_function(make_data(args.graph, args.device, args.seed), args.stacks, args.hidden, args.seed)
    print(f"checked: {', '.join(args.stacks)} give ours's loss and gradients at {CHECK_DEPTH} layers", flush=True)
    results, missing = run(args)
    table, accept = tables(args, results, missing)
    plotted = plot(args, results, os.path.splitext(markdown)[0] + ".png")
    g = PRESETS[args.graph]
    memory = ("peak resident set (VmHWM) of the step in a fresh process, minus VmRSS before it, after gc and "
              f"malloc_trim; glibc's malloc thresholds: --malloc {args.malloc}; allocator MB: torch's CPU "
              f"allocator peak over one more step (profiler), where a step takes under {ALLOCATOR_CHECK_S} s"
              if args.device == "cpu" else
              "torch.cuda.max_memory_allocated minus the memory allocated before the step")
    notes = [f"graph {args.graph}: N = {g['num_nodes']:,}, E = {g['num_edges']:,}, {g['edge_features']} edge "
             f"features; hidden {args.hidden} in 2 groups; GENConv softmax (learn_t), LayerNorm MLP; float32; "
             f"Adam; {args.device}",
             f"same weights in every stack; loss and gradients checked equal to ours's at {CHECK_DEPTH} layers first",
             f"peak MB: one training step (forward, loss, backward, Adam step) above the baseline (model, graph, "
             f"inputs, gradients, Adam state); the largest over the runs after the model's first step (1st step "
             f"peak MB: that step, which also allocates what stays from then on, e.g. autograd's per-parameter "
             f"gradient accumulators); {memory}",
             f"step s: median over `runs` steps (up to {args.repeat}, while they total under {args.repeat_s:.0f} s) "
             f"after the first; {'wall clock' if args.device == 'cpu' else 'CUDA events'}",
             f"skipped: extrapolated from the stack's smaller depths, over {MEMORY_FRACTION:.0%} of available memory "
             f"or --budget-s {args.budget_s:.0f} s",
             f"whole run (check included): {time.perf_counter() - start:.0f} s; {plotted}"]
    write_report(f"Memory and time of a training step against depth ({args.device})", machine_info(args.device),
                 {"steps": table, "acceptance (issue 4)": accept}, notes, json_path=json_path, markdown_path=markdown,
                 raw={"measured": [dict(depth=d, stack=s, **r) for (d, s), r in results.items()],
                      "not_measured": [dict(depth=d, stack=s, reason=why) for (d, s), why in missing.items()]})


if __name__ == "__main__":
    main()
