"""PyG's own tests of GENConv, SAGEConv, GCNConv, GATConv and GroupAddRev against revgnn_ext's classes, patched in
by this module as a plugin of a pytest subprocess. Skipped unless REVGNN_PYG_SOURCE is a PyG source checkout of
the installed version (for 2.8.1, tag 2.8.0.post1):

    git clone --depth 1 --branch 2.8.0.post1 https://github.com/pyg-team/pytorch_geometric /tmp/pyg
    REVGNN_PYG_SOURCE=/tmp/pyg python -m pytest tests/test_pyg_suites.py

With FULL_TEST=1 PyG's tests also script the layers: the only failures allowed are our TorchScript refusal.
"""
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

PATCHED = ("GENConv", "SAGEConv", "GCNConv", "GATConv", "GroupAddRev")
SUITES = {"GENConv": "test/nn/conv/test_gen_conv.py", "SAGEConv": "test/nn/conv/test_sage_conv.py",
          "GCNConv": "test/nn/conv/test_gcn_conv.py", "GATConv": "test/nn/conv/test_gat_conv.py",
          "GroupAddRev": "test/nn/models/test_rev_gnn.py"}
TORCHSCRIPT_REFUSAL = "TorchScript (torch.jit.script) is not supported"
# PyG tests that script the layer even without FULL_TEST: they may fail with our refusal only.
SCRIPTED_ANYWAY = {"GCNConv": {"test_gcn_conv_with_decomposed_layers"}}


# ---------------------------------------------------------------- the plugin (in the subprocess)
def pytest_configure(config):
    """Our classes replace PyG's wherever PyG's tests import them from."""
    import torch_geometric.nn as pyg_nn
    from torch_geometric.nn import conv, models

    from revgnn_ext import nn as ours
    for name in PATCHED:
        for namespace in (pyg_nn, conv, models):
            if hasattr(namespace, name):
                setattr(namespace, name, getattr(ours, name))


def pytest_collection_modifyitems(session, config, items):
    from revgnn_ext import nn as ours
    for item in items:
        module = vars(item.module)
        stale = [name for name in PATCHED if name in module and module[name] is not getattr(ours, name)]
        if stale:
            raise pytest.UsageError(f"{item.module.__name__} holds PyG's {', '.join(stale)}, not revgnn_ext's")


# ---------------------------------------------------------------- the tests (in our suite)
def _run_suite(suite: str, full_test: bool, tmp_path: Path):
    """(test outcomes {name: failure message or None}, pytest's output) of one PyG test file."""
    source = os.environ.get("REVGNN_PYG_SOURCE")
    if not source:
        pytest.skip("set REVGNN_PYG_SOURCE to a PyG source checkout to run PyG's own tests (see this file)")
    path = Path(source) / SUITES[suite]
    if not path.is_file():
        pytest.skip(f"{path} not found: REVGNN_PYG_SOURCE must be a PyG source checkout")
    report = tmp_path / "report.xml"
    env = dict(os.environ, FULL_TEST="1" if full_test else "0",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "pytest", str(path), "-p", "test_pyg_suites", "-p", "no:cacheprovider",
                           "-o", "addopts=", "-q", f"--junitxml={report}"],
                          cwd=source, env=env, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert report.is_file(), output
    outcomes = {}
    for case in ElementTree.parse(report).iter("testcase"):
        failed = case.find("failure") if case.find("failure") is not None else case.find("error")
        if case.find("skipped") is None:
            outcomes[case.get("name")] = None if failed is None else (failed.get("message") or failed.text or "")
    assert outcomes, output
    return outcomes, output


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_pyg_suite_passes(suite, tmp_path):
    outcomes, output = _run_suite(suite, False, tmp_path)
    failed = {name: message for name, message in outcomes.items() if message is not None
              and not (name in SCRIPTED_ANYWAY.get(suite, ()) and TORCHSCRIPT_REFUSAL in message)}
    assert not failed, f"PyG's tests of {suite} failed against ours: {sorted(failed)}\n{output[-6000:]}"


@pytest.mark.parametrize("suite", ["GENConv", "SAGEConv", "GCNConv", "GATConv"])
def test_pyg_full_suite_fails_only_on_torchscript(suite, tmp_path):
    outcomes, output = _run_suite(suite, True, tmp_path)
    other = {name: message for name, message in outcomes.items()
             if message is not None and TORCHSCRIPT_REFUSAL not in message}
    assert not other, f"PyG's FULL_TEST tests of {suite}: failures other than TorchScript: {other}\n{output[-6000:]}"
