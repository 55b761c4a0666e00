"""One-command GPU validation: build for the local GPU, run the whole test suite with its CUDA
cases, run the GPU benchmarks, and leave the results in one dated folder.

    python benchmarks/gpu_check.py [--out DIR] [--budget SECONDS]      # or: make gpu-check

Run it with the python that holds torch (a CUDA build) and torch_geometric: it installs nothing
else and needs no network. Each step runs in a subprocess, its output in a log of its own:

1. build: `pip install --no-build-isolation --no-deps -e .` with FORCE_CUDA=1 and
   TORCH_CUDA_ARCH_LIST set to the local GPU's compute capability, then an import that checks
   the CUDA kernels are in; without a GPU, the CPU kernels only (FORCE_ONLY_CPU=1).
2. tests: pytest over tests/ (the CUDA cases run when torch sees a GPU), with a JUnit XML from
   which the summary counts outcomes per file. On a GPU the step fails unless CUDA-parametrized
   tests ran and passed and none of them was skipped for a reason no CPU test was skipped for
   (such as conftest's "no GPU").
3. benchmarks (BENCHMARKS below), each with --device cuda, --json and --markdown and its own time
   cap; scripts not written yet are reported as absent. Without a GPU, those that have a CPU
   configuration run it on a small graph to show that they work (numbers not worth keeping),
   the others are skipped.

Everything goes to benchmarks/results/<date>-<gpu name>/ (<date>-cpu-dryrun without a GPU), or
--out: summary.md (machine, steps, test counts, each benchmark's report), build.log, tests.log,
tests.xml and <benchmark>.json/.md/.log (and .png where it plots). The summary is printed last.
The exit status is 1 if any step failed, timed out or was not run for lack of time.

--budget bounds the whole run (default 570 s with a GPU, inside the device tool's 600 s per
command; 3600 s without, on a CPU machine that may be shared): a step is stopped at its own cap
or when the budget runs out, and the summary says so.
"""
import argparse
import contextlib
import datetime
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from common import machine_info, machine_line

ROOT = Path(__file__).resolve().parent.parent
GPU_BUDGET_S, CPU_BUDGET_S = 570, 3600  # default --budget with and without a GPU
SUMMARY_RESERVE_S = 10  # kept back from the budget for writing the summary
MIN_BENCHMARK_S = 20    # a benchmark is not started with less time than this left
LOG_TAIL_LINES = 25     # printed when a step fails


@dataclass
class Benchmark:
    name: str
    script: str                     # under benchmarks/
    cuda_args: List[str]            # besides --device cuda --json --markdown; "{out}": the results folder
    cpu_args: Optional[List[str]]   # the dry run's small CPU configuration; None: skipped without a GPU
    cap_s: float                    # the most seconds it may take


# Caps and flags sized for an H100 (about 4 min of build and 2 of tests before them).
BENCHMARKS = [
    Benchmark("spmm", "spmm.py", ["--budget", "2"],
              ["--graphs", "issue-3", "--reduce", "sum", "--repeat", "3", "--budget", "1"], 150),
    Benchmark("gen_conv", "gen_conv.py", [],
              ["--graphs", "issue-3", "--aggr", "max", "--repeat", "3", "--budget", "2"], 120),
    Benchmark("memory_depth", "memory_depth.py", ["--out", "{out}", "--budget-s", "30", "--repeat-s", "10"],
              None, 150),
    Benchmark("headline", "headline.py", [], ["--scale", "0.0005", "--layers", "4", "--parts", "4", "--budget-s", "5"], 300),
]
FAILED = ("FAILED", "TIMED OUT", "not run")


@dataclass
class Step:
    name: str
    status: str = "ok"  # ok, skipped, or one of FAILED
    seconds: Optional[float] = None
    note: str = ""


class Budget:
    def __init__(self, seconds: float):
        self.start = time.monotonic()
        self.end = self.start + seconds - SUMMARY_RESERVE_S

    def left(self) -> float:
        return self.end - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def session_processes(sid: int) -> List[int]:
    """Live (not zombie) processes of session sid, from /proc/<pid>/stat."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, _pgrp, session = stat.read_text().rsplit(")", 1)[1].split()[:4]
        except OSError:  # it ended meanwhile
            continue
        if int(session) == sid and state != "Z":
            pids.append(int(stat.parent.name))
    return pids


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILLs proc, started in a session of its own, and everything it started: process groups
    alone would miss ninja's compilers, which it puts in groups of their own."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    while pids := session_processes(proc.pid):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def run_logged(cmd: List[str], log: Path, timeout: float, env: Mapping[str, str]) -> Optional[int]:
    """Runs cmd in ROOT with stdout and stderr appended to log; its exit status, or None when it
    ran past timeout (then it is killed with all it started)."""
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=max(timeout, 0))
        except subprocess.TimeoutExpired:
            kill_session(proc)
            f.write(f"\ngpu_check: stopped after {timeout:.0f} s\n")
            return None


def log_tail(log: Path) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])


def timed_step(step: Step, cmd: List[str], log: Path, timeout: float, env: Mapping[str, str]) -> Optional[int]:
    """run_logged, recording seconds and a TIMED OUT / FAILED status in step; the exit status."""
    start = time.monotonic()
    rc = run_logged(cmd, log, timeout, env)
    step.seconds = time.monotonic() - start
    if rc is None:
        step.status, step.note = "TIMED OUT", f"stopped after {timeout:.0f} s; see {log.name}"
    elif rc != 0:
        step.status, step.note = "FAILED", f"exit status {rc}; see {log.name}"
    return rc


def build(out: Path, gpu: Optional[str], budget: Budget) -> Step:
    step = Step("build")
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    if gpu:
        env.update(FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=gpu)
        env.pop("FORCE_ONLY_CPU", None)
    else:
        print("no GPU: skipping the CUDA kernels (building the CPU kernels only)", flush=True)
        env["FORCE_ONLY_CPU"] = "1"
    log = out / "build.log"
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."]
    if timed_step(step, cmd, log, budget.left(), env) != 0:
        return step
    check = subprocess.run([sys.executable, "-c", "import revgnn_ext; print(revgnn_ext.with_cuda())"], cwd=ROOT,
                           capture_output=True, text=True)
    with open(log, "a") as f:
        f.write(f"import revgnn_ext: exit status {check.returncode}, with_cuda() = {check.stdout}{check.stderr}")
    if check.returncode != 0:
        step.status, step.note = "FAILED", f"the built extension does not import; see {log.name}"
    elif gpu and check.stdout.strip() != "True":
        step.status, step.note = "FAILED", "built without its CUDA kernels"
    else:
        step.note = f"CUDA kernels for compute capability {gpu}" if gpu else "CPU kernels only"
    return step


def count_tests(xml: Path) -> Dict[str, object]:
    """Outcomes (passed / failed / skipped) per test file and for the CUDA-parametrized tests
    (node names containing 'cuda'), the reasons CUDA tests were skipped, and the reasons CPU
    tests were skipped."""
    per_file: Dict[str, Counter] = defaultdict(Counter)
    cuda, cuda_skips, cpu_skip_reasons = Counter(), Counter(), set()
    for case in ET.parse(xml).iter("testcase"):
        skipped = case.find("skipped")
        if case.find("failure") is not None or case.find("error") is not None:
            outcome = "failed"
        else:
            outcome = "passed" if skipped is None else "skipped"
        per_file[case.get("file") or case.get("classname")][outcome] += 1
        reason = skipped.get("message", "") if skipped is not None else None
        if "cuda" in case.get("name", "").lower():
            cuda[outcome] += 1
            if reason is not None:
                cuda_skips[reason] += 1
        elif reason is not None:
            cpu_skip_reasons.add(reason)
    return {"per_file": per_file, "cuda": cuda, "cuda_skips": cuda_skips, "cpu_skip_reasons": cpu_skip_reasons}


def tests_table(per_file: Dict[str, Counter]) -> str:
    lines = ["| file | passed | failed | skipped |", "| --- | ---: | ---: | ---: |"]
    total = Counter()
    for name in sorted(per_file):
        c = per_file[name]
        total.update(c)
        lines.append(f"| {name} | {c['passed']} | {c['failed']} | {c['skipped']} |")
    lines.append(f"| **total** | **{total['passed']}** | **{total['failed']}** | **{total['skipped']}** |")
    return "\n".join(lines)


def run_tests(out: Path, gpu: Optional[str], budget: Budget) -> Tuple[Step, str]:
    """The tests step and the Markdown section on its counts."""
    step = Step("tests")
    if not gpu:
        print("no GPU: skipping the CUDA test cases (they skip themselves)", flush=True)
    xml, log = out / "tests.xml", out / "tests.log"
    cmd = [sys.executable, "-m", "pytest", "tests", "-v", "-rfEs", "--durations=20", f"--junitxml={xml}",
           "-o", "junit_family=xunit1"]
    rc = timed_step(step, cmd, log, budget.left(), os.environ)
    if rc is None or not xml.exists():
        step.note = step.note or "no JUnit XML written"
        return step, f"No counts: {step.note}."
    counts = count_tests(xml)
    cuda, total = counts["cuda"], sum(counts["per_file"].values(), Counter())
    unexpected = sum(n for why, n in counts["cuda_skips"].items() if why not in counts["cpu_skip_reasons"])
    skips = "; ".join(f"{n} × {why!r}" + (" (CPU tests skip for it too)" if why in counts["cpu_skip_reasons"] else "")
                      for why, n in counts["cuda_skips"].items())
    cuda_line = (f"CUDA-parametrized tests: {sum(cuda.values())} collected, {cuda['passed']} ran and passed, "
                 f"{cuda['failed']} failed, {cuda['skipped']} skipped" + (f" ({skips})" if skips else ""))
    step.note = f"{total['passed']} passed, {total['failed']} failed, {total['skipped']} skipped; "
    if gpu:
        step.note += (f"CUDA: {cuda['passed']} passed, {cuda['failed']} failed, {cuda['skipped']} skipped "
                      f"({unexpected} for a reason no CPU test skips for)")
        if cuda["passed"] == 0 or cuda["failed"] or unexpected:
            step.status = "FAILED"
    else:
        step.note += "no GPU: CUDA cases skipped"
    return step, f"{tests_table(counts['per_file'])}\n\n{cuda_line}."


def run_benchmark(bench: Benchmark, out: Path, gpu: Optional[str], budget: Budget) -> Tuple[Step, str]:
    """The benchmark's step and its report (Markdown; empty when it wrote none)."""
    step = Step(bench.name)
    script = ROOT / "benchmarks" / bench.script
    if not script.exists():
        step.status, step.note = "skipped", f"benchmarks/{bench.script} not present"
        return step, ""
    args = bench.cuda_args if gpu else bench.cpu_args
    if args is None:
        print(f"no GPU: skipping {bench.name}", flush=True)
        step.status, step.note = "skipped", "no GPU (no CPU configuration)"
        return step, ""
    timeout = min(bench.cap_s, budget.left())
    if timeout < MIN_BENCHMARK_S:
        step.status, step.note = "not run", "the time budget was spent"
        return step, ""
    if not gpu:
        print(f"no GPU: skipping the CUDA {bench.name} benchmark (running its CPU path, small)", flush=True)
    report, log = out / f"{bench.name}.md", out / f"{bench.name}.log"
    cmd = [sys.executable, str(script), "--device", "cuda" if gpu else "cpu", *[a.format(out=out) for a in args],
           "--json", str(out / f"{bench.name}.json"), "--markdown", str(report)]
    rc = timed_step(step, cmd, log, timeout, dict(os.environ, PYTHONUNBUFFERED="1"))
    if rc == 0 and not report.exists():
        step.status, step.note = "FAILED", f"exit status 0 but no report written; see {log.name}"
    if step.status != "ok":
        return step, ""
    if not gpu:
        step.note = f"CPU smoke run: {' '.join(args)}"
    plot = out / f"{bench.name}.png"  # a script that plots puts it beside its report
    return step, report.read_text() + (f"\n![{bench.name}]({plot.name})\n" if plot.exists() else "")


def source_revision() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def machine_lines(gpu: Optional[str]) -> List[str]:
    device = "cuda" if gpu else "cpu"
    lines = [machine_line(machine_info(device)), ""]
    if gpu:
        p = torch.cuda.get_device_properties(0)
        lines.append(f"- GPU: {p.name}, compute capability {gpu}, {p.total_memory / 2**30:.1f} GiB, "
                     f"{p.multi_processor_count} SMs, {torch.cuda.device_count()} visible")
        lines.append(f"- CPU: {machine_info('cpu')['device']}")
    lines.append(f"- python {sys.version.split()[0]}, source {source_revision()}")
    return lines


def steps_table(steps: List[Step]) -> str:
    lines = ["| step | status | seconds | note |", "| --- | --- | ---: | --- |"]
    for s in steps:
        seconds = f"{s.seconds:.0f}" if s.seconds is not None else ""
        lines.append(f"| {s.name} | {s.status} | {seconds} | {s.note} |")
    return "\n".join(lines)


def default_out(gpu: Optional[str]) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-") if gpu else "cpu-dryrun"
    return ROOT / "benchmarks" / "results" / f"{datetime.date.today().isoformat()}-{slug}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="results folder (default: benchmarks/results/<date>-<gpu name>, "
                                            "or <date>-cpu-dryrun without a GPU)")
    p.add_argument("--budget", type=float, help=f"seconds the whole run may take (default: {GPU_BUDGET_S} with "
                                                f"a GPU, {CPU_BUDGET_S} without)")
    p.add_argument("--only", help="comma-separated steps to run among tests and the benchmarks "
                                  f"({', '.join(b.name for b in BENCHMARKS)}); default: all. The build always runs "
                                  "(incremental after a first call), so a lease too short for everything can be "
                                  "split over two calls into the same --out (e.g. --only tests,spmm,gen_conv, "
                                  "then --only memory_depth,headline); each call writes summary-<steps>.md")
    args = p.parse_args()
    known = ["tests"] + [b.name for b in BENCHMARKS]
    only = known if args.only is None else args.only.split(",")
    if set(only) - set(known):
        p.error(f"--only: unknown steps {sorted(set(only) - set(known))}; choose from {', '.join(known)}")
    gpu = "{}.{}".format(*torch.cuda.get_device_capability(0)) if torch.cuda.is_available() else None
    args.budget = args.budget or (GPU_BUDGET_S if gpu else CPU_BUDGET_S)
    budget = Budget(args.budget)
    out = (args.out or default_out(gpu)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    summary = "summary.md" if args.only is None else f"summary-{'-'.join(only)}.md"
    outputs = [summary, "build.log"] + (["tests.log", "tests.xml"] if "tests" in only else []) + \
              [f"{b.name}.{ext}" for b in BENCHMARKS if b.name in only for ext in ("json", "md", "log", "png")]
    for name in outputs:  # a rerun into the same folder leaves nothing stale
        (out / name).unlink(missing_ok=True)
    print(f"gpu_check: {'GPU ' + torch.cuda.get_device_name(0) if gpu else 'no GPU'}; results in {out}", flush=True)

    steps, sections = [], []

    def finished(step: Step) -> Step:
        print(f"[{step.name}] {step.status}" + (f" in {step.seconds:.0f} s" if step.seconds is not None else "")
              + (f": {step.note}" if step.note else ""), flush=True)
        if step.status in FAILED and step.seconds is not None:
            log = out / f"{step.name}.log"
            print(log_tail(log) if log.exists() else "", flush=True)
        steps.append(step)
        return step

    if finished(build(out, gpu, budget)).status == "ok":
        test_section = "Not run (--only)."
        if "tests" in only:
            test_step, test_section = run_tests(out, gpu, budget)
            finished(test_step)
        for bench in (b for b in BENCHMARKS if b.name in only):
            bench_step, report = run_benchmark(bench, out, gpu, budget)
            finished(bench_step)
            if report:
                sections.append(report)
    else:
        test_section = "Not run: the build failed."
        for name in only:
            finished(Step(name, "not run", note="the build failed"))

    failed = [s.name for s in steps if s.status in FAILED]
    verdict = f"FAILED: {', '.join(failed)}" if failed else "passed"
    title = torch.cuda.get_device_name(0) if gpu else "no GPU (CPU dry run)"
    head = "\n".join([f"# gpu-check: {title}, {datetime.date.today().isoformat()}: {verdict}", ""]
                     + machine_lines(gpu)
                     + [f"- `make gpu-check` took {budget.elapsed():.0f} s (budget {args.budget:.0f} s)", "",
                        "## Steps", "", steps_table(steps), "", "## Tests", "", test_section, ""])
    if not gpu:
        head += ("\nNo GPU: the CUDA kernels were not built, the CUDA test cases skipped themselves, and the "
                 "benchmarks ran their CPU paths on one small graph to show that the scripts work end to end; "
                 "their numbers are not results.\n")
    benchmarks = "\n".join(sections)
    (out / summary).write_text(head + ("\n" + benchmarks if benchmarks else ""))
    print(("\n" + benchmarks if benchmarks else "") + "\n" + head, flush=True)
    print(f"results: {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
