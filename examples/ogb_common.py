"""What the OGB examples share: arguments, the dataset (ogb's PygNodePropPredDataset, or
revgnn_ext.datasets with --synthetic), DistributedDataParallel under torchrun, checkpoints, and
the training loop; and, as the default Recipe, the training of ogbn_proteins.py and
ogbn_products.py with random node partitions (ogbn_arxiv.py brings its own Recipe).

The recipe is the paper's: Adam, gradient clipping at 1.0, and each epoch a fresh random split of
the nodes into --num-parts parts, one optimizer step per part on its induced subgraph (edges and
edge features between its nodes only), the loss over its training nodes. --full-graph instead
takes one step per epoch on the whole graph. Evaluation runs on the whole graph under
torch.no_grad, where the reversible blocks keep no state for backward.

The proteins model's node input includes each node's sum of its edge features: as in the
paper, those sums are computed once over the whole graph (Task.node_inputs) and every part looks
its nodes' sums up, rather than summing over the part's own (about --num-parts times fewer) edges.

Work is not lost: paths are checked before training (a missing --checkpoint directory is
created, a missing --root refused), a checkpoint is written atomically after every epoch, a
step that leaves non-finite weights (a diverging run) stops the run before the next checkpoint,
so the one on disk keeps the last good epoch, and a resumed run takes a new --lr, --epochs,
--eval-every, --device or --root but refuses other changed arguments, which would make it a
different run. Unreadable checkpoints and dataset directories end the run with one line.

Under torchrun (WORLD_SIZE > 1) every process trains on its own share of each epoch's parts
(part i on rank i % world_size) through DistributedDataParallel (gloo on CPU, nccl on GPU), so
one optimizer step averages the gradients of world_size parts. Every process evaluates; rank 0
alone logs and writes the checkpoint. All randomness of an epoch is drawn from (seed, epoch,
rank), so a run resumed from its checkpoint continues exactly as an uninterrupted one.
"""
import argparse
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Tuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch_geometric.utils import subgraph
from tqdm import tqdm

from example_args import POSITIVE_FLOAT, POSITIVE_INT, PROBABILITY
from revgnn_ext.datasets import NodeData
from revgnn_ext.memory import set_malloc_thresholds

# --synthetic on CPU defaults to a small graph and one epoch (a few optimizer steps).
CPU_SYNTHETIC_SCALE = 0.01
# The arguments a resumed run may change (it uses the new values); any other must be the
# checkpoint's, or the resumed run would be a different run.
RESUMABLE = ("lr", "epochs", "eval_every", "checkpoint", "device", "root")


@dataclass
class Task:
    name: str                               # the OGB dataset, e.g. "ogbn-proteins"
    metric: str                             # its Evaluator's metric: "rocauc" or "acc"
    epochs: int                             # default epochs on real data (the paper's code)
    node_features: Callable[..., Tensor]    # ogb's Data -> the model's x
    synthetic: Callable[..., NodeData]      # revgnn_ext.datasets generator: (scale, seed=, device=)
    loss: Callable[[Tensor, Tensor], Tensor]      # (logits, labels) of the training nodes -> summed loss
    prediction: Callable[[Tensor], Tensor]        # logits -> the Evaluator's y_pred
    # Per-node model inputs computed once on the whole graph, passed to the model as keyword
    # arguments; each part gets its nodes' rows (the paper's whole-graph edge sums on proteins).
    node_inputs: Callable[[NodeData], Dict[str, Tensor]] = lambda data: {}
    lr: float = 1e-3                        # default learning rate (the paper's)


def parser(task: Task, doc: str, partitions: bool = True) -> argparse.ArgumentParser:
    """The examples' arguments; ``partitions``: with --num-parts and --full-graph (the default
    Recipe's)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="dataset", help="ogb dataset root (default: dataset)")
    p.add_argument("--synthetic", action="store_true",
                   help="train on revgnn_ext's seeded synthetic graph shaped like the dataset (no download)")
    p.add_argument("--scale", type=POSITIVE_FLOAT,
                   help="with --synthetic: fraction of the real node and edge counts "
                        f"(default 1 on cuda, {CPU_SYNTHETIC_SCALE} on cpu)")
    p.add_argument("--epochs", type=POSITIVE_INT,
                   help=f"default {task.epochs}; 1 with --synthetic on cpu")
    p.add_argument("--num-layers", type=POSITIVE_INT, help="default: the paper's")
    p.add_argument("--hidden-channels", type=POSITIVE_INT, help="default: the paper's")
    p.add_argument("--dropout", type=PROBABILITY, help="default: the paper's")
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=task.lr, help=f"learning rate (default {task.lr})")
    if partitions:
        parts = p.add_mutually_exclusive_group()
        parts.add_argument("--num-parts", type=POSITIVE_INT, default=10,
                           help="random node partitions per epoch, one optimizer step each (default 10)")
        parts.add_argument("--full-graph", action="store_true",
                           help="one optimizer step per epoch on the whole graph instead of partitions")
    p.add_argument("--eval-every", type=POSITIVE_INT, default=1,
                   help="evaluate every N epochs (and after the last)")
    p.add_argument("--checkpoint", help="save after every epoch here; resume from it when it exists")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda when available")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the synthetic graph, the initialization, the partitions and dropout (default 0)")
    return p


def model_overrides(args) -> dict:
    """The RevGNN.preset overrides given on the command line."""
    given = dict(num_layers=args.num_layers, hidden_channels=args.hidden_channels, dropout=args.dropout)
    return {k: v for k, v in given.items() if v is not None}


def _one_line(err: BaseException) -> str:
    """The exception's type and the first sentence of its message."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    return type(err).__name__ + (f": {lines[0].strip().split('. ')[0]}" if lines else "")


def _check_paths(task: Task, args) -> None:
    """Before any work: the dataset root exists, and the checkpoint's directory exists (created
    here) and is writable, so that a run never fails after its first epoch for want of a path."""
    if not args.synthetic and not os.path.isdir(args.root):
        raise SystemExit(f"--root {args.root}: no such directory. Create it (ogb then downloads {task.name} into "
                         f"it), point --root at the directory that holds {task.name.replace('-', '_')}/, "
                         "or train with --synthetic")
    if args.checkpoint:
        folder = os.path.dirname(os.path.abspath(args.checkpoint))
        if os.path.isdir(args.checkpoint):
            raise SystemExit(f"--checkpoint {args.checkpoint} is a directory: give a file path")
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as err:
            raise SystemExit(f"--checkpoint {args.checkpoint}: cannot create its directory ({_one_line(err)})")
        if not os.access(folder, os.W_OK):
            raise SystemExit(f"--checkpoint {args.checkpoint}: its directory {folder} is not writable")


def _setup(args) -> Tuple[int, int, torch.device]:
    """(rank, world_size, device): one process, or torchrun's (it sets WORLD_SIZE, RANK, LOCAL_RANK)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1, torch.device(args.device)
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def _check_partitions(args, world: int) -> None:
    if world > 1 and args.full_graph:
        raise SystemExit("--full-graph trains on the whole graph in every step: run it in one process, "
                         "not under torchrun")
    if args.num_parts % world:
        raise SystemExit(f"--num-parts ({args.num_parts}) must be a multiple of the number of processes "
                         f"({world}), so that every process takes the same number of steps")


def _load(task: Task, args, rank: int, world: int, device: torch.device) -> NodeData:
    if args.synthetic:
        return task.synthetic(args.scale, seed=args.seed, device=device)
    from ogb.nodeproppred import PygNodePropPredDataset
    from torch_geometric.data.data import DataEdgeAttr, DataTensorAttr
    from torch_geometric.data.storage import GlobalStorage

    if rank > 0:
        dist.barrier()  # rank 0 processes the raw files first, once
    # ogb 1.3.6 reads its processed file with a bare torch.load, which torch >= 2.6 makes a
    # weights_only load; that refuses the PyG classes pickled in it. Allow exactly those, only here.
    try:
        with torch.serialization.safe_globals([DataEdgeAttr, DataTensorAttr, GlobalStorage]):
            dataset = PygNodePropPredDataset(task.name, root=args.root)
    except Exception as err:  # a failed download, missing or damaged files: one line, no traceback
        raise SystemExit(f"{task.name} in --root {args.root}: cannot load it ({_one_line(err)})") from None
    if rank == 0 and world > 1:
        dist.barrier()
    data = dataset[0]
    split_idx = dataset.get_idx_split()
    return NodeData(task.node_features(data), data.edge_index, data.edge_attr, data.y, split_idx).to(device)


def _parts(data: NodeData, args, epoch: int, rank: int, world: int) -> Iterator[Tuple[Tensor, Tensor, Tensor]]:
    """This process's parts of the epoch: (nodes, edge_index, edge_attr) of each induced subgraph,
    or the whole graph (nodes None) with --full-graph. The split is the same on every rank."""
    if args.full_graph:
        yield None, data.edge_index, data.edge_attr
        return
    gen = torch.Generator().manual_seed(hash((args.seed, epoch)) % 2**63)
    perm = torch.randperm(data.num_nodes, generator=gen).to(data.x.device)
    for nodes in perm.tensor_split(args.num_parts)[rank::world]:
        edge_index, edge_attr = subgraph(nodes, data.edge_index, data.edge_attr, relabel_nodes=True,
                                         num_nodes=data.num_nodes)
        yield nodes, edge_index, edge_attr


def stop_if_diverged(model, loss: Tensor, grad_norm: Tensor, args, epoch: int, step: int) -> None:
    """After an optimizer step: a weight that is no longer finite ends the run (SystemExit)
    before the epoch's checkpoint. The weights are the same in every DDP process, so all of
    them stop here together."""
    if not torch.nn.utils.get_total_norm(model.parameters(), math.inf).isfinite():
        then = (f"; {args.checkpoint} keeps epoch {epoch - 1}: resume from it with a lower --lr"
                if args.checkpoint and epoch > 1 else ": lower --lr")
        raise SystemExit(f"epoch {epoch}, step {step}: training diverged (loss {loss.item():.4g}, gradient norm "
                         f"{grad_norm.item():.4g}), the weights are no longer finite. Stopped{then}")


def _train_epoch(task: Task, model, optimizer, data: NodeData, inputs: Dict[str, Tensor], is_train: Tensor, args,
                 epoch: int, rank: int, world: int) -> Tuple[float, int]:
    """(mean loss over the epoch's steps of all processes, steps of this process). A step that
    leaves a non-finite weight ends the run (SystemExit) before the epoch's checkpoint."""
    model.train()
    torch.manual_seed(hash((args.seed, epoch, rank)) % 2**63)  # dropout
    steps = 1 if args.full_graph else args.num_parts // world
    losses = []
    for step, (nodes, edge_index, edge_attr) in enumerate(tqdm(
            _parts(data, args, epoch, rank, world), total=steps, desc=f"epoch {epoch}", leave=False,
            disable=rank > 0), 1):
        x, y, train = (data.x, data.y, is_train) if nodes is None else (data.x[nodes], data.y[nodes], is_train[nodes])
        part_inputs = inputs if nodes is None else {name: value[nodes] for name, value in inputs.items()}
        optimizer.zero_grad()
        target = y[train]
        # The mean over the labels; a part without training nodes adds a zero loss, and every
        # DDP process still takes its step.
        loss = task.loss(model(x, edge_index, edge_attr, **part_inputs)[train], target) / max(target.numel(), 1)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        stop_if_diverged(model, loss, norm, args, epoch, step)
        losses.append(loss.item())
    total = torch.tensor([sum(losses), len(losses)], dtype=torch.float64, device=data.x.device)
    if world > 1:
        dist.all_reduce(total)
    return (total[0] / total[1]).item(), steps


@torch.no_grad()
def _evaluate(task: Task, model, data: NodeData, inputs: Dict[str, Tensor], evaluator) -> Dict[str, float]:
    model.eval()
    prediction = task.prediction(model(data.x, data.edge_index, data.edge_attr, **inputs))
    return {split: evaluator.eval({"y_true": data.y[idx], "y_pred": prediction[idx]})[task.metric]
            for split, idx in data.split_idx.items()}


class Recipe:
    """How run() trains and evaluates a task. This class is the paper's recipe for ogbn-proteins
    and ogbn-products (see the module docstring): the dataset's graph as loaded, Adam, gradient
    clipping at 1.0, --num-parts random node partitions per epoch (or --full-graph), and the
    epoch with the best validation metric. examples/ogbn_arxiv.py overrides it."""

    def check(self, args, world: int) -> None:
        """Refuses arguments that cannot run in ``world`` processes (SystemExit)."""
        _check_partitions(args, world)

    def prepare(self, data: NodeData) -> NodeData:
        """The graph the model trains on, from the loaded dataset."""
        return data

    def describe(self, args) -> str:
        """What one optimizer step covers, for the log."""
        return "whole graph per step" if args.full_graph else f"{args.num_parts} random partitions per epoch"

    def optimizer(self, parameters, args) -> torch.optim.Optimizer:
        return torch.optim.Adam(parameters, lr=args.lr)

    def train_epoch(self, task: Task, model, optimizer, data: NodeData, inputs: Dict[str, Tensor], is_train: Tensor,
                    args, epoch: int, rank: int, world: int) -> Tuple[float, int]:
        """(mean loss over the epoch's steps of all processes, steps of this process)."""
        return _train_epoch(task, model, optimizer, data, inputs, is_train, args, epoch, rank, world)

    def evaluate(self, task: Task, module, data: NodeData, inputs: Dict[str, Tensor],
                 evaluator) -> Tuple[Dict[str, float], float]:
        """(the metrics to log by name, each split's "<split> <metric>"; the score that the best
        epoch maximizes)."""
        result = _evaluate(task, module, data, inputs, evaluator)
        return {f"{split} {task.metric}": value for split, value in result.items()}, result["valid"]

    def on_best(self, args, rank: int) -> None:
        """Called after an evaluation that gave a new best score."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _flags(values: dict, names) -> str:
    """The arguments ``names`` as a command line would give them ((default) for an omitted one)."""
    return " ".join(f"{_flag(name)} {'(default)' if values.get(name) is None else values[name]}" for name in names)


def _read_checkpoint(task: Task, args, device: torch.device) -> dict:
    """args.checkpoint's state, read before any work. A file that is no checkpoint of this task,
    or one written with other arguments than RESUMABLE (a different run), ends the run with one line."""
    path = args.checkpoint
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        saved_task, saved = state["task"], state["args"]
    except Exception as err:
        raise SystemExit(f"--checkpoint {path} is not a checkpoint of this script ({_one_line(err)}): "
                         "delete it or give another path") from None
    if saved_task != task.name:
        raise SystemExit(f"--checkpoint {path} holds a run on {saved_task}, not {task.name}: give another path")
    now = vars(args)
    changed = [name for name in sorted(saved.keys() | now.keys())
               if name not in RESUMABLE and saved.get(name) != now.get(name)]
    if changed:
        raise SystemExit(f"--checkpoint {path} was written with {_flags(saved, changed)}, this run has "
                         f"{_flags(now, changed)}: repeat those to resume it (only {', '.join(map(_flag, RESUMABLE))} "
                         "may change), or give another --checkpoint")
    return state


def _restore(state: dict, args, module, optimizer) -> None:
    """Load a checkpoint's state into module and optimizer; the optimizer takes the new --lr."""
    try:
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except Exception as err:
        raise SystemExit(f"--checkpoint {args.checkpoint} does not fit this model ({_one_line(err)}): "
                         "give another path") from None
    for group in optimizer.param_groups:
        group["lr"] = args.lr


def run(task: Task, args, build_model: Callable[[], torch.nn.Module], recipe: Recipe = Recipe()) -> None:
    """Train build_model() on the task as args and the recipe say; print the metric per epoch and,
    at the end, the test metric at the best epoch (``test rocauc 0.xxxx``)."""
    from ogb.nodeproppred import Evaluator

    set_malloc_thresholds()  # glibc: a resident set flat in depth on CPU (see revgnn_ext/memory.py)
    if args.scale is not None and not args.synthetic:
        raise SystemExit("--scale needs --synthetic")
    _check_paths(task, args)
    rank, world, device = _setup(args)
    recipe.check(args, world)
    cpu_synthetic = args.synthetic and device.type == "cpu"
    if args.synthetic and args.scale is None:
        args.scale = CPU_SYNTHETIC_SCALE if cpu_synthetic else 1.0
    if args.epochs is None:
        args.epochs = 1 if cpu_synthetic else task.epochs
    log = print if rank == 0 else (lambda *a, **k: None)
    resumed = _read_checkpoint(task, args, device) if args.checkpoint and os.path.exists(args.checkpoint) else None

    data = recipe.prepare(_load(task, args, rank, world, device))
    inputs = task.node_inputs(data)
    is_train = torch.zeros(data.num_nodes, dtype=torch.bool, device=device)
    is_train[data.split_idx["train"]] = True
    torch.manual_seed(args.seed)
    try:
        module = build_model().to(device)
    except ValueError as err:  # a model argument out of range (e.g. --hidden-channels): one line
        raise SystemExit(f"the model's arguments (--num-layers, --hidden-channels, ...): {err}") from None
    model = torch.nn.parallel.DistributedDataParallel(module) if world > 1 else module
    optimizer = recipe.optimizer(model.parameters(), args)
    evaluator = Evaluator(task.name)

    source = f"synthetic, scale {args.scale}" if args.synthetic else args.root
    log(f"{task.name} ({source}): {data.num_nodes:,} nodes, {data.edge_index.size(1):,} edges, "
        f"{data.split_idx['train'].numel():,} training nodes")
    log(f"{module}: {sum(p.numel() for p in module.parameters()):,} parameters")
    log(f"device {device}, {world} process(es), {torch.get_num_threads()} threads each; {recipe.describe(args)}")

    start, best = 1, None  # best: {"epoch", "score", "valid", "test"}
    if resumed is not None:
        _restore(resumed, args, module, optimizer)
        start, best, saved_lr = resumed["epoch"] + 1, resumed["best"], resumed["args"]["lr"]
        log(f"resumed from {args.checkpoint} after epoch {start - 1}"
            + (f", with --lr {args.lr} (it was trained with {saved_lr})" if args.lr != saved_lr else ""))
        del resumed  # the model and the optimizer hold their own copies

    m = task.metric
    for epoch in range(start, args.epochs + 1):
        began = time.perf_counter()
        loss, steps = recipe.train_epoch(task, model, optimizer, data, inputs, is_train, args, epoch, rank, world)
        trained = time.perf_counter()
        line = f"epoch {epoch} | loss {loss:.4f}"
        timing = f"{trained - began:.1f} s train ({(trained - began) / steps:.2f} s/step)"
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            result, score = recipe.evaluate(task, module, data, inputs, evaluator)
            line += "".join(f" | {name} {value:.4f}" for name, value in result.items())
            timing += f", {time.perf_counter() - trained:.1f} s eval"
            if best is None or score > best["score"]:
                best = {"epoch": epoch, "score": score, "valid": result[f"valid {m}"], "test": result[f"test {m}"]}
                recipe.on_best(args, rank)
        line += f" | {timing}"
        log(line, flush=True)
        if args.checkpoint and rank == 0:
            state = {"model": module.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "best": best,
                     "task": task.name, "args": vars(args)}
            torch.save(state, args.checkpoint + ".tmp")
            os.replace(args.checkpoint + ".tmp", args.checkpoint)  # never a half-written checkpoint
    if best is None:
        raise SystemExit(f"--checkpoint {args.checkpoint} is at epoch {start - 1} >= --epochs {args.epochs} "
                         "and holds no evaluation: raise --epochs")
    log(f"best valid {m} {best['valid']:.4f} at epoch {best['epoch']}")
    log(f"test {m} {best['test']:.4f}")
    if world > 1:
        dist.destroy_process_group()
