"""The built-in default job (`make demo`): train a deep RevGNN (RevGNN-Deep's architecture:
GENConv max aggregation, 80 channels in 2 reversible groups, edge features encoded inside the
fused kernel) on a seeded synthetic ogbn-proteins-like graph for a few steps, and beside it the
same network without reversibility (plain autograd, every activation stored) where it fits.

    python examples/demo.py [--device cpu|cuda] [--layers L] [--nodes N] [--degree K] [--steps S]

Defaults: 200 layers on a 5,000-node graph on CPU, 1001 layers on a 50,000-node graph on GPU.
Before training, the reversible model's gradients are checked against plain autograd on a small
graph in float64. Prints the loss, step time and peak memory above the model, graph and
optimizer state (revgnn_ext.memory.PeakMemory: on CPU the process's resident set, on GPU the
allocator). It first fixes glibc's malloc thresholds (revgnn_ext.memory.set_malloc_thresholds):
with glibc's dynamic ones the resident set keeps about one freed activation per layer although
the bytes allocated stay flat.
"""
import argparse
import time

import torch
import torch.nn.functional as F

from example_args import POSITIVE_FLOAT, POSITIVE_INT
from revgnn_ext.datasets import synthetic_proteins
from revgnn_ext.memory import PeakMemory, available_memory, set_malloc_thresholds
from revgnn_ext.nn import RevGNN


def check_gradients():
    """Reversible and plain autograd give the same gradients (float64, small graph, dropout on)."""
    data = synthetic_proteins(num_nodes=200, mean_degree=10, seed=1)
    results = []
    for reversible in (True, False):
        torch.manual_seed(0)
        model = RevGNN.preset("proteins-deep", num_layers=6, hidden_channels=16, reversible=reversible).double()
        torch.manual_seed(1)
        model(data.x.double(), data.edge_index, data.edge_attr.double()).square().sum().backward()
        results.append([p.grad for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    print("check: reversible gradients equal plain autograd's (6 layers, float64)")


def train(data, args, device, reversible: bool, steps: int, num_layers: int, quiet: bool = False) -> dict:
    torch.manual_seed(args.seed)
    model = RevGNN.preset("proteins-deep", num_layers=num_layers, hidden_channels=args.hidden,
                          reversible=reversible).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():  # gradients and Adam state exist before the first measurement
        p.grad = torch.zeros_like(p)
    optimizer.step()
    train_idx = data.split_idx["train"]
    times, peaks, losses = [], [], []
    for step in range(steps):
        with PeakMemory(device) as memory:
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=False)
            out = model(data.x, data.edge_index, data.edge_attr)
            loss = F.binary_cross_entropy_with_logits(out[train_idx], data.y[train_idx])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        peaks.append(memory.peak)
        losses.append(loss.item())
        if not quiet:
            print(f"  step {step + 1}: loss {losses[-1]:.4f}  {times[-1]:.2f} s  peak {memory.peak / 2**20:,.0f} MB")
    params = sum(p.numel() for p in model.parameters())
    steady = slice(1, None) if steps > 1 else slice(None)  # step 1 also builds the graph caches: left out
    return dict(time=min(times[steady]), peak=max(peaks[steady]), loss=losses[-1], params=params)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--layers", type=POSITIVE_INT, help="depth (default: 200 on cpu, 1001 on cuda)")
    p.add_argument("--nodes", type=POSITIVE_INT, help="graph nodes (default: 5,000 on cpu, 50,000 on cuda)")
    p.add_argument("--degree", type=POSITIVE_FLOAT, default=20.0, help="mean in-degree")
    p.add_argument("--hidden", type=POSITIVE_INT, default=80, help="channels (2 groups)")
    p.add_argument("--steps", type=POSITIVE_INT, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plain", action="store_true", help="skip the non-reversible comparison")
    args = p.parse_args()
    try:  # the model's own checks (e.g. hidden channels into 2 groups), on the meta device: no memory
        with torch.device("meta"):
            RevGNN.preset("proteins-deep", num_layers=1, hidden_channels=args.hidden)
    except ValueError as err:
        p.error(f"argument --hidden: {err}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("argument --device: cuda: no CUDA device is available; use --device cpu")
    set_malloc_thresholds()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    layers = args.layers if args.layers is not None else (1001 if gpu else 200)
    nodes = args.nodes if args.nodes is not None else (50_000 if gpu else 5_000)

    check_gradients()
    data = synthetic_proteins(num_nodes=nodes, mean_degree=args.degree, seed=args.seed, device=device)
    print(f"graph: synthetic ogbn-proteins-like, {nodes:,} nodes, {data.edge_index.size(1):,} edges, "
          f"8 edge features, 112 tasks; device {device}, {torch.get_num_threads()} threads")

    print(f"RevGNN (reversible): {layers} layers x {args.hidden} channels, 2 groups, GENConv max")
    ours = train(data, args, device, True, args.steps, layers)
    print(f"  {ours['params']:,} parameters")
    rows = [("RevGNN (reversible)", ours)]
    if not args.no_plain:
        # One step at a few layers predicts the plain stack's memory (linear in depth).
        probe_layers = min(layers, 8)
        probe = train(data, args, device, False, 1, probe_layers, quiet=True)
        predicted = probe["peak"] * layers / probe_layers
        if predicted < 0.6 * available_memory(device):
            print(f"plain residual stack (same function, no reversibility): {layers} layers")
            rows.append(("plain autograd", train(data, args, device, False, args.steps, layers)))
        else:
            print(f"plain residual stack: skipped at {layers} layers, it would need about "
                  f"{predicted / 2**30:.1f} GB (measured {probe['peak'] / 2**20:.0f} MB at {probe_layers} layers)")
    print(f"\n| {layers} layers | step s | peak MB above model+optimizer | final loss |")
    print("|---|---:|---:|---:|")
    for name, r in rows:
        print(f"| {name} | {r['time']:.2f} | {r['peak'] / 2**20:,.0f} | {r['loss']:.4f} |")
    if len(rows) == 2:
        plain = rows[1][1]
        print(f"\nreversible: {plain['peak'] / max(ours['peak'], 1):.1f}x less memory, "
              f"{ours['time'] / plain['time']:.2f}x the plain step time")


if __name__ == "__main__":
    main()
