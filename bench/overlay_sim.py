#!/usr/bin/env python3
"""Tapestry overlay at scale, on the simulated network (virtual time).

For each network size N the very same node code as on TLS runs N nodes in
one process on ``SimNetwork`` with a ``PlaneTopology`` (nodes on a 100 ms x
100 ms square plus 1-5 ms access links: a metric space, as Tapestry's
locality analysis assumes), and measures:

* routing: hops to the root of random GUIDs (mean, p99; target log16 N + 0.5
  and + 2), whether the root is the unique global root, and routing RDP
  (overlay path latency / direct latency source -> root);
* object location: RDP of locating a replica (path to the first pointer plus
  the step to the holder, over the direct latency to that holder) for nearby
  and far replicas, with and without pointer caching on the first hops;
* dynamic joins on top of the network: messages and virtual time per join;
* failures (sizes up to ``--failures-max``): crash 10 % then 30 % of the
  nodes; share of objects (3 replicas, 3 salted roots) with a live replica
  that are located, before and after repair (heartbeats, slot repair,
  republish, all on virtual time).

The garbage collector's existing objects are frozen after the build (a
harness setting: the simulation holds millions of long-lived objects).

Building N nodes by sequential dynamic join costs O(N) joins of a few hundred
messages each; the bulk is therefore built by a fast path: every node's table
is filled from the global view with, per slot, the 3 nodes of that prefix
nearest to it, and backpointers to match. That gives exactly the table
invariant (a slot is empty only if no node has its prefix) that sequential
joins give (tests/test_overlay_sim.py checks joins establish it), with ideal
nearest-neighbour choices. ``--joins`` nodes then join with the real protocol.
The network passes message bodies by reference (``encode=False``): no schema
checks or byte counts, which the tests cover, to afford 10,000 nodes.

    .venv/bin/python bench/overlay_sim.py                       # N = 1k, 10k, 30k
    .venv/bin/python bench/overlay_sim.py --sizes 1000 --quick  # a smoke run
    .venv/bin/python bench/overlay_sim.py --out bench/results/overlay_sim
"""

from __future__ import annotations

import argparse
import gc
import math
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import trio
import trio.testing

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    machine_info,
    machine_markdown,
    markdown_table,
    progress,
    write_json,
    write_text,
)
from overlay import messages as m  # noqa: E402
from overlay.config import OverlayConfig  # noqa: E402
from overlay.errors import NoRoute  # noqa: E402
from overlay.node import TapestryNode  # noqa: E402
from overlay.routing_table import global_root  # noqa: E402
from overlay.wire.ids import Identity, digits  # noqa: E402
from overlay.wire.simnet import PlaneTopology, SimNetwork  # noqa: E402

# Timers off while building and measuring (so no background traffic counts
# against joins); the test-scale timers for the failure phase.
QUIET = OverlayConfig(heartbeat_interval=0, repair_interval=0, republish_interval=0)
TIMERS = OverlayConfig()


def pct(values, p: float) -> float:
    v = sorted(values)
    if not v:
        return float("nan")
    k = min(len(v) - 1, max(0, math.ceil(p / 100 * len(v)) - 1))
    return v[k]


# ----------------------------------------------------------------- building


def fast_tables(net: SimNetwork, nodes: list[TapestryNode], slot_size: int = 3) -> None:
    """Fill every table from the global view (see module docstring)."""
    order = sorted(range(len(nodes)), key=lambda i: nodes[i].id)
    ns = [nodes[i] for i in order]
    n = len(ns)
    pos = np.array([net.topology.position(x.id) for x in ns], dtype=float)  # x, y, access (ms)
    depth = 10
    dig = np.array([digits(x.id)[:depth] for x in ns], dtype=np.int8)       # n x depth
    peers = [x.peer for x in ns]
    for i, node in enumerate(ns):
        one_way = (np.hypot(pos[:, 0] - pos[i, 0], pos[:, 1] - pos[i, 1]) + pos[:, 2] + pos[i, 2]) / 1000
        rtt = 2 * one_way
        lo, hi = 0, n
        table = node.table
        for level in range(depth):
            if hi - lo <= 1:
                break
            col = dig[lo:hi, level]
            bounds = np.searchsorted(col, np.arange(17), side="left") + lo
            mine = dig[i, level]
            for d in range(16):
                a, b = int(bounds[d]), int(bounds[d + 1])
                if d == mine or a >= b:
                    continue
                k = min(slot_size, b - a)
                part = rtt[a:b]
                idx = np.argpartition(part, k - 1)[:k] if b - a > k else np.arange(b - a)
                for j in idx:
                    j = a + int(j)
                    r = float(rtt[j])
                    table.add(peers[j], r)
                    node.rtts[peers[j].id] = r
                    ns[j].table.note_backpointer(peers[i], 0.0)
            lo, hi = int(bounds[mine]), int(bounds[mine + 1])


async def build(nursery, n: int, seed: int) -> tuple[SimNetwork, list[TapestryNode]]:
    net = SimNetwork(seed=seed, topology=PlaneTopology(seed=seed), encode=False)
    nodes = []
    for i in range(n):
        node = TapestryNode(net.add(Identity.from_seed(b"bench-%d-%d" % (seed, i))), config=QUIET)
        nodes.append(node)
    fast_tables(net, nodes)
    for node in nodes:
        await nursery.start(node.run)
        node.joined = True
    # Millions of long-lived objects (tables, tasks): without this, Python's
    # cyclic collector rescans them all over and takes a third of the time.
    gc.collect()
    gc.freeze()
    return net, nodes


async def batched(fns, width: int = 200) -> None:
    """Run coroutine functions ``width`` at a time (bounded virtual time)."""
    for k in range(0, len(fns), width):
        async with trio.open_nursery() as n:
            for fn in fns[k:k + width]:
                n.start_soon(fn)


# -------------------------------------------------------------- measuring


def path_latency(net: SimNetwork, trace: list[bytes]) -> float:
    return sum(net.latency(a, b) for a, b in zip(trace, trace[1:]))


async def measure_routing(net, nodes, queries: int, rnd: random.Random) -> dict:
    ids = sorted(x.id for x in nodes)
    hops, rdp, wrong, failed = [], [], 0, 0

    async def one():
        nonlocal wrong, failed
        src = rnd.choice(nodes)
        g = rnd.randbytes(32)
        try:
            r = await src.find_root(g, trace=True)
        except NoRoute:
            failed += 1
            return
        hops.append(r.hops)
        if r.at.id != global_root(g, ids):
            wrong += 1
        direct = net.latency(src.id, r.at.id)
        if direct > 0:
            rdp.append(path_latency(net, r.trace) / direct)

    await batched([one] * queries)
    return {"queries": queries, "failed": failed, "wrong_root": wrong,
            "mean_hops": statistics.fmean(hops), "p99_hops": pct(hops, 99),
            "max_hops": max(hops), "hops_hist": np.bincount(hops).tolist(),
            "rdp_median": statistics.median(rdp), "rdp_p90": pct(rdp, 90),
            "rdp_mean": statistics.fmean(rdp), "_rdp": rdp}


async def publish_objects(nodes, count: int, replicas: int, rnd: random.Random) -> dict:
    objs = {}
    for _ in range(count):
        g = rnd.randbytes(32)
        objs[g] = rnd.sample(nodes, replicas)
    fns = []
    for g, holders in objs.items():
        for h in holders:
            fns.append(lambda h=h, g=g: h.publish(g))
    await batched(fns)
    return objs


async def measure_location(net, nodes, objs, queries: int, rnd: random.Random) -> dict:
    """Locate one replica per query (diverting at the first pointer) and
    compare the path with the direct latency to the replica found."""
    keys = list(objs)
    rows = []   # (direct to nearest replica, rdp vs found, rdp vs nearest, hops, nearest found)
    misses = 0

    async def one():
        nonlocal misses
        client = rnd.choice(nodes)
        g = rnd.choice(keys)
        holders = objs[g]
        if client in holders:
            return
        try:
            r = await client.router.request("locate", m.salted(g, 0), obj=g, want=1, exclude=[],
                                            trace=True)
        except NoRoute:
            misses += 1
            return
        if not r.found:
            misses += 1
            return
        h = r.found[0].id
        path = path_latency(net, r.trace) + net.latency(r.trace[-1], h)
        nearest = min(net.latency(client.id, x.id) for x in holders)
        rows.append((nearest, path / net.latency(client.id, h), path / nearest,
                     len(r.trace) - 1, net.latency(client.id, h) == nearest))

    await batched([one] * queries)
    rows.sort()
    third = len(rows) // 3
    buckets = {"nearby": rows[:third], "middle": rows[third:2 * third], "far": rows[2 * third:]}
    out = {"queries": queries, "misses": misses, "measured": len(rows),
           "rdp_median": statistics.median(r[1] for r in rows),
           "rdp_p90": pct([r[1] for r in rows], 90),
           "rdp_vs_nearest_median": statistics.median(r[2] for r in rows),
           "nearest_found": sum(r[4] for r in rows) / len(rows),
           "mean_hops": statistics.fmean(r[3] for r in rows),
           "_rdp": [r[1] for r in rows], "buckets": {}}
    for name, b in buckets.items():
        out["buckets"][name] = {
            "direct_ms": [round(1000 * b[0][0], 1), round(1000 * b[-1][0], 1)],
            "rdp_median": statistics.median(r[1] for r in b),
            "rdp_p90": pct([r[1] for r in b], 90),
            "nearest_found": sum(r[4] for r in b) / len(b),
        }
    return out


async def measure_joins(net, nursery, nodes, count: int, seed: int, rnd: random.Random) -> dict:
    msgs, reqs, virt = [], [], []
    for i in range(count):
        node = TapestryNode(net.add(Identity.from_seed(b"joiner-%d-%d" % (seed, i))), config=QUIET)
        await nursery.start(node.run)
        before_sent = sum(net.stats.sent.values())
        before_msgs = net.stats.messages()
        t0 = trio.current_time()
        await node.join(rnd.choice(nodes).peer)
        # Let the hand-over and adoption pings the join set off finish.
        await trio.sleep(5)
        virt.append(trio.current_time() - t0 - 5)
        reqs.append(sum(net.stats.sent.values()) - before_sent)
        msgs.append(net.stats.messages() - before_msgs)
        nodes.append(node)
    ids = sorted(x.id for x in nodes)
    wrong = 0
    for _ in range(200):
        g = rnd.randbytes(32)
        wrong += global_root(g, ids) != (await rnd.choice(nodes).find_root(g)).at.id
    return {"joins": count, "requests_median": statistics.median(reqs),
            "messages_median": statistics.median(msgs), "messages_mean": statistics.fmean(msgs),
            "virtual_s_median": statistics.median(virt), "wrong_roots_after": wrong}


async def measure_failures(net, nodes, objs, queries: int, rnd: random.Random) -> dict:
    for node in nodes:
        node.reconfigure(TIMERS)
    alive = list(nodes)
    dead: set[bytes] = set()
    out = {}
    # Detection (dead after 30 s, heartbeats every 10 s) and a few rounds of
    # slot repair and republish after it.
    settle = TIMERS.dead_after + 3 * TIMERS.heartbeat_interval

    async def success() -> tuple[float, float]:
        """(share located by the API: salts in turn, dead holders skipped;
        share whose first route alone, toward salt 0, found a live holder)."""
        ok = first = tried = 0
        keys = [g for g, hs in objs.items() if any(h.id not in dead for h in hs)]

        async def one():
            nonlocal ok, first, tried
            client = rnd.choice(alive)
            g = rnd.choice(keys)
            tried += 1
            try:
                r = await client.router.request("locate", m.salted(g, 0), obj=g, want=1,
                                                exclude=[])
                first += bool(r.found) and r.found[0].id not in dead
            except NoRoute:
                pass
            found = await client.locate(g, n=1)
            ok += bool(found) and found[0].id not in dead

        await batched([one] * queries)
        return ok / tried, first / tried

    for share in (0.10, 0.30):
        target = int(share * len(nodes))
        victims = rnd.sample(alive, target - len(dead))
        for v in victims:
            net.crash(v.id)
            v.stop()
            dead.add(v.id)
            alive.remove(v)
        with_replica = sum(any(h.id not in dead for h in hs) for hs in objs.values())
        before = await success()
        t0 = time.perf_counter()
        await trio.sleep(settle)
        after = await success()
        out[f"{int(share * 100)}%"] = {
            "crashed": len(dead), "objects_with_live_replica": with_replica,
            "objects": len(objs), "located_before_repair": before[0],
            "located_after_repair": after[0], "first_route_before_repair": before[1],
            "first_route_after_repair": after[1], "repair_virtual_s": settle,
            "repair_real_s": round(time.perf_counter() - t0, 1)}
        progress("overlay", f"  {share:.0%} crashed: located {before[0]:.1%} before, "
                            f"{after[0]:.1%} after {settle:.0f} s of repair (first route alone: "
                            f"{before[1]:.1%} -> {after[1]:.1%})")
    return out


async def run_size(n: int, args, seed: int) -> dict:
    rnd = random.Random(seed)
    res: dict = {"n": n, "log16_n": math.log(n, 16)}
    async with trio.open_nursery() as nursery:
        t0 = time.perf_counter()
        net, nodes = await build(nursery, n, seed)
        res["build"] = {"method": "fast path (global view, 3 nearest per slot)",
                        "real_s": round(time.perf_counter() - t0, 1),
                        "mean_table": statistics.fmean(len(x.table) for x in nodes)}
        progress("overlay", f"N={n}: built in {res['build']['real_s']} s, "
                            f"{res['build']['mean_table']:.0f} neighbours per node")
        t0 = time.perf_counter()
        res["joins"] = await measure_joins(net, nursery, nodes, args.joins, seed, rnd)
        progress("overlay", f"  {args.joins} dynamic joins: median {res['joins']['messages_median']} "
                            f"messages ({time.perf_counter() - t0:.0f} s)")
        res["routing"] = await measure_routing(net, nodes, args.queries, rnd)
        r = res["routing"]
        progress("overlay", f"  routing: mean {r['mean_hops']:.2f} hops, p99 {r['p99_hops']}, "
                            f"RDP median {r['rdp_median']:.2f}, wrong roots {r['wrong_root']}")
        res["location"] = {}
        for label, spread in (("no caching", 0), ("pointer caching", QUIET.spread_hops)):
            for node in nodes:
                node.config = node.config.with_(spread_hops=spread)
            objs = await publish_objects(nodes, args.objects, 3, rnd)
            loc = await measure_location(net, nodes, objs, args.queries, rnd)
            res["location"][label] = loc
            progress("overlay", f"  location ({label}): RDP median {loc['rdp_median']:.2f}, "
                                f"p90 {loc['rdp_p90']:.2f}, nearest found {loc['nearest_found']:.0%}")
        if n <= args.failures_max:
            res["failures"] = await measure_failures(net, nodes, objs, args.queries // 2, rnd)
        nursery.cancel_scope.cancel()
    return res


# ------------------------------------------------------------------ output


def markdown(results: list[dict], info: dict, args) -> str:
    out = ["# Tapestry overlay on the simulated network", "",
           "Produced by `bench/overlay_sim.py` (see its docstring for the method). "
           "Virtual time; plane topology 100 ms x 100 ms plus 1-5 ms access links; "
           "3 neighbours per slot, 3 salted roots, 3 replicas per object.", "",
           machine_markdown(info), ""]
    rows = []
    for r in results:
        ro = r["routing"]
        tgt_mean, tgt_p99 = r["log16_n"] + 0.5, r["log16_n"] + 2
        rows.append([f"{r['n']:,}", f"{ro['mean_hops']:.2f} (<= {tgt_mean:.2f})",
                     f"{ro['p99_hops']} (<= {tgt_p99:.2f})", ro["wrong_root"],
                     f"{ro['rdp_median']:.2f}", f"{ro['rdp_p90']:.2f}"])
    out += ["## Routing to the root of random GUIDs", "",
            markdown_table(["N", "mean hops (target)", "p99 hops (target)", "wrong roots",
                            "RDP median", "RDP p90"], rows, right=range(1, 6)), ""]
    rows = []
    for r in results:
        for label, loc in r["location"].items():
            b = loc["buckets"]
            rows.append([f"{r['n']:,}", label, f"{loc['rdp_median']:.2f}", f"{loc['rdp_p90']:.2f}",
                         *(f"{b[k]['rdp_median']:.2f} / {b[k]['rdp_p90']:.2f}"
                           for k in ("nearby", "middle", "far")),
                         f"{loc['nearest_found']:.0%}"])
    out += ["## Locating one of 3 replicas", "",
            "RDP = (overlay path to the first pointer + step to the replica found) / direct "
            "latency to that replica. Buckets: thirds of the queries by direct latency to the "
            "nearest replica (median / p90).", "",
            markdown_table(["N", "pointers", "RDP median", "RDP p90", "nearby", "middle", "far",
                            "nearest replica found"], rows, right=range(2, 8)), ""]
    rows = [[f"{r['n']:,}", r["joins"]["joins"], f"{r['joins']['messages_median']:.0f}",
             f"{r['joins']['requests_median']:.0f}", f"{r['joins']['virtual_s_median']:.2f} s",
             r["joins"]["wrong_roots_after"]] for r in results]
    out += ["## Dynamic joins on top of the network", "",
            "Messages = requests + replies, everything the join sets off (measured with the "
            "timers off, so nothing else runs).", "",
            markdown_table(["N", "joins", "messages (median)", "requests (median)",
                            "virtual time (median)", "wrong roots after (of 200)"], rows,
                           right=range(1, 6)), ""]
    rows = []
    for r in results:
        for share, f in r.get("failures", {}).items():
            rows.append([f"{r['n']:,}", share, f"{f['objects_with_live_replica']}/{f['objects']}",
                         f"{f['located_before_repair']:.1%}", f"{f['located_after_repair']:.1%}",
                         f"{f['first_route_before_repair']:.1%}",
                         f"{f['first_route_after_repair']:.1%}",
                         f"{f['repair_virtual_s']:.0f} s"])
    if rows:
        out += ["## Crashes: objects with a live replica that are located", "",
                "Crashed nodes stop without notice; each query picks a live client and an object "
                "with a live replica. `locate` (the API) tries the salted roots in turn and skips "
                "holders that do not answer; \"first route\" is one locate route toward salt 0 "
                "alone, which shows what repair restores. Repair = heartbeats every 10 s, dead "
                "after 30 s, slot repair, republish every 10 s (virtual time).", "",
                markdown_table(["N", "crashed", "objects with a live replica",
                                "locate before repair", "after repair",
                                "first route before", "after", "repair time"], rows,
                               right=range(2, 8)), ""]
    skipped = [r["n"] for r in results if "failures" not in r]
    if skipped:
        out += [f"Failure runs were not made for N = {', '.join(f'{x:,}' for x in skipped)} "
                f"(`--failures-max {args.failures_max}`): a heartbeat round there is over a "
                "million simulated pings.", ""]
    return "\n".join(out)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    for r in results:
        h = r["routing"]["hops_hist"]
        ax[0].bar(np.arange(len(h)) + (0.4 if r is results[-1] and len(results) > 1 else 0),
                  np.array(h) / sum(h), width=0.4, label=f"N={r['n']:,}")
        rdp = sorted(r["routing"]["_rdp"])
        ax[1].plot(rdp, np.linspace(0, 1, len(rdp)), label=f"routing N={r['n']:,}")
        for label, loc in r["location"].items():
            v = sorted(loc["_rdp"])
            ax[2].plot(v, np.linspace(0, 1, len(v)), label=f"N={r['n']:,}, {label}")
    ax[0].set(title="hops to the root", xlabel="hops", ylabel="share of routes")
    ax[1].set(title="routing RDP (CDF)", xlabel="RDP", xlim=(0, 8))
    ax[2].set(title="object location RDP (CDF)", xlabel="RDP", xlim=(0, 10))
    for a in ax:
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,10000,30000")
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--objects", type=int, default=300)
    p.add_argument("--joins", type=int, default=50)
    p.add_argument("--failures-max", type=int, default=2000,
                   help="run the crash experiment for sizes up to this")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="fewer queries and joins")
    p.add_argument("--out", help="write OUT.md, OUT.json and OUT.png")
    args = p.parse_args(argv)
    if args.quick:
        args.queries, args.objects, args.joins = 400, 60, 10
    info = machine_info()
    results = []
    for n in (int(x) for x in args.sizes.split(",")):
        t0 = time.perf_counter()
        res = trio.run(run_size, n, args, args.seed,
                       clock=trio.testing.MockClock(autojump_threshold=0))
        res["real_s"] = round(time.perf_counter() - t0, 1)
        results.append(res)
        progress("overlay", f"N={n} done in {res['real_s']} s")
    info["load_after"] = [round(x, 2) for x in __import__("os").getloadavg()]
    md = markdown(results, info, args)
    if args.out:
        out = Path(args.out)
        write_text(out.with_suffix(".md"), md + "\n")
        plot(results, out.with_suffix(".png"))
        clean = [{k: _strip(v) for k, v in r.items()} for r in results]
        write_json(out.with_suffix(".json"), {"machine": info, "args": vars(args), "results": clean})
    print(md)
    return 0


def _strip(v):
    """Drop the raw samples (keys starting with '_') from JSON output."""
    if isinstance(v, dict):
        return {k: _strip(x) for k, x in v.items() if not k.startswith("_")}
    return v


if __name__ == "__main__":
    sys.exit(main())
