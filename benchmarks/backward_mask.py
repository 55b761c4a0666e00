"""What does computing only the gradients autograd asks for save in a RevGNN training step?

    python benchmarks/backward_mask.py [--device cpu|cuda] [--layers 16] [--hidden 80]
        [--graph powerlaw-20k-d30] [--rounds 5]

One training step (forward, BCE over 112 tasks, backward, Adam) of RevGNN proteins-deep on the
graph's 8 edge features, which need no gradient (the edge encoder's weight does). Two ways, in
interleaved rounds in this process, on the same model and inputs:

- masked: gen_aggregate_backward gets autograd's needs_input_grad and computes only those;
- all outputs: it is asked for all six gradients (what it computed before it took a mask:
  [E, F] grad_edge_attr per group and layer, allocated and computed, then dropped).

Both give the same parameter gradients bit for bit (checked). Reports each way's median step
time and its largest peak memory (revgnn_ext.memory.PeakMemory) over the rounds.
"""
import argparse
import statistics

import torch
import torch.nn.functional as F

import revgnn_ext.ops
from revgnn_ext.nn import RevGNN

from graphs import make_graph
from measure import PeakMemory, no_gpu, output_arguments, report, set_malloc_thresholds, timed


class AllOutputs:
    """torch.ops.revgnn_ext with gen_aggregate_backward asked for every gradient."""

    def __init__(self, ops):
        self._ops = ops

    def __getattr__(self, name):
        return getattr(self._ops, name)

    def gen_aggregate_backward(self, *args):
        return self._ops.gen_aggregate_backward(*args[:-1], [True] * 6)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=80)
    parser.add_argument("--graph", default="powerlaw-20k-d30")
    parser.add_argument("--rounds", type=int, default=5)
    output_arguments(parser)
    args = parser.parse_args()
    if no_gpu(args.device, "backward_mask"):
        return
    set_malloc_thresholds()
    torch.manual_seed(args.seed)
    g = make_graph(args.graph, args.device, seed=args.seed)
    x = torch.eye(8, device=args.device)[torch.randint(0, 8, (g.num_nodes,), device=args.device)]
    y = torch.randint(0, 2, (g.num_nodes, 112), device=args.device).float()
    model = RevGNN.preset("proteins-deep", num_layers=args.layers, hidden_channels=args.hidden).to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    masked_ops = revgnn_ext.ops._ops
    ways = {"masked": masked_ops, "all outputs": AllOutputs(masked_ops)}

    def step(ops):
        revgnn_ext.ops._ops = ops
        try:
            optimizer.zero_grad(set_to_none=False)
            torch.manual_seed(args.seed)  # the same dropout mask each step
            F.binary_cross_entropy_with_logits(model(x, g.edge_index, g.edge_attr), y).backward()
            grads = [p.grad.clone() for p in model.parameters()]
            optimizer.step()
            return grads
        finally:
            revgnn_ext.ops._ops = masked_ops

    state = {k: v.clone() for k, v in model.state_dict().items()}
    first = {}
    for name, ops in ways.items():  # warm-up, and the check: the same gradients from the same weights
        model.load_state_dict(state)
        first[name] = step(ops)
    assert all(torch.equal(a, b) for a, b in zip(*first.values())), "the two ways' gradients differ"
    seconds = {name: [] for name in ways}
    peaks = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, ops in ways.items():
            with PeakMemory(args.device) as memory:
                _, s = timed(step, args.device, ops)
            seconds[name].append(s)
            peaks[name].append(memory.peak)
    rows = [dict(way=name, seconds=statistics.median(seconds[name]), peak_mb=max(peaks[name]) / 2**20,
                 min_peak_mb=min(peaks[name]) / 2**20) for name in ways]
    notes = [f"RevGNN proteins-deep, {args.layers} layers x {args.hidden}, graph {args.graph} "
             f"({g.num_nodes:,} nodes, {g.edge_index.size(1):,} edges, 8 edge features), float32",
             f"{args.rounds} interleaved rounds after one warm-up step each; the same gradients bit for bit",
             "times (s): " + "; ".join(f"{n}: " + ", ".join(f"{t:.2f}" for t in seconds[n]) for n in ways)]
    columns = [("way", "backward computes", ""), ("seconds", "step time (s, median)", ".2f"),
               ("peak_mb", "peak (MB, max)", ".1f"), ("min_peak_mb", "peak (MB, min)", ".1f")]
    report("gen_aggregate_backward's output mask: one RevGNN training step", args.device,
           {"steps": (rows, columns)}, notes, markdown_path=args.markdown, json_path=args.json,
           raw=dict(seconds=seconds, peaks=peaks))


if __name__ == "__main__":
    main()
