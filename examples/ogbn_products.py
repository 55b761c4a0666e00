"""Train RevGNN-112 (112 layers x 160 channels, SAGEConv) on ogbn-products with the paper's
recipe: Adam 1e-3, gradient clipping 1.0, cross-entropy over the 47 classes, 10 random node
partitions per epoch; accuracy from ogb's Evaluator on the whole graph.

    python examples/ogbn_products.py --root dataset                  # downloads through ogb
    python examples/ogbn_products.py --synthetic                     # no download; on CPU: scale 0.01, 1 epoch
    torchrun --nproc_per_node 2 examples/ogbn_products.py --synthetic  # DistributedDataParallel

Ends by printing the test accuracy at the best validation epoch: ``test acc 0.xxxx``.
"""
import torch.nn.functional as F

import ogb_common
from revgnn_ext.datasets import synthetic_products
from revgnn_ext.nn import RevGNN

TASK = ogb_common.Task(
    name="ogbn-products", metric="acc", epochs=500, node_features=lambda data: data.x, synthetic=synthetic_products,
    loss=lambda out, y: F.cross_entropy(out, y[:, 0], reduction="sum"),
    prediction=lambda out: out.argmax(dim=-1, keepdim=True))


def main():
    args = ogb_common.parser(TASK, __doc__).parse_args()
    overrides = ogb_common.model_overrides(args)
    ogb_common.run(TASK, args, lambda: RevGNN.preset("products-112", **overrides))


if __name__ == "__main__":
    main()
