"""The OGB examples end to end, as subprocesses, with tiny models: through ogb's real loader and
Evaluator on dataset directories written here in ogb's raw format (no download), with
--synthetic, resuming from a checkpoint, and as 2 gloo processes under torchrun."""
import gzip
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ogb")
pytest.importorskip("tqdm")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = {"ogbn-proteins": ("ogbn_proteins.py", "rocauc"), "ogbn-products": ("ogbn_products.py", "acc")}
TINY = ["--epochs", "1", "--num-layers", "2", "--hidden-channels", "16", "--num-parts", "2"]


def _csv(path: Path, rows, fmt: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        np.savetxt(f, rows, fmt=fmt, delimiter=",")


def write_ogb_dataset(root: Path, name: str, num_nodes: int = 300, num_edges: int = 1500):
    """A small random graph in the layout ogb 1.3.6 reads for ``name`` (its master.csv): one
    undirected edge per row of raw/edge.csv.gz (ogb adds the reverse edges), the split in
    split/<split type>/, and RELEASE_v1.txt, without which ogb offers to download again."""
    rng = np.random.default_rng(0)
    home = root / name.replace("-", "_")
    raw = home / "raw"
    _csv(raw / "edge.csv.gz", rng.integers(0, num_nodes, (num_edges, 2)), "%d")
    _csv(raw / "num-node-list.csv.gz", [[num_nodes]], "%d")
    _csv(raw / "num-edge-list.csv.gz", [[num_edges]], "%d")
    if name == "ogbn-proteins":
        species = [3702, 4932, 6239, 7227, 7955, 9606, 10090, 511145]  # the real taxonomy ids
        _csv(raw / "node_species.csv.gz", rng.choice(species, (num_nodes, 1)), "%d")
        _csv(raw / "edge-feat.csv.gz", rng.random((num_edges, 8)), "%.3f")
        _csv(raw / "node-label.csv.gz", rng.integers(0, 2, (num_nodes, 112)), "%d")
        split = "species"
    else:
        _csv(raw / "node-feat.csv.gz", rng.standard_normal((num_nodes, 100)), "%.4f")
        _csv(raw / "node-label.csv.gz", rng.integers(0, 47, (num_nodes, 1)), "%d")
        split = "sales_ranking"
    order = rng.permutation(num_nodes)
    for part, idx in zip(("train", "valid", "test"), np.split(order, [num_nodes // 2, 3 * num_nodes // 4])):
        _csv(home / "split" / split / f"{part}.csv.gz", idx[:, None], "%d")
    (home / "RELEASE_v1.txt").write_text("written by tests/test_examples.py\n")


def run(command) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    assert "Downloading" not in result.stdout + result.stderr
    return result.stdout


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
    write_ogb_dataset(tmp_path, name)
    script, metric = SCRIPTS[name]
    command = [sys.executable, str(EXAMPLES / script), "--root", str(tmp_path), "--device", "cpu", *TINY]
    checkpoint = ["--checkpoint", str(tmp_path / "checkpoint.pt")]
    first = run(command + checkpoint)
    assert (tmp_path / name.replace("-", "_") / "processed" / "geometric_data_processed.pt").exists()
    assert f"{name} ({tmp_path}): 300 nodes, 3,000 edges, 150 training nodes" in first
    assert re.search(rf"^epoch 1 \| loss \d+\.\d+ .* \| valid {metric} 0\.\d+ \| test {metric}", first, re.MULTILINE)
    assert 0.0 <= final_metric(first, metric) <= 1.0

    second = run(command + checkpoint + ["--epochs", "2"])
    assert "resumed from" in second and "after epoch 1" in second
    assert "epoch 1 |" not in second
    # The resumed epoch 2 is the epoch 2 of an uninterrupted run (timings aside).
    uninterrupted = run(command + ["--epochs", "2"])
    assert epoch_line(second, 2) == epoch_line(uninterrupted, 2)
    assert final_metric(second, metric) == final_metric(uninterrupted, metric)


@pytest.mark.parametrize("name, extra", [("ogbn-proteins", ["--scale", "0.001"]),
                                         ("ogbn-products", ["--scale", "0.0002", "--full-graph"])])
def test_synthetic(name, extra):
    script, metric = SCRIPTS[name]
    tiny = TINY[:-2] if "--full-graph" in extra else TINY
    out = run([sys.executable, str(EXAMPLES / script), "--synthetic", "--device", "cpu", *extra, *tiny])
    assert f"{name} (synthetic, scale {extra[1]})" in out
    final_metric(out, metric)


def test_torchrun_two_processes():
    script, metric = SCRIPTS["ogbn-proteins"]
    out = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(EXAMPLES / script), "--synthetic", "--scale", "0.001", "--device", "cpu", *TINY])
    assert "2 process(es)" in out
    assert out.count("epoch 1 |") == 1
    final_metric(out, metric)
