"""The OGB examples end to end with tiny models: ogb's loader on raw files written here, --synthetic, resuming,
torchrun; whole-graph edge sums in the proteins partitions; runs that never lose work (one-line errors)."""
import gzip
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("ogb")
pytest.importorskip("tqdm")

from revgnn_ext.datasets import synthetic_proteins  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = ["--epochs", "1", "--num-layers", "2", "--hidden-channels", "16", "--num-parts", "2"]
# name: (script, its metric, a tiny model's arguments, the scale of a tiny synthetic graph)
SCRIPTS = {"ogbn-proteins": ("ogbn_proteins.py", "rocauc", TINY, "0.001"),
           "ogbn-products": ("ogbn_products.py", "acc", TINY, "0.0002"),
           "ogbn-arxiv": ("ogbn_arxiv.py", "acc", ["--epochs", "1", "--num-layers", "3", "--hidden-channels", "8"],
                          "0.002")}
SYNTHETIC = [sys.executable, str(EXAMPLES / "ogbn_proteins.py"), "--synthetic", "--scale", "0.001", "--device", "cpu",
             *TINY]


def _csv(path: Path, rows, fmt: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        np.savetxt(f, rows, fmt=fmt, delimiter=",")


def write_ogb_dataset(root: Path, name: str, num_nodes: int = 300, num_edges: int = 1500):
    """A small random graph in ogb 1.3.6's raw layout for ``name`` (RELEASE_v1.txt: no download); its edges."""
    rng = np.random.default_rng(0)
    home = root / name.replace("-", "_")
    raw = home / "raw"
    edges = rng.integers(0, num_nodes, (num_edges, 2))
    _csv(raw / "edge.csv.gz", edges, "%d")
    _csv(raw / "num-node-list.csv.gz", [[num_nodes]], "%d")
    _csv(raw / "num-edge-list.csv.gz", [[num_edges]], "%d")
    if name == "ogbn-proteins":
        species = [3702, 4932, 6239, 7227, 7955, 9606, 10090, 511145]  # the real taxonomy ids
        _csv(raw / "node_species.csv.gz", rng.choice(species, (num_nodes, 1)), "%d")
        _csv(raw / "edge-feat.csv.gz", rng.random((num_edges, 8)), "%.3f")
        _csv(raw / "node-label.csv.gz", rng.integers(0, 2, (num_nodes, 112)), "%d")
        split = "species"
    elif name == "ogbn-arxiv":
        _csv(raw / "node-feat.csv.gz", rng.standard_normal((num_nodes, 128)), "%.4f")
        _csv(raw / "node-label.csv.gz", rng.integers(0, 40, (num_nodes, 1)), "%d")
        _csv(raw / "node_year.csv.gz", rng.integers(2000, 2021, (num_nodes, 1)), "%d")
        split = "time"
    else:
        _csv(raw / "node-feat.csv.gz", rng.standard_normal((num_nodes, 100)), "%.4f")
        _csv(raw / "node-label.csv.gz", rng.integers(0, 47, (num_nodes, 1)), "%d")
        split = "sales_ranking"
    order = rng.permutation(num_nodes)
    for part, idx in zip(("train", "valid", "test"), np.split(order, [num_nodes // 2, 3 * num_nodes // 4])):
        _csv(home / "split" / split / f"{part}.csv.gz", idx[:, None], "%d")
    (home / "RELEASE_v1.txt").write_text("written by tests/test_examples.py\n")
    return torch.from_numpy(edges).T


def run(command) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    assert "Downloading" not in result.stdout + result.stderr
    return result.stdout


def fails(command) -> tuple:
    """(message, stdout) of a command that must fail with a one-line message and no traceback."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode != 0, f"{command} succeeded:\n{result.stdout}"
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr.splitlines()[-1], result.stdout  # splitlines also ends tqdm's \r-lines


def final_metric(out: str, metric: str) -> float:
    """The last line, ``test <metric> 0.xxxx``; once only (rank 0 alone prints)."""
    found = re.findall(rf"^test {metric} (\d\.\d{{4}})$", out, re.MULTILINE)
    assert len(found) == 1 and out.rstrip().endswith(f"test {metric} {found[0]}"), out
    return float(found[0])


def epoch_line(out: str, epoch: int) -> str:
    """The line of ``epoch`` without its timings."""
    return re.search(rf"^epoch {epoch} \|.*(?= \| [\d.]+ s train)", out, re.MULTILINE).group(0)


@pytest.mark.parametrize("name", SCRIPTS)
def test_ogb_directory_and_resume(tmp_path, name):
    """ogb's loader and Evaluator; a resumed run equals an uninterrupted one; a damaged dataset file is one line."""
    edges = write_ogb_dataset(tmp_path, name)
    if name == "ogbn-arxiv":
        both = torch.cat([edges, edges.flip(0)], 1)
        num_edges = torch.unique(both[:, both[0] != both[1]], dim=1).size(1) + 300
    else:
        num_edges = 2 * edges.size(1)
    script, metric, tiny, _ = SCRIPTS[name]
    command = [sys.executable, str(EXAMPLES / script), "--root", str(tmp_path), "--device", "cpu", *tiny]
    checkpoint = ["--checkpoint", str(tmp_path / "checkpoint.pt")]
    first = run(command + checkpoint)
    assert (tmp_path / name.replace("-", "_") / "processed" / "geometric_data_processed.pt").exists()
    assert f"{name} ({tmp_path}): 300 nodes, {num_edges:,} edges, 150 training nodes" in first
    assert re.search(rf"^epoch 1 \| loss \d+\.\d+ .* \| valid {metric} 0\.\d+ \| test {metric}", first, re.MULTILINE)
    assert 0.0 <= final_metric(first, metric) <= 1.0

    second = run(command + checkpoint + ["--epochs", "2"])
    assert "resumed from" in second and "after epoch 1" in second
    assert "epoch 1 |" not in second
    uninterrupted = run(command + ["--epochs", "2"])
    assert epoch_line(second, 2) == epoch_line(uninterrupted, 2)
    assert final_metric(second, metric) == final_metric(uninterrupted, metric)

    processed = tmp_path / name.replace("-", "_") / "processed" / "geometric_data_processed.pt"
    processed.write_bytes(processed.read_bytes()[:1000])  # a damaged dataset file
    message, _ = fails(command)
    assert message.startswith(f"{name} in --root {tmp_path}: cannot load it ("), message


def test_missing_root_is_one_line(tmp_path):
    message, out = fails([sys.executable, str(EXAMPLES / "ogbn_products.py"), "--root", str(tmp_path / "missing")])
    assert message == (f"--root {tmp_path / 'missing'}: no such directory. Create it (ogb then downloads "
                       "ogbn-products into it), point --root at the directory that holds ogbn_products/, or train "
                       "with --synthetic"), message
    assert out == "" and not (tmp_path / "missing").exists()


@pytest.mark.parametrize("flag, value", [("--layers", "0"), ("--nodes", "0"), ("--steps", "0"), ("--degree", "-1"),
                                         ("--degree", "inf"), ("--hidden", "8"), ("--hidden", "7"), ("--hidden", "0")])
def test_demo_arguments_out_of_range_are_one_line(flag, value):
    """demo.py refuses a value out of range (--hidden 8: the edge features' width; 7: not 2 groups) before any work."""
    message, out = fails([sys.executable, str(EXAMPLES / "demo.py"), flag, value])
    assert message.startswith(f"demo.py: error: argument {flag}: "), message
    assert out == ""


@pytest.mark.parametrize("flag, value", [("--hidden-channels", "8"), ("--hidden-channels", "7"),
                                         ("--num-layers", "0"), ("--dropout", "1")])
def test_ogb_model_arguments_out_of_range_are_one_line(flag, value):
    message, _ = fails([*SYNTHETIC, flag, value])
    assert flag.lstrip("-").replace("-", "_") in message or flag in message, message


@pytest.mark.parametrize("name, args, expected", [
    ("ogbn-proteins", TINY, []), ("ogbn-products", ["--full-graph", *TINY[:-2]], []),
    ("ogbn-proteins", ["--model", "deq", "--epochs", "1", "--hidden-channels", "16", "--num-parts", "2"],
     ["num_layers=1, conv='gen'", "equilibrium=True"])], ids=["proteins", "products-full-graph", "proteins-deq"])
def test_synthetic(name, args, expected):
    script, metric, _, scale = SCRIPTS[name]
    out = run([sys.executable, str(EXAMPLES / script), "--synthetic", "--device", "cpu", "--scale", scale, *args])
    assert all(line in out for line in [f"{name} (synthetic, scale {scale})", *expected]), out
    final_metric(out, metric)


@pytest.mark.parametrize("name", ["ogbn-proteins", "ogbn-arxiv"])
def test_torchrun_two_processes(name):
    script, metric, tiny, scale = SCRIPTS[name]
    out = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(EXAMPLES / script), "--synthetic", "--scale", scale, "--device", "cpu", *tiny])
    assert "2 process(es)" in out
    assert out.count("epoch 1 |") == 1
    final_metric(out, metric)


def test_proteins_partitions_look_up_whole_graph_edge_sums(monkeypatch):
    """The example's partitions get their nodes' whole-graph edge sums (not their own edges'); so does evaluation."""
    from torch_geometric.utils import subgraph

    monkeypatch.syspath_prepend(str(EXAMPLES))
    import ogbn_proteins

    calls = []

    class Recording(ogbn_proteins.RevGNN):
        def forward(self, x, edge_index, edge_attr=None, edge_sums=None):
            calls.append((self.training, x, edge_index, edge_attr, edge_sums))
            return super().forward(x, edge_index, edge_attr, edge_sums)

    monkeypatch.setattr(ogbn_proteins, "RevGNN", Recording)
    monkeypatch.setattr(sys, "argv", ["ogbn_proteins.py", "--synthetic", "--scale", "0.0005", "--device", "cpu", *TINY])
    ogbn_proteins.main()

    data = synthetic_proteins(0.0005, seed=0)
    sums = torch.zeros(data.num_nodes, 8).index_add_(0, data.edge_index[0], data.edge_attr)
    parts = [call[1:] for call in calls if call[0]]
    assert len(parts) == 2
    seen = []
    for x, edge_index, edge_attr, edge_sums in parts:
        nodes = torch.cdist(edge_sums, sums).argmin(dim=1)  # whose whole-graph sums the part was given
        torch.testing.assert_close(edge_sums, sums[nodes], rtol=1e-5, atol=1e-5)  # float32 sums of ~600 edges
        assert torch.equal(x, data.x[nodes])  # the subgraph induced by those nodes, in their order
        sub_index, sub_attr = subgraph(nodes, data.edge_index, data.edge_attr, relabel_nodes=True,
                                       num_nodes=data.num_nodes)
        assert torch.equal(edge_index, sub_index) and torch.equal(edge_attr, sub_attr)
        own = torch.zeros(nodes.numel(), 8).index_add_(0, sub_index[0], sub_attr)
        assert own.sum() < 0.75 * edge_sums.sum()  # the part's own sums: about half, with 2 parts
        seen.append(nodes)
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(data.num_nodes))  # a partition
    (_, x, edge_index, edge_attr, edge_sums), = [call for call in calls if not call[0]]
    assert x.size(0) == data.num_nodes
    torch.testing.assert_close(edge_sums, sums, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A one-epoch checkpoint of the synthetic proteins run, in directories that did not exist."""
    path = tmp_path_factory.mktemp("trained") / "new" / "dir" / "checkpoint.pt"
    run(SYNTHETIC + ["--checkpoint", str(path)])
    return path


@pytest.fixture
def checkpoint(trained, tmp_path) -> Path:
    """A copy of the trained checkpoint for one test to resume from."""
    return Path(shutil.copy(trained, tmp_path / "checkpoint.pt"))


def test_checkpoint_directory_is_made_before_training(trained, tmp_path):
    assert trained.is_file()  # its directories were created
    (tmp_path / "file").write_text("")
    message, out = fails(SYNTHETIC + ["--checkpoint", str(tmp_path / "file" / "checkpoint.pt")])
    assert message.startswith("--checkpoint") and "cannot create its directory" in message, message
    assert out == ""  # nothing trained, nothing even loaded
    message, out = fails(SYNTHETIC + ["--checkpoint", str(tmp_path)])
    assert message == f"--checkpoint {tmp_path} is a directory: give a file path" and out == ""


def test_diverging_run_keeps_the_good_checkpoint(checkpoint):
    good = checkpoint.read_bytes()
    message, out = fails(SYNTHETIC + ["--checkpoint", str(checkpoint), "--epochs", "3", "--lr", "1e30"])
    assert re.fullmatch(rf"epoch 2, step [12]: training diverged \(loss \S+, gradient norm \S+\), the weights are "
                        rf"no longer finite\. Stopped; {re.escape(str(checkpoint))} keeps epoch 1: resume from it "
                        rf"with a lower --lr", message), message
    assert "epoch 2 |" not in out
    assert checkpoint.read_bytes() == good and list(checkpoint.parent.iterdir()) == [checkpoint]
    state = torch.load(checkpoint, weights_only=True)
    assert state["epoch"] == 1 and all(value.isfinite().all() for value in state["model"].values())


def test_resume_takes_a_new_lr(checkpoint):
    out = run(SYNTHETIC + ["--checkpoint", str(checkpoint), "--epochs", "2", "--lr", "0.01"])
    assert f"resumed from {checkpoint} after epoch 1, with --lr 0.01 (it was trained with 0.001)" in out
    state = torch.load(checkpoint, weights_only=True)
    assert state["epoch"] == 2 and state["args"]["lr"] == 0.01
    assert [group["lr"] for group in state["optimizer"]["param_groups"]] == [0.01]  # what Adam stepped with


@pytest.mark.parametrize("change, was, now", [
    (["--dropout", "0.3", "--seed", "1"], "--dropout (default) --seed 0", "--dropout 0.3 --seed 1"),
    (["--hidden-channels", "32"], "--hidden-channels 16", "--hidden-channels 32"),
])
def test_resume_refuses_other_changed_arguments(checkpoint, change, was, now):
    good = checkpoint.read_bytes()
    message, out = fails(SYNTHETIC + ["--checkpoint", str(checkpoint), "--epochs", "2", *change])
    assert message.startswith(f"--checkpoint {checkpoint} was written with {was}, this run has {now}: repeat those "
                              "to resume it (only --lr, --epochs, --eval-every, --checkpoint, --device, --root may "
                              "change)"), message
    assert out == "" and checkpoint.read_bytes() == good


@pytest.mark.parametrize("content", ["text", "truncated", "other format", "other task"])
def test_unreadable_checkpoint_is_one_line(trained, tmp_path, content):
    path = tmp_path / "checkpoint.pt"
    if content == "text":
        path.write_text("not a checkpoint\n")
    elif content == "truncated":
        path.write_bytes(trained.read_bytes()[:2000])
    elif content == "other format":
        torch.save({"model": {}, "epoch": 1}, path)
    else:
        torch.save({**torch.load(trained, weights_only=True), "task": "ogbn-products"}, path)
    message, out = fails(SYNTHETIC + ["--checkpoint", str(path)])
    if content == "other task":
        assert message == f"--checkpoint {path} holds a run on ogbn-products, not ogbn-proteins: give another path"
    else:
        assert re.fullmatch(rf"--checkpoint {re.escape(str(path))} is not a checkpoint of this script \(\w+: .*\): "
                            "delete it or give another path", message), message
    assert out == ""
