"""revgnn_ext.memory: with set_malloc_thresholds a deep reversible model's resident set stays flat in depth on CPU;
PeakMemory measures a region's own peak; the demo's reversible model peaks well below its plain twin."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from revgnn_ext.memory import PeakMemory, available_memory, set_malloc_thresholds

from conftest import fresh_process_json, raises

LINUX = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")

NODES, HIDDEN = 4000, 64
SHALLOW, DEEP = 2, 32

# As examples/demo.py: the thresholds at start-up, RevGNN-Deep trained with Adam (its state made first); prints
# each of two steps' resident-set peak above the resident set before it.
SCRIPT = """
import json, sys
from revgnn_ext.memory import PeakMemory, set_malloc_thresholds
if not set_malloc_thresholds():
    sys.exit(3)
import torch
import torch.nn.functional as F
from revgnn_ext.datasets import synthetic_proteins
from revgnn_ext.nn import RevGNN

layers, nodes, hidden = map(int, sys.argv[1:])
torch.manual_seed(0)
data = synthetic_proteins(num_nodes=nodes, mean_degree=10, seed=0)
model = RevGNN.preset("proteins-deep", num_layers=layers, hidden_channels=hidden)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
for p in model.parameters():
    p.grad = torch.zeros_like(p)
optimizer.step()
peaks = []
for step in range(2):
    with PeakMemory("cpu") as memory:
        optimizer.zero_grad(set_to_none=False)
        F.binary_cross_entropy_with_logits(model(data.x, data.edge_index, data.edge_attr), data.y).backward()
        optimizer.step()
    peaks.append(memory.peak)
print(json.dumps(peaks))
"""


@LINUX
def test_resident_set_flat_in_depth():
    shallow, deep = (fresh_process_json(SCRIPT, layers, NODES, HIDDEN) for layers in (SHALLOW, DEEP))
    activation = NODES * HIDDEN * 4
    # Measured: the first step grows by 0.05 MB per added layer, 2 MB (two activations) without the thresholds.
    for step, (a, b) in enumerate(zip(shallow, deep), 1):
        assert b - a < 0.25 * (DEEP - SHALLOW) * activation, \
            f"step {step}: resident peak {a / 2**20:.1f} MB at {SHALLOW} layers, {b / 2**20:.1f} MB at {DEEP}"


def test_process_environment_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert set_malloc_thresholds() is False


@pytest.mark.parametrize("kwargs", [dict(mmap_threshold=0), dict(trim_threshold=-1), dict(mmap_threshold=2**26)])
def test_bad_thresholds(kwargs):
    with raises(ValueError, "set_malloc_thresholds", *kwargs):
        set_malloc_thresholds(**kwargs)


@LINUX
def test_peak_memory_is_the_regions_own():
    """The peak counts what the region touches, not a larger block freed before it."""
    mb = 2**20
    big = torch.ones(200 * mb // 4)
    del big
    with PeakMemory("cpu") as memory:
        small = torch.ones(32 * mb // 4)
    assert 30 * mb < memory.peak < 100 * mb, f"peak {memory.peak / mb:.1f} MB for a 32 MB tensor"
    assert memory.start > 0
    del small


def test_available_memory():
    assert available_memory("cpu") > 0


@LINUX
def test_demo_reversible_peaks_below_plain():
    """examples/demo.py, tiny: both models train; the reversible one's peak well below the plain one's."""
    demo = Path(__file__).resolve().parents[1] / "examples" / "demo.py"
    result = subprocess.run([sys.executable, str(demo), "--device", "cpu", "--layers", "8", "--nodes", "1500",
                             "--hidden", "32", "--degree", "10", "--steps", "2"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    peaks = {name: float(mb.replace(",", "")) for name, mb in
             re.findall(r"^\| (RevGNN \(reversible\)|plain autograd) \| [\d.]+ \| ([\d,]+) \|", result.stdout, re.M)}
    assert set(peaks) == {"RevGNN (reversible)", "plain autograd"}, result.stdout
    assert 2 * peaks["RevGNN (reversible)"] < peaks["plain autograd"], result.stdout
