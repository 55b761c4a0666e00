"""Shared fixtures: devices, dtypes, graph shapes; the one set of graph, gradient and error helpers."""
import collections
import contextlib
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import zlib

# torch.compile's on-disk cache does not key on a custom op's schema: each test run compiles afresh.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="revgnn_ext_inductor_"))

import pytest  # noqa: E402
import torch  # noqa: E402

from revgnn_ext import CSRGraph, emulator  # noqa: E402
from revgnn_ext.datasets import power_law_graph  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

# "emu": the CUDA kernels on the CPU under revgnn_ext.emulator (CPU tensors; see _emulated_cuda).
MARKS = {"cpu": [], "cuda": [pytest.mark.skipif(not HAS_CUDA, reason="no GPU")],
         "emu": [pytest.mark.emu, pytest.mark.skipif(not emulator.available(),
                                                     reason="emulated CUDA kernels not built (REVGNN_EXT_EMULATOR=1)")]}

DEVICES = ["cpu", pytest.param("cuda", marks=MARKS["cuda"]), pytest.param("cpu", marks=MARKS["emu"], id="emu")]


def device_dtype_params():
    """(device, dtype) pairs: CPU float32/float64; CUDA and its emulation also float16/bfloat16."""
    low = [torch.float16, torch.bfloat16]
    return [pytest.param("cpu" if dev == "emu" else dev, dt, marks=MARKS[dev], id=f"{dev}-{str(dt).split('.')[-1]}")
            for dev in ("cpu", "cuda", "emu") for dt in [torch.float32, torch.float64] + (low if dev != "cpu" else [])]


def random_edges(num_nodes, num_edges, seed=0):
    """edge_index [2, num_edges] with uniformly random endpoints (self loops and duplicates occur)."""
    return torch.randint(0, num_nodes, (2, num_edges), generator=torch.Generator().manual_seed(seed))


def make_graph(shape, seed=0):
    """(edge_index, num_nodes) for a named graph shape; num_nodes may be a (src, dst) pair."""
    gen = torch.Generator().manual_seed(seed)
    if shape == "random":
        return random_edges(40, 300, seed), 40
    if shape == "no_edges":
        return torch.empty(2, 0, dtype=torch.long), 7
    if shape == "isolated":  # edges only among the first 10 of 30 nodes
        return torch.randint(0, 10, (2, 60), generator=gen), 30
    if shape == "self_loops":
        ei = torch.randint(0, 20, (2, 80), generator=gen)
        loops = torch.arange(20).repeat(2, 1)
        return torch.cat([ei, loops], 1), 20
    if shape == "duplicates":
        ei = torch.randint(0, 15, (2, 40), generator=gen)
        return torch.cat([ei, ei, ei[:, :10]], 1), 15
    if shape == "bipartite":
        src = torch.randint(0, 30, (150,), generator=gen)
        dst = torch.randint(0, 17, (150,), generator=gen)
        return torch.stack([src, dst]), (30, 17)
    if shape == "power_law":  # hubs both ways: the largest in- and out-degrees over a quarter of the edges
        return power_law_graph(300, 3000, exponent=1.8, seed=seed), 300
    raise ValueError(shape)


def graph_inputs(shape, channels, edge_dim=None, dtype=torch.float64, device="cpu"):
    """(x, edge_index) of make_graph(shape), and edge_attr if `edge_dim`: random features that require grad."""
    edge_index, n = make_graph(shape)
    x = torch.randn(n, channels, dtype=dtype, device=device, requires_grad=True)
    if edge_dim is None:
        return x, edge_index.to(device)
    return x, edge_index.to(device), torch.randn(edge_index.size(1), edge_dim, dtype=dtype, device=device,
                                                 requires_grad=True)


def sparse_adj_t(edge_index, values, num_src, num_dst, layout="coo"):
    """PyG's adj_t of a graph (rows = destinations; values [E] or [E, F]), as a coalesced COO or a CSR tensor."""
    coo = torch.sparse_coo_tensor(edge_index.flip(0), values, (num_dst, num_src) + tuple(values.shape[1:])).coalesce()
    return coo if layout in ("coo", torch.sparse_coo) else coo.to_sparse_csr()


def config_id(config):
    return "-".join(f"{k}={v}" for k, v in config.items()) or "default"


def csr_graph(shape="random", device="cpu", seed=0, shuffled=False, unique=False):
    """make_graph(shape, seed) as a CSRGraph; `shuffled`: edge order not CSR order; `unique`: no duplicate edges."""
    edge_index, n = make_graph(shape, seed)
    if shuffled:
        gen = torch.Generator().manual_seed(seed + 1)
        edge_index = edge_index[:, torch.randperm(edge_index.size(1), generator=gen)]
    if unique:
        edge_index = edge_index.unique(dim=1)
    return CSRGraph.from_edge_index(edge_index, n).to(device)


@contextlib.contextmanager
def raises(exc, *names):
    """pytest.raises(exc) whose message names each of `names` (as a whole word where it starts/ends with \\w)."""
    with pytest.raises(exc) as info:
        yield info
    message = str(info.value)
    for name in names:
        pattern = re.escape(name)
        if re.match(r"\w", name[0]):
            pattern = r"(?<!\w)" + pattern
        if re.match(r"\w", name[-1]):
            pattern += r"(?!\w)"
        assert re.search(pattern, message), f"{name!r} is not named in {type(info.value).__name__}: {message}"


def grads(out, inputs, gout=None):
    """The gradients of `inputs` (None where unused or `out` needs no grad) for `gout` (default: fixed random)."""
    if not out.requires_grad:
        return [None] * len(inputs)
    if gout is None:
        gout = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).to(out)
    return list(torch.autograd.grad(out, inputs, gout, allow_unused=True))


def module_grads(module, args, autocast=False):
    """module(*args) (seeded; under CPU bfloat16 autocast if `autocast`) and, by name ("input0", ..., then
    parameter names), the gradients of the args that require grad and of every parameter."""
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = module(*args)
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    names = [f"input{i}" for i in range(len(inputs))] + [n for n, _ in module.named_parameters()]
    gout = torch.randn(out.shape, dtype=torch.float64).to(out)
    return out, dict(zip(names, grads(out, inputs + list(module.parameters()), gout)))


def fresh_process_json(script, *args):
    """The JSON last line `script` prints in a fresh process without MALLOC_ variables; skips on exit code 3."""
    result = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                            timeout=300, env={k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")})
    if result.returncode == 3:
        pytest.skip("set_malloc_thresholds does nothing here (not glibc)")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_same_across_thread_counts(step):
    """step() -> tensors, run with 1 thread, all threads, 1, all: the same bits each time."""
    old = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, old, 1, old):
            torch.set_num_threads(threads)
            runs.append(list(step()))
    finally:
        torch.set_num_threads(old)
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


def max_cpu_allocation(fn) -> int:
    """The largest single CPU allocation (bytes) while fn() runs, by torch's profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0), default=0)


def assert_error_within_twice(ours, same_dtype, exact, rtol, name="result"):
    """Error against the float64 truth `exact` at most twice `same_dtype`'s, plus `rtol` at exact's scale; same NaNs."""
    exact = exact.double()
    ours, same_dtype = ours.double(), same_dtype.double()
    assert torch.equal(torch.isnan(ours), torch.isnan(exact)), f"{name}: NaNs differ"
    if exact.numel() == 0:
        return
    err = (ours - exact).abs().nan_to_num().max().item()
    err_ref = (same_dtype - exact).abs().nan_to_num().max().item()
    slack = rtol * (1 + exact.abs().nan_to_num().max().item())
    assert err <= 2 * err_ref + slack, f"{name}: error {err:.3g}, the reference's {err_ref:.3g} (+ {slack:.3g})"


def assert_same_as_pyg(ours, ref, out_ours, out_ref, inputs, tol):
    """Our layer and PyG's (same state_dict): same output and gradients of `inputs` and every parameter."""
    torch.testing.assert_close(out_ours, out_ref, rtol=tol, atol=tol)
    gout = torch.randn_like(out_ours)
    for a, b in zip(grads(out_ours, inputs + list(ours.parameters()), gout),
                    grads(out_ref, inputs + list(ref.parameters()), gout)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def compare_with_pyg(ours, ref, args, slack=None, autocast=False):
    """module_grads of our layer and PyG's `ref` (same state): the output and every gradient to 1e-10 if `slack` is
    None; otherwise (in lower precision, or under bfloat16 autocast) within twice PyG's error against the float64
    truth (a float64 copy of `ref` on the same inputs), plus `slack` at the truth's scale. Returns our output."""
    out_o, grads_o = module_grads(ours, args, autocast)
    out_r, grads_r = module_grads(ref, args, autocast)
    if slack is None:
        def check(a, b, name):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")
    else:
        args64 = [a.detach().double().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor)
                  and a.is_floating_point() else a for a in args]
        out_x, truth = module_grads(copy.deepcopy(ref).double(), args64)
        truth["output"] = out_x

        def check(a, b, name):
            assert_error_within_twice(a, b, truth[name], slack, name=name)
    check(out_o, out_r, "output")
    for name, a in grads_o.items():
        if a is not None or grads_r[name] is not None:
            check(a, grads_r[name], name)
    return out_o


def assert_compiles_as_eager(f, make_inputs, names):
    """torch.compile(f, fullgraph=True) gives f's output and gradients of sum(output) for the inputs in ``names``."""
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    eager_in, compiled_in = make_inputs(), make_inputs()
    torch.testing.assert_close(compiled(**compiled_in), f(**eager_in))
    compiled(**compiled_in).sum().backward()
    f(**eager_in).sum().backward()
    for k in names:
        torch.testing.assert_close(compiled_in[k].grad, eager_in[k].grad)


SHAPES = ["random", "no_edges", "isolated", "self_loops", "duplicates", "bipartite", "power_law"]


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _emulated_cuda(request):
    """An "emu" case runs its ops' CUDA kernels under the emulator, with a scheduling seed of its own."""
    if request.node.get_closest_marker("emu") is None:
        yield
        return
    with emulator.emulated(seed=zlib.crc32(request.node.nodeid.encode())):
        yield


def pytest_configure(config):
    config.addinivalue_line("markers", "compile: runs torch.compile (slow to compile; deselect with -m 'not compile')")
    config.addinivalue_line("markers", "emu: runs the CUDA kernels under the emulator (revgnn_ext.emulator)")


_EMULATED_OUTCOMES = collections.Counter()


def pytest_runtest_logreport(report):
    if "emu" in report.keywords and (report.when == "call" or report.outcome != "passed"):
        _EMULATED_OUTCOMES[report.outcome] += 1


def pytest_terminal_summary(terminalreporter):
    if _EMULATED_OUTCOMES:
        terminalreporter.write_line(
            "emulated CUDA cases: " + ", ".join(f"{n} {k}" for k, n in sorted(_EMULATED_OUTCOMES.items())))


def check_compiled_training(model, calls, lr=0.05):
    """torch.compile(model) and an eager copy each take an SGD step on mean(out ** 2) per argument tuple of
    ``calls``: same losses and gradients (float64, 1e-9); repeated argument types and shapes do not recompile."""
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    optimizers = [torch.optim.SGD(m.parameters(), lr=lr) for m in (model, eager)]
    seen = set()
    for step, args in enumerate(calls):
        signature = tuple((type(a), tuple(a.shape)) if isinstance(a, torch.Tensor) else type(a) for a in args)
        results = []
        for module, repeat in ((compiled, signature in seen), (eager, False)):
            # each tensor that requires grad replaced by a fresh leaf of the same values
            leaves = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and a.requires_grad else a
                      for a in args]
            with torch._dynamo.config.patch(error_on_recompile=repeat):
                loss = module(*leaves).square().mean()
                loss.backward()
            results.append([loss] + [a.grad for a in leaves if isinstance(a, torch.Tensor) and a.requires_grad]
                           + [p.grad for p in module.parameters()])
        seen.add(signature)
        for i, (a, b) in enumerate(zip(*results)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"step {step}, tensor {i}: {m}")
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()


def plain_copy(module):
    """A deep copy of `module` whose reversible blocks run under plain autograd (disable=True)."""
    plain = copy.deepcopy(module)
    for m in plain.modules():
        if hasattr(m, "disable"):
            m.disable = True
    return plain
