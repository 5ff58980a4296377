"""Small files through two ``p2pfs demo`` mounts side by side: code A and
code B (two source trees, e.g. a worktree of an older commit and this one)
are mounted at once, and batches of create+write+close, stat, unlink of 1 KiB
files go through one, then the other, alternating which goes first.

    .venv/bin/python bench/small_ab.py --a /tmp/wt-old [--b .] [--rounds 12]
                                       [--files 150] [--out bench/results/small_ab]

Why this shape: on this shared 2-core machine the same code varies by 30%
from one minute to the next, so two runs minutes apart cannot tell a 10%
change. Here both demos are up (an idle one costs a few ms of CPU per
second) and each round measures A and B within seconds of each other; the
median of the per-round ratios B/A is what to read. An A/A run (the same
tree twice) gives a median ratio of 1.00 with rounds between 0.88 and 1.21.

Operations per second = 3 x files / the batch's time, measured by
``bench/mount_bench.py``'s own loop. Each demo runs with its tree as the working
directory and on ``PYTHONPATH``, so its node and ring processes run that
tree's code too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine_info, machine_markdown, progress  # noqa: E402
from bench.mount_bench import small_files  # noqa: E402


class Demo:
    """``p2pfs demo`` of the source tree ``tree`` at a fresh mount point."""

    def __init__(self, tree: Path, label: str, log_dir: Path):
        self.tree, self.label = tree, label
        self.mnt = Path(tempfile.mkdtemp(prefix=f"small-ab-{label}-"))
        env = {**os.environ, "PYTHONPATH": str(tree)}
        self.log = open(log_dir / f"demo-{label}.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "p2pfs", "demo", str(self.mnt)],
                                     cwd=tree, env=env, stdout=self.log, stderr=self.log)

    def mounted(self) -> bool:
        with open("/proc/mounts") as f:
            return any(line.split()[1] == str(self.mnt) for line in f)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)     # the demo unmounts and stops its nodes
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        try:
            self.mnt.rmdir()
        except OSError:
            pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--a", required=True, type=Path, help="source tree A (the baseline)")
    p.add_argument("--b", default=ROOT, type=Path, help="source tree B (default: this one)")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--files", type=int, default=150, help="files per batch")
    p.add_argument("--out", help="write PREFIX.md and PREFIX.json")
    a = p.parse_args(argv)
    for tree in (a.a, a.b):
        if not (tree / "p2pfs" / "__main__.py").is_file():
            p.error(f"{tree} is not a p2pfs source tree")
    if a.rounds < 1 or a.files < 1:
        p.error("--rounds and --files must be at least 1")
    info = machine_info()
    log_dir = Path(tempfile.mkdtemp(prefix="small-ab-logs-"))
    demos = [Demo(a.a.resolve(), "A", log_dir), Demo(a.b.resolve(), "B", log_dir)]
    try:
        deadline = time.monotonic() + 120
        while not all(d.mounted() for d in demos):
            for d in demos:
                if d.proc.poll() is not None:
                    sys.exit(f"demo {d.label} ({d.tree}) exited; see {log_dir}")
            if time.monotonic() > deadline:
                sys.exit(f"demos not mounted within 120 s; see {log_dir}")
            time.sleep(0.2)
        time.sleep(3)
        rows = []
        for r in range(a.rounds):
            order = demos if r % 2 == 0 else demos[::-1]
            got = {d.label: small_files(d.mnt / f"round{r}", a.files)["ops_per_s"]
                   for d in order}
            rows.append(got)
            progress("small_ab", f"round {r}: A {got['A']:.0f}  B {got['B']:.0f}  "
                     f"B/A {got['B'] / got['A']:.2f}")
    finally:
        for d in demos:
            d.stop()
    shutil.rmtree(log_dir, ignore_errors=True)     # kept (and named) only on failure
    ratios = [x["B"] / x["A"] for x in rows]
    res = {
        "A": statistics.median(x["A"] for x in rows),
        "B": statistics.median(x["B"] for x in rows),
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios), "ratio_max": max(ratios),
    }
    md = (f"# Small files, two demos side by side (bench/small_ab.py)\n\n"
          f"`bench/small_ab.py --a {a.a} --b {a.b} --rounds {a.rounds} --files {a.files}`: "
          f"{a.rounds} rounds of {a.files} files (1 KiB) through each mount, alternating "
          f"which goes first.\n\n{machine_markdown(info)}\n"
          f"- load average {list(round(x, 2) for x in os.getloadavg())} at the end\n\n"
          f"| | A | B | B/A |\n|---|---:|---:|---:|\n"
          f"| median ops/s | {res['A']:.0f} | {res['B']:.0f} | "
          f"{res['ratio_median']:.3f} (rounds {res['ratio_min']:.2f}-{res['ratio_max']:.2f}) |\n")
    print(md)
    if a.out:
        Path(a.out + ".md").write_text(md)
        Path(a.out + ".json").write_text(json.dumps(
            {"machine": info, "args": {k: str(v) for k, v in vars(a).items()},
             "rounds": rows, "result": res}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
