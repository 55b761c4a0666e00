"""Train RevGAT (5 layers, 3 heads x 256, 2,098,256 parameters: revgnn_ext.nn.RevGAT) on
ogbn-arxiv with the paper's recipe: the citation graph made bidirected, with one self loop per
node; label reuse (in each step a random half of the training nodes, --mask-rate 0.5, get their
label as a one-hot input, one pass without gradients fills the label inputs of all other nodes
with its predicted distribution, the model runs again on those inputs and the loss covers the
other half of the training nodes); the loss log(eps + cross-entropy) - log(eps), eps = 1 - ln 2;
RMSprop with lr 0.002 after a linear warm-up over 50 epochs; input dropout 0.25, dropout 0.75,
edge dropout 0.3; 2000 epochs of one whole-graph step. Evaluation gives the model every training
label and one label iteration for the others; the epoch with the lowest validation loss is kept
(the paper's choice), its accuracies from ogb's Evaluator.

Self-distillation (the paper's RevGAT + self-KD): a teacher run writes its predictions (logits)
at its best epoch with --predictions; a run with --mode student --teacher <that file> trains a
fresh model on (1 - alpha) x its loss + alpha x T^2 x KL(teacher || model) of the distributions
at temperature T over all nodes (alpha 0.95, T 0.7; the mean over nodes and classes, as the
paper's code takes it).

    python examples/ogbn_arxiv.py --root dataset --predictions teacher.pt       # downloads through ogb
    python examples/ogbn_arxiv.py --root dataset --mode student --teacher teacher.pt
    python examples/ogbn_arxiv.py --synthetic                       # no download; on CPU: scale 0.01, 1 epoch
    torchrun --nproc_per_node 2 examples/ogbn_arxiv.py --synthetic    # DistributedDataParallel

Under torchrun every process takes the whole-graph step with its own label split, dropout and
edge dropout, and the step averages their gradients. Ends by printing the test accuracy at the
best epoch: ``test acc 0.xxxx``.
"""
import math
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.utils import add_self_loops, remove_self_loops, to_undirected

import ogb_common
from revgnn_ext.datasets import NodeData, synthetic_arxiv
from revgnn_ext.nn import RevGAT

NUM_CLASSES = 40
EPSILON = 1 - math.log(2)


def paper_loss(out: Tensor, y: Tensor) -> Tensor:
    """The paper's loss, summed over the nodes: log(eps + cross-entropy) - log(eps)."""
    return (torch.log(EPSILON + F.cross_entropy(out, y[:, 0], reduction="none")) - math.log(EPSILON)).sum()


TASK = ogb_common.Task(
    name="ogbn-arxiv", metric="acc", epochs=2000, node_features=lambda data: data.x, synthetic=synthetic_arxiv,
    loss=paper_loss, prediction=lambda out: out.argmax(dim=-1, keepdim=True), lr=0.002)


def with_labels(x: Tensor, y: Tensor, known: Tensor) -> Tensor:
    """The model's input: [x, the one-hot label of the nodes ``known``, 0 for the others]."""
    onehot = torch.zeros(x.size(0), NUM_CLASSES, dtype=x.dtype, device=x.device)
    onehot[known, y[known, 0]] = 1
    return torch.cat([x, onehot], dim=1)


def label_reuse(model, data: NodeData, known: Tensor, unknown: Tensor) -> Tensor:
    """The model's output with the labels of ``known`` as inputs and one label iteration: a pass
    without gradients predicts the nodes ``unknown``, whose label inputs become that predicted
    distribution for the second pass."""
    inputs = with_labels(data.x, data.y, known)
    with torch.no_grad():
        out = model(inputs, data.edge_index)
    inputs[unknown, -NUM_CLASSES:] = F.softmax(out[unknown], dim=-1)
    return model(inputs, data.edge_index)


def distillation(out: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """T^2 x KL(softmax(teacher / T) || softmax(out / T)), the mean over nodes and classes."""
    log_q = F.log_softmax(out / temperature, dim=-1)
    kl = F.kl_div(log_q, F.softmax(teacher / temperature, dim=-1), reduction="sum") / out.numel()
    return kl * temperature ** 2


class LabelReuse(ogb_common.Recipe):
    """The paper's arxiv recipe (module docstring), one whole-graph step per epoch."""

    def __init__(self, args):
        self.args = args
        self.teacher = None  # the teacher's logits [N, classes] in student mode
        self.output = None   # the model's logits at the last evaluation

    def check(self, args, world: int) -> None:
        pass  # every process takes the whole graph

    def prepare(self, data: NodeData) -> NodeData:
        """The graph bidirected (duplicate edges merged), its self loops replaced by one per node;
        in student mode, the teacher's predictions read (a file that does not fit ends the run)."""
        n = data.num_nodes
        edge_index = remove_self_loops(to_undirected(data.edge_index, num_nodes=n))[0]
        data = NodeData(data.x, add_self_loops(edge_index, num_nodes=n)[0], None, data.y, data.split_idx)
        if self.args.mode == "student":
            path = self.args.teacher
            try:
                self.teacher = torch.load(path, map_location=data.x.device, weights_only=True)
            except Exception as err:
                raise SystemExit(f"--teacher {path}: cannot read it ({ogb_common._one_line(err)})") from None
            if not isinstance(self.teacher, Tensor) or self.teacher.shape != (n, NUM_CLASSES):
                shape = list(self.teacher.shape) if isinstance(self.teacher, Tensor) else type(self.teacher).__name__
                raise SystemExit(f"--teacher {path} holds {shape}, not the [{n}, {NUM_CLASSES}] predictions of a "
                                 "run with --predictions on this graph")
        return data

    def describe(self, args) -> str:
        line = f"whole graph per step, label reuse (mask rate {args.mask_rate}, 1 label iteration)"
        if args.mode == "student":
            line += f", self-distillation from {args.teacher} (alpha {args.alpha}, T {args.temperature})"
        return line

    def optimizer(self, parameters, args) -> torch.optim.Optimizer:
        return torch.optim.RMSprop(parameters, lr=args.lr)

    def train_epoch(self, task, model, optimizer, data, inputs, is_train, args, epoch, rank, world):
        model.train()
        torch.manual_seed(hash((args.seed, epoch, rank)) % 2**63)  # label split, dropout, edge dropout
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, epoch / args.warmup)
        train = data.split_idx["train"]
        labelled = torch.rand(train.numel(), device=train.device) < args.mask_rate
        known, target = train[labelled], train[~labelled]
        unknown = torch.cat([target, data.split_idx["valid"], data.split_idx["test"]])
        optimizer.zero_grad()
        out = label_reuse(model, data, known, unknown)
        loss = task.loss(out[target], data.y[target]) / max(target.numel(), 1)
        if self.teacher is not None:
            loss = (1 - args.alpha) * loss + args.alpha * distillation(out, self.teacher, args.temperature)
        loss.backward()
        optimizer.step()
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        ogb_common.stop_if_diverged(model, loss, grad_norm, args, epoch, 1)
        total = loss.detach().double()
        if world > 1:
            dist.all_reduce(total)
        return (total / world).item(), 1

    @torch.no_grad()
    def evaluate(self, task, module, data, inputs, evaluator):
        module.eval()
        split = data.split_idx
        self.output = out = label_reuse(module, data, split["train"], torch.cat([split["valid"], split["test"]]))
        prediction = task.prediction(out)
        result = {f"{name} acc": evaluator.eval({"y_true": data.y[idx], "y_pred": prediction[idx]})["acc"]
                  for name, idx in split.items()}
        valid_loss = task.loss(out[split["valid"]], data.y[split["valid"]]).item() / max(split["valid"].numel(), 1)
        result["valid loss"] = valid_loss
        return result, -valid_loss

    def on_best(self, args, rank: int) -> None:
        if args.predictions and rank == 0:  # the teacher of a later --mode student run
            torch.save(self.output.cpu(), args.predictions + ".tmp")
            os.replace(args.predictions + ".tmp", args.predictions)


def main():
    p = ogb_common.parser(TASK, __doc__, partitions=False)
    p.add_argument("--input-dropout", type=ogb_common.PROBABILITY, help="default: the paper's (0.25)")
    p.add_argument("--edge-dropout", type=ogb_common.PROBABILITY, help="default: the paper's (0.3)")
    p.add_argument("--mask-rate", type=ogb_common.PROBABILITY, default=0.5,
                   help="label reuse: the fraction of training nodes whose labels are inputs in a step (default 0.5)")
    p.add_argument("--warmup", type=ogb_common.POSITIVE_INT, default=50,
                   help="epochs of linear learning-rate warm-up (default 50)")
    p.add_argument("--predictions", help="write the model's predictions (logits) at its best epoch here: the "
                                         "teacher of a --mode student run")
    p.add_argument("--mode", choices=["teacher", "student"], default="teacher",
                   help="student: self-distillation from --teacher (default teacher: no distillation)")
    p.add_argument("--teacher", help="with --mode student: a teacher run's --predictions file")
    p.add_argument("--alpha", type=ogb_common.PROBABILITY, default=0.95,
                   help="student: the weight of the distillation loss (default 0.95)")
    p.add_argument("--temperature", type=ogb_common.POSITIVE_FLOAT, default=0.7,
                   help="student: the distillation temperature (default 0.7)")
    args = p.parse_args()
    if (args.mode == "student") != (args.teacher is not None):
        p.error("--teacher goes with --mode student, and --mode student needs --teacher")
    if args.teacher is not None and not os.path.isfile(args.teacher):
        raise SystemExit(f"--teacher {args.teacher}: no such file (write it with --predictions in a teacher run)")
    overrides = ogb_common.model_overrides(args)
    overrides.update({k: v for k, v in dict(input_dropout=args.input_dropout, edge_dropout=args.edge_dropout).items()
                      if v is not None})
    ogb_common.run(TASK, args, lambda: RevGAT.preset("arxiv", **overrides), LabelReuse(args))


if __name__ == "__main__":
    main()
