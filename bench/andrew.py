"""The Andrew benchmark, as run by the Pond and Ivy papers (PAPERS.md
"Figures to beat": Pond 8.3x NFS, Ivy 2-3x NFS), on a real C source tree.

    python bench/andrew.py TARGET [--runs N] [--scale K] [--json P] [--md P] [--png P]
    python bench/andrew.py --compare [BASE] [--p2pfs] [--peers glusterfs,seaweedfs] --out PREFIX

Five phases, each timed, in a fresh subdirectory per run (removed after):

1. ``mkdir``: create the tree's directories;
2. ``copy``: write every source file (bytes read into memory beforehand, so
   only the target is measured; mode bits kept, as ``cp`` does);
3. ``stat``: walk the tree with readdir and ``lstat`` every entry, reading
   nothing;
4. ``read``: read every byte of every file;
5. ``compile``: ``make -j1 linux`` (gcc, one job, so every target sees the same
   sequential build), then, untimed, run the built ``lua -v``.

``--scale K`` puts K copies of the tree in each run, each phase covering all
of them. Caches stay warm from phase to phase as in the original benchmark,
and nothing is fsync'd; ``sync`` runs (untimed) before each run so one run's
write-back does not land in the next one's timings.

``--compare`` measures, in one process and interleaved run by run (these
machines are noisy), a local directory, the pass-through FUSE baseline
(``bench/passthroughfs.py``), and with ``--p2pfs`` the p2pfs demo network
(reported as "not yet mountable" while ``p2pfs demo`` does not exist), and
with ``--peers`` GlusterFS/SeaweedFS. The targets: p2pfs's Andrew total at
most 2x local and 1.3x pass-through (issue 8), 1.10x local (DESIGN.md).
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import report  # noqa: E402
import srctree  # noqa: E402
import targets as tg  # noqa: E402

PHASES = ("mkdir", "copy", "stat", "read", "compile")
TAG = "andrew"


class BenchError(Exception):
    """A phase did not do its work (a wrong count of entries or bytes, a failed
    build, a binary that does not run): its timings would mean nothing."""


class Workload:
    """The tree to replay K times, loaded once before any timing."""

    def __init__(self, tree: srctree.SourceTree, scale: int, cflags: str = ""):
        self.tree, self.scale = tree, scale
        # Extra flags come after the Makefile's own, so e.g. -O0 overrides its -O2.
        self.build = [*tree.build, *([f"{tree.cflags_var}={cflags}"] if cflags else [])]
        self.top = srctree.ensure_tree(tree)
        self.listing = srctree.load(self.top)

    def describe(self) -> dict:
        t = self.tree
        return {"name": t.name, "version": t.version, "archive": t.archive, "sha256": t.sha256,
                "directories": len(self.listing.dirs) + 1, "files": len(self.listing.files),
                "bytes": self.listing.nbytes, "build": self.build, "scale": self.scale}


_run_ids = itertools.count(1)


def phase_mkdir(copies: list[Path], work: Workload) -> None:
    for c in copies:
        os.mkdir(c)
        for d in work.listing.dirs:
            os.mkdir(c / d)


def phase_copy(copies: list[Path], work: Workload) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    for c in copies:
        for rel, mode, data in work.listing.files:
            fd = os.open(c / rel, flags, mode)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)


def phase_stat(copies: list[Path], work: Workload) -> None:
    seen = 0
    stack = [str(c) for c in copies]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                st = os.lstat(entry.path)
                seen += 1
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
    want = work.scale * (len(work.listing.dirs) + len(work.listing.files))
    if seen != want:
        raise BenchError(f"stat phase saw {seen} entries, expected {want}")


def phase_read(copies: list[Path], work: Workload) -> None:
    total = 0
    for c in copies:
        for rel, _, _ in work.listing.files:
            with open(c / rel, "rb", buffering=0) as f:
                while chunk := f.read(1 << 16):
                    total += len(chunk)
    if total != work.scale * work.listing.nbytes:
        raise BenchError(f"read phase read {total} bytes, expected {work.scale * work.listing.nbytes}")


def _build_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    env["LC_ALL"] = "C"
    return env


def phase_compile(copies: list[Path], work: Workload) -> None:
    env = _build_env()
    for c in copies:
        r = subprocess.run(work.build, cwd=c, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:
            raise BenchError(f"{' '.join(work.build)} in {c} failed ({r.returncode}): "
                             f"{r.stdout[-800:]}")


PHASE_FN = {"mkdir": phase_mkdir, "copy": phase_copy, "stat": phase_stat,
            "read": phase_read, "compile": phase_compile}


def check_binary(copy: Path, work: Workload) -> str:
    """Run the built program (untimed); its version line must name the tree."""
    binary = copy / work.tree.binary
    try:
        r = subprocess.run([str(binary), *work.tree.check], capture_output=True, text=True,
                           timeout=30)
    except OSError as e:
        raise BenchError(f"built binary {binary} does not run: {e}") from None
    line = (r.stdout or r.stderr).strip()
    if r.returncode != 0 or work.tree.version not in line:
        raise BenchError(f"{binary} {' '.join(work.tree.check)} printed {line!r} (exit {r.returncode})")
    return line


def run_once(where: Path, work: Workload, phases: tuple[str, ...], keep: bool = False) -> dict:
    """One run of the selected phases in a fresh subdirectory of ``where``;
    returns seconds per phase (and the built binary's version line)."""
    root = where / f"andrew-{os.getpid()}-{next(_run_ids)}"
    os.sync()  # earlier runs' dirty pages are written now, not during our phases
    os.mkdir(root)
    copies = [root / f"tree{k}" for k in range(work.scale)]
    record: dict = {}
    try:
        for name in phases:
            with common.stopwatch() as t:
                PHASE_FN[name](copies, work)
            record[name] = t[0]
        if "compile" in phases:
            record["check"] = check_binary(copies[0], work)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    if keep:
        record["kept"] = str(root)
    return record


def parse_phases(text: str) -> tuple[str, ...]:
    """``1-4``, ``1,2,5`` or ``mkdir,copy,stat`` -> phase names in suite order."""
    chosen = set()
    for part in text.split(","):
        part = part.strip()
        if "-" in part and all(p.isdigit() for p in part.split("-", 1)):
            lo, hi = map(int, part.split("-", 1))
            chosen.update(PHASES[i - 1] for i in range(lo, hi + 1) if 1 <= i <= len(PHASES))
        elif part.isdigit() and 1 <= int(part) <= len(PHASES):
            chosen.add(PHASES[int(part) - 1])
        elif part in PHASES:
            chosen.add(part)
        else:
            raise argparse.ArgumentTypeError(f"unknown phase {part!r} (1-5 or {', '.join(PHASES)})")
    if not {"mkdir", "copy"} <= chosen:
        raise argparse.ArgumentTypeError("phases 1 (mkdir) and 2 (copy) make the files the others use")
    return tuple(p for p in PHASES if p in chosen)


def _fmt_record(rec: dict, phases) -> str:
    parts = [f"{p} {common.fmt_seconds(rec[p])}" for p in phases]
    return " ".join(parts) + f" = {common.fmt_seconds(sum(rec[p] for p in phases))}"


def benchmark(targets: list[tg.Target], work: Workload, args) -> None:
    """Bring the targets up, run warm-ups and runs interleaved, bring them down."""
    live: list[tg.Target] = []
    try:
        for t in targets:
            common.progress(TAG, f"starting {t.name}")
            try:
                t.start()
                t.status = "ok"
                live.append(t)
                pid = f" (pid {t.details['pid']})" if "pid" in t.details else ""
                common.progress(TAG, f"{t.name}: {t.label()} at {t.path}{pid}")
            except tg.TargetUnavailable as e:
                t.status, t.reason = "unavailable", str(e)
                common.progress(TAG, f"{t.name}: {e}")
        for i in range(args.warmup + args.runs):
            warm = i < args.warmup
            label = f"warm-up {i + 1}/{args.warmup}" if warm else f"run {i - args.warmup + 1}/{args.runs}"
            last = i == args.warmup + args.runs - 1
            for t in list(live):
                try:
                    rec = run_once(t.path, work, args.phases, keep=args.keep and last)
                except (BenchError, OSError) as e:
                    t.status, t.reason = "failed", f"{label}: {e}"
                    common.progress(TAG, f"{t.name} FAILED in {label}: {e}")
                    live.remove(t)
                    continue
                if not warm:
                    t.details.setdefault("runs", []).append(rec)
                common.progress(TAG, f"{label} {t.name}: {_fmt_record(rec, args.phases)}")
    finally:
        for t in reversed(targets):
            t.stop()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", nargs="?", help="directory to benchmark; with --compare, the "
                   "directory in which the local directory and mount points are made (default: $TMPDIR)")
    p.add_argument("--runs", type=int, default=5, help="measured runs (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="unrecorded runs first (default 1)")
    p.add_argument("--scale", type=int, default=1, help="copies of the tree per run (default 1)")
    p.add_argument("--phases", type=parse_phases, default=PHASES, help="e.g. 1-4 (default: all five)")
    p.add_argument("--cflags", default="", help="extra compiler flags for phase 5, after the "
                   "Makefile's -O2 (e.g. --cflags=-O0 for a quicker build; recorded in the result)")
    p.add_argument("--compare", action="store_true", help="local vs pass-through FUSE (and more)")
    p.add_argument("--p2pfs", action="store_true", help="with --compare: include `p2pfs demo`")
    p.add_argument("--p2pfs-cmd", help="with --p2pfs: command line to mount p2pfs, with "
                   "{python}, {mountpoint}, {data} substituted")
    p.add_argument("--peers", default="", help="with --compare: comma list of glusterfs,seaweedfs")
    p.add_argument("--passthrough-args", default="", help="extra options for passthroughfs.py")
    p.add_argument("--keep", action="store_true",
                   help="keep the last run's tree (mounts are still taken down with --compare)")
    p.add_argument("--out", help="write PREFIX.md, PREFIX.json and PREFIX.png")
    p.add_argument("--json", help="write the JSON result here")
    p.add_argument("--md", help="write the Markdown table here")
    p.add_argument("--png", help="write the bar chart here")
    return p


PEERS = ("glusterfs", "seaweedfs")


def make_targets(args) -> list[tg.Target]:
    if not args.compare:
        return [tg.DirectoryTarget("target", args.target)]
    base = Path(args.target or tempfile.gettempdir())
    out: list[tg.Target] = [tg.LocalTarget(base),
                            tg.PassthroughTarget(base, args.passthrough_args.split())]
    if args.p2pfs:
        out.append(tg.P2pfsTarget(base, args.p2pfs_cmd))
    for name in args.peers:
        out.append(tg.PeerTarget(name, base))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.runs < 1 or args.scale < 1 or args.warmup < 0:
        parser.error("--runs and --scale must be >= 1, --warmup >= 0")
    if not args.compare and not args.target:
        parser.error("give a TARGET directory, or --compare")
    args.peers = [n.strip() for n in args.peers.split(",") if n.strip()]
    if unknown := [n for n in args.peers if n not in PEERS]:
        parser.error(f"unknown peer(s) {', '.join(unknown)} (known: {', '.join(PEERS)})")
    if (args.p2pfs or args.peers) and not args.compare:
        parser.error("--p2pfs and --peers need --compare")
    if args.target and not os.path.isdir(args.target):
        print(f"andrew: {args.target} is not a directory", file=sys.stderr)
        return 1
    # SIGTERM unwinds like Ctrl-C, so mounts and daemons are always taken down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        work = Workload(srctree.LUA, args.scale, args.cflags)
    except srctree.SourceTreeError as e:
        print(f"andrew: {e}", file=sys.stderr)
        return 1
    common.progress(TAG, f"{work.tree.name} {work.tree.version}: {len(work.listing.files)} files, "
                         f"scale {args.scale}, {args.warmup} warm-up + {args.runs} runs, "
                         f"phases {','.join(args.phases)}")
    targets = make_targets(args)
    machine = common.machine_info()
    try:
        benchmark(targets, work, args)
    except KeyboardInterrupt:
        print("andrew: interrupted", file=sys.stderr)
        return 130
    result = report.build(targets, work.describe(), args, machine)
    text = report.markdown(result)
    print(text, end="")
    paths = {"json": args.json, "md": args.md, "png": args.png}
    if args.out:
        paths = {k: v or f"{args.out}.{k}" for k, v in paths.items()}
    if paths["json"]:
        common.write_json(paths["json"], result)
    if paths["md"]:
        common.write_text(paths["md"], text)
    if paths["png"]:
        report.chart(result, paths["png"])
    ok = [t for t in targets if t.status == "ok"]
    failed = [t for t in targets if t.status == "failed"]
    if not ok or (failed and not args.compare):
        return 1
    if args.compare and any(t.name in ("local", "passthrough") and t.status != "ok" for t in targets):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
