#!/usr/bin/env python3
"""Block layer benchmark: replicated puts and gets across real node processes
on loopback (issue 4; DESIGN.md "Performance budget").

Setup: ``--nodes`` storage node processes (``python -m storage``: TLS
transport, LMDB store, repair keeper) on 127.0.0.1, plus this process as a
client node: a ``StorageNode`` without a store on the TLS transport, joined
to the overlay (as ``p2pfs mount`` running a node of its own that stores
nothing). r = 3. Payloads are random, so nothing deduplicates.

Phases, each figure in MB/s of user data (plaintext; 1 MB = 10^6 bytes):

1. single 64 KiB blocks, one at a time: ``put`` (seal, place, three stores,
   durable on return), then ``get`` (locate, fetch, verify, open);
2. a 256 MiB stream: ``put_many`` of 4,096 blocks of 64 KiB, then
   ``get_many`` of them all (pipelined; results compared with the input);
3. restore after a holder dies: ``--restore-mib`` stored, one holder killed
   with SIGKILL, then the time until every block is back on r live nodes
   (the overlay's failure detection, by heartbeat, starts the nodes' repair
   passes; ``storage.maintenance``).

Beside each figure: CPU seconds used by this client process and by all node
processes together during the phase (the machine has 2 cores, shared by all).

    .venv/bin/python bench/blocks_bench.py                      # Markdown on stdout
    .venv/bin/python bench/blocks_bench.py --out bench/results/blocks
    .venv/bin/python bench/blocks_bench.py --profile DIR        # pyinstrument, client + nodes
    .venv/bin/python bench/blocks_bench.py --py-spy /path/to/py-spy --spy-dir DIR
    .venv/bin/python bench/blocks_bench.py --compare BEFORE.json --out bench/results/blocks

``--py-spy`` samples the client and every node during each phase (collapsed
stacks, ``DIR/<phase>-<process>.txt``, all threads, GIL or not): the
figures of such a run are perturbed, read them for where the time goes only.
``--compare`` puts the figures of an earlier run (its ``--out`` JSON, for
example of the code before a change, run just before on the same machine)
beside this one's. ``--out`` keeps the hand-written "Where the time goes"
section of an existing ``.md``, replacing only the figures above it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import trio  # noqa: E402

from bench.common import (load_average, machine_info, machine_markdown, proc_cpu,  # noqa: E402
                          progress, self_cpu)
from overlay.wire.ids import Identity  # noqa: E402
from overlay.wire.tls import TlsTransport  # noqa: E402
from overlay.wire.transport import Peer  # noqa: E402
from p2pfs.cluster import LocalCluster, python_module_argv  # noqa: E402
from storage import blockservice as bs  # noqa: E402
from storage.blockapi import MAX_BLOCK, Kind  # noqa: E402
from storage.maintenance import DEFAULT_INTERVAL  # noqa: E402
from storage.server import StorageNode  # noqa: E402

KEY = bytes(range(32))
MB = 1e6
KEEP_MARK = "## Where the time goes"


class Phase:
    """Wall time and CPU (client, nodes) of one phase; with ``spy`` (a
    :class:`Spy`), sampled by py-spy meanwhile under the name ``name``."""

    spy: "Spy | None" = None   # set by main() for a --py-spy run

    def __init__(self, pids: list[int], name: str = ""):
        self.pids = pids
        self.name = name
        self._spies: list[subprocess.Popen] = []

    def __enter__(self):
        if self.spy is not None and self.name:
            self._spies = self.spy.start(self.pids, self.name)
        self.t0, self.c0, self.n0 = time.perf_counter(), self_cpu(), proc_cpu(self.pids)
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.client_cpu = self_cpu() - self.c0
        self.nodes_cpu = proc_cpu(self.pids) - self.n0
        if self._spies:
            self.spy.stop(self._spies)


class Spy:
    """py-spy recorders attached to this process and the nodes for a phase."""

    def __init__(self, exe: str, out: Path, rate: int = 100):
        self.exe, self.out, self.rate = exe, out, rate
        out.mkdir(parents=True, exist_ok=True)

    def start(self, pids: list[int], name: str) -> list[subprocess.Popen]:
        tag = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        procs = []
        for label, pid in [("client", os.getpid())] + [(f"node{i}", p) for i, p in enumerate(pids)]:
            procs.append(subprocess.Popen(
                [self.exe, "record", "--pid", str(pid), "--format", "raw", "--nonblocking",
                 "--rate", str(self.rate), "-o", str(self.out / f"{tag}-{label}.txt")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1.0)   # attached before the phase starts
        return procs

    @staticmethod
    def stop(procs: list[subprocess.Popen]) -> None:
        for p in procs:
            p.send_signal(signal.SIGINT)   # py-spy writes its file and exits
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def row(name: str, nbytes: int, ph: Phase, **extra) -> dict:
    progress("blocks", f"{name}: {nbytes / MB / ph.seconds:.1f} MB/s")
    return {"phase": name, "bytes": nbytes, "seconds": round(ph.seconds, 3),
            "mb_per_s": round(nbytes / MB / ph.seconds, 1),
            "client_cpu_s": round(ph.client_cpu, 2), "nodes_cpu_s": round(ph.nodes_cpu, 2),
            **extra}


def median_of(runs: list[dict], key: str) -> dict:
    """The run with the median ``key`` (upper median), listing every run."""
    mid = sorted(runs, key=lambda r: r[key])[len(runs) // 2]
    return {**mid, "runs": [r[key] for r in runs], "runs_of": key}


def node_argv(args, profile_dir: Path | None):
    def argv_for(index, data, bootstrap):
        a = ["--data", str(data), "--listen", "127.0.0.1:0", "--quota", "8G",
             "--log-level", "warning"]
        if args.repair_interval is not None:
            a += ["--repair-interval", str(args.repair_interval)]
        if not args.fsync:
            a.append("--no-fsync")
        for b in bootstrap:
            a += ["--bootstrap", b.info["bootstrap"]]
        if profile_dir is not None:
            out = profile_dir / f"node{index}.txt"
            return [sys.executable, __file__, "--profiled-node", str(out), *a]
        return python_module_argv("storage", *a)
    return argv_for


async def drain_publishing(cluster: LocalCluster) -> None:
    """Wait until no node has blocks left to publish."""
    from overlay import control

    while True:
        backlog = 0
        for n in cluster.nodes:
            if n.alive:
                st = await control.call(n.info["control"], "blk.ctl.status", {})
                backlog += st["status"].get("publish_backlog", 0)
        if not backlog:
            return
        await trio.sleep(0.25)


async def count_copies(t: TlsTransport, cluster: LocalCluster, bguids: list[bytes]) -> dict:
    counts = dict.fromkeys(bguids, 0)
    for n in cluster.nodes:
        if not n.alive:
            continue
        have = await bs.has_on(t, Peer(bytes.fromhex(n.id_hex), n.addr), bguids, timeout=60)
        for g, h in have.items():
            counts[g] += h
    return counts


async def run(args, cluster: LocalCluster, profiler) -> dict:
    pids = [n.pid for n in cluster.nodes]
    results: list[dict] = []
    boot = [Peer(bytes.fromhex(n.id_hex), n.addr) for n in cluster.nodes[:1]]
    client = StorageNode(TlsTransport(Identity.generate()), None)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(args.timeout):
            await nursery.start(client.run, boot)
            await trio.sleep(1.0)   # let the join's table updates settle
            rb = client.blocks(KEY)
            if profiler is not None:
                profiler.start()

            written: list[bytes] = []   # every block stored, for the restore count

            # 1. single blocks, one in flight
            singles = [os.urandom(MAX_BLOCK) for _ in range(args.singles)]
            progress("blocks", f"{args.singles} single puts")
            with Phase(pids, "single put") as ph:
                sg = [await rb.put(Kind.DATA, p) for p in singles]
            written += sg
            results.append(row("put, single 64 KiB blocks", len(singles) * MAX_BLOCK, ph,
                               ops_per_s=round(len(singles) / ph.seconds, 1)))
            with Phase(pids, "single publish") as ph:
                await drain_publishing(cluster)
            results.append({"phase": "holders publish the single blocks in the DOLR "
                                     "(after the puts)",
                            "seconds": round(ph.seconds, 2), "blocks": len(singles),
                            "nodes_cpu_s": round(ph.nodes_cpu, 2)})
            progress("blocks", f"{args.singles} single gets")
            with Phase(pids, "single get") as ph:
                got = [await rb.get(g, Kind.DATA) for g in sg]
            assert got == singles, "single gets returned wrong data"
            results.append(row("get, single 64 KiB blocks", len(singles) * MAX_BLOCK, ph,
                               ops_per_s=round(len(singles) / ph.seconds, 1)))
            del singles, got

            # 2. the stream, repeated with fresh data (nothing deduplicates)
            n = args.stream_mib * (1 << 20) // MAX_BLOCK
            puts, pubs, gets = [], [], []
            for rep in range(args.repeat):
                stream = [os.urandom(MAX_BLOCK) for _ in range(n)]
                progress("blocks", f"stream put of {args.stream_mib} MiB ({rep + 1}/{args.repeat})")
                with Phase(pids, f"stream put {rep}") as ph:
                    bg = await rb.put_many([(Kind.DATA, p) for p in stream])
                puts.append(row(f"put_many, {args.stream_mib} MiB stream", n * MAX_BLOCK, ph))
                written += bg
                # Holders publish in the background once the stream pauses
                # (storage.maintenance): measured apart, so gets are not charged.
                progress("blocks", "waiting for the holders to publish the stream")
                with Phase(pids, f"stream publish {rep}") as ph:
                    await drain_publishing(cluster)
                pubs.append({"phase": f"holders publish the {args.stream_mib} MiB stream "
                                      f"in the DOLR (after the put)",
                             "seconds": round(ph.seconds, 2), "blocks": n,
                             "nodes_cpu_s": round(ph.nodes_cpu, 2)})
                progress("blocks", f"stream get of {args.stream_mib} MiB")
                with Phase(pids, f"stream get {rep}") as ph:
                    back = await rb.get_many([(g, Kind.DATA) for g in bg])
                assert back == stream, "stream get returned wrong data"
                gets.append(row(f"get_many, {args.stream_mib} MiB stream", n * MAX_BLOCK, ph))
                del stream, back
            results += [median_of(puts, "mb_per_s"), median_of(pubs, "seconds"),
                        median_of(gets, "mb_per_s")]
            if profiler is not None:
                profiler.stop()

            # 3. restore after a holder dies: everything it held, back to r copies
            async with TlsTransport(Identity.generate()) as t:
                m = args.restore_mib * (1 << 20) // MAX_BLOCK
                written += await rb.put_many([(Kind.DATA, os.urandom(MAX_BLOCK))
                                              for _ in range(m)])
                await drain_publishing(cluster)
                victim = cluster.nodes[-1]
                held = sum((await bs.has_on(t, Peer(bytes.fromhex(victim.id_hex), victim.addr),
                                            written, timeout=60)).values())
                progress("blocks", f"killing node {victim.index} (pid {victim.pid}), "
                                   f"holder of {held} of {len(written)} blocks")
                killed_at = time.perf_counter()
                cluster.kill(victim)
                with Phase(pids, "restore") as ph:
                    while True:
                        copies = await count_copies(t, cluster, written)
                        short = sum(1 for g in written if copies[g] < 3)
                        if not short:
                            break
                        if time.perf_counter() - killed_at > args.restore_timeout:
                            progress("blocks", f"restore incomplete: {short} blocks short")
                            break
                        await trio.sleep(0.5)
                lost = sum(1 for g in written if copies[g] == 0)
                restore = time.perf_counter() - killed_at
                results.append({"phase": f"restore r=3 after kill -9 of a holder "
                                         f"({held} blocks, {held * MAX_BLOCK / MB:.0f} MB, "
                                         f"lost with it)",
                                "seconds": round(restore, 2), "blocks": held,
                                "mb_per_s": round(held * MAX_BLOCK / MB / restore, 1),
                                "lost": lost, "still_short": short,
                                "client_cpu_s": round(ph.client_cpu, 2),
                                "nodes_cpu_s": round(ph.nodes_cpu, 2)})
            client.stop()
            nursery.cancel_scope.cancel()
    return {"results": results, "client_stats": dict(rb.stats),
            "placement": dict(client.placement.stats)}


def _phase_key(name: str) -> str:
    return re.sub(r" \(.*\)$", "", name)   # the restore phase names its counts


def _cell(r: dict | None, key: str) -> str:
    return "" if r is None else str(r.get(key, ""))


def markdown(result: dict, keep: str) -> str:
    cfg = result["config"]
    before = result.get("before")
    old = {_phase_key(r["phase"]): r for r in before["results"]} if before else {}
    lines = [
        "# Block layer benchmark: replicated puts and gets on loopback", "",
        f"Produced by `.venv/bin/python bench/blocks_bench.py --out bench/results/blocks"
        + (" --compare BEFORE.json" if before else "") + "` "
        f"({cfg['nodes']} storage node processes + this client node, r = 3, "
        f"fsync {'on' if cfg['fsync'] else 'off'}, periodic repair every "
        f"{cfg['repair_interval'] or DEFAULT_INTERVAL:g} s plus a pass when a neighbour fails).",
        "", machine_markdown(result["machine"]), "",
    ]
    if before:
        m = before["machine"]
        end = f", {m['load_after']} at the end" if m.get("load_after") else ""
        lines += [f"Each cell: before / after. Before: the same benchmark on git {m.get('git')}, "
                  f"started {m.get('date')}, load average {m.get('load')} at the start{end}. "
                  "After: this tree.", "",
                  "| phase | MB/s of user data | ops/s | seconds | client CPU s | nodes CPU s |",
                  "|---|---:|---:|---:|---:|---:|"]
    else:
        lines += ["| phase | MB/s of user data | ops/s | seconds | client CPU s | nodes CPU s |",
                  "|---|---:|---:|---:|---:|---:|"]
    for r in result["results"]:
        name = r["phase"]
        if len(r.get("runs", ())) > 1:
            name += f" (median of {len(r['runs'])}: {', '.join(str(x) for x in r['runs'])})"
        cells = [_cell(r, k) for k in ("mb_per_s", "ops_per_s", "seconds", "client_cpu_s",
                                       "nodes_cpu_s")]
        if before:
            o = old.get(_phase_key(r["phase"]))
            prev = [_cell(o, k) for k in ("mb_per_s", "ops_per_s", "seconds", "client_cpu_s",
                                          "nodes_cpu_s")]
            cells = [f"{p} / {c}" if p or c else "" for p, c in zip(prev, cells)]
            if o is not None and len(o.get("runs", ())) > 1:
                name += f"; before: {', '.join(str(x) for x in o['runs'])}"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Targets (issue 4): put >= 50 MB/s and get >= 100 MB/s of user data.", ""]
    if keep:
        lines += [keep.rstrip(), ""]
    return "\n".join(lines)


def profiled_node(out: str, argv: list[str]) -> int:
    """Run ``python -m storage ARGV`` under pyinstrument; the profile is
    written when the node exits (SIGTERM: it leaves, then returns)."""
    from pyinstrument import Profiler

    from storage import server

    prof = Profiler(async_mode="disabled")
    prof.start()
    try:
        return server.main(argv)
    finally:
        prof.stop()
        Path(out).write_text(prof.output_text(unicode=True))


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--profiled-node":
        return profiled_node(sys.argv[2], sys.argv[3:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=5)
    p.add_argument("--singles", type=int, default=200)
    p.add_argument("--stream-mib", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3, help="stream runs (median reported)")
    p.add_argument("--restore-mib", type=int, default=64)
    p.add_argument("--repair-interval", type=float, default=None,
                   help="the nodes' periodic repair pass (default: theirs, 300 s; passes "
                        "also run when a neighbour fails)")
    p.add_argument("--restore-timeout", type=float, default=300.0)
    p.add_argument("--timeout", type=float, default=1200.0, help="give up after this long")
    p.add_argument("--fsync", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--profile", type=Path, help="write pyinstrument profiles here")
    p.add_argument("--py-spy", metavar="EXE", help="sample every phase with this py-spy")
    p.add_argument("--spy-dir", type=Path, default=Path("spy"),
                   help="where --py-spy writes its collapsed stacks")
    p.add_argument("--compare", type=Path, metavar="BEFORE.json",
                   help="show the figures of this earlier result beside the new ones")
    p.add_argument("--out", type=Path, help="write OUT.md and OUT.json")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    before = json.loads(args.compare.read_text()) if args.compare else None
    if args.py_spy:
        Phase.spy = Spy(args.py_spy, args.spy_dir)
    info = machine_info()
    base = Path(tempfile.mkdtemp(prefix="blocks-bench-"))
    profiler = None
    if args.profile:
        from pyinstrument import Profiler
        args.profile.mkdir(parents=True, exist_ok=True)
        profiler = Profiler(async_mode="disabled")
    cluster = LocalCluster(base, node_argv(args, args.profile), ready_timeout=120)
    try:
        progress("blocks", f"starting {args.nodes} node processes in {base}")
        cluster.start(args.nodes)
        out = trio.run(run, args, cluster, profiler)
    finally:
        cluster.stop(grace=120 if args.profile else 20)
        shutil.rmtree(base, ignore_errors=True)
    info["load_after"] = load_average()
    if profiler is not None:
        (args.profile / "client.html").write_text(profiler.output_html())
        (args.profile / "client.txt").write_text(profiler.output_text(unicode=True))
    result = {"machine": info, "config": {"nodes": args.nodes, "r": 3, "fsync": args.fsync,
                                          "repair_interval": args.repair_interval,
                                          "stream_mib": args.stream_mib,
                                          "repeat": args.repeat,
                                          "singles": args.singles}, **out}
    if before is not None:
        result["before"] = {"machine": before["machine"], "results": before["results"]}
    keep = ""
    if args.out:
        md = args.out.with_suffix(".md")
        if md.exists():
            old = md.read_text()
            if KEEP_MARK in old:
                keep = old[old.index(KEEP_MARK):]
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(markdown(result, keep))
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(markdown(result, keep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
