"""Synthetic OGB-shaped datasets: seeded, well-formed, heavy-tailed, learnable labels."""
import pytest
import torch

from revgnn_ext.datasets import OGB_SHAPES, power_law_graph, synthetic_products, synthetic_proteins

from conftest import raises


def test_power_law_graph_is_seeded_and_skewed():
    a = power_law_graph(5000, 100_000, exponent=2.5, seed=3)
    assert torch.equal(a, power_law_graph(5000, 100_000, exponent=2.5, seed=3))
    assert not torch.equal(a, power_law_graph(5000, 100_000, exponent=2.5, seed=4))
    assert a.shape == (2, 100_000) and a.dtype == torch.int64 and 0 <= a.min() and a.max() < 5000
    in_degree = torch.bincount(a[1], minlength=5000).float()
    assert in_degree.max() > 10 * in_degree.mean()  # hubs exist
    with raises(ValueError, "power_law_graph", "exponent"):
        power_law_graph(10, 10, exponent=1.0)


@pytest.mark.parametrize("make, tasks", [(synthetic_proteins, 112), (synthetic_products, 1)])
def test_synthetic_datasets(make, tasks):
    data = make(num_nodes=2000, mean_degree=15, seed=1)
    again = make(num_nodes=2000, mean_degree=15, seed=1)
    assert torch.equal(data.y, again.y) and torch.equal(data.x, again.x)
    assert data.num_nodes == 2000 and data.edge_index.shape == (2, 30_000)
    assert data.y.shape == (2000, tasks)
    ids = torch.cat(list(data.split_idx.values()))
    assert torch.equal(ids.sort().values, torch.arange(2000))  # the split is a partition
    if make is synthetic_proteins:
        assert data.x.shape == (2000, 8) and data.edge_attr.shape == (30_000, 8)
        assert torch.equal(data.x.sum(1), torch.ones(2000))  # one-hot species
        assert 0.4 < data.y.mean() < 0.6
    else:
        assert data.x.shape == (2000, 100) and data.edge_attr is None
        assert data.y.unique().numel() > 40


def test_scale_follows_the_real_shapes():
    data = synthetic_proteins(0.01)
    shape = OGB_SHAPES["ogbn-proteins"]
    assert data.num_nodes == round(shape["num_nodes"] * 0.01)
    assert abs(data.edge_index.size(1) / data.num_nodes - shape["num_edges"] / shape["num_nodes"]) < 1
    with raises(ValueError, "ogbn-products", "scale"):
        synthetic_products(0.0)
