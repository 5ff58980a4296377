"""fsck of a volume of 10,000 files (issue 9: "fsck of a volume of 10,000
files completes, and its time is in bench/results/").

    .venv/bin/python bench/fsck_bench.py [--files 10000] [--kinds single,network]
                                         [--repeat 3] [--out bench/results/fsck]

The volume: directories of 100 files each; nine files in ten are small (a
few hundred bytes, inline in the log), every tenth holds 20 KB in a DATA
block; the writer syncs every 500 files and snapshots every 2000 settled
records (the mount's default), so the logs carry a chain of snapshots as a
long-lived volume does. Two places it lives:

* ``single``: a single-node volume (one LMDB store, r = 1);
* ``network``: 4 storage node processes (r = 3) and a 4-member inner ring
  on loopback (``p2pfs.cluster``, ``storage.ring_local``), fsck joining as
  a client node like ``p2pfs fsck`` does.

Each is checked ``--repeat`` times in full (every copy fetched and hashed)
and as many times with ``--quick`` (holders' word for what they hold),
alternating; the phase times come from fsck's progress reports. Nothing is damaged: this is the
cost of a clean check.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (load_average, machine_info, machine_markdown,  # noqa: E402
                          markdown_table, progress, write_json, write_text)
from overlay.wire.ids import Identity  # noqa: E402
from p2pfs.backend import LocalBackend, mkfs_local  # noqa: E402
from p2pfs.cluster import LocalCluster, python_module_argv  # noqa: E402
from p2pfs.fsck import fsck  # noqa: E402
from p2pfs.netbackend import NetworkBackend, mkfs_network  # noqa: E402
from storage.namespace import Namespace  # noqa: E402
from storage.ring_local import LocalRing  # noqa: E402

RING_ARGS = ["--request-timeout", "2", "--view-change-timeout", "2"]
PER_DIR = 100
SYNC_EVERY = 500


def content(i: int) -> bytes:
    if i % 10 == 0:
        return (b"%08d" % i) * 2500                   # 20,000 bytes: a DATA block
    return (b"file %d\n" % i) * (10 + i % 40)        # inline


async def fill(s, files: int) -> float:
    t = time.perf_counter()
    ns = await Namespace.mount(s.view, s.identity, s.blocks, s.board)
    d = None
    for i in range(files):
        if i % PER_DIR == 0:
            d = await ns.mkdir(1, f"d{i // PER_DIR:04d}", 0o755, 0, 0)
        a = await ns.create(d.ino, f"f{i:05d}", 0o644, 0, 0)
        await ns.write(a.ino, 0, content(i))
        if i % SYNC_EVERY == SYNC_EVERY - 1:
            await ns.sync()
            progress("fill", f"{i + 1} files")
    await ns.sync()
    while getattr(s.board, "pending", False):
        await trio.sleep(0.1)
    return time.perf_counter() - t


class Phases:
    """fsck's progress callback, timing its phases."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.start: dict[str, float] = {}
        self.end: dict[str, float] = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = time.perf_counter() - self.t0
        self.start.setdefault(phase, now)
        self.end[phase] = now

    def spans(self, total: float) -> dict[str, float]:
        order = sorted(self.start, key=self.start.get)
        out = {}
        for a, b in zip(order, order[1:] + [None]):
            out[a] = round((self.start[b] if b else total) - self.start[a], 3)
        return out


async def measure(vol: Path, repeat: int) -> dict:
    """``repeat`` full and ``repeat`` quick checks, alternating (so a change
    in the machine's load falls on both alike); medians of each."""
    runs = []
    for k in range(2 * repeat):
        quick = k % 2 == 1
        ph = Phases()
        t, cpu = time.perf_counter(), time.process_time()
        report = await fsck(vol, verify_data=not quick, progress=ph)
        wall = time.perf_counter() - t
        cpu = time.process_time() - cpu
        if report.exit_code() != 0:
            raise SystemExit(f"the volume is not clean: {[p.line() for p in report.problems]}")
        runs.append({"quick": quick, "seconds": round(wall, 3), "cpu": round(cpu, 3),
                     "phases": ph.spans(wall),
                     "load": load_average(), "stats": report.stats})
        progress("fsck", f"{'quick' if quick else 'full'} check {wall:.1f} s "
                         f"({report.stats.get('blocks')} blocks)")
    full = [r["seconds"] for r in runs if not r["quick"]]
    quick = [r["seconds"] for r in runs if r["quick"]]
    cpu = [r["cpu"] for r in runs if not r["quick"]]
    return {"full_median": statistics.median(full), "full": full,
            "cpu_median": statistics.median(cpu),
            "quick_median": statistics.median(quick), "quick": quick, "runs": runs,
            "stats": runs[0]["stats"]}


async def single(base: Path, files: int, repeat: int) -> dict:
    vol = base / "single"
    mkfs_local(vol)
    async with LocalBackend(vol).attach() as s:
        fill_s = await fill(s, files)
    out = await measure(vol, repeat)
    out["fill_seconds"] = round(fill_s, 1)
    return out


def _node_argv(index, data, bootstrap):
    args = ["--data", str(data), "--listen", "127.0.0.1:0", "--log-level", "warning"]
    for b in bootstrap:
        args += ["--bootstrap", b.info["bootstrap"]]
    return python_module_argv("storage", *args)


async def network(base: Path, files: int, repeat: int) -> dict:
    cluster = LocalCluster(base / "nodes", _node_argv, ready_timeout=120)
    owner = Identity.generate()
    ring = LocalRing(base / "ring", owner=owner, args=RING_ARGS, name="bench")
    try:
        cluster.start(4)
        await ring.start()
        vol = base / "network"
        mkfs_network(vol, [cluster.nodes[0].info["bootstrap"]], r=3, name="bench",
                     identity=owner, ring=ring.ring)
        async with NetworkBackend(vol).attach() as s:
            fill_s = await fill(s, files)
        out = await measure(vol, repeat)
        out["fill_seconds"] = round(fill_s, 1)
        return out
    finally:
        ring.close()
        cluster.stop()


def markdown(args, info: dict, results: dict) -> str:
    rows = []
    for kind, r in results.items():
        st = r["stats"]
        rows.append([kind, f"{st.get('files', 0):,}", f"{st.get('records', 0):,}",
                     st.get("snapshots", 0), f"{st.get('blocks', 0):,}",
                     f"{st.get('copies_verified', 0):,}",
                     f"{r['full_median']:.1f} s ({', '.join(f'{x:.1f}' for x in r['full'])})",
                     f"{r['cpu_median']:.1f} s", f"{r['quick_median']:.1f} s",
                     f"{r['fill_seconds']:.0f} s"])
    table = markdown_table(["volume", "files", "records", "snapshots", "blocks",
                            "copies verified", "fsck: median (runs)", "its CPU (fsck process)",
                            "fsck --quick: median", "to write it"], rows, right=range(1, 10))
    phase_rows = []
    for kind, r in results.items():
        run = r["runs"][0]
        ph = run["phases"]
        phase_rows.append([kind, f"{ph.get('heads', 0) + ph.get('ring', 0):.2f} s"] +
                          [f"{ph.get(p, 0):.2f} s" for p in ("logs", "snapshots", "replay",
                                                              "blocks")])
    phases = markdown_table(["volume", "certificates, heads, view", "logs read",
                             "snapshots loaded", "replay and compare", "block survey"],
                            phase_rows, right=(1, 2, 3, 4, 5))
    return "\n\n".join([
        "# fsck of a 10,000-file volume (bench/fsck_bench.py)",
        f"`bench/fsck_bench.py --files {args.files} --kinds {args.kinds} --repeat "
        f"{args.repeat}`: a clean check of everything reachable from the view (certificates "
        f"member by member, heads, every log record, every snapshot compared with a replay, "
        f"every block's copies fetched and hashed on its holders); `--quick` trusts the "
        f"holders' word that they hold a block. Single-node: one LMDB store, r = 1. "
        f"Network: 4 storage node processes, r = 3, a 4-member ring, all on loopback. "
        f"The machine is shared (see the load averages): wall times vary with what else "
        f"runs; the CPU time of the fsck process itself varies less.",
        machine_markdown(info), table,
        "Where a full check's time goes (its first run, just after the volume was "
        "written; load averages per run are in the JSON):", phases,
    ]) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=10000)
    p.add_argument("--kinds", default="single,network")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "fsck"))
    args = p.parse_args()
    info = machine_info()
    results = {}
    base = Path(tempfile.mkdtemp(prefix="p2pfs-fsck-bench-"))
    try:
        for kind in args.kinds.split(","):
            progress("bench", f"{kind}: {args.files} files")
            fn = {"single": single, "network": network}[kind]
            results[kind] = trio.run(fn, base / kind, args.files, args.repeat)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    info["load_after"] = load_average()
    write_json(args.out + ".json", {"machine": info, "args": vars(args), "results": results})
    write_text(args.out + ".md", markdown(args, info, results))
    print(markdown(args, info, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
