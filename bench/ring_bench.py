"""Inner ring benchmark: certified updates per second and latency (p50,
p99) of 4 real member processes on loopback (TLS, LMDB with fsync of the
executed state), with one client alone and with 8 concurrent clients (issue
5 target: >= 200 updates/s and p50 <= 10 ms).

    .venv/bin/python bench/ring_bench.py [--updates 400] [--seconds 10] [--clients 8]
        [--no-sync] [--no-tentative] [--commit-delay S] [--pipeline N] [--batch N]
        [--profile] [--before RING.JSON --before-label TEXT]
        [--ab OTHER_TREE [--rounds 3]] [--tag T] [--out bench/results]

Each client updates its own object with a compare-and-swap predicate
(expect_seq), waits for the 2f+1-signed certificate, verifies it, and goes
on; latency is from request to verified certificate. For each scenario the
benchmark reports the CPU time (user + system) every process spent per
update, far less sensitive than wall-clock time to other load on the
machine, and the protocol traffic per update (client requests, and the
one-way frames members send each other). With ``--profile`` a second,
shorter pass runs the primary and one backup under cProfile (CPU time) and
breaks their CPU down by category; ``--before`` shows an earlier run's
ring.json next to this one.

On a shared machine two runs minutes apart are not comparable; ``--ab
OTHER_TREE`` compares honestly: it runs OTHER_TREE's benchmark (its own
ring code, e.g. the previous commit in another git worktree) and this one
alternately, ``--rounds`` times each, shorter runs, with the load average
before each, and reports the medians (raw runs in ``ring.ab.jsonl``).

Writes ``ring.json`` (all numbers and the machine) and ``ring.md`` (tables,
then ``ring.notes.md`` if present: history and analysis kept by hand);
``--tag T`` names a variant's files ``ring.T.json`` and ``ring.T.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pstats
import shlex
import statistics
import subprocess
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

PROFILED = (0, 1)        # the primary of view 0 and one backup


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
                     stop_after: float | None, count: int | None, started: trio.Event,
                     reqs: list[int]):
    async with TlsTransport(ident) as t:
        c = RingClient(t, lr.ring, ident, attempt_timeout=5.0, deadline=30.0)
        cert = await c.create(name, b"\x00" * 32)
        cert = await c.update(cert.aguid, b"\x01" * 32, expect_seq=cert.seq)   # warm
        await started.wait()
        sent0 = t.stats.sent["pbft.req"]
        k = 0
        end = None if stop_after is None else trio.current_time() + stop_after
        while (count is None or k < count) and (end is None or trio.current_time() < end):
            k += 1
            t0 = time.perf_counter()
            cert = await c.update(cert.aguid, k.to_bytes(32, "big"), expect_seq=cert.seq)
            lat.append((time.perf_counter() - t0) * 1000)
        reqs.append(t.stats.sent["pbft.req"] - sent0)


async def member_stats(lr: LocalRing) -> list[dict]:
    """``ring.status`` counters of every member."""
    out = []
    async with TlsTransport(lr.owner) as t:
        for m in lr.ring.members:
            r = await t.request(Peer(m.id, m.addr), STATUS, {}, timeout=10.0)
            out.append(r["stats"])
    return out


async def run_scenario(lr, clients: int, count: int | None, seconds: float | None) -> dict:
    lat: list[float] = []
    reqs: list[int] = []
    started = trio.Event()
    idents = [Identity.generate() for _ in range(clients)]
    t_start = [0.0]
    cpu0: list[float] = []

    async def go():
        await trio.sleep(1.0)          # every client connected and warmed up
        st0.extend(await member_stats(lr))
        cpu0.extend([cpu_seconds(lr.pid(k)) for k in range(len(lr.ids))] + [time.process_time()])
        t_start[0] = time.perf_counter()
        started.set()

    st0: list[dict] = []
    async with trio.open_nursery() as n:
        n.start_soon(go)
        for k, ident in enumerate(idents):
            n.start_soon(one_client, lr, ident, b"bench%d" % k, lat, seconds, count, started,
                         reqs)
    wall = time.perf_counter() - t_start[0]
    cpu1 = [cpu_seconds(lr.pid(k)) for k in range(len(lr.ids))] + [time.process_time()]
    st1 = await member_stats(lr)
    u = len(lat)
    per = [(b - a) / u * 1000 for a, b in zip(cpu0, cpu1)]
    members_cpu, client_cpu = sum(per[:-1]), per[-1]
    batches = st1[1]["batches"] - st0[1]["batches"]
    frames = sum(b["frames_sent"] - a["frames_sent"] for a, b in zip(st0, st1))
    return {"clients": clients, "updates": u, "seconds": round(wall, 3),
            "updates_per_s": round(u / wall, 1),
            "p50_ms": round(statistics.median(lat), 2), "p99_ms": round(pct(lat, 99), 2),
            "mean_ms": round(statistics.fmean(lat), 2), "max_ms": round(max(lat), 2),
            "requests_per_batch": round((st1[1]["executed"] - st0[1]["executed"])
                                        / max(batches, 1), 2),
            "client_requests_per_update": round(sum(reqs) / u, 2),
            "member_frames_per_update": round(frames / u, 2),
            "cpu_ms_per_update": round(members_cpu + client_cpu, 2),
            "members_cpu_ms_per_update": round(members_cpu, 2),
            "client_cpu_ms_per_update": round(client_cpu, 2),
            "cpu_ms_per_update_by_process": {
                "primary": round(per[0], 2),
                "backup (mean)": round(statistics.fmean(per[1:-1]), 2),
                "client": round(client_cpu, 2)},
            "cpu_bound_updates_per_s": round((os.cpu_count() or 1) * 1000
                                             / (members_cpu + client_cpu), 1)}


# ---- CPU profile categories -------------------------------------------------------------

CATEGORIES = [
    ("Ed25519 sign/verify", lambda f, fn: "ed25519" in fn.lower()),
    ("LMDB (commit, fsync)", lambda f, fn: "Transaction" in fn or "Environment" in fn
     or "lmdb" in f),
    ("TLS records (OpenSSL, TLS stream)", lambda f, fn: "_ssl." in fn or f.endswith("_ssl.py")
     or f.endswith("tls_stream.py")),
    ("socket and epoll system calls", lambda f, fn: "_socket.socket" in fn or "epoll" in fn),
    ("msgpack and frame schema checks", lambda f, fn: "msgpack" in f or "msgpack" in fn
     or f.endswith("wire/frames.py")),
    ("transport (tls.py, transport.py)", lambda f, fn: f.endswith("wire/tls.py")
     or f.endswith("wire/transport.py")),
    ("trio (scheduler, tasks, channels)", lambda f, fn: "/trio/" in f or "/outcome/" in f),
    ("ring protocol (storage/)", lambda f, fn: "/storage/" in f),
]


def _category(f: str, fn: str) -> str | None:
    return next((c for c, match in CATEGORIES if match(f, fn)), None)


def profile_breakdown(path: Path, updates: int) -> dict:
    """CPU ms per update of one profiled member, by category (self time).
    Builtins and standard library functions that fit no category count for
    their callers' categories, in proportion to the time spent under each."""
    st = pstats.Stats(str(path))
    cats: dict[str, float] = {}
    total = 0.0
    for (f, _line, fn), (_cc, _nc, tt, _ct, callers) in st.stats.items():
        total += tt
        name = _category(f, fn)
        if name is not None:
            cats[name] = cats.get(name, 0.0) + tt
            continue
        shares = {}
        for (cf, _cl, cfn), (_c1, _c2, _ctt, cct) in callers.items():
            c = _category(cf, cfn) or "other"
            shares[c] = shares.get(c, 0.0) + cct
        whole = sum(shares.values())
        if whole <= 0:
            cats["other"] = cats.get("other", 0.0) + tt
            continue
        for c, w in shares.items():
            cats[c] = cats.get(c, 0.0) + tt * w / whole
    scale = 1000 / max(updates, 1)
    return {"total_ms_per_update": round(total * scale, 2),
            "by_category_ms": {c: round(t * scale, 3) for c, t in
                               sorted(cats.items(), key=lambda x: -x[1])}}


async def profile_pass(lr: LocalRing, d: Path, args) -> dict:
    """Run members 0 and 1 under cProfile for a lone client and for the
    concurrent clients; the profile covers both."""
    for k in PROFILED:
        lr.stop(k)
        lr.spawn(k, ["--cpu-profile", str(d / f"cpu{k}.prof")])
        await lr.wait_ready(k)
    await trio.sleep(1.0)
    a = await run_scenario(lr, 1, max(args.updates // 2, 50), None)
    b = await run_scenario(lr, args.clients, None, max(args.seconds / 2, 3.0))
    for k in PROFILED:
        lr.stop(k, timeout=120)
    u = a["updates"] + b["updates"]
    return {"updates": u, "note": "cProfile (CPU clock) roughly doubles the cost of Python "
            "code; shares between categories are what to read",
            "members": {("primary" if k == 0 else "backup"): profile_breakdown(
                d / f"cpu{k}.prof", u) for k in PROFILED}}


async def main(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    member_args = ["--checkpoint", "128", "--pipeline", str(args.pipeline), "--batch",
                   str(args.batch), "--commit-delay", str(args.commit_delay)] + \
        (["--no-sync"] if args.no_sync else []) + \
        (["--no-tentative"] if args.no_tentative else [])
    results = {"machine": machine(), "config": {
        "members": 4, "f": 1, "transport": "TLS 1.3 over loopback",
        "fsync": "executed state before results leave" if not args.no_sync else "none",
        "tentative_execution": not args.no_tentative, "commit_delay_s": args.commit_delay,
        "pipeline": args.pipeline, "batch_max": args.batch, "checkpoint_interval": 128,
        "member_args": member_args}, "scenarios": []}
    with tempfile.TemporaryDirectory() as d:
        lr = LocalRing(d, args=member_args)
        try:
            await lr.start()
            results["scenarios"].append(await run_scenario(lr, 1, args.updates, None))
            print(json.dumps(results["scenarios"][-1]), flush=True)
            results["scenarios"].append(await run_scenario(lr, args.clients, None, args.seconds))
            print(json.dumps(results["scenarios"][-1]), flush=True)
            results["machine"]["loadavg_end"] = os.getloadavg()
            if args.profile:
                results["profile"] = await profile_pass(lr, Path(d), args)
        finally:
            lr.close()
    return results


def write(results: dict, out: Path, tag: str = "") -> None:
    stem = "ring" + (f".{tag}" if tag else "")
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    m, cfg = results["machine"], results["config"]
    lines = [
        "# Inner ring benchmark (bench/ring_bench.py)", "",
        f"4 ring members (f=1) as separate processes, TLS over loopback; fsync: {cfg['fsync']}; "
        f"tentative execution {'on' if cfg['tentative_execution'] else 'off'}; "
        f"member arguments `{' '.join(cfg['member_args'])}`. Each client updates its own "
        f"object with a compare-and-swap predicate and waits for the verified 2f+1-signed "
        f"certificate.", ""]
    if results.get("command"):
        lines += [f"Command: `{results['command']}`", ""]
    lines += [
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, "
        f"load average at start {m['loadavg_start'][0]:.2f}, at end "
        f"{m['loadavg_end'][0]:.2f}. The machine is shared with other engineers' runs: "
        f"wall-clock figures move a lot with their load, CPU time per update much less "
        f"(but it too grows on busy cores).", "",
        "| clients | updates | updates/s | p50 ms | p99 ms | requests/batch | per update: client "
        "requests + member frames | CPU ms/update: primary, backup, client, total | CPU-bound "
        "ceiling, updates/s |",
        "|---|---|---|---|---|---|---|---|---|"]
    for s in results["scenarios"]:
        p = s["cpu_ms_per_update_by_process"]
        lines.append(
            f"| {s['clients']} | {s['updates']} | {s['updates_per_s']} | {s['p50_ms']} | "
            f"{s['p99_ms']} | {s['requests_per_batch']} | {s['client_requests_per_update']} + "
            f"{s['member_frames_per_update']} | {p['primary']}, {p['backup (mean)']}, "
            f"{p['client']}, {s['cpu_ms_per_update']} | {s['cpu_bound_updates_per_s']} |")
    before = results.get("before")
    if before:
        bm = before["machine"]
        lines += ["", f"Before ({before.get('label', 'an earlier run')}; load average "
                  f"{bm['loadavg_start'][0]:.2f} at start):", "",
                  "| clients | updates/s | p50 ms | p99 ms | requests/batch | CPU ms/update, total "
                  "(members + client) |", "|---|---|---|---|---|---|"]
        for s in before["scenarios"]:
            lines.append(f"| {s['clients']} | {s['updates_per_s']} | {s['p50_ms']} | "
                         f"{s['p99_ms']} | {s['requests_per_batch']} | {s['cpu_ms_per_update']} "
                         f"({s['members_cpu_ms_per_update']} + "
                         f"{s['client_cpu_ms_per_update']}) |")
    lines += ["", "CPU ms/update is user+system time per certified update (all 3 backups are "
              "in the total; the backup column is one of them). The ceiling is "
              f"{m['cores']} cores / total CPU per update, on an otherwise idle machine.", "",
              "Target (issue 5): >= 200 updates/s and p50 <= 10 ms.", ""]
    ab = results.get("ab")
    if ab:
        lines += ab_table(ab)
    prof = results.get("profile")
    if prof:
        lines += ["## Where a member's CPU goes (cProfile, CPU clock, self time)", "",
                  f"Both scenarios again ({prof['updates']} updates) with the primary and one "
                  f"backup profiled; {prof['note']}.", "",
                  "| category | primary ms/update | backup ms/update |", "|---|---|---|"]
        pm, bm = prof["members"]["primary"], prof["members"]["backup"]
        cats = list(pm["by_category_ms"])
        cats += [c for c in bm["by_category_ms"] if c not in cats]
        for c in cats:
            lines.append(f"| {c} | {pm['by_category_ms'].get(c, 0)} | "
                         f"{bm['by_category_ms'].get(c, 0)} |")
        lines.append(f"| total (profiled) | {pm['total_ms_per_update']} | "
                     f"{bm['total_ms_per_update']} |")
        lines.append("")
    notes = out / f"{stem}.notes.md"
    if notes.exists():
        lines += [notes.read_text()]
    (out / f"{stem}.md").write_text("\n".join(lines))


# ---- alternating with another tree's code ------------------------------------------------


def alternate(other: Path, rounds: int, out: Path, extra: list[str],
              other_extra: list[str], stem: str = "ring") -> dict:
    """Run ``other``'s benchmark and this one by turns (see module
    docstring); short runs, 200 updates alone and 6 s with the clients."""
    runs = []
    short = ["--updates", "200", "--seconds", "6"]
    trees = [("other", other.resolve()), ("this", Path(__file__).resolve().parent.parent)]
    for r in range(rounds):
        for label, tree in trees:
            with tempfile.TemporaryDirectory() as d:
                load = os.getloadavg()[0]
                cmd = [sys.executable, str(tree / "bench" / "ring_bench.py"), *short, "--out", d]
                cmd += extra if label == "this" else other_extra
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=tree)
                res = json.loads((Path(d) / "ring.json").read_text())
            runs.append({"round": r, "code": label, "loadavg_before": load,
                         "scenarios": res["scenarios"]})
            print(json.dumps({k: runs[-1][k] for k in ("round", "code", "loadavg_before")}
                             | {"p50_ms": [s["p50_ms"] for s in res["scenarios"]],
                                "updates_per_s": [s["updates_per_s"] for s in res["scenarios"]]}),
                  flush=True)
    (out / f"{stem}.ab.jsonl").write_text("".join(json.dumps(x) + "\n" for x in runs))
    return {"other": str(other), "rounds": rounds, "extra_args": extra,
            "other_args": other_extra, "raw": f"{stem}.ab.jsonl", "runs": runs}


def ab_table(ab: dict) -> list[str]:
    med = statistics.median
    rows = ["## This code and the other alternating (same machine, same minutes)", "",
            f"{ab['rounds']} rounds, each the other tree's benchmark ("
            f"{ab.get('label') or '`' + ab['other'] + '`'}, its "
            f"own ring code, arguments `{' '.join(ab.get('other_args') or []) or 'its defaults'}`)"
            f" and then this one (arguments `{' '.join(ab['extra_args'])}`), "
            f"`--updates 200 --seconds 6`; medians "
            f"over the rounds. Raw runs and the load average before each: "
            f"`{ab.get('raw', 'ring.ab.jsonl')}`.", "",
            "| code | clients | updates/s | p50 ms | p99 ms | CPU ms/update | load averages |",
            "|---|---|---|---|---|---|---|"]
    for code in ("other", "this"):
        runs = [x for x in ab["runs"] if x["code"] == code]
        loads = ", ".join(f"{x['loadavg_before']:.1f}" for x in runs)
        for k in range(len(runs[0]["scenarios"])):
            sc = [x["scenarios"][k] for x in runs]
            rows.append(f"| {code} | {sc[0]['clients']} | {med(s['updates_per_s'] for s in sc)} | "
                        f"{med(s['p50_ms'] for s in sc)} | {med(s['p99_ms'] for s in sc)} | "
                        f"{med(s['cpu_ms_per_update'] for s in sc)} | {loads} |")
    return rows + [""]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--updates", type=int, default=400, help="updates of the lone client")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of the concurrent run")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--no-sync", action="store_true", help="members never fsync (unsafe)")
    ap.add_argument("--no-tentative", action="store_true",
                    help="members execute only decided batches")
    ap.add_argument("--commit-delay", type=float, default=0.05)
    ap.add_argument("--pipeline", type=int, default=1,
                    help="batches in flight at the primary (1: bigger batches, which is what "
                         "a CPU-bound ring wants)")
    ap.add_argument("--batch", type=int, default=64, help="requests per batch at most")
    ap.add_argument("--profile", action="store_true", help="add a CPU profile pass")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--tag", default="", help="name a variant: ring.TAG.json, ring.TAG.md")
    ap.add_argument("--before", type=Path, help="a ring.json of an earlier run to show too")
    ap.add_argument("--before-label", default="", help="what the earlier run was")
    ap.add_argument("--ab", type=Path, metavar="OTHER_TREE",
                    help="also alternate with OTHER_TREE's benchmark (module docstring)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of --ab")
    ap.add_argument("--ab-other-args", default="", help="arguments for OTHER_TREE's benchmark")
    ap.add_argument("--ab-label", default="", help="what OTHER_TREE is (e.g. its commit)")
    a = ap.parse_args()
    res = trio.run(main, a)
    if a.ab:
        res["ab"] = alternate(a.ab, a.rounds, Path(a.out),
                              ["--pipeline", str(a.pipeline), "--batch", str(a.batch),
                               "--commit-delay", str(a.commit_delay)], a.ab_other_args.split(),
                              "ring" + (f".{a.tag}" if a.tag else ""))
        res["ab"]["label"] = a.ab_label
    res["command"] = shlex.join([".venv/bin/python", "bench/ring_bench.py"] + sys.argv[1:])
    if a.before:
        res["before"] = json.loads(a.before.read_text())
        res["before"]["label"] = a.before_label or str(a.before)
        res["before"].pop("before", None)
    write(res, Path(a.out), a.tag)
    print(Path(a.out) / ("ring" + (f".{a.tag}" if a.tag else "") + ".md"))
