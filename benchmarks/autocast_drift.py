"""How far bfloat16 autocast moves RevGNN-Deep's gradients, reversible against plain autograd.

RevGNN.preset("proteins-deep") (hidden 80) at 101 and 1001 layers on a seeded proteins-like
graph. For each depth: the gradients' relative error (all parameters together) against a
float32 plain-autograd run without autocast, for the reversible model and for the plain one
(reversible=False), both under torch.autocast(bfloat16), forward inside autocast and backward
outside as users write it; and the reconstruction error of the first block's input rebuilt
from the last block's output through every block's inversion (the arithmetic backward uses),
under autocast and, for reference, in float32 without it.

    python benchmarks/autocast_drift.py [--depths 101,1001] [--nodes 2000] [--markdown out.md]
"""
import argparse
import json
import platform

import torch

from revgnn_ext import CSRGraph
from revgnn_ext.nn import RevGNN


def proteins_like(num_nodes: int, degree: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    edge_index = torch.randint(0, num_nodes, (2, num_nodes * degree), generator=gen)
    edge_attr = torch.rand(edge_index.size(1), 8, generator=gen)
    x = torch.eye(8)[torch.randint(0, 8, (num_nodes,), generator=gen)]
    target = torch.rand(num_nodes, 112, generator=gen).round()
    return x, edge_index, edge_attr, target


def model(depth: int, reversible: bool) -> RevGNN:
    torch.manual_seed(0)
    return RevGNN.preset("proteins-deep", num_layers=depth, reversible=reversible).eval()


def gradients(net: RevGNN, data, autocast: bool) -> torch.Tensor:
    x, edge_index, edge_attr, target = data
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = net(x, edge_index, edge_attr)
    torch.nn.functional.binary_cross_entropy_with_logits(out.float(), target).backward()
    return torch.cat([p.grad.flatten() for p in net.parameters()])


def reconstruction_error(net: RevGNN, data, autocast: bool) -> float:
    """Relative error of the first block's input rebuilt through all inversions."""
    x, edge_index, edge_attr, _ = data
    graph = CSRGraph.from_edge_index(edge_index, x.size(0))
    attr = graph.edges_to_csr(edge_attr)
    graph = graph.csr_ordered()
    encoder = (net.edge_encoder.weight, net.edge_encoder.bias.unsqueeze(1))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        first = torch.randn(x.size(0), net.hidden_channels, generator=torch.Generator().manual_seed(1))
        h = first
        for layer in net.layers:
            h = layer(h, graph, None, attr, *encoder)
        for layer in reversed(net.layers):
            h = layer.inverse(h, graph, None, attr, *encoder)
    return ((h - first).norm() / first.norm()).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="101,1001")
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--degree", type=int, default=10)
    parser.add_argument("--markdown")
    parser.add_argument("--json")
    args = parser.parse_args()
    data = proteins_like(args.nodes, args.degree)
    rows = []
    for depth in (int(d) for d in args.depths.split(",")):
        exact = gradients(model(depth, reversible=False), data, autocast=False)
        row = {"layers": depth}
        for name, reversible in (("reversible", True), ("plain", False)):
            grads = gradients(model(depth, reversible), data, autocast=True)
            row[f"grad_error_{name}"] = ((grads - exact).norm() / exact.norm()).item()
        row["reconstruction_bf16"] = reconstruction_error(model(depth, True), data, autocast=True)
        row["reconstruction_fp32"] = reconstruction_error(model(depth, True), data, autocast=False)
        rows.append(row)
        print(row, flush=True)
    machine = f"{platform.processor() or platform.machine()}, torch {torch.__version__}"
    lines = [f"bfloat16 autocast drift, RevGNN-Deep (hidden 80), {args.nodes} nodes x degree {args.degree}; "
             f"{machine}", "",
             "| layers | grad error, reversible + autocast | grad error, plain + autocast | ratio | "
             "first input rebuilt, autocast | first input rebuilt, float32 |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['layers']} | {r['grad_error_reversible']:.3g} | {r['grad_error_plain']:.3g} | "
                     f"{r['grad_error_reversible'] / r['grad_error_plain']:.2f} | {r['reconstruction_bf16']:.2g} | "
                     f"{r['reconstruction_fp32']:.2g} |")
    print("\n".join(lines))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
