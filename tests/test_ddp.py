"""DDP over GroupAddRev: 2 gloo processes, each on half a graph, get the average of the halves' single-process
gradients, with DDP's defaults, find_unused_parameters or static_graph, and a block applied twice."""
import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pyg = pytest.importorskip("torch_geometric")

from revgnn_ext.nn import GENConv, GroupAddRev, SAGEConv  # noqa: E402

from conftest import make_graph  # noqa: E402
from test_group_add_rev import Block  # noqa: E402

OPTIONS = [{}, {"find_unused_parameters": True}, {"static_graph": True}]
STEPS = 2


class Net(torch.nn.Module):
    """Encoder, two GENConv blocks (the first applied twice), a SAGEConv block, head."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Linear(5, 8)
        self.gen = torch.nn.ModuleList(
            GroupAddRev(Block(4, GENConv(4, 4, aggr="softmax", learn_t=True, edge_dim=3, norm="layer"), dropout=0.0),
                        num_groups=2)
            for _ in range(2))
        self.sage = GroupAddRev(Block(4, SAGEConv(4, 4), dropout=0.0), num_groups=2)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x, edge_index, edge_attr):
        h = self.encoder(x)
        for block in (self.gen[0], self.gen[1], self.gen[0]):
            h = block(h, edge_index, edge_attr)
        return self.head(self.sage(h, edge_index))


def _model():
    torch.manual_seed(0)
    return Net().double()


def _partitions():
    """(x, edge_index, edge_attr, target) of the subgraphs induced by two halves of a random node permutation."""
    edge_index, n = make_graph("random")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    edge_attr = torch.randn(edge_index.size(1), 3, generator=gen, dtype=torch.float64)
    target = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    out = []
    for nodes in torch.randperm(n, generator=gen).chunk(2):
        ei, ea = pyg.utils.subgraph(nodes, edge_index, edge_attr, relabel_nodes=True, num_nodes=n)
        out.append((x[nodes], ei, ea, target[nodes]))
    return out


def _train(model, backward):
    """Each step's gradients (from backward(model)) over STEPS steps of SGD."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = []
    for _ in range(STEPS):
        opt.zero_grad()
        backward(model)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
    return grads


def _loss(model, partition):
    x, edge_index, edge_attr, target = partition
    return (model(x, edge_index, edge_attr) - target).square().mean()


def _rank(rank, rendezvous, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    partition = _partitions()[rank]
    results = []
    for options in OPTIONS:
        model = torch.nn.parallel.DistributedDataParallel(_model(), **options)
        grads = _train(model, lambda m: _loss(m, partition).backward())
        results.append([{n.removeprefix("module."): g for n, g in step.items()} for step in grads])
    dist.destroy_process_group()
    torch.save(results, f"{out_dir}/rank{rank}.pt")


def _single_process():
    """The same SGD steps in one process on the average of the two partitions' gradients."""
    partitions = _partitions()

    def backward(model):
        for partition in partitions:
            (_loss(model, partition) / len(partitions)).backward()

    return _train(_model(), backward)


def test_ddp_gradients_equal_the_average_of_the_partitions(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2)
    expected = _single_process()
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for options, grads in zip(OPTIONS, results):
            for step, (got, want) in enumerate(zip(grads, expected)):
                assert set(got) == set(want), (rank, options, step)
                for name, g in want.items():
                    torch.testing.assert_close(got[name], g, rtol=1e-10, atol=1e-10,
                                               msg=lambda m: f"rank {rank}, {options}, step {step}, {name}: {m}")
