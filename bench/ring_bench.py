"""Inner ring benchmark: certified updates per second and latency (p50,
p99) of 4 real member processes on loopback (TLS, LMDB with fsync), with one
client alone and with 8 concurrent clients (issue 5 target: >= 200 updates/s
and p50 <= 10 ms).

    .venv/bin/python bench/ring_bench.py [--updates 400] [--seconds 10] [--clients 8]
                                         [--no-sync] [--profile] [--out bench/results]

Each client updates its own object with a compare-and-swap predicate
(expect_seq), waits for the 2f+1-signed certificate, verifies it, and goes
on; latency is from request to verified certificate. Writes ``ring.json``
(all numbers and the machine), ``ring.md`` (a table) and, with --profile,
``ring.profile.txt`` (pyinstrument of the primary member during the run);
``--tag T`` names a variant's files ``ring.T.json`` and ``ring.T.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from overlay.wire.ids import Identity  # noqa: E402
from overlay.wire.tls import TlsTransport  # noqa: E402
from overlay.wire.transport import Peer  # noqa: E402
from storage.ring import STATUS  # noqa: E402
from storage.ring_local import LocalRing  # noqa: E402
from storage.ringclient import RingClient  # noqa: E402


def machine() -> dict:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "kernel": platform.release(), "loadavg_start": os.getloadavg()}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def one_client(lr: LocalRing, ident: Identity, name: bytes, lat: list[float],
                     stop_after: float | None, count: int | None, started: trio.Event):
    lr.ring  # noqa: B018
    async with TlsTransport(ident) as t:
        c = RingClient(t, lr.ring, ident, attempt_timeout=5.0, deadline=30.0)
        cert = await c.create(name, b"\x00" * 32)
        cert = await c.update(cert.aguid, b"\x01" * 32, expect_seq=cert.seq)   # warm
        await started.wait()
        k = 0
        end = None if stop_after is None else trio.current_time() + stop_after
        while (count is None or k < count) and (end is None or trio.current_time() < end):
            k += 1
            t0 = time.perf_counter()
            cert = await c.update(cert.aguid, k.to_bytes(32, "big"), expect_seq=cert.seq)
            lat.append((time.perf_counter() - t0) * 1000)


async def member_stats(lr: LocalRing) -> dict:
    """Execution counters of member 1 (``ring.status``)."""
    m = lr.ring.members[1]
    async with TlsTransport(lr.owner) as t:
        r = await t.request(Peer(m.id, m.addr), STATUS, {}, timeout=10.0)
    return r["stats"]


async def run_scenario(lr, clients: int, count: int | None, seconds: float | None) -> dict:
    lat: list[float] = []
    started = trio.Event()
    idents = [Identity.generate() for _ in range(clients)]
    t_start = [0.0]

    cpu0: list[float] = []
    st0 = await member_stats(lr)

    async def go():
        await trio.sleep(1.0)          # every client connected and warmed up
        cpu0.extend([cpu_seconds(lr.pid(k)) for k in range(len(lr.ids))] + [time.process_time()])
        t_start[0] = time.perf_counter()
        started.set()

    async with trio.open_nursery() as n:
        n.start_soon(go)
        for k, ident in enumerate(idents):
            n.start_soon(one_client, lr, ident, b"bench%d" % k, lat, seconds, count, started)
    wall = time.perf_counter() - t_start[0]
    st = await member_stats(lr)
    cpu1 = [cpu_seconds(lr.pid(k)) for k in range(len(lr.ids))] + [time.process_time()]
    members_cpu = sum(cpu1[:-1]) - sum(cpu0[:-1])
    client_cpu = cpu1[-1] - cpu0[-1]
    per_update = (members_cpu + client_cpu) / len(lat) * 1000
    batches = st["batches"] - st0["batches"]
    return {"clients": clients, "updates": len(lat), "seconds": round(wall, 3),
            "requests_per_batch": round((st["executed"] - st0["executed"]) / max(batches, 1), 2),
            "cpu_ms_per_update": round(per_update, 2),
            "members_cpu_ms_per_update": round(members_cpu / len(lat) * 1000, 2),
            "client_cpu_ms_per_update": round(client_cpu / len(lat) * 1000, 2),
            "cpu_bound_updates_per_s": round((os.cpu_count() or 1) * 1000 / per_update, 1),
            "updates_per_s": round(len(lat) / wall, 1),
            "p50_ms": round(statistics.median(lat), 2), "p99_ms": round(pct(lat, 99), 2),
            "mean_ms": round(statistics.fmean(lat), 2), "max_ms": round(max(lat), 2)}


async def main(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine(), "config": {
        "members": 4, "f": 1, "transport": "TLS 1.3 over loopback", "fsync": not args.no_sync,
        "commit": "worker thread" if args.commit_thread else "inline",
        "pipeline": args.pipeline,
        "checkpoint_interval": 128, "batch_max": 64}, "scenarios": []}
    with tempfile.TemporaryDirectory() as d:
        member_args = ["--checkpoint", "128", "--pipeline", str(args.pipeline)] + \
            (["--no-sync"] if args.no_sync else []) + \
            (["--commit-thread"] if args.commit_thread else [])
        lr = LocalRing(d, args=member_args)
        prof = Path(d) / "profile.txt"
        try:
            await lr.start()
            if args.profile:               # restart the primary under the profiler
                lr.stop(0)
                lr.spawn(0, ["--profile", str(prof)])
                await lr.wait_ready(0)
            results["scenarios"].append(await run_scenario(lr, 1, args.updates, None))
            print(json.dumps(results["scenarios"][-1]))
            results["scenarios"].append(await run_scenario(lr, args.clients, None, args.seconds))
            print(json.dumps(results["scenarios"][-1]))
        finally:
            if args.profile:
                lr.stop(0, timeout=300)    # writing the profile takes a while
            lr.close()
        if args.profile and prof.exists():
            (out / "ring.profile.txt").write_text(prof.read_text())
            results["profiled"] = True
    results["machine"]["loadavg_end"] = os.getloadavg()
    return results


def write(results: dict, out: Path, tag: str = "") -> None:
    stem = "ring" + (f".{tag}" if tag else "")
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    m = results["machine"]
    lines = [
        "# Inner ring benchmark (bench/ring_bench.py)", "",
        f"4 ring members (f=1) as separate processes, TLS over loopback, LMDB "
        f"{'with' if results['config']['fsync'] else 'without'} fsync; each client updates "
        f"its own object with a compare-and-swap predicate and waits for the verified "
        f"2f+1-signed certificate.", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, "
        f"load average at start {m['loadavg_start'][0]:.2f}, at end {m['loadavg_end'][0]:.2f}.",
        "", "| clients | updates | updates/s | p50 ms | p99 ms | mean ms | CPU ms/update "
        "(members + client) | CPU-bound ceiling, updates/s |",
        "|---|---|---|---|---|---|---|---|"]
    for s in results["scenarios"]:
        lines.append(f"| {s['clients']} | {s['updates']} | {s['updates_per_s']} | "
                     f"{s['p50_ms']} | {s['p99_ms']} | {s['mean_ms']} | "
                     f"{s['cpu_ms_per_update']} ({s['members_cpu_ms_per_update']} + "
                     f"{s['client_cpu_ms_per_update']}) | {s['cpu_bound_updates_per_s']} |")
    lines += ["", "CPU ms/update is user+system time of the 4 member processes and the client "
              "process per certified update; it does not depend on other load, and "
              f"{m['cores']} cores / it is the ceiling on an otherwise idle machine."]
    lines += ["", "Target (issue 5): >= 200 updates/s and p50 <= 10 ms.", ""]
    prof = out / "ring.profile.txt"
    if results.get("profiled") and prof.exists():
        top = [ln for ln in prof.read_text().splitlines() if ln.strip()][:40]
        lines += ["## Profile of the primary member (pyinstrument, wall clock)", "",
                  "Whole run, both scenarios; `ring.profile.txt` has the full tree.", "",
                  "```"] + top + ["```", ""]
    (out / f"{stem}.md").write_text("\n".join(lines))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--updates", type=int, default=400, help="updates of the lone client")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of the concurrent run")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--no-sync", action="store_true")
    ap.add_argument("--commit-thread", action="store_true",
                    help="members commit LMDB in a worker thread")
    ap.add_argument("--pipeline", type=int, default=2, help="batches in flight at the primary")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--tag", default="", help="name a variant: ring.TAG.json, ring.TAG.md")
    a = ap.parse_args()
    res = trio.run(main, a)
    write(res, Path(a.out), a.tag)
    print(Path(a.out) / ("ring" + (f".{a.tag}" if a.tag else "") + ".md"))
