"""How do a training step's peak memory and time grow with depth, for four stacks of the same function?

    python benchmarks/memory_depth.py [--device cpu|cuda] [--depths 1,10,100,1001]
        [--stacks plain,checkpoint,PyG,ours] [--hidden 64] [--graph powerlaw-20k-d30] [--budget-s 600]
        [--autocast bf16] [--malloc flat|default] [--out DIR]

The model: Linear(node features, hidden) -> L blocks -> LayerNorm -> ReLU -> Linear(hidden, tasks),
BCE-with-logits over the tasks, Adam. Each block has 2 groups of c = hidden / 2 channels; each
group's F = GENConv(c, c, aggr='softmax', learn_t=True, edge_dim, bias=True, norm='layer') applied to
ReLU(LayerNorm(x)), with the raw edge features given to every block (each GENConv encodes them
with its own lin_edge: PyG's materializes [E, c] per call, ours applies it inside the kernel).
The stacks, all with the same weights, checked to give ours's loss and gradients at CHECK_DEPTH
layers first:

- plain: revgnn_ext's GroupAddRev(disable=True) and GENConv, plain autograd (every activation kept);
- checkpoint: the plain stack with torch.utils.checkpoint (use_reentrant=False) around each block;
- PyG: torch_geometric.nn.GroupAddRev with torch_geometric.nn.GENConv;
- ours: revgnn_ext.nn.GroupAddRev with revgnn_ext.nn.GENConv.

Memory: the peak of one training step (forward, loss, backward, Adam step) above what is held
before it (the model, graph, inputs, gradients and Adam state, all allocated before the first
step), in a training loop's steady state: the model's first step, which also allocates what the
process keeps from then on (thread pools, autograd's per-parameter gradient accumulators), is
reported apart; the peak is the largest of the steps after it. revgnn_ext.memory.PeakMemory: on
CPU the resident set's high-water mark, each (depth, stack) in a fresh process that first calls
set_malloc_thresholds() as the examples do (--malloc default: it does not); on GPU the allocator's,
every configuration in this process. Time: the same steps, median of up to --repeat, more than one
only while they total under --repeat-s. --autocast bf16 adds the same steps under
torch.autocast(bfloat16) beside the float32 ones (after them, in the same process).

A configuration whose memory or step time, extrapolated from the stack's smaller depths, would
exceed MEMORY_FRACTION of the available memory or --budget-s is not run: its row says why.
Output: tables (steps; the ratios that benchmarks/README.md judges), JSON with every number and a
plot (with matplotlib), in --out (default benchmarks/results/<date>-<machine>/) as memory_depth.md,
.json and .png, or at --markdown / --json.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F
import torch_geometric
from torch.utils.checkpoint import checkpoint

from revgnn_ext import CSRGraph
from revgnn_ext.nn import GENConv, GroupAddRev

from graphs import PRESETS, make_graph
from measure import (PeakMemory, available_memory, check_gradients, no_gpu, plot, report, results_dir,
                     set_malloc_thresholds, short, timed)

STACKS = ("plain", "checkpoint", "PyG", "ours")
NODE_FEATURES, TASKS = 8, 8  # for presets that do not name them
CHECK_DEPTH = 2         # layers of the models checked against ours before measuring
MEMORY_FRACTION = 0.7   # of the available memory that a configuration may be predicted to use
MB = 2**20


class Group(torch.nn.Module):
    """One group's F: conv(ReLU(LayerNorm(x)), adj, edge_attr)."""

    def __init__(self, channels: int, conv_cls, edge_dim: Optional[int]):
        super().__init__()
        self.norm = torch.nn.LayerNorm(channels)
        self.conv = conv_cls(channels, channels, aggr="softmax", learn_t=True, edge_dim=edge_dim, bias=True,
                             norm="layer")

    def forward(self, x, adj, edge_attr):
        return self.conv(F.relu(self.norm(x)), adj, edge_attr)


class Net(torch.nn.Module):
    """Linear encoder -> `depth` 2-group blocks of `stack` -> LayerNorm -> ReLU -> Linear head."""

    def __init__(self, stack: str, depth: int, in_channels: int, hidden: int, edge_dim: Optional[int], tasks: int):
        super().__init__()
        pyg = stack == "PyG"
        conv_cls, rev_cls = (torch_geometric.nn.GENConv, torch_geometric.nn.GroupAddRev) if pyg else (GENConv,
                                                                                                       GroupAddRev)
        self.encoder = torch.nn.Linear(in_channels, hidden)
        self.blocks = torch.nn.ModuleList(
            rev_cls(Group(hidden // 2, conv_cls, edge_dim), num_groups=2, disable=stack in ("plain", "checkpoint"))
            for _ in range(depth))
        self.checkpointed = stack == "checkpoint"
        self.norm = torch.nn.LayerNorm(hidden)
        self.head = torch.nn.Linear(hidden, tasks)

    def forward(self, x, adj, edge_attr):
        h = self.encoder(x)
        for block in self.blocks:
            h = checkpoint(block, h, adj, edge_attr, use_reentrant=False) if self.checkpointed \
                else block(h, adj, edge_attr)
        return self.head(F.relu(self.norm(h)))


def make_data(graph_name: str, device, seed: int) -> dict:
    """The preset graph, random node features and labels; PyG gets edge_index, ours the graph in
    CSR order with the edge features reordered once (CSRGraph.csr_ordered), as a model that
    reuses them should."""
    g, preset = make_graph(graph_name, device, seed), PRESETS[graph_name]
    gen = torch.Generator(device=device).manual_seed(seed + 2)
    x = torch.randn(g.num_nodes, preset.get("node_features", NODE_FEATURES), device=device, generator=gen)
    labels = (torch.rand(g.num_nodes, preset.get("tasks", TASKS), device=device, generator=gen) < 0.5).float()
    graph = CSRGraph.from_edge_index(g.edge_index, g.num_nodes)
    graph.transposed()
    edge_attr = graph.edges_to_csr(g.edge_attr, "edge_attr") if g.edge_attr is not None else None
    return dict(x=x, labels=labels, PyG=(g.edge_index, g.edge_attr), ours=(graph.csr_ordered(), edge_attr))


def build(stack: str, depth: int, data: dict, hidden: int, seed: int) -> Net:
    """`stack` at `depth` layers with ours's weights for `seed`."""
    edge_attr = data["PyG"][1]

    def net(name):
        torch.manual_seed(seed)
        return Net(name, depth, data["x"].size(1), hidden, edge_attr.size(1) if edge_attr is not None else None,
                   data["labels"].size(1)).to(data["x"].device)

    model = net(stack)
    if stack != "ours":
        model.load_state_dict(net("ours").state_dict())
    return model


def loss_and_backward(model: Net, data: dict, stack: str, bf16: bool = False):
    with torch.autocast(data["x"].device.type, dtype=torch.bfloat16, enabled=bf16):
        adj, edge_attr = data["PyG" if stack == "PyG" else "ours"]
        loss = F.binary_cross_entropy_with_logits(model(data["x"], adj, edge_attr), data["labels"])
    loss.backward()
    return loss.detach()


def check_same_function(data: dict, stacks, hidden: int, seed: int) -> None:
    """Each stack's loss and gradients equal ours's at CHECK_DEPTH layers (float32 round-off)."""
    grads = {}
    for stack in dict.fromkeys(["ours", *stacks]):
        model = build(stack, CHECK_DEPTH, data, hidden, seed)
        grads[stack] = (loss_and_backward(model, data, stack), {name: p.grad for name, p in model.named_parameters()})
    ref_loss, ref = grads["ours"]
    for stack in stacks:
        loss, theirs = grads[stack]
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0, msg=lambda m: f"{stack}: loss differs: {m}")
        check_gradients(ref, theirs, f"{stack} against ours", 1e-3)


def measure(config: dict) -> dict:
    """One (depth, stack): the first step and the steady steps (each: seconds, peak bytes, bytes
    held before it), under bf16 autocast too when asked; parameters and the bytes of parameters,
    gradients and Adam state."""
    device = torch.device(config["device"])
    if device.type == "cpu" and config["malloc"] == "flat" and not set_malloc_thresholds():
        raise RuntimeError("memory_depth: --malloc flat needs glibc and no MALLOC_MMAP_THRESHOLD_ or "
                           "MALLOC_TRIM_THRESHOLD_ in the environment (or run with --malloc default)")
    stack = config["stack"]
    data = make_data(config["graph"], device, config["seed"])
    model = build(stack, config["depth"], data, config["hidden"], config["seed"])
    params = list(model.parameters())
    for p in params:  # gradients and Adam state before the first step: one step on zero gradients
        p.grad = torch.zeros_like(p)
    optimizer = torch.optim.Adam(params, lr=1e-3)
    optimizer.step()
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]

    def step(bf16: bool):
        optimizer.zero_grad(set_to_none=False)
        loss_and_backward(model, data, stack, bf16)
        optimizer.step()

    def run(bf16: bool):
        with PeakMemory(device) as memory:
            _, seconds = timed(step, device, bf16)
        return seconds, memory.peak, memory.start

    def steady(bf16: bool):
        runs = []
        while len(runs) < config["repeat"] and (not runs or sum(r[0] for r in runs) + runs[-1][0]
                                                 <= config["repeat_s"]):
            runs.append(run(bf16))
        return runs

    result = dict(params=sum(p.numel() for p in params), first=run(False), steps=steady(False),
                  state_bytes=sum(t.numel() * t.element_size() for t in params + [p.grad for p in params] + state))
    if config["autocast"]:
        try:
            result["bf16_steps"] = steady(True)
        except Exception as err:  # e.g. an op without autocast support: its message goes in the table
            result["bf16_error"] = short(err)
    return result


def measure_in_child(config: dict) -> dict:
    """measure(config) in a fresh process of this script (CPU: a clean resident set)."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(config)],
                          stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring process failed (exit status {proc.returncode}; its error is printed above)")
    return json.loads(proc.stdout.splitlines()[-1])


def median_s(runs) -> float:
    return statistics.median(r[0] for r in runs)


def peak(runs) -> int:
    return max(r[1] for r in runs)


def extrapolate(points, depth: int) -> Optional[float]:
    """The value at `depth` from measured (depth, value) points: the line through the last two;
    proportional to depth from one; None from none."""
    if len(points) < 2:
        return points[0][1] * depth / points[0][0] if points else None
    (d1, v1), (d2, v2) = points[-2:]
    return v2 + (v2 - v1) / (d2 - d1) * (depth - d2)


def skip_reason(history, depth: int, device, budget_s: float) -> Optional[str]:
    """Why `depth` is not run, judged from the stack's measured [(depth, result)], or None."""
    if not history:
        return None
    seconds = extrapolate([(d, median_s(r["steps"])) for d, r in history], depth)
    last_depth, last = history[-1]  # what is held before a step grows with the parameters and Adam state
    total = (extrapolate([(d, peak(r["steps"])) for d, r in history], depth) + max(r[2] for r in last["steps"])
             + last["state_bytes"] * (depth / last_depth - 1))
    limit = available_memory(device)
    if total > MEMORY_FRACTION * limit:
        return (f"skipped: predicted {total / 2**30:.1f} GiB > {MEMORY_FRACTION:.0%} of the available "
                f"{limit / 2**30:.1f} GiB")
    if seconds > budget_s:
        return f"skipped: predicted {seconds:.0f} s > budget {budget_s:.0f} s"
    return None


def tables(args, results, missing):
    """The steps table and the ratios table."""
    rows = []
    for depth in args.depths:
        for stack in args.stacks:
            r, ours = results.get((depth, stack)), results.get((depth, "ours"))
            row = dict(depth=depth, stack=stack, note=missing.get((depth, stack), ""))
            if r:
                row.update(params=r["params"], state_mb=r["state_bytes"] / MB,
                           baseline_mb=max(s[2] for s in r["steps"]) / MB, first_mb=r["first"][1] / MB,
                           peak_mb=peak(r["steps"]) / MB, step_s=median_s(r["steps"]), runs=len(r["steps"]))
                if ours:
                    row.update(peak_ratio=peak(r["steps"]) / peak(ours["steps"]),
                               time_ratio=median_s(r["steps"]) / median_s(ours["steps"]))
                if "bf16_steps" in r:
                    row.update(bf16_mb=peak(r["bf16_steps"]) / MB, bf16_s=median_s(r["bf16_steps"]))
                row["note"] = r.get("bf16_error", "") and f"bf16 autocast failed: {r['bf16_error']}"
            rows.append(row)
    columns = [("depth", "layers", "d"), ("stack", "stack", ""), ("params", "params", ","),
               ("state_mb", "params+grads+Adam MB", ".1f"), ("baseline_mb", "baseline MB", ".0f"),
               ("first_mb", "1st step peak MB", ".1f"), ("peak_mb", "peak MB", ".1f"), ("step_s", "step s", ".2f"),
               ("runs", "runs", "d"), ("peak_ratio", "peak / ours", ".2f"), ("time_ratio", "time / ours", ".2f")]
    if args.autocast:
        columns += [("bf16_mb", "bf16 peak MB", ".1f"), ("bf16_s", "bf16 step s", ".2f")]
    columns.append(("note", "note", ""))

    def ratio(what, a, b, key):
        """results[a] / results[b] by `key`, or why one is missing."""
        gone = [f"{k[1]} at {k[0]}: {missing.get(k, 'not in --depths/--stacks')}" for k in (a, b) if k not in results]
        return dict(ratio=what, value=None if gone else key(results[a]["steps"]) / key(results[b]["steps"]),
                    note="; ".join(gone))

    ratios = [ratio("ours: peak at 1001 layers / at 10", (1001, "ours"), (10, "ours"), peak),
              ratio("ours / plain step time at 100 layers", (100, "ours"), (100, "plain"), median_s)]
    ratios += [ratio(f"PyG / ours step time at {d} layers", (d, "PyG"), (d, "ours"), median_s) for d in args.depths]
    ratio_columns = [("ratio", "ratio", ""), ("value", "value", ".2f"), ("note", "not measured", "")]
    return {"steps": (rows, columns), "ratios (benchmarks/README.md states the targets)": (ratios, ratio_columns)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--depths", default="1,10,100,1001", help="comma-separated layer counts")
    p.add_argument("--stacks", default=",".join(STACKS), help=f"comma-separated, from {', '.join(STACKS)}")
    p.add_argument("--hidden", type=int, default=64, help="channels (2 groups of hidden / 2)")
    p.add_argument("--graph", default="powerlaw-20k-d30", choices=list(PRESETS))
    p.add_argument("--budget-s", type=float, default=600, help="a configuration predicted to step longer is skipped")
    p.add_argument("--repeat", type=int, default=3, help="steady steps per configuration at most")
    p.add_argument("--repeat-s", type=float, default=100, help="a further step only while the steps total under this")
    p.add_argument("--autocast", choices=["bf16"], help="also measure the steps under torch.autocast(bfloat16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--malloc", default="flat", choices=["flat", "default"],
                   help="CPU: flat, revgnn_ext.memory.set_malloc_thresholds() in each measuring process as in the "
                        "examples (default); default, glibc's own dynamic thresholds")
    p.add_argument("--out", help="results folder (default: benchmarks/results/<date>-<machine>)")
    p.add_argument("--json", help="JSON path (default: <out>/memory_depth.json)")
    p.add_argument("--markdown", help="Markdown path (default: <out>/memory_depth.md; the plot goes beside it)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: measure one configuration, print JSON
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return
    if no_gpu(args.device, "the CUDA memory-depth benchmark"):
        return
    args.depths = sorted({int(d) for d in args.depths.split(",")})
    args.stacks = args.stacks.split(",")
    if set(args.stacks) - set(STACKS) or args.hidden % 2 or min(args.depths) < 1:
        p.error(f"--stacks from {STACKS}, --hidden even, --depths >= 1")
    out = args.out or results_dir(args.device)
    os.makedirs(out, exist_ok=True)
    markdown = args.markdown or os.path.join(out, "memory_depth.md")

    start = time.perf_counter()
    check_same_function(make_data(args.graph, args.device, args.seed), args.stacks, args.hidden, args.seed)
    print(f"checked: {', '.join(args.stacks)} give ours's loss and gradients at {CHECK_DEPTH} layers", flush=True)
    results, missing = {}, {}
    for depth in args.depths:
        for stack in args.stacks:
            history = [(d, results[d, stack]) for d in args.depths if (d, stack) in results]
            missing[depth, stack] = skip_reason(history, depth, args.device, args.budget_s)
            if not missing[depth, stack]:
                config = dict(device=args.device, graph=args.graph, hidden=args.hidden, seed=args.seed, stack=stack,
                              depth=depth, repeat=args.repeat, repeat_s=args.repeat_s, malloc=args.malloc,
                              autocast=args.autocast)
                try:
                    results[depth, stack] = measure_in_child(config) if args.device == "cpu" else measure(config)
                    del missing[depth, stack]
                except (RuntimeError, torch.OutOfMemoryError) as err:
                    missing[depth, stack] = f"failed: {short(err)}"
            r = results.get((depth, stack))
            print(f"{stack} at {depth} layers: " + (f"{median_s(r['steps']):.2f} s, peak {peak(r['steps']) / MB:.1f} MB"
                                                    if r else missing[depth, stack]), flush=True)
    missing = {k: v for k, v in missing.items() if v}
    depths = {stack: [d for d in args.depths if (d, stack) in results] for stack in args.stacks}
    panels = [("layers", ylabel, {s: (ds, [key(results[d, s]["steps"]) / scale for d in ds])
                                  for s, ds in depths.items()}, "log")
              for ylabel, key, scale in (("peak MB above parameters and Adam state", peak, MB),
                                         ("training step s", median_s, 1))]
    plotted = plot(os.path.splitext(markdown)[0] + ".png", panels,
                   f"one training step, {args.graph}, hidden {args.hidden}, {args.device}")
    g = PRESETS[args.graph]
    memory = (f"resident-set high-water mark in a fresh process per row, malloc thresholds: --malloc {args.malloc}"
              if args.device == "cpu" else "torch.cuda.max_memory_allocated")
    notes = [f"graph {args.graph}: N = {g['num_nodes']:,}, E = {g['num_edges']:,}, {g['edge_features']} edge "
             f"features; hidden {args.hidden} in 2 groups; GENConv softmax (learn_t), LayerNorm MLP; float32; Adam; "
             f"{args.device}",
             f"same weights in every stack; loss and gradients checked equal to ours's at {CHECK_DEPTH} layers first",
             "peak MB: one training step above the baseline (model, graph, inputs, gradients, Adam state), the "
             f"largest over the steps after the model's first (1st step peak MB: that step); {memory}",
             f"step s: median over `runs` steps (up to {args.repeat}, while they total under {args.repeat_s:.0f} s) "
             f"after the first; {'wall clock' if args.device == 'cpu' else 'CUDA events'}"
             + ("; bf16: the same steps under torch.autocast(bfloat16), after the float32 ones" * bool(args.autocast)),
             f"skipped: extrapolated from the stack's smaller depths, over {MEMORY_FRACTION:.0%} of available memory "
             f"or --budget-s {args.budget_s:.0f} s",
             f"whole run (check included): {time.perf_counter() - start:.0f} s; {plotted}"]
    report(f"Memory and time of a training step against depth ({args.device})", args.device,
           tables(args, results, missing), notes, markdown_path=markdown,
           json_path=args.json or os.path.join(out, "memory_depth.json"),
           raw={"measured": [dict(depth=d, stack=s, **r) for (d, s), r in results.items()],
                "not_measured": [dict(depth=d, stack=s, reason=why) for (d, s), why in missing.items()]})


if __name__ == "__main__":
    main()
