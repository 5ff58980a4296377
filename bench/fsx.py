"""Data integrity under random I/O: fsx (the file-system exerciser of
xfstests) on ``p2pfs demo``, several seeds at once.

    .venv/bin/python bench/fsx.py FSX_BINARY [--ops 20000] [--seeds 1,2,3]
                                  [--out bench/results/fsx]

fsx keeps an in-memory model of one file and applies random reads, writes,
mapped reads and writes, truncates, fallocate / punch-hole / zero-range /
collapse / insert, with close-and-reopen at random, checking every byte it
reads and the size after each operation; the first difference fails the
run. It is not shipped here: build ``ltp/fsx.c`` of an xfstests checkout
(https://git.kernel.org/pub/scm/fs/xfs/xfstests-dev.git, GPL-2.0) and pass
the binary. One fsx process per seed runs concurrently in the same mount
(each on its own file), so the kernel and the file system interleave them.

Output: ``PREFIX.md`` and ``PREFIX.json``: per seed the operations done,
the verdict and fsx's last lines.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine_info, machine_markdown, progress  # noqa: E402
from bench.targets import P2pfsTarget, TargetUnavailable  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("fsx", type=Path, help="an fsx binary (xfstests ltp/fsx.c)")
    ap.add_argument("--ops", type=int, default=20000, help="operations per seed")
    ap.add_argument("--seeds", default="1,2,3", help="comma-separated seeds, one fsx each")
    ap.add_argument("--max-len", type=int, default=4 << 20, help="largest file (-l)")
    ap.add_argument("--max-op", type=int, default=256 << 10, help="largest operation (-o)")
    ap.add_argument("--close-open", type=int, default=40,
                    help="1 in N operations closes and reopens the file (-c)")
    ap.add_argument("--out", default="bench/results/fsx", help="output prefix")
    args = ap.parse_args(argv)
    if not args.fsx.is_file():
        ap.error(f"{args.fsx} is not a file")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        ap.error("--seeds takes integers separated by commas")
    if not seeds or args.ops < 1:
        ap.error("at least one seed and one operation")
    info = machine_info()
    base = Path(tempfile.mkdtemp(prefix="fsx-bench-"))
    target = P2pfsTarget(base)
    results: dict[str, dict] = {}
    try:
        progress("fsx", "starting p2pfs demo")
        try:
            target.start()
        except TargetUnavailable as e:
            sys.exit(f"fsx: p2pfs demo did not mount: {e}")
        t0 = time.monotonic()
        procs = {}
        for s in seeds:
            f = target.path / f"fsx-{s}"
            cmd = [str(args.fsx), "-N", str(args.ops), "-S", str(s), "-c", str(args.close_open),
                   "-l", str(args.max_len), "-o", str(args.max_op), "-p", str(args.ops // 4 or 1),
                   str(f)]
            procs[s] = (cmd, subprocess.Popen(cmd, cwd=target.path, stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT, text=True))
            progress("fsx", f"seed {s}: {' '.join(cmd)}")
        for s, (cmd, p) in procs.items():
            out, _ = p.communicate(timeout=7200)
            lines = out.splitlines()
            ok = p.returncode == 0 and any("completed A-OK" in ln for ln in lines)
            results[str(s)] = {"ops": args.ops, "ok": ok, "exit": p.returncode,
                               "command": " ".join(cmd), "last_lines": lines[-8:]}
            progress("fsx", f"seed {s}: {'A-OK' if ok else 'FAILED'}")
        wall = time.monotonic() - t0
    finally:
        target.stop()
        shutil.rmtree(base, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(
        {"machine": info, "wall_s": round(wall, 1), "results": results}, indent=2) + "\n")
    lines = ["# Data integrity under random I/O (fsx) through the mount", "",
             f"`bench/fsx.py FSX --ops {args.ops} --seeds {args.seeds}`: {len(seeds)} fsx "
             f"processes at once on `p2pfs demo` (4 nodes, r=3, ring of 4), {wall:.0f} s.", "",
             machine_markdown(info), "",
             "| seed | operations | verdict | fsx's last line |", "|---:|---:|---|---|"]
    for s, r in results.items():
        last = r["last_lines"][-1] if r["last_lines"] else ""
        lines.append(f"| {s} | {r['ops']} | {'A-OK' if r['ok'] else 'FAILED'} | {last} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
