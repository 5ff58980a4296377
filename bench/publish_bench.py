#!/usr/bin/env python3
"""What publishing costs the holders after a burst of block puts (issues 4
and 8; DESIGN.md "Performance budget"), for one source tree or several side
by side (for example the code before and after batched publishing).

Setup as in ``bench/blocks_bench.py``: ``--nodes`` storage node processes
(``python -m storage``, TLS, LMDB) on 127.0.0.1 and this process as a client
node that stores nothing, r = 3. Two workloads, fresh random data each:

* small: ``--small`` blocks of ``--small-size`` bytes put ``--burst`` at a
  time, one put after the other (the shape of copying a tree of small files);
* stream: ``--stream`` blocks of 64 KiB in one ``put_many``.

Per workload: the put (seconds, MB/s of user data, CPU of the client and of
all nodes), then the publishing the holders still do after it (until every
node's publish backlog is empty: seconds, nodes' CPU from /proc/PID/stat),
and the requests the nodes sent over both, by message type (the overlay's
``tap.*`` ones are what publishing costs in messages). With ``--idle S``,
then S seconds with no client activity: what keeping every block published
costs (the periodic republish, soft state; storage nodes republish every
600 s, so S must exceed that to see a round).

    .venv/bin/python bench/publish_bench.py                       # this tree
    .venv/bin/python bench/publish_bench.py --tree before=/tmp/base --tree after=.
    .venv/bin/python bench/publish_bench.py --tree ... --out bench/results/publish

With ``--tree`` (twice or more), each tree runs in a child process started in
that directory (its node processes too), ``--rounds`` times, alternating
trees, and the medians are shown side by side. The script only uses APIs that
existed before batched publishing, so an older tree can be measured with it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import proc_cpu, self_cpu  # noqa: E402

MB = 1e6
KEY = bytes(range(32))


def progress(msg: str) -> None:
    print(f"[publish] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------- one tree, once

async def measure(args) -> dict:
    import trio

    from overlay import control
    from overlay.wire.ids import Identity
    from overlay.wire.tls import TlsTransport
    from overlay.wire.transport import Peer
    from p2pfs.cluster import LocalCluster, python_module_argv
    from storage.blockapi import Kind
    from storage.server import StorageNode

    def argv_for(index, data, bootstrap):
        a = ["--data", str(data), "--listen", "127.0.0.1:0", "--quota", "8G",
             "--log-level", "warning"]
        if not args.fsync:
            a.append("--no-fsync")
        for b in bootstrap:
            a += ["--bootstrap", b.info["bootstrap"]]
        return python_module_argv("storage", *a)

    async def statuses(cluster) -> list[dict]:
        return [(await control.call(n.info["control"], "blk.ctl.status", {}, timeout=60))["status"]
                for n in cluster.nodes]

    async def drain(cluster) -> None:
        while any(s.get("publish_backlog", 0) for s in await statuses(cluster)):
            await trio.sleep(0.1)

    def sent_since(before: list[dict], after: list[dict]) -> dict:
        out: dict[str, int] = {}
        for b, a in zip(before, after):
            for k, v in a["sent"].items():
                d = v - b["sent"].get(k, 0)
                if d:
                    out[k] = out.get(k, 0) + d
        return dict(sorted(out.items()))

    base = Path(tempfile.mkdtemp(prefix="publish-bench-"))
    cluster = LocalCluster(base, argv_for, ready_timeout=120)
    results = {}
    try:
        progress(f"{Path.cwd()}: starting {args.nodes} nodes")
        cluster.start(args.nodes)
        pids = [n.pid for n in cluster.nodes]
        boot = [Peer(bytes.fromhex(n.id_hex), n.addr) for n in cluster.nodes[:1]]
        client = StorageNode(TlsTransport(Identity.generate()), None)
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run, boot)
            await trio.sleep(1.0)
            rb = client.blocks(KEY)
            await drain(cluster)
            for name, count, size, burst in (("small", args.small, args.small_size, args.burst),
                                             ("stream", args.stream, 65536, args.stream)):
                if count <= 0:
                    continue
                data = [os.urandom(size) for _ in range(count)]
                before = await statuses(cluster)
                t0, c0, n0 = time.perf_counter(), self_cpu(), proc_cpu(pids)
                for i in range(0, count, burst):
                    await rb.put_many([(Kind.DATA, p) for p in data[i:i + burst]])
                t1, c1, n1 = time.perf_counter(), self_cpu(), proc_cpu(pids)
                await drain(cluster)
                t2, n2 = time.perf_counter(), proc_cpu(pids)
                sent = sent_since(before, await statuses(cluster))
                results[name] = {
                    "blocks": count, "block_bytes": size, "per_put": burst,
                    "put_s": round(t1 - t0, 3), "put_mb_s": round(count * size / MB / (t1 - t0), 1),
                    "put_client_cpu_s": round(c1 - c0, 2), "put_nodes_cpu_s": round(n1 - n0, 2),
                    "publish_after_s": round(t2 - t1, 2), "publish_after_nodes_cpu_s": round(n2 - n1, 2),
                    "nodes_cpu_total_s": round(n2 - n0, 2),
                    "tap_messages": sum(v for k, v in sent.items() if k.startswith("tap.")),
                    "sent": sent,
                }
                progress(f"{name}: {results[name]['put_mb_s']} MB/s, nodes CPU "
                         f"{results[name]['nodes_cpu_total_s']} s, "
                         f"{results[name]['tap_messages']} overlay messages")
            if args.idle > 0:
                before = await statuses(cluster)
                n0 = proc_cpu(pids)
                await trio.sleep(args.idle)
                after = await statuses(cluster)
                sent = sent_since(before, after)
                results["idle"] = {
                    "seconds": args.idle, "published": sum(s["published"] for s in after),
                    "nodes_cpu_s": round(proc_cpu(pids) - n0, 2),
                    "tap_messages": sum(v for k, v in sent.items() if k.startswith("tap.")),
                    "sent": sent}
                progress(f"idle {args.idle:g} s with {results['idle']['published']} objects "
                         f"published: nodes CPU {results['idle']['nodes_cpu_s']} s")
            client.stop()
            nursery.cancel_scope.cancel()
    finally:
        cluster.stop(grace=20)
        shutil.rmtree(base, ignore_errors=True)
    return results


# -------------------------------------------------------------- side by side

KEYS = [("put_mb_s", "put MB/s"), ("put_nodes_cpu_s", "nodes CPU s during the put"),
        ("publish_after_s", "publishing after the put, s"),
        ("publish_after_nodes_cpu_s", "nodes CPU s publishing after the put"),
        ("nodes_cpu_total_s", "nodes CPU s, put + publishing"),
        ("tap_messages", "overlay requests sent by the nodes")]
IDLE_KEYS = [("seconds", "idle seconds"), ("published", "objects published (all nodes)"),
             ("nodes_cpu_s", "nodes CPU s"), ("tap_messages", "overlay requests sent by the nodes")]


def compare(args) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.common import load_average, machine_info

    info = machine_info()
    runs: dict[str, list[dict]] = {label: [] for label, _ in args.tree}
    for r in range(args.rounds):
        order = args.tree if r % 2 == 0 else list(reversed(args.tree))
        for label, path in order:
            progress(f"round {r + 1}/{args.rounds}: {label} ({path})")
            child = ([sys.executable, str(Path(__file__).resolve()), "--json",
                      "--nodes", str(args.nodes), "--small", str(args.small),
                      "--small-size", str(args.small_size), "--burst", str(args.burst),
                      "--stream", str(args.stream), "--idle", str(args.idle)]
                     + ([] if args.fsync else ["--no-fsync"]))
            env = {**os.environ, "PYTHONPATH": str(Path(path).resolve())}
            out = subprocess.run(child, cwd=path, env=env, check=True, stdout=subprocess.PIPE)
            runs[label].append(json.loads(out.stdout))
    med: dict[str, dict] = {}
    for label, rs in runs.items():
        med[label] = {}
        for wl in rs[0]:
            keys = IDLE_KEYS if wl == "idle" else KEYS
            med[label][wl] = {k: statistics.median(r[wl][k] for r in rs) for k, _ in keys}
            med[label][wl]["sent_last_run"] = rs[-1][wl]["sent"]
    info["load_after"] = load_average()
    return {"machine": info, "command": " ".join(["bench/publish_bench.py"] + sys.argv[1:]),
            "config": {"nodes": args.nodes, "small": args.small, "small_size": args.small_size,
                       "burst": args.burst, "stream": args.stream, "idle": args.idle,
                       "fsync": args.fsync},
            "trees": dict(args.tree), "rounds": args.rounds, "medians": med, "runs": runs}


def markdown(result: dict) -> str:
    from bench.common import machine_markdown

    labels = list(result["trees"])
    cfg = result["config"]
    lines = ["# Publishing after a burst of block puts: side by side", "",
             f"Produced by `.venv/bin/python {result['command']}` ({cfg['nodes']} storage node "
             f"processes + a client node, r = 3, fsync {'on' if cfg['fsync'] else 'off'}; "
             f"small: {cfg['small']} blocks of {cfg['small_size']} B, {cfg['burst']} per put; "
             f"stream: {cfg['stream']} blocks of 64 KiB in one put_many).", "",
             machine_markdown(result["machine"]), "",
             f"Medians of {result['rounds']} rounds, trees alternating: "
             + ", ".join(f"{lb} = `{p}`" for lb, p in result["trees"].items()), ""]
    for wl in result["medians"][labels[0]]:
        lines += [f"**{wl}**", "", "| | " + " | ".join(labels) + " |",
                  "|---|" + "---:|" * len(labels)]
        for k, name in (IDLE_KEYS if wl == "idle" else KEYS):
            lines.append(f"| {name} | " + " | ".join(f"{result['medians'][lb][wl][k]:g}"
                                                      for lb in labels) + " |")
        for lb in labels:
            lines.append(f"| sent by type ({lb}, last run) | "
                         + json.dumps(result["medians"][lb][wl]["sent_last_run"]) + " |"
                         + " |" * (len(labels) - 1))
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--small", type=int, default=2000, help="small blocks (0: skip)")
    p.add_argument("--small-size", type=int, default=4096)
    p.add_argument("--burst", type=int, default=4, help="small blocks per put")
    p.add_argument("--stream", type=int, default=1024, help="64 KiB blocks (0: skip)")
    p.add_argument("--idle", type=float, default=0.0,
                   help="seconds of quiet measured at the end (0: skip)")
    p.add_argument("--fsync", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--tree", action="append", default=[], type=lambda s: tuple(s.split("=", 1)),
                   metavar="LABEL=DIR", help="measure this source tree (twice or more)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, help="write OUT.md and OUT.json")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.tree:
        result = compare(args)
        md = markdown(result)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.with_suffix(".md").write_text(md + "\n")
            args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2) if args.json else md)
        return 0
    sys.path.insert(0, str(Path.cwd()))
    import trio
    result = trio.run(measure, args)
    print(json.dumps(result, indent=2) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
