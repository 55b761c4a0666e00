"""Timing, memory and reporting helpers shared by the benchmark scripts.

Times are medians over repeated runs after a warm-up: CUDA events around each run on GPU,
``time.perf_counter`` around each run on CPU. Peak memory is what one call allocates above what
was allocated before it, counted by torch's own allocator on both devices.
"""
import contextlib
import datetime
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch._C._profiler import _EventType

__all__ = ["MIN_REPEAT", "synchronize", "wall_clock", "time_fns", "time_fn", "peak_memory", "available_memory",
           "device_copy_bandwidth", "machine_info", "machine_line", "results_dir", "Table", "write_report"]

MIN_REPEAT = 3  # a time budget never cuts a measurement below this many runs
PEAK_MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated minus the memory allocated before the call",
    "cpu": "bytes allocated through torch's CPU allocator above those allocated before the call, "
           "replayed from torch.profiler allocation events (memory that libraries allocate on "
           "their own, e.g. MKL workspaces, is not seen)",
}

Inputs = Union[None, Sequence[tuple], Callable[[int], tuple]]


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def wall_clock(fn: Callable, device) -> Tuple[object, float]:
    """(fn(), seconds) for a one-off step, such as building a graph."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def _arguments(inputs: Inputs, i: int) -> tuple:
    if inputs is None:
        return ()
    if callable(inputs):
        return tuple(inputs(i))
    return inputs[i % len(inputs)]


class _Timer:
    """One timed run: CUDA events on GPU (read after a synchronize), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.begin, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.begin = time.perf_counter()

    def stop(self) -> "_Timer":
        if self.cuda:
            self.end.record()
        else:
            self.end = time.perf_counter()
        return self

    def seconds(self) -> float:
        return self.begin.elapsed_time(self.end) / 1e3 if self.cuda else self.end - self.begin


def _warm_up(fn: Callable, inputs: Inputs, warmup: int) -> None:
    for i in range(warmup):
        fn(*_arguments(inputs, i))


def time_fns(fns: Dict[str, Callable], *, warmup: int, repeat: int, device, inputs: Inputs = None,
             budget_s: Optional[float] = None) -> Tuple[Dict[str, float], Dict[str, Exception]]:
    """Median seconds of each ``fn(*args)`` over up to ``repeat`` runs after ``warmup`` runs,
    run in interleaved rounds (each fn once per round, on the same args) so that all of them see
    the same machine load. Returns (medians, exceptions of the fns that raised; those are dropped).

    ``inputs`` gives each round's args: None (no args), a list of arg tuples used in turn
    (rotating inputs keeps them from being cache-hot), or a callable round index -> arg tuple,
    called outside the timed region. ``budget_s``: a fn whose ``repeat`` runs would take longer,
    judged from its warm-up, gets fewer (at least MIN_REPEAT).
    """
    device = torch.device(device)
    errors: Dict[str, Exception] = {}
    runs: Dict[str, int] = {}
    for name, fn in fns.items():
        try:
            _, seconds = wall_clock(lambda: _warm_up(fn, inputs, warmup), device)
        except Exception as err:  # reported to the caller
            errors[name] = err
            continue
        fits = repeat if budget_s is None or warmup == 0 else int(budget_s * warmup / max(seconds, 1e-9))
        runs[name] = min(repeat, max(MIN_REPEAT, fits))
    timers: Dict[str, List[_Timer]] = {name: [] for name in runs}
    for i in range(max(runs.values(), default=0)):
        args = _arguments(inputs, warmup + i)
        for name, n in runs.items():
            if name in errors or i >= n:
                continue
            try:
                timer = _Timer(device)
                fns[name](*args)
                timers[name].append(timer.stop())
            except Exception as err:
                errors[name] = err
    synchronize(device)
    medians = {name: statistics.median(t.seconds() for t in ts) for name, ts in timers.items() if name not in errors}
    return medians, errors


def time_fn(fn: Callable, *, warmup: int, repeat: int, device, inputs: Inputs = None,
            budget_s: Optional[float] = None) -> float:
    """Median seconds of ``fn(*args)`` over ``repeat`` runs after ``warmup`` runs; see time_fns."""
    medians, errors = time_fns({"fn": fn}, warmup=warmup, repeat=repeat, device=device, inputs=inputs,
                               budget_s=budget_s)
    if errors:
        raise errors["fn"]
    return medians["fn"]


@contextlib.contextmanager
def _c_stderr_silenced():
    """Kineto writes a line to the C-level stderr each time a profiler starts or stops."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _walk(nodes):
    for node in nodes:
        yield node
        yield from _walk(node.children)


def _cpu_peak_memory(fn: Callable) -> int:
    with _c_stderr_silenced(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                      profile_memory=True) as prof:
        fn()
    events = [e for e in _walk(prof.profiler.kineto_results.experimental_event_tree())
              if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu"]
    allocated = peak = 0
    for e in sorted(events, key=lambda e: e.start_time_ns):
        allocated += e.extra_fields.alloc_size  # negative for frees
        peak = max(peak, allocated)
    return peak


def peak_memory(fn: Callable, device) -> int:
    """Peak bytes allocated during one ``fn()`` above those allocated before it (see
    PEAK_MEMORY_METHOD for how, per device type)."""
    device = torch.device(device)
    if device.type != "cuda":
        return _cpu_peak_memory(fn)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def available_memory(device) -> int:
    """Bytes that new tensors on ``device`` can still take: free GPU memory plus what PyTorch's
    caching allocator holds unused; on CPU, MemAvailable from /proc/meminfo."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not found in /proc/meminfo")


def device_copy_bandwidth(device, nbytes: Optional[int] = None) -> float:
    """Bytes per second of a large tensor copy on ``device``, counting bytes read plus bytes
    written: the practical ceiling for a memory-bound kernel. Default size: 1 GiB on GPU (well
    past any L2), 256 MiB on CPU."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = 2**30 if device.type == "cuda" else 2**28
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = time_fn(lambda: dst.copy_(src), warmup=2, repeat=10, device=device)
    return 2 * nbytes / seconds


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(device) -> Dict[str, object]:
    device = torch.device(device)
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"{_cpu_name()} ({os.cpu_count()} logical CPUs)",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    return info


def results_dir(device) -> str:
    """benchmarks/results/<date>-<machine>, the machine named by the GPU on cuda, by the CPU model
    and its logical CPU count on cpu (e.g. 2026-11-24-cpu-xeon-2core)."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        model = re.sub(r"\((r|tm)\)|\b(intel|amd|processor|cpu)\b|@.*", " ", _cpu_name().lower())
        name = f"cpu {model} {os.cpu_count()}core"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                        f"{datetime.date.today().isoformat()}-{slug}")


class Table:
    """Rows of raw values (kept for JSON) rendered as a Markdown table.

    ``columns``: (key, title, format spec) triples; the spec (e.g. ".2f") formats numbers, and
    None values show as "n/a".
    """

    def __init__(self, columns: Sequence[Tuple[str, str, str]]):
        self.columns = list(columns)
        self.rows: List[Dict[str, object]] = []

    def add(self, **row) -> None:
        unknown = set(row) - {key for key, _, _ in self.columns}
        if unknown:
            raise KeyError(f"Table.add: unknown columns {sorted(unknown)}")
        self.rows.append(row)

    @staticmethod
    def _cell(value, spec: str) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "n/a"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return format(value, spec)
        return str(value)

    def markdown(self) -> str:
        cells = [[self._cell(row.get(key), spec) for key, _, spec in self.columns] for row in self.rows]
        titles = [title for _, title, _ in self.columns]
        widths = [max([len(t)] + [len(r[i]) for r in cells]) for i, t in enumerate(titles)]
        numeric = [bool(spec) for _, _, spec in self.columns]

        def line(values):
            return "| " + " | ".join(v.rjust(w) if num else v.ljust(w)
                                     for v, w, num in zip(values, widths, numeric)) + " |"

        rule = "| " + " | ".join(("-" * (w - 1) + ":") if num else "-" * w
                                 for w, num in zip(widths, numeric)) + " |"
        return "\n".join([line(titles), rule] + [line(r) for r in cells])


def machine_line(info: Dict[str, object]) -> str:
    parts = [str(info["device"]), f"torch {info['torch']}"]
    if "cuda" in info:
        parts.append(f"CUDA {info['cuda']}")
    parts += [f"{info['threads']} threads", str(info["date"])]
    return " · ".join(parts)


def write_report(title: str, info: Dict[str, object], tables: Dict[str, Table], notes: Sequence[str], *,
                 json_path: Optional[str] = None, markdown_path: Optional[str] = None,
                 raw: Optional[Dict[str, object]] = None) -> str:
    """Prints the report as Markdown (title, machine line, notes, one section per table) and
    writes it to ``markdown_path`` and the raw rows to ``json_path`` when given, with ``raw``
    (measurements the tables summarize) under the key "raw"."""
    parts = [f"## {title}", "", machine_line(info), ""]
    parts += [f"- {note}" for note in notes]
    for name, table in tables.items():
        parts += ["", f"### {name}", "", table.markdown()]
    text = "\n".join(parts) + "\n"
    print(text)
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(text)
    if json_path:
        payload = {"title": title, "machine": info, "notes": list(notes),
                   "tables": {name: table.rows for name, table in tables.items()}}
        if raw is not None:
            payload["raw"] = raw
        with open(json_path, "w") as f:
            json.dump(payload, f, indent=1)
    return text
