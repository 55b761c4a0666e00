"""Under CPU bfloat16 autocast, how does GENConv's error (softmax with a learned t) compare with
PyG's GENConv under the same autocast, both against the float64 truth, over many seeds and sizes?

For each configuration (with and without MessageNorm), graph size and seed: the same state_dict
in both layers, one random output gradient; the max-abs error of the output and of the gradients
of x, edge_attr and t. Prints, per configuration and quantity, the median and maximum of the
ratio ours / PyG's and how often either error exceeded twice the other.

    python benchmarks/autocast_vs_pyg.py [--seeds 100] [--json out.json]
"""
import argparse
import copy
import json
import statistics

import torch
import torch_geometric as pyg

from revgnn_ext.nn import GENConv

CONFIGS = {"softmax-learn_t": dict(aggr="softmax", learn_t=True),
           "softmax-learn_t-msg_norm": dict(aggr="softmax", learn_t=True, msg_norm=True, learn_msg_scale=True)}
SIZES = {"40 nodes, 300 edges": (40, 300), "300 nodes, 3,000 edges": (300, 3000),
         "3,000 nodes, 30,000 edges": (3000, 30000)}
QUANTITIES = {"out": "output", "x": "x.grad", "edge_attr": "edge_attr.grad", "aggr_module.t": "t.grad"}


def graph(num_nodes: int, num_edges: int, gen: torch.Generator) -> torch.Tensor:
    """Uniform sources; destinations with Zipf-like in-degrees (rank^-1.2) above 40 nodes."""
    if num_nodes <= 40:
        return torch.randint(0, num_nodes, (2, num_edges), generator=gen)
    probs = torch.arange(1, num_nodes + 1, dtype=torch.float64).pow(-1.2)[torch.randperm(num_nodes, generator=gen)]
    dst = torch.multinomial(probs, num_edges, replacement=True, generator=gen)
    return torch.stack([torch.randint(0, num_nodes, (num_edges,), generator=gen), dst])


def results(module, x, edge_index, edge_attr, autocast: bool) -> dict:
    """The output and the gradients of x, edge_attr and every parameter for one output gradient."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = module(x, edge_index, edge_attr)
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(out)
    names = ["x", "edge_attr"] + [n for n, _ in module.named_parameters()]
    grads = torch.autograd.grad(out, [x, edge_attr, *module.parameters()], gout, allow_unused=True)
    return {"out": out, **dict(zip(names, grads))}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=100)
    p.add_argument("--json", help="write every run's errors here")
    args = p.parse_args()
    rows = []
    for config_name, config in CONFIGS.items():
        for size_name, (n, e) in SIZES.items():
            for seed in range(args.seeds):
                edge_index = graph(n, e, torch.Generator().manual_seed(seed))
                torch.manual_seed(seed)
                ref = pyg.nn.GENConv(12, 16, edge_dim=8, **config)
                ours = GENConv(12, 16, edge_dim=8, **config)
                ours.load_state_dict(ref.state_dict())
                x = torch.randn(n, 12, requires_grad=True)
                edge_attr = torch.randn(e, 8, requires_grad=True)
                got = [results(m, x, edge_index, edge_attr, True) for m in (ours, ref)]
                truth = results(copy.deepcopy(ref).double(), x.detach().double().requires_grad_(), edge_index,
                                edge_attr.detach().double().requires_grad_(), False)
                for key in QUANTITIES:
                    ours_err, pyg_err = ((r[key].double() - truth[key]).abs().max().item() for r in got)
                    rows.append(dict(config=config_name, size=size_name, seed=seed, what=key, ours=ours_err,
                                     pyg=pyg_err, scale=truth[key].abs().max().item()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f)
    print("| configuration | result | median ours/PyG | max ours/PyG | ours > 2x PyG | PyG > 2x ours |")
    print("|---|---|---:|---:|---:|---:|")
    for config_name in CONFIGS:
        for key, label in QUANTITIES.items():
            runs = [r for r in rows if r["config"] == config_name and r["what"] == key]
            ratios = [r["ours"] / r["pyg"] for r in runs]
            print(f"| {config_name} | {label} | {statistics.median(ratios):.2f} | {max(ratios):.1f} | "
                  f"{sum(r['ours'] > 2 * r['pyg'] for r in runs)}/{len(runs)} | "
                  f"{sum(r['pyg'] > 2 * r['ours'] for r in runs)}/{len(runs)} |")


if __name__ == "__main__":
    main()
