"""The machine a result comes from and the folder it goes to. Needs torch only, not revgnn_ext:
gpu_check.py uses it before it has built the extension."""
import datetime
import os
import platform
import re

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine(device) -> str:
    """One line: the device (GPU name, or CPU model and logical CPUs), torch, CUDA, threads, date."""
    device = torch.device(device)
    parts = [torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{_cpu_name()} ({os.cpu_count()} logical CPUs)", f"torch {torch.__version__}"]
    if device.type == "cuda":
        parts.append(f"CUDA {torch.version.cuda}")
    parts += [f"{torch.get_num_threads()} threads", datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")]
    return " · ".join(parts)


def results_dir(device) -> str:
    """benchmarks/results/<date>-<machine>: the GPU's name, or the CPU model and its logical CPU
    count (e.g. 2026-11-24-cpu-xeon-2core)."""
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        model = re.sub(r"\((r|tm)\)|\b(intel|amd|processor|cpu)\b|@.*", " ", _cpu_name().lower())
        name = f"cpu {model} {os.cpu_count()}core"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return os.path.join(RESULTS, f"{datetime.date.today().isoformat()}-{slug}")
