"""What the benchmarks measure, one way each: time (median of runs, CUDA events on GPU), peak
memory (revgnn_ext.memory.PeakMemory: the allocator on GPU, the process's resident set on CPU),
copy bandwidth, gather bandwidth, the machine; and the report (Markdown and JSON)."""
import json
import os
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from revgnn_ext.memory import PeakMemory, available_memory, set_malloc_thresholds

from machine_info import RESULTS, machine, results_dir

__all__ = ["PeakMemory", "available_memory", "set_malloc_thresholds", "output_arguments", "no_gpu", "timed",
           "median_seconds", "short", "check_gradients", "copy_bandwidth", "gather_bandwidth", "machine", "results_dir",
           "plot", "report"]

MIN_REPEAT = 3  # a time budget never cuts a measurement below this many runs


def output_arguments(parser) -> None:
    """--seed, --json and --markdown, which every benchmark takes."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    parser.add_argument("--markdown")


def no_gpu(device: str, what: str) -> bool:
    """Whether --device cuda was asked on a machine without a GPU (then says it skips `what`)."""
    if device == "cuda" and not torch.cuda.is_available():
        print(f"no GPU: skipping {what}")
        return True
    return False


def timed(fn: Callable, device, *args) -> Tuple[object, float]:
    """(fn(*args), seconds): CUDA events around the call on GPU, perf_counter on CPU."""
    if torch.device(device).type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        result = fn(*args)
        end.record()
        end.synchronize()
        return result, begin.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - begin


def short(err: BaseException) -> str:
    """An exception as one short line, for a table's note."""
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:160]}"


def median_seconds(fns: Dict[str, Callable], device, *, inputs: Sequence[tuple] = ((),), warmup: int = 1,
                   repeat: int = 10, budget_s: Optional[float] = None) -> Tuple[Dict[str, float], Dict[str, str]]:
    """Median seconds of each fn over up to ``repeat`` runs after ``warmup`` runs, in interleaved
    rounds (each fn once per round, on the same args) so that all see the same machine load;
    round i takes ``inputs[i % len(inputs)]`` as args (rotating inputs are not cache-hot). A fn
    whose runs would take over ``budget_s`` seconds, judged from its warm-up, gets fewer (at least
    MIN_REPEAT). Returns (medians, short errors of the fns that raised)."""
    errors, runs = {}, {}
    for name, fn in fns.items():
        try:
            _, seconds = timed(lambda: [fn(*inputs[i % len(inputs)]) for i in range(warmup)], device)
        except Exception as err:  # reported to the caller
            errors[name] = short(err)
            continue
        fits = repeat if budget_s is None or warmup == 0 else int(budget_s * warmup / max(seconds, 1e-9))
        runs[name] = min(repeat, max(MIN_REPEAT, fits))
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for i in range(max(runs.values(), default=0)):
        for name, n in runs.items():
            if name not in errors and i < n:
                try:
                    times[name].append(timed(fns[name], device, *inputs[(warmup + i) % len(inputs)])[1])
                except Exception as err:
                    errors[name] = short(err)
    return {name: statistics.median(t) for name, t in times.items() if name not in errors}, errors


def check_gradients(ref: Dict[str, torch.Tensor], other: Dict[str, torch.Tensor], who: str, rtol: float) -> None:
    """`other`'s gradients (by parameter name) equal `ref`'s within `rtol` in relative norm; those
    under 1e-3 of the largest are round-off in both (a bias before a norm) and not compared, and a
    GENConv's learnable t gets 1e-2 (its gradient is a sum of N x D terms that cancel)."""
    largest = max(g.norm().item() for g in ref.values())
    for name, g in ref.items():
        if g.norm().item() >= 1e-3 * largest:
            rel = ((other[name] - g).norm() / g.norm()).item()
            assert rel < (1e-2 if name.endswith(".t") else rtol), \
                f"{who}: gradient of {name} differs by {rel:.1e} (relative norm)"


def copy_bandwidth(device) -> float:
    """Bytes per second (read + written) of a large tensor copy: the practical ceiling of a
    memory-bound kernel. 1 GiB on GPU (well past any L2), 256 MiB on CPU."""
    nbytes = 2**30 if torch.device(device).type == "cuda" else 2**28
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    medians, _ = median_seconds({"copy": lambda: dst.copy_(src)}, device, warmup=2, repeat=10)
    return 2 * nbytes / medians["copy"]


def gather_bandwidth(device, rows: int, width: int, dtype=torch.float32) -> Dict[str, float]:
    """Bytes per second that a row gather reads, ``table.index_select(0, idx)`` with uniformly
    random idx: the practical ceiling of a kernel that gathers a feature row per edge. Measured
    into a [rows, width] table (the kernel's own x) and into one small enough to stay in cache
    (4 MiB on GPU, within L2; 256 KiB on CPU): {"table": ..., "cached": ...}. 2^21 rows gathered
    per run (CPU: 2^17)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    row_bytes = width * torch.empty((), dtype=dtype).element_size()
    count = 2**21 if cuda else 2**17
    result = {}
    for name, n in (("table", rows), ("cached", max(1, (2**22 if cuda else 2**18) // row_bytes))):
        table = torch.randn(n, width, device=device).to(dtype)
        idx = torch.randint(0, n, (count,), device=device)
        out = torch.empty(count, width, device=device, dtype=dtype)
        medians, _ = median_seconds({name: lambda: torch.index_select(table, 0, idx, out=out)}, device, warmup=2,
                                    repeat=10)
        result[name] = count * row_bytes / medians[name]
    return result


def plot(path: str, panels: Sequence[tuple], title: str = "") -> str:
    """Line plots side by side, log-scaled, to `path` (with matplotlib); returns what a report says
    of it. panels: (xlabel, ylabel, {label: (xs, ys)}, x scale "log" or "linear") each."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot: none (matplotlib is not installed)"
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (xlabel, ylabel, lines, xscale) in zip(axes[0], panels):
        for label, (xs, ys) in lines.items():
            ax.plot(xs, ys, "o-", label=label)
        ax.set(xscale=xscale, yscale="log", xlabel=xlabel, ylabel=ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {os.path.basename(path)}"


def _cell(value, spec: str) -> str:
    if value is None:
        return "n/a"
    return format(value, spec) if spec and isinstance(value, (int, float)) else str(value)


def markdown_table(rows: List[dict], columns: Sequence[Tuple[str, str, str]]) -> str:
    """rows as a Markdown table; columns: (key, title, format spec; "" for text)."""
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |",
             "| " + " | ".join("---:" if spec else "---" for _, _, spec in columns) + " |"]
    lines += ["| " + " | ".join(_cell(row.get(key), spec) for key, _, spec in columns) + " |" for row in rows]
    return "\n".join(lines)


def report(title: str, device, tables: Dict[str, Tuple[List[dict], Sequence[Tuple[str, str, str]]]],
           notes: Sequence[str], *, markdown_path: Optional[str] = None, json_path: Optional[str] = None,
           raw: Optional[dict] = None) -> None:
    """Prints the report (title, machine, notes, one section per table of (rows, columns)) and
    writes it to ``markdown_path``, and the rows (with ``raw`` under "raw") to ``json_path``."""
    line = machine(device)
    parts = [f"## {title}", "", line, ""] + [f"- {note}" for note in notes]
    for name, (rows, columns) in tables.items():
        parts += ["", f"### {name}", "", markdown_table(rows, columns)]
    text = "\n".join(parts) + "\n"
    print(text, flush=True)
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(text)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(title=title, machine=line, notes=list(notes), raw=raw,
                           tables={name: rows for name, (rows, _) in tables.items()}), f, indent=1)
