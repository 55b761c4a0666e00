"""`make gpu-check`: what a lent GPU must show, most valuable first, in one command of at most
8 minutes, build included (issue 12). benchmarks/README.md has the plan and its time estimates.

    python benchmarks/gpu_check.py [--only STEP,...] [--out DIR] [--budget SECONDS]

Run it with the python that holds torch (a CUDA build) and torch_geometric: it installs nothing
and needs no network. Each step runs in a subprocess with its own log and time cap, and is
reported even when a later one fails or runs out of time:

1. build: `pip install -e .` for this GPU's compute capability only, MAX_JOBS = all cores,
   then an import that checks the CUDA kernels are in (without a GPU: the CPU kernels);
2. tests: every CUDA test case (`pytest -k cuda`), in parallel where pytest-xdist is installed,
   stopping after MAX_FAILURES failures and listing each; on a GPU the step fails unless they ran
   and passed, none skipped for lack of a GPU;
3. the benchmarks of STEPS in order, first group by default; `--only` (make's ONLY=) runs the
   named steps instead, e.g. the second group in a second call (the build is then incremental).

Results: benchmarks/results/<date>-<gpu>/ (<date>-cpu-dryrun without a GPU, git-ignored), or
--out: summary.md (summary-<steps>.md with --only), build.log, tests.log, tests.xml and each
benchmark's .md, .json, .log (and .png). The summary is printed last; the exit status is 1 when a
step failed, timed out or was not run for lack of time. Without a GPU the same command is a dry
run: CPU build, the CUDA cases skip themselves, the benchmarks run small on CPU (not results).
"""
import argparse
import contextlib
import datetime
import importlib.util
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import torch

from machine_info import RESULTS, machine, results_dir

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = {True: 480, False: 3600}  # the whole run, with and without a GPU
MAX_FAILURES = 20
BUILD_CAP_S, TESTS_CAP_S = 300, 150
MIN_STEP_S = 20  # a benchmark is not started with less time than this left
# name: (arguments on a GPU, arguments of the CPU dry run or None to skip it there, cap in seconds,
# group). "{out}": the results folder. Caps sized for an H100 (README: the plan).
STEPS = {
    "headline": (["headline.py", "--autocast", "bf16", "--ours-budget-s", "60"],
                 ["headline.py", "--scale", "0.0005", "--layers", "4", "--parts", "4", "--budget-s", "5",
                  "--autocast", "bf16"], 150, 1),
    "spmm": (["spmm.py", "--graphs", "proteins", "--budget", "2"],
             ["spmm.py", "--graphs", "powerlaw-20k-d30", "--reduce", "sum", "--repeat", "3", "--budget", "1"], 60, 1),
    "gen_conv": (["gen_conv.py", "--graphs", "proteins", "--profile"],
                 ["gen_conv.py", "--graphs", "powerlaw-20k-d30", "--aggr", "max", "--repeat", "3", "--profile"], 60, 1),
    "memory_depth": (["memory_depth.py", "--out", "{out}", "--budget-s", "30", "--repeat-s", "10",
                      "--autocast", "bf16"], None, 240, 2),
    "spmm_more": (["spmm.py", "--graphs", "powerlaw-100k-d20,products-100k-d50,proteins-10k-d600,products",
                   "--budget", "2"], None, 150, 2),
    "gen_conv_more": (["gen_conv.py", "--graphs", "powerlaw-20k-d30,proteins-10k-d600,products-100k-d50,products"],
                      None, 120, 2),
    "gat": (["gat.py"], ["gat.py", "--graphs", "powerlaw-20k-d15:0.1", "--repeat", "3"], 120, 2),
}


class Budget:
    """The whole run's seconds; each step's own cap applies on a GPU only (a CPU dry run on a shared
    machine has just the budget)."""

    def __init__(self, seconds: float, capped: bool):
        self.start, self.seconds, self.capped = time.monotonic(), seconds, capped

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILLs proc, started in a session of its own, and everything it started (a process
    group would miss ninja's compilers, which ninja puts in groups of their own)."""
    while True:
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[3]) == proc.pid and fields[0] != "Z":
                    pids.append(int(stat.parent.name))
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.poll()
        time.sleep(0.1)
    proc.wait()


def run_step(name: str, cmd: list, log: Path, cap_s: float, budget: Budget, env=None) -> dict:
    """Runs cmd in ROOT, output to log, for at most min(cap_s, what the budget has left): the step's
    {name, status (ok / FAILED / TIMED OUT / not run), seconds, note}."""
    timeout = min(cap_s if budget.capped else budget.left(), budget.left())
    if timeout < MIN_STEP_S:
        return dict(name=name, status="not run", note="the time budget was spent")
    start = time.monotonic()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(map(str, cmd))}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, **(env or {}), PYTHONUNBUFFERED="1"), stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_session(proc)
            f.write(f"\ngpu_check: stopped after {timeout:.0f} s\n")
            rc = None
    step = dict(name=name, status="ok", seconds=time.monotonic() - start, note="")
    if rc is None:
        step.update(status="TIMED OUT", note=f"stopped after {timeout:.0f} s; see {log.name}")
    elif rc:
        step.update(status="FAILED", note=f"exit status {rc}; see {log.name}")
    return step


def build(out: Path, gpu, budget: Budget) -> dict:
    env = dict(PIP_DISABLE_PIP_VERSION_CHECK="1", MAX_JOBS=str(os.cpu_count()))
    if gpu:
        env.update(FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=gpu, FORCE_ONLY_CPU="0")
    else:
        env.update(FORCE_ONLY_CPU="1")
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."]
    step = run_step("build", cmd, out / "build.log", BUILD_CAP_S, budget, env)
    if step["status"] == "ok":
        check = subprocess.run([sys.executable, "-c", "import revgnn_ext; print(revgnn_ext.with_cuda())"], cwd=ROOT,
                               capture_output=True, text=True)
        with open(out / "build.log", "a") as f:
            f.write(f"$ import revgnn_ext: exit status {check.returncode}\n{check.stdout}{check.stderr}")
        if check.returncode or (gpu and check.stdout.strip() != "True"):
            step.update(status="FAILED", note="the built extension does not import, or lacks its CUDA kernels; see "
                                              "build.log")
        else:
            step["note"] = f"CUDA kernels for compute capability {gpu}" if gpu else "CPU kernels only (no GPU)"
    return step


def tests(out: Path, gpu, budget: Budget) -> tuple:
    """The tests step and the summary's section on them."""
    xml = out / "tests.xml"
    parallel = ["-n", "auto"] if gpu and importlib.util.find_spec("xdist") else []
    cmd = [sys.executable, "-m", "pytest", "tests", "-k", "cuda", "-q", "-rfEs", f"--maxfail={MAX_FAILURES}",
           f"--junitxml={xml}", "-o", "junit_family=xunit1", *parallel]
    step = run_step("tests", cmd, out / "tests.log", TESTS_CAP_S, budget)
    if not xml.exists():
        return step, f"No counts: {step['note'] or 'no JUnit XML written'}."
    counts, skips, failures = Counter(), Counter(), []
    for case in ET.parse(xml).iter("testcase"):
        skipped = case.find("skipped")
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            failures.append(f"{case.get('classname')}::{case.get('name')}")
        elif skipped is not None:
            counts["skipped"] += 1
            skips[skipped.get("message", "")] += 1
        else:
            counts["passed"] += 1
    no_gpu = sum(n for why, n in skips.items() if "no GPU" in why)
    step["note"] = (f"CUDA cases: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped "
                    f"({no_gpu} for lack of a GPU)" + ("" if parallel or not gpu else "; pytest-xdist not installed"))
    if gpu and (counts["failed"] or no_gpu or not counts["passed"]):
        step["status"] = "FAILED"
    lines = [step["note"] + "."] + [f"- skipped {n} × {why!r}" for why, n in skips.items()]
    lines += [f"- FAILED {name}" for name in failures]
    return step, "\n".join(lines)


def benchmark(name: str, out: Path, gpu, budget: Budget) -> tuple:
    """The benchmark's step and its report (empty when it wrote none)."""
    gpu_args, cpu_args, cap_s, _ = STEPS[name]
    if not gpu and cpu_args is None:
        return dict(name=name, status="skipped", note="no GPU (no CPU configuration)"), ""
    args = [a.format(out=out) for a in (gpu_args if gpu else cpu_args)]
    report = out / f"{name}.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / args[0]), "--device", "cuda" if gpu else "cpu", *args[1:],
           "--json", str(out / f"{name}.json"), "--markdown", str(report)]
    step = run_step(name, cmd, out / f"{name}.log", cap_s, budget)
    if step["status"] != "ok" or not report.exists():
        step.update(status=step["status"] if step["status"] != "ok" else "FAILED", note=step["note"] or "no report")
        return step, ""
    step["note"] = " ".join(args) + ("" if gpu else " (CPU smoke run)")
    png = report.with_suffix(".png")
    return step, report.read_text() + (f"\n![{name}]({png.name})\n" if png.exists() else "")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help=f"comma-separated steps among tests, {', '.join(STEPS)} (default: tests and the "
                                  "first group)")
    p.add_argument("--out", type=Path, help="results folder")
    p.add_argument("--budget", type=float, help="seconds the whole run may take (default 480 with a GPU, 3600 without)")
    args = p.parse_args()
    only = args.only.split(",") if args.only else ["tests"] + [n for n, s in STEPS.items() if s[3] == 1]
    if set(only) - {"tests", *STEPS}:
        p.error(f"--only: choose from tests, {', '.join(STEPS)}")
    gpu = "{}.{}".format(*torch.cuda.get_device_capability(0)) if torch.cuda.is_available() else None
    budget = Budget(args.budget or BUDGET_S[bool(gpu)], capped=bool(gpu))
    out = (args.out or Path(results_dir("cuda") if gpu else f"{RESULTS}/{datetime.date.today()}-cpu-dryrun")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    summary = out / ("summary.md" if args.only is None else f"summary-{'-'.join(only)}.md")
    for name in ["build", *only]:  # a rerun into the same folder leaves nothing stale
        for path in out.glob(f"{name}.*"):
            path.unlink()
    print(f"gpu_check: {'GPU ' + torch.cuda.get_device_name(0) if gpu else 'no GPU: a CPU dry run'}; results in {out}",
          flush=True)

    steps, sections, test_section = [], [], "Not run."

    def finished(step: dict) -> None:
        seconds = f" in {step['seconds']:.0f} s" if "seconds" in step else ""
        print(f"[{step['name']}] {step['status']}{seconds}: {step['note']}", flush=True)
        log = out / f"{step['name']}.log"
        if step["status"] in ("FAILED", "TIMED OUT") and log.exists():
            print("\n".join(log.read_text(errors="replace").splitlines()[-25:]), flush=True)
        steps.append(step)

    finished(build(out, gpu, budget))
    for name in only:
        if steps[0]["status"] != "ok":
            finished(dict(name=name, status="not run", note="the build failed"))
        elif name == "tests":
            step, test_section = tests(out, gpu, budget)
            finished(step)
        else:
            step, section = benchmark(name, out, gpu, budget)
            finished(step)
            sections.append(section)
    failed = [s["name"] for s in steps if s["status"] in ("FAILED", "TIMED OUT", "not run")]
    git = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    head = [f"# gpu-check: {torch.cuda.get_device_name(0) if gpu else 'no GPU (CPU dry run)'}, "
            f"{datetime.date.today()}: {'FAILED: ' + ', '.join(failed) if failed else 'passed'}", "",
            f"- {machine('cuda' if gpu else 'cpu')}", f"- CPU: {machine('cpu')}" if gpu else "",
            f"- python {sys.version.split()[0]}, source {git.stdout.strip() or 'unknown'}",
            f"- took {time.monotonic() - budget.start:.0f} s (budget {budget.seconds:.0f} s)", "", "## Steps", "",
            "| step | status | seconds | note |", "| --- | --- | ---: | --- |"]
    head += [f"| {s['name']} | {s['status']} | {s.get('seconds', 0):.0f} | {s['note']} |" for s in steps]
    head += ["", "## Tests", "", test_section, ""]
    if not gpu:
        head.append("No GPU: the CUDA kernels were not built, the CUDA test cases skipped themselves, and the "
                    "benchmarks ran small on CPU to show that they work end to end; their numbers are not results.\n")
    text = "\n".join(head) + "\n".join(s for s in sections if s)
    summary.write_text(text)
    print("\n".join(s for s in sections if s) + "\n" + "\n".join(head), flush=True)
    print(f"results: {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
