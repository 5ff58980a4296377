#!/usr/bin/env python3
"""Wire benchmark: the real transport (overlay/wire/tls.py) on loopback.

Measures what the layers above pay per message: the cost of a new connection
(TCP + TLS 1.3 + the client's NodeID proof), small request/response round
trips per second one at a time and with 32 in flight, and bulk throughput
with 1 MiB bodies each way. Every frame goes through the real codec (schema
checks, msgpack) and real TLS.

The answering node runs in a child process, the asking node in this one, so
each end has a core of its own as two nodes on two machines would (this
machine has 2). Beside each figure: CPU used by each process during the phase
(100 % = one core busy), which shows which side limits the rate.
``--same-process`` puts both ends on one trio thread instead.

    .venv/bin/python bench/wire_bench.py                 # Markdown table on stdout
    .venv/bin/python bench/wire_bench.py --json          # JSON on stdout
    .venv/bin/python bench/wire_bench.py --out bench/results/wire   # wire.md + wire.json
    .venv/bin/python bench/wire_bench.py --profile DIR   # pyinstrument, both ends

``--out`` keeps the hand-written "Where the time goes" section of an
existing ``.md`` (the profile summary), replacing only the figures above it.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cryptography  # noqa: E402
import msgpack  # noqa: E402
import trio  # noqa: E402

from bench.common import (  # noqa: E402
    load_average,
    machine_info,
    machine_markdown,
    write_json,
    write_text,
)
from overlay.wire import frames  # noqa: E402
from overlay.wire.ids import Identity  # noqa: E402
from overlay.wire.tls import TlsTransport  # noqa: E402
from overlay.wire.transport import Dispatcher, Peer  # noqa: E402

MiB = 1 << 20
BULK = 1 * MiB
SMALL = 32  # bytes of payload in a "small" request

ECHO = frames.message("bench.wire.echo", request={"data": frames.Bytes(max=4096)},
                      reply={"data": frames.Bytes(max=4096)})
PUT = frames.message("bench.wire.put", request={"data": frames.Bytes(max=2 * MiB)},
                     reply={"size": int})
GET = frames.message("bench.wire.get", request={"size": frames.Int(0, 2 * MiB)},
                     reply={"data": frames.Bytes(max=2 * MiB)})

SERVER = Identity.from_seed(b"bench-wire-server")
CLIENT = Identity.from_seed(b"bench-wire-client")
SECTION = "## Where the time goes"
GROUPS = ("connect", "small", "bulk")
WAITING = "waiting in epoll"


def handlers() -> Dispatcher:
    blob = b"\x5a" * (2 * MiB)

    async def echo(sender, body):
        return {"data": body["data"]}

    async def put(sender, body):
        return {"size": len(body["data"])}

    async def get(sender, body):
        return {"data": blob[:body["size"]]}

    d = Dispatcher()
    d.on(ECHO, echo)
    d.on(PUT, put)
    d.on(GET, get)
    return d


# -- the answering node (child process) -------------------------------------------


async def serve_until_stdin_closes() -> None:
    t = TlsTransport(SERVER)
    async with trio.open_nursery() as n:
        addr = await n.start(t.serve, handlers())
        print(json.dumps({"address": addr}), flush=True)
        await trio.to_thread.run_sync(sys.stdin.buffer.read)  # parent closes stdin to stop us
        await t.aclose()


def child_main(profile: str | None) -> None:
    if profile:
        from pyinstrument import Profiler
        p = Profiler(async_mode="disabled")
        p.start()
    trio.run(serve_until_stdin_closes)
    if profile:
        p.stop()
        write_profile(p, Path(profile))


def write_profile(p, path: Path) -> None:
    """The profile as text (breakdown, flat list, call tree) and the
    breakdown as JSON beside it."""
    shares = breakdown(p)
    table = "".join(f"{v:6.1%}  {k}\n" for k, v in shares.items())
    path.write_text(
        "# share of busy time (sampled time outside epoll), by category\n" + table
        + "\n# flat, by own time\n"
        + p.output_text(unicode=True, flat=True, flat_time="self")
        + "\n# call tree\n"
        + p.output_text(unicode=True))
    path.with_suffix(".json").write_text(json.dumps(shares, indent=2) + "\n")


def _category(path: str, cls: str | None, fn: str) -> str:
    builtin = path == "<built-in>"
    if builtin and "." in fn:  # builtins are named "Class.method"
        cls, fn = fn.rsplit(".", 1)
    if builtin and fn == "poll":
        return WAITING
    if (builtin and cls == "socket") or "trio/_socket.py" in path or "_highlevel_socket" in path:
        return "socket system calls (loopback TCP, kernel side included)"
    if "/cryptography/" in path or (builtin and cls in ("SSLContext", "_SSLContext")) or (
            builtin and fn == "do_handshake"):
        return "connection setup: TLS handshake, certificates, Ed25519"
    if ((builtin and cls in ("_SSLSocket", "MemoryBIO")) or path.endswith(("/ssl.py", "/_ssl.py"))
            or path.endswith("overlay/wire/tls_stream.py")):
        return "TLS records: OpenSSL crypto + tls_stream.py"
    if "/msgpack/" in path or path.endswith("overlay/wire/frames.py"):
        return "frames: msgpack, schema checks, FrameBuffer"
    if "overlay/wire/" in path:
        return "transport logic (tls.py, transport.py, handshake.py)"
    if any(k in path for k in ("/trio/", "outcome", "contextlib", "/sniffio/", "collections")) or (
            builtin and cls == "Context"):
        return "trio: scheduler, task switches, cancel scopes, channels"
    if "wire_bench" in path:
        return "benchmark loop"
    return "other"


def breakdown(p) -> dict[str, float]:
    """Sampled time by category (see ``_category``), as shares of the total.
    Self time is attributed to the frame it belongs to."""
    totals: dict[str, float] = {}

    def walk(frame, parent):
        if frame.is_synthetic_leaf:
            owner = parent
            if owner is not None:
                key = _category(owner.file_path or "", owner.class_name, owner.function)
                totals[key] = totals.get(key, 0.0) + frame.time
            return
        for child in frame.children:
            walk(child, frame)

    root = p.last_session.root_frame()
    if root is not None:
        walk(root, None)
    # Time in epoll is idleness, or this process waiting for a core while
    # other work runs (a shared machine): leave it out of the shares.
    totals.pop(WAITING, None)
    total = sum(totals.values()) or 1.0
    return {k: v / total for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


# -- CPU accounting -----------------------------------------------------------------


class Cpu:
    """CPU seconds used by this process and by the server process."""

    def __init__(self, server_pid: int | None):
        self.pid = server_pid
        self.tick = os.sysconf("SC_CLK_TCK")

    def sample(self) -> tuple[float, float, float]:
        wall = time.perf_counter()
        me = time.process_time()
        other = 0.0
        if self.pid is not None:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            other = (int(fields[11]) + int(fields[12])) / self.tick  # utime + stime
        return wall, me, other

    @staticmethod
    def usage(a, b) -> tuple[float, float, float]:
        wall = b[0] - a[0]
        return wall, (b[1] - a[1]) / wall, (b[2] - a[2]) / wall


# -- the asking node -------------------------------------------------------------------


async def timed_loop(workers: int, seconds: float, one) -> tuple[int, list[float], float]:
    """Run ``one()`` in ``workers`` tasks until ``seconds`` pass; return the
    count, the latencies and the elapsed wall time."""
    latencies: list[float] = []
    deadline = trio.current_time() + seconds
    start = time.perf_counter()

    async def worker():
        while trio.current_time() < deadline:
            t0 = time.perf_counter()
            await one()
            latencies.append(time.perf_counter() - t0)

    async with trio.open_nursery() as n:
        for _ in range(workers):
            n.start_soon(worker)
    return len(latencies), latencies, time.perf_counter() - start


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def measure(cpu: Cpu, name: str, unit: str, scale: float, workers: int,
                  seconds: float, repeat: int, one) -> dict:
    """Run a phase ``repeat`` times after a warm-up; keep the median run.
    ``scale`` turns completed requests into the unit (1 per request, or
    MiB per request)."""
    await timed_loop(workers, min(0.5, seconds), one)
    runs = []
    for _ in range(repeat):
        a = cpu.sample()
        n, lat, wall = await timed_loop(workers, seconds, one)
        _, c_cpu, s_cpu = Cpu.usage(a, cpu.sample())
        value = n * scale / wall
        runs.append({"name": name, "unit": unit, "value": value,
                     "p50_us": pct(lat, 0.5) * 1e6, "p99_us": pct(lat, 0.99) * 1e6,
                     "client_cpu": c_cpu, "server_cpu": s_cpu,
                     # CPU time per request (or per MiB): less sensitive than
                     # the rate to other work competing for the cores
                     "per": "MiB" if unit == "MiB/s" else "request",
                     "client_cpu_per_us": c_cpu / value * 1e6,
                     "server_cpu_per_us": s_cpu / value * 1e6})
    runs.sort(key=lambda r: r["value"])
    row = runs[len(runs) // 2]
    row["runs"] = [round(r["value"], 1) for r in runs]
    return row


async def run_client(peer: Peer, seconds: float, repeat: int, cpu: Cpu,
                     profiler=None, only=GROUPS) -> list[dict]:
    rows = []
    client = TlsTransport(CLIENT)
    async with client:
        if "connect" in only:
            rows.append(await measure_connect(peer, cpu))
        small = {"data": b"s" * SMALL}
        bulk = {"data": b"\xa5" * BULK}
        await client.request(peer, ECHO, small)  # connect outside the timings

        async def rpc():
            await client.request(peer, ECHO, small)

        async def put():
            await client.request(peer, PUT, bulk)

        async def get():
            await client.request(peer, GET, {"size": BULK})

        phases = []
        if "small" in only:
            phases += [(f"small request ({SMALL} B), {w} in flight", "req/s", 1.0, w, rpc)
                       for w in (1, 32)]
        if "bulk" in only:
            phases += [(f"1 MiB {label}, {w} in flight", "MiB/s", BULK / MiB, w, fn)
                       for label, fn in (("upload", put), ("download", get)) for w in (1, 4)]
        if profiler:
            profiler.start()
        for name, unit, scale, workers, fn in phases:
            rows.append(await measure(cpu, name, unit, scale, workers, seconds, repeat, fn))
        if profiler:
            profiler.stop()
    return rows


async def measure_connect(peer: Peer, cpu: Cpu, count: int = 30) -> dict:
    """Cost of a new connection: each of ``count`` fresh transports (their
    certificates made beforehand) connects, proves itself, asks once."""
    fresh = [TlsTransport(Identity.generate()) for _ in range(count)]
    times = []
    a = cpu.sample()
    for t in fresh:
        async with t:
            t0 = time.perf_counter()
            await t.request(peer, ECHO, {"data": b"x"})
            times.append(time.perf_counter() - t0)
    wall, c_cpu, s_cpu = Cpu.usage(a, cpu.sample())
    return {"name": "new connection + first request", "unit": "ms",
            "value": statistics.median(times) * 1e3,
            "p50_us": pct(times, 0.5) * 1e6, "p99_us": pct(times, 0.99) * 1e6,
            "client_cpu": c_cpu, "server_cpu": s_cpu, "per": "connection",
            "client_cpu_per_us": c_cpu * wall / count * 1e6,
            "server_cpu_per_us": s_cpu * wall / count * 1e6}


async def same_process(seconds: float, repeat: int, profiler, only=GROUPS) -> list[dict]:
    server = TlsTransport(SERVER)
    async with trio.open_nursery() as n:
        await n.start(server.serve, handlers())
        rows = await run_client(server.peer, seconds, repeat, Cpu(None), profiler, only)
        for r in rows:
            r["server_cpu"] = r["server_cpu_per_us"] = None  # client_cpu covers both
        await server.aclose()
    return rows


def machine() -> dict:
    """``bench.common.machine_info`` (taken at the start) plus what TLS and
    framing speed depend on."""
    info = machine_info()
    info.update(openssl=ssl.OPENSSL_VERSION, cryptography=cryptography.__version__,
                msgpack=".".join(map(str, msgpack.version)))
    return info


def markdown(result: dict, keep: str) -> str:
    m = result["machine"]
    out = [
        "# Wire benchmark: TLS transport on loopback",
        "",
        "Produced by `.venv/bin/python bench/wire_bench.py --out bench/results/wire`"
        f" ({result['mode']}; each phase run {result['repeat']} times for"
        f" {result['seconds']:g} s, the median run shown).",
        "",
        machine_markdown(m),
        f"- TLS and framing: {m['openssl']}, cryptography {m['cryptography']},"
        f" msgpack {m['msgpack']}",
        "",
        "| benchmark | result | p50 latency | p99 latency | client CPU | server CPU"
        " | client CPU per | server CPU per |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        value = f"{r['value']:,.2f}" if r["unit"] == "ms" else f"{r['value']:,.0f}"
        one_process = r["server_cpu"] is None
        server = "-" if one_process else f"{r['server_cpu']:.0%}"
        server_per = "-" if one_process else f"{fmt_us(r['server_cpu_per_us'])}/{r['per']}"
        out.append(f"| {r['name']} | {value} {r['unit']} | {fmt_us(r['p50_us'])} |"
                   f" {fmt_us(r['p99_us'])} | {r['client_cpu']:.0%} | {server} |"
                   f" {fmt_us(r['client_cpu_per_us'])}/{r['per']} | {server_per} |")
    out += ["",
            "CPU: share of one core used by each process during the phase; CPU per:"
            " CPU time each process spent per request, per MiB or per connection"
            " (with both ends in one process, the client column covers both).", ""]
    if keep:
        out.append(keep.rstrip() + "\n")
    return "\n".join(out)


def fmt_us(us: float) -> str:
    return f"{us / 1000:,.2f} ms" if us >= 1000 else f"{us:,.0f} us"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="duration of each run")
    ap.add_argument("--repeat", type=int, default=3, help="runs per phase (median kept)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    ap.add_argument("--out", help="write PREFIX.md and PREFIX.json")
    ap.add_argument("--same-process", action="store_true", help="both ends on one trio thread")
    ap.add_argument("--only", action="append", choices=GROUPS,
                    help="run only these groups of phases (repeatable)")
    ap.add_argument("--profile", metavar="DIR", help="profile both ends with pyinstrument")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--profile-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        child_main(args.profile_file)
        return 0

    info = machine()  # load average at the start
    only = tuple(args.only or GROUPS)
    profiler = None
    if args.profile:
        from pyinstrument import Profiler
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        profiler = Profiler(async_mode="disabled")

    if args.same_process:
        rows = trio.run(same_process, args.seconds, args.repeat, profiler, only)
        mode = "both ends in one process"
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve"]
        if args.profile:
            cmd += ["--profile-file", str(Path(args.profile) / "server.txt")]
        child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            addr = json.loads(child.stdout.readline())["address"]
            peer = Peer(SERVER.id, addr)
            rows = trio.run(run_client, peer, args.seconds, args.repeat, Cpu(child.pid),
                            profiler, only)
        finally:
            child.stdin.close()  # asks it to stop
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        mode = "answering node in a child process"
    if profiler:
        write_profile(profiler, Path(args.profile) / "client.txt")
        for side in ("client", "server"):
            f = Path(args.profile) / f"{side}.json"
            if f.exists():
                print(f"{side} profile:", file=sys.stderr)
                for k, v in json.loads(f.read_text()).items():
                    print(f"  {v:6.1%}  {k}", file=sys.stderr)

    info["load_after"] = load_average()
    result = {"machine": info, "seconds": args.seconds, "repeat": args.repeat,
              "mode": mode, "rows": rows}
    if args.out:
        md_path, json_path = Path(args.out + ".md"), Path(args.out + ".json")
        keep = ""
        if md_path.exists():
            text = md_path.read_text()
            if SECTION in text:
                keep = text[text.index(SECTION):]
        write_text(md_path, markdown(result, keep))
        write_json(json_path, result)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(markdown(result, ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
