"""Throughput through the kernel mount (issue 7's figures), side by side in
one run: a plain local directory and ``p2pfs demo`` (4 node processes,
r=3, a 4-member inner ring), optionally the pass-through FUSE baseline.

    .venv/bin/python bench/mount_bench.py [--size-mib 256] [--files 2000] [--runs 3]
                                          [--passthrough] [--out bench/results/mount]

Per target and run:

* sequential write of ``--size-mib`` MiB in 1 MiB writes, then fsync and
  close (MB/s of user data, the fsync included: what is durable);
* sequential read of it back in 1 MiB reads after dropping the kernel's page
  cache (``/proc/sys/vm/drop_caches``, so the data really comes through the
  file system; noted in the results when that is not permitted);
* ``--files`` small files (1 KiB each): create+write+close all, stat all,
  unlink all; operations per second = 3 x files / total time.

Targets (issue 7): read >= 50% of the local directory's, write >= 50 MB/s,
small-file ops >= 500/s. The median of the runs is reported with min and max.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (machine_info, machine_markdown, markdown_table, progress,  # noqa: E402
                          summarize)
from bench.targets import (LocalTarget, P2pfsTarget, PassthroughTarget,  # noqa: E402
                           TargetUnavailable)

CHUNK = 1 << 20


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def seq_write(path: Path, size: int) -> float:
    buf = os.urandom(CHUNK)
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(size // CHUNK):
            os.write(fd, buf)
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t


def seq_read(path: Path) -> tuple[float, int]:
    t = time.perf_counter()
    n = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            b = os.read(fd, CHUNK)
            if not b:
                break
            n += len(b)
    finally:
        os.close(fd)
    return time.perf_counter() - t, n


def small_files(d: Path, count: int) -> dict:
    d.mkdir()
    data = b"x" * 1024
    t0 = time.perf_counter()
    for i in range(count):
        with open(d / f"f{i:05d}", "wb") as f:
            f.write(data)
    t1 = time.perf_counter()
    for i in range(count):
        os.stat(d / f"f{i:05d}")
    t2 = time.perf_counter()
    for i in range(count):
        os.unlink(d / f"f{i:05d}")
    t3 = time.perf_counter()
    d.rmdir()
    return {"create": t1 - t0, "stat": t2 - t1, "delete": t3 - t2,
            "ops_per_s": 3 * count / (t3 - t0)}


def run_target(target, size: int, files: int, runs: int) -> dict:
    progress("mount", f"starting {target.name}")
    target.start()
    target.status = "ok"
    out = {"write_mbs": [], "read_mbs": [], "small_ops": [], "small": [], "dropped": True}
    try:
        for r in range(runs):
            f = target.path / f"big{r}"
            w = seq_write(f, size)
            out["dropped"] &= drop_caches()
            rd, n = seq_read(f)
            if n != size:
                raise RuntimeError(f"{target.name}: read back {n} bytes of {size}")
            os.unlink(f)
            s = small_files(target.path / f"small{r}", files)
            out["write_mbs"].append(size / w / 1e6)
            out["read_mbs"].append(size / rd / 1e6)
            out["small_ops"].append(s["ops_per_s"])
            out["small"].append(s)
            progress("mount", f"{target.name} run {r + 1}/{runs}: write {size / w / 1e6:.1f} "
                              f"MB/s, read {size / rd / 1e6:.1f} MB/s, small files "
                              f"{s['ops_per_s']:.0f} ops/s")
    finally:
        target.stop()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--files", type=int, default=2000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--passthrough", action="store_true", help="also the pass-through FUSE baseline")
    p.add_argument("--out", help="write PREFIX.md and PREFIX.json")
    a = p.parse_args(argv)
    if a.size_mib < 1 or a.files < 1 or a.runs < 1:
        p.error("sizes and counts must be positive")
    base = Path(tempfile.mkdtemp(prefix="mount-bench-"))
    info = machine_info()
    targets = [LocalTarget(base)] + ([PassthroughTarget(base)] if a.passthrough else []) + [
        P2pfsTarget(base)]
    results = {}
    for t in targets:
        try:
            results[t.name] = run_target(t, a.size_mib << 20, a.files, a.runs)
            results[t.name]["label"] = t.label()
        except TargetUnavailable as e:
            progress("mount", f"{t.name} unavailable: {e}")
            results[t.name] = {"label": t.label(), "unavailable": str(e)}
    info["load_after"] = [round(x, 2) for x in os.getloadavg()]
    local = results.get("local", {})
    rows = []
    for name, r in results.items():
        if "unavailable" in r:
            rows.append([name, r["unavailable"], "", "", "", ""])
            continue
        w, rd, s = (summarize(r[k]) for k in ("write_mbs", "read_mbs", "small_ops"))
        r["summary"] = {"write_mbs": w, "read_mbs": rd, "small_ops": s}
        ratio = (rd["median"] / summarize(local["read_mbs"])["median"]) if local.get(
            "read_mbs") else None
        rows.append([f"{name}: {r['label']}",
                     f"{w['median']:.1f} ({w['min']:.1f}-{w['max']:.1f})",
                     f"{rd['median']:.1f} ({rd['min']:.1f}-{rd['max']:.1f})",
                     "-" if ratio is None else f"{100 * ratio:.0f}%",
                     f"{s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f})",
                     "yes" if r["dropped"] else "no (not permitted)"])
    table = markdown_table(["target", "seq write MB/s (fsync incl.)", "seq read MB/s",
                            "read vs local", f"{a.files} small files: create+stat+delete ops/s",
                            "page cache dropped before reads"], rows, right=(1, 2, 3, 4))
    md = (f"# Through the mount (bench/mount_bench.py)\n\n"
          f"`{' '.join(['bench/mount_bench.py'] + (argv or sys.argv[1:]))}`: "
          f"{a.size_mib} MiB sequential file in 1 MiB calls, {a.files} files of 1 KiB, "
          f"median of {a.runs} runs (min-max), all targets in one run.\n\n"
          f"{machine_markdown(info)}\n\n{table}\n\n"
          f"Targets (issue 7): sequential read >= 50% of the local directory's, write >= 50 MB/s, "
          f"small-file operations >= 500/s.\n")
    print(md)
    if a.out:
        Path(a.out + ".md").write_text(md)
        Path(a.out + ".json").write_text(json.dumps({"machine": info, "args": vars(a),
                                                     "results": results}, indent=1,
                                                    default=str))
    os.rmdir(base) if base.exists() and not any(base.iterdir()) else None
    return 0


if __name__ == "__main__":
    sys.exit(main())
