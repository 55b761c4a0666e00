"""The headline run: one training step of RevGNN-Deep (1001 layers x 80 channels, 2 groups,
GENConv max; 20,031,384 parameters) on the full proteins-scale synthetic graph (132,534 nodes,
79,122,504 edges, 8 edge features, 112 tasks) with no partitioning, beside the paper's setup
(10 random node partitions: one epoch is 10 partition steps) and PyG's GroupAddRev with PyG's
GENConv (the model-level edge embedding materialized as [E, 80], as the paper's code does).

    python benchmarks/headline.py [--device cuda] [--scale 1] [--layers 1001] [--parts 10] [--autocast bf16]

Each step: forward, BCE over the 112 tasks on the training nodes, backward, gradient clipping
at 1.0, Adam. Time of one step after a warm-up step; peak memory above the model, graph and
optimizer state (revgnn_ext.memory.PeakMemory: the allocator on GPU, the resident set on CPU).
--autocast bf16 adds one step of ours on the full graph under torch.autocast(bfloat16), after the
float32 ones. PyG runs at growing depths until it runs out of memory or its predicted step time
passes --budget-s; the table shows the largest depth measured and what it needed. Without a GPU
the defaults shrink to a smoke run (--scale 0.001, 20 layers) that only shows the script works.
"""
import argparse
from typing import Callable, Dict

import torch
import torch.nn.functional as F
import torch_geometric

from revgnn_ext.datasets import NodeData, synthetic_proteins
from revgnn_ext.nn import RevGNN

from measure import PeakMemory, no_gpu, output_arguments, report, set_malloc_thresholds, short, timed

PROBE_LAYERS = 3  # depth of the probe step that predicts the full-depth step time


class PygGroup(torch.nn.Module):
    """The F of one group with PyG's GENConv: the [E, hidden] edge embedding comes in
    transposed, so that PyG's GroupAddRev does not split it by channels."""

    def __init__(self, c: int, hidden: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(c)
        self.conv = torch_geometric.nn.GENConv(c, c, aggr="max", norm="layer", bias=True, edge_dim=hidden)

    def forward(self, x, edge_index, emb_t, mask):
        h = F.relu(self.norm(x))
        return self.conv(h if mask is None else h * mask, edge_index, emb_t.t())


class PygRevGNN(torch.nn.Module):
    """RevGNN-Deep built from PyG's GroupAddRev and GENConv, with our model's state_dict keys."""

    def __init__(self, ours: RevGNN):
        super().__init__()
        hidden, c = ours.hidden_channels, ours.hidden_channels // ours.num_groups
        self.input_encoder, self.node_encoder, self.edge_encoder = (torch.nn.Linear(8, 8), torch.nn.Linear(16, hidden),
                                                                    torch.nn.Linear(8, hidden))
        self.layers = torch.nn.ModuleList(
            torch_geometric.nn.GroupAddRev(torch.nn.ModuleList(PygGroup(c, hidden) for _ in range(ours.num_groups)))
            for _ in range(ours.num_layers))
        self.dropout, self.norm, self.head = ours.dropout, torch.nn.LayerNorm(hidden), torch.nn.Linear(hidden, 112)
        self.load_state_dict(ours.state_dict())

    def forward(self, x, edge_index, edge_attr):
        sums = torch.zeros(x.size(0), 8, dtype=x.dtype, device=x.device).index_add_(0, edge_index[0], edge_attr)
        h = self.node_encoder(torch.cat([sums, self.input_encoder(x)], dim=-1))
        emb_t = self.edge_encoder(edge_attr).t()
        mask = self.dropout.mask(h)
        for layer in self.layers:
            h = layer(h, edge_index, emb_t, mask)
        return self.head(F.dropout(F.relu(self.norm(h)), self.dropout.p, self.training))


def subgraph(data: NodeData, nodes: torch.Tensor) -> NodeData:
    """The subgraph induced by `nodes` (a random partition), relabelled."""
    edge_index, edge_attr = torch_geometric.utils.subgraph(nodes, data.edge_index, data.edge_attr,
                                                           relabel_nodes=True, num_nodes=data.num_nodes)
    train = torch.zeros(data.num_nodes, dtype=torch.bool, device=nodes.device)
    train[data.split_idx["train"]] = True
    return NodeData(data.x[nodes], edge_index, edge_attr, data.y[nodes], {"train": train[nodes].nonzero().flatten()})


def make_step(model: torch.nn.Module) -> Callable[..., float]:
    """One training step on a graph (under bf16 autocast if asked), with the gradients and Adam
    state already allocated."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()

    def step(data: NodeData, bf16: bool = False) -> float:
        train = data.split_idx["train"]
        optimizer.zero_grad(set_to_none=False)
        with torch.autocast(data.x.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(data.x, data.edge_index, data.edge_attr)
            loss = F.binary_cross_entropy_with_logits(out[train], data.y[train])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.item()
    return step


def measure(step: Callable[..., float], data: NodeData, device, bf16: bool = False) -> Dict[str, float]:
    """Seconds and peak memory of one step."""
    with PeakMemory(device) as memory:
        _, seconds = timed(step, device, data, bf16)
    return dict(seconds=seconds, peak=memory.peak)


def out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def check_against_pyg(device) -> str:
    """Ours and the PyG twin compute the same loss and gradients (small graph, float64)."""
    data = synthetic_proteins(num_nodes=300, mean_degree=10, seed=7, device=device)
    data = NodeData(data.x.double(), data.edge_index, data.edge_attr.double(), data.y.double(), data.split_idx)
    ours = RevGNN.preset("proteins-deep", num_layers=3).to(device).double()
    pyg = PygRevGNN(ours).to(device).double()
    grads = []
    for model in (ours, pyg):
        torch.manual_seed(0)  # the same dropout mask
        F.binary_cross_entropy_with_logits(model(data.x, data.edge_index, data.edge_attr), data.y).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    return "ours and the PyG twin give the same gradients (3 layers, float64)"


def pyg_largest_depth(data: NodeData, layers: int, device, budget_s: float) -> Dict[str, object]:
    """PyG's model at depths 1, 10, 100, ... up to `layers`, stopping at an out-of-memory error or
    when the step time predicted from the last depth (linear in depth) passes the budget."""
    result: Dict[str, object] = dict(depth=None, note="")
    depth = 1
    while True:
        try:
            step = make_step(PygRevGNN(RevGNN.preset("proteins-deep", num_layers=depth)).to(device))
            step(data)  # warm-up
            m = measure(step, data, device)
        except RuntimeError as err:
            if not out_of_memory(err):
                raise
            result["note"] = f"out of memory at {depth} layer{'s' if depth > 1 else ''}"
            break
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        result.update(depth=depth, **m)
        if depth == layers:
            break
        nxt = min(depth * 10, layers)
        if m["seconds"] * nxt / depth > budget_s:
            result["note"] = (f"{nxt} layers would take ~{m['seconds'] * nxt / depth:.0f} s per step "
                              f"(budget {budget_s:.0f} s)")
            break
        depth = nxt
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--scale", type=float,
                   help="fraction of the proteins node and edge counts (default 1; 0.001 on cpu)")
    p.add_argument("--layers", type=int, help="depth (default 1001; 20 on cpu)")
    p.add_argument("--parts", type=int, default=10, help="random node partitions of the paper's setup")
    p.add_argument("--budget-s", type=float, default=60.0, help="largest predicted PyG step time to attempt")
    p.add_argument("--ours-budget-s", type=float, default=90.0,
                   help="seconds for our full-graph steps at full depth; when a shallow probe predicts more, the "
                        "depth is cut to fit and the prediction reported")
    p.add_argument("--autocast", choices=["bf16"], help="also one step of ours under torch.autocast(bfloat16)")
    output_arguments(p)
    args = p.parse_args()
    if no_gpu(args.device, "the headline run (--device cpu runs a smoke-size version)"):
        return
    set_malloc_thresholds()  # CPU: a freed block leaves the resident set, so each peak is the step's own
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    scale = args.scale if args.scale is not None else (1.0 if gpu else 0.001)
    layers = args.layers or (1001 if gpu else 20)
    torch.manual_seed(args.seed)

    notes = [check_against_pyg(device)]
    data, seconds = timed(lambda: synthetic_proteins(scale, seed=args.seed, device=device), device)
    n, e = data.num_nodes, data.edge_index.size(1)
    notes.append(f"graph: synthetic ogbn-proteins at scale {scale:g}: {n:,} nodes, {e:,} edges, 8 edge features, "
                 f"112 tasks, generated on {device} in {seconds:.1f} s")
    rows = []

    def add(row: dict) -> None:
        """A table row, also printed at once: a run stopped at its time limit still shows it."""
        rows.append(row)
        print(f"headline: {row}", flush=True)

    print(f"headline: {notes[-1]}", flush=True)
    # A shallow probe first: its step time, linear in depth, says whether the full depth fits the budget.
    probe_layers = min(PROBE_LAYERS, layers)
    step = make_step(RevGNN.preset("proteins-deep", num_layers=probe_layers).to(device))
    step(data)  # warm-up: also builds and caches the CSR graph
    probe = measure(step, data, device)
    steps = 3 if args.autocast else 2  # warm-up, float32 (and bf16) steps at full depth
    predicted = probe["seconds"] * layers / probe_layers
    if layers > probe_layers and steps * predicted > args.ours_budget_s:
        add(dict(setup="full graph", model="revgnn_ext RevGNN", layers=probe_layers, edges=e, step_s=probe["seconds"],
                 epoch_s=probe["seconds"], peak_mb=probe["peak"] / 2**20,
                 note=f"no partitioning; {layers} layers would take ~{predicted:.0f} s per step "
                      f"(--ours-budget-s {args.ours_budget_s:.0f} for {steps} steps)"))
        layers = max(probe_layers, int(args.ours_budget_s / steps / (probe["seconds"] / probe_layers)))
    del step
    ours = RevGNN.preset("proteins-deep", num_layers=layers).to(device)
    notes.append(f"RevGNN-Deep at {layers} layers: {sum(q.numel() for q in ours.parameters()):,} parameters")
    step = make_step(ours)
    step(data)  # warm-up
    full = measure(step, data, device)
    add(dict(setup="full graph", model="revgnn_ext RevGNN", layers=layers, edges=e, step_s=full["seconds"],
                     epoch_s=full["seconds"], peak_mb=full["peak"] / 2**20, note="no partitioning"))
    if args.autocast:
        row = dict(setup="full graph", model="revgnn_ext RevGNN, bf16 autocast", layers=layers, edges=e)
        try:
            bf16 = measure(step, data, device, bf16=True)
            row.update(step_s=bf16["seconds"], epoch_s=bf16["seconds"], peak_mb=bf16["peak"] / 2**20,
                       note="no partitioning; after the float32 steps")
        except Exception as err:  # e.g. an op without autocast support: its message goes in the table
            row["note"] = f"failed: {short(err)}"
        add(row)

    parts = [subgraph(data, part) for part in torch.randperm(n, device=device).chunk(args.parts)]
    step(parts[0])  # warm-up
    runs = [measure(step, part, device) for part in parts]
    add(dict(setup=f"{args.parts} partitions (paper)", model="revgnn_ext RevGNN", layers=layers,
                     edges=parts[0].edge_index.size(1), step_s=sorted(r["seconds"] for r in runs)[len(runs) // 2],
                     epoch_s=sum(r["seconds"] for r in runs), peak_mb=max(r["peak"] for r in runs) / 2**20,
                     note="median step; epoch = all partitions"))
    del step, ours
    for setup, graph in (("full graph", data), (f"{args.parts} partitions (paper)", parts[0])):
        r = pyg_largest_depth(graph, layers, device, args.budget_s)
        epoch = None if r["depth"] is None or graph is data else r["seconds"] * args.parts
        add(dict(setup=setup, model="PyG GroupAddRev + GENConv", layers=r["depth"],
                         edges=graph.edge_index.size(1), step_s=r.get("seconds"),
                         epoch_s=r.get("seconds") if graph is data else epoch,
                         peak_mb=r["peak"] / 2**20 if "peak" in r else None,
                         note=r["note"] or "largest depth measured"))
    columns = [("setup", "setup", ""), ("model", "model", ""), ("layers", "layers", "d"),
               ("edges", "edges per step", ","), ("step_s", "step s", ".2f"), ("epoch_s", "epoch s", ".2f"),
               ("peak_mb", "peak MB", ",.0f"), ("note", "note", "")]
    report("Headline: RevGNN-Deep on the proteins-scale graph", device, {"one training step": (rows, columns)}, notes,
           json_path=args.json, markdown_path=args.markdown)


if __name__ == "__main__":
    main()
