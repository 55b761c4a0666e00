"""Train RevGNN-Deep (1001 layers x 80 channels, default), RevGNN-Wide (--model wide, 448 x
224) or RevGNN-DEQ (--model deq: one weight-tied GENConv block of 64 channels at its fixed
point, revgnn_ext.nn.deq.DEQ) on ogbn-proteins with the paper's recipe: Adam 1e-3, gradient
clipping 1.0, binary cross-entropy over the 112 tasks, 10 random node partitions per epoch;
ROC-AUC from ogb's Evaluator on the whole graph. The node input's edge-feature sums are computed
once on the whole graph and each partition looks its nodes' sums up, as the paper does.

    python examples/ogbn_proteins.py --root dataset                  # downloads through ogb
    python examples/ogbn_proteins.py --synthetic                     # no download; on CPU: scale 0.01, 1 epoch
    python examples/ogbn_proteins.py --synthetic --model deq         # the equilibrium model
    torchrun --nproc_per_node 2 examples/ogbn_proteins.py --synthetic  # DistributedDataParallel

Ends by printing the test ROC-AUC at the best validation epoch: ``test rocauc 0.xxxx``.
"""
import torch
import torch.nn.functional as F

import ogb_common
from revgnn_ext.datasets import synthetic_proteins
from revgnn_ext.nn import RevGNN

MODELS = {"deep": "proteins-deep", "wide": "proteins-wide", "deq": "proteins-deq"}


def species_one_hot(data) -> torch.Tensor:
    """The model's x: a one-hot of each node's species (ogb gives taxonomy ids, node_species [N, 1])."""
    ids, index = torch.unique(data.node_species.view(-1), return_inverse=True)
    if ids.numel() > 8:
        raise ValueError(f"ogbn-proteins: node_species holds {ids.numel()} species, the model takes 8")
    return F.one_hot(index, 8).float()


TASK = ogb_common.Task(
    name="ogbn-proteins", metric="rocauc", epochs=1000, node_features=species_one_hot, synthetic=synthetic_proteins,
    loss=lambda out, y: F.binary_cross_entropy_with_logits(out, y.float(), reduction="sum"),
    prediction=lambda out: out,
    node_inputs=lambda data: {"edge_sums": RevGNN.out_edge_sums(data.edge_index, data.edge_attr, data.num_nodes)})


def main():
    p = ogb_common.parser(TASK, __doc__)
    p.add_argument("--model", choices=list(MODELS), default="deep",
                   help="RevGNN-Deep, RevGNN-Wide or RevGNN-DEQ (default deep)")
    args = p.parse_args()
    overrides = ogb_common.model_overrides(args)
    ogb_common.run(TASK, args, lambda: RevGNN.preset(MODELS[args.model], **overrides))


if __name__ == "__main__":
    main()
