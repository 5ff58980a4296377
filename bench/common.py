"""Helpers shared by the benchmark scripts in ``bench/``: what machine a result
came from, timing, summaries, and writing Markdown and JSON results.

Every committed result carries the machine and the versions it was measured
with (DESIGN.md "Performance budget": the figures only mean something next to
the machine they ran on). Nothing here imports the p2pfs packages, so the
benchmarks can also run against directories when p2pfs is broken.
"""

from __future__ import annotations

import datetime
import json
import os
import resource
import platform
import shutil
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Iterable, Iterator, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"


def progress(tag: str, msg: str) -> None:
    """One progress line on stderr (stdout stays free for results)."""
    print(f"[{tag}] {msg}", file=sys.stderr, flush=True)


@contextmanager
def stopwatch() -> Iterator[list[float]]:
    """``with stopwatch() as t: ...`` then ``t[0]`` is the elapsed seconds."""
    box = [0.0]
    start = time.perf_counter()
    try:
        yield box
    finally:
        box[0] = time.perf_counter() - start


def summarize(values: Sequence[float]) -> dict:
    """Median, min and max of a non-empty list of measurements."""
    if not values:
        raise ValueError("summarize() needs at least one value")
    return {"median": statistics.median(values), "min": min(values),
            "max": max(values), "n": len(values)}


def _sig3(x: float) -> str:
    return f"{x:.0f}" if x >= 99.95 else f"{x:.1f}" if x >= 9.995 else f"{x:.2f}"


def fmt_seconds(s: float | None) -> str:
    """A duration with three significant digits and a readable unit."""
    if s is None:
        return "-"
    if s >= 0.9995:
        return f"{_sig3(s)} s"
    if s >= 0.9995e-3:
        return f"{_sig3(s * 1e3)} ms"
    return f"{_sig3(s * 1e6)} us"


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]],
                   right: Sequence[int] = ()) -> str:
    """A GitHub Markdown table; columns whose index is in ``right`` align right."""
    head = "| " + " | ".join(headers) + " |"
    rule = "|" + "|".join("---:" if i in right else "---" for i in range(len(headers))) + "|"
    body = ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` atomically (a reader never sees half a result file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json(path: str | Path, obj: object) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _first_line(argv: Sequence[str]) -> str | None:
    """First output line of a version command, or None if it is not installed."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    out = (r.stdout or r.stderr).strip().splitlines()
    return out[0] if out else None


def _read_key(path: str, key: str, sep: str = ":") -> str | None:
    try:
        with open(path) as f:
            for line in f:
                k, _, v = line.partition(sep)
                if k.strip() == key:
                    return v.strip().strip('"')
    except OSError:
        pass
    return None


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_revision() -> str | None:
    """The repository's commit, with ``+dirty`` when the work tree has changes."""
    try:
        head = subprocess.run(["git", "-C", str(REPO_DIR), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(REPO_DIR), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages: how busy the machine was around a run."""
    return [round(x, 2) for x in os.getloadavg()]


def machine_info() -> dict:
    """CPU, memory, kernel and tool versions, recorded in every result."""
    mem_kb = _read_key("/proc/meminfo", "MemTotal")
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _read_key("/proc/cpuinfo", "model name") or platform.processor() or None,
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "memory_gib": round(int(mem_kb.split()[0]) / 2**20, 1) if mem_kb else None,
        "load": load_average(),
        "kernel": platform.release(),
        "os": _read_key("/etc/os-release", "PRETTY_NAME", "="),
        "python": platform.python_version(),
        "gcc": _first_line(["gcc", "--version"]),
        "make": _first_line(["make", "--version"]),
        "fuse": _first_line(["fusermount3", "-V"]),
        "pyfuse3": _package_version("pyfuse3"),
        "trio": _package_version("trio"),
        "p2pfs": _package_version("p2pfs"),
        "git": git_revision(),
    }


def machine_markdown(info: dict) -> str:
    """The machine block of a Markdown result."""
    return "\n".join([
        f"- machine: {info.get('cpu')}, {info.get('cores')} cores "
        f"({info.get('cores_usable')} usable), {info.get('memory_gib')} GiB",
        f"- system: {info.get('os')}, Linux {info.get('kernel')}, {info.get('fuse')}",
        f"- tools: Python {info.get('python')}, {info.get('gcc')}, {info.get('make')}",
        f"- packages: pyfuse3 {info.get('pyfuse3')}, trio {info.get('trio')}, "
        f"p2pfs {info.get('p2pfs')} (git {info.get('git')})",
        f"- date: {info.get('date')}; load average {info.get('load')} at the start"
        + (f", {info['load_after']} at the end" if info.get("load_after") else ""),
    ])


def proc_cpu(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far (gone ones: 0)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


def self_cpu() -> float:
    """User + system CPU seconds of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
