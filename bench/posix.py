"""POSIX conformance through the mount: pjdfstest on ``p2pfs demo``, beside a
local directory, in one run.

    .venv/bin/python bench/posix.py PJDFSTEST_DIR [--jobs 2] [--only chmod,rename]
                                    [--out bench/results/posix]

pjdfstest (https://github.com/pjd/pjdfstest, BSD licence) is the suite
file-system developers run for POSIX semantics: 238 test files, about 8,800
checks of modes, owners, links, renames, special files, times and error
codes. It is not shipped here; pass a checkout (its ``pjdfstest`` binary is
built with autoreconf/configure/make if missing: Debian's ``autoconf
automake`` are needed for that). Each target runs the whole suite with
``prove -r`` as root in a fresh directory of the target, since the suite
switches users to check permissions (the mount has ``allow_other`` and
``default_permissions``, as DESIGN.md asks).

Output: ``PREFIX.md`` and ``PREFIX.json``: per target the files, checks,
failures (with the failing files), and wall time.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine_info, machine_markdown, progress  # noqa: E402
from bench.targets import LocalTarget, P2pfsTarget, TargetUnavailable  # noqa: E402

SUMMARY = re.compile(r"^Files=(\d+), Tests=(\d+), (\d+) wallclock secs")
FAILED_FILE = re.compile(r"^(\S+\.t)\s+\(Wstat: \d+ Tests: (\d+) Failed: (\d+)\)")


def build(pjd: Path) -> Path:
    binary = pjd / "pjdfstest"
    if binary.exists():
        return binary
    progress("posix", f"building pjdfstest in {pjd}")
    for cmd in (["autoreconf", "-ifs"], ["./configure"], ["make", "pjdfstest"]):
        r = subprocess.run(cmd, cwd=pjd, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"posix: building pjdfstest failed at {' '.join(cmd)}:\n{r.stderr[-2000:]}")
    return binary


def run_suite(pjd: Path, where: Path, jobs: int, only: list[str]) -> dict:
    tests = pjd / "tests"
    dirs = [str(tests / o) for o in only] if only else [str(tests)]
    work = Path(tempfile.mkdtemp(prefix="pjd-", dir=where))
    work.chmod(0o755)       # the suite acts as other users too: they must get in
    t0 = time.monotonic()
    try:
        r = subprocess.run(["prove", "-r", f"-j{jobs}", *dirs], cwd=work, capture_output=True,
                           text=True, timeout=3600)
    finally:
        wall = time.monotonic() - t0
        shutil.rmtree(work, ignore_errors=True)
    out = r.stdout + r.stderr
    files = checks = 0
    for line in out.splitlines():
        m = SUMMARY.match(line)
        if m:
            files, checks = int(m.group(1)), int(m.group(2))
    failed = {}
    for line in out.splitlines():
        m = FAILED_FILE.match(line)
        if m and int(m.group(3)):
            failed[m.group(1).replace(str(tests) + "/", "")] = int(m.group(3))
    return {"files": files, "checks": checks, "failed_checks": sum(failed.values()),
            "failed_files": failed, "passed": r.returncode == 0 and files > 0,
            "wall_s": round(wall, 1), "tail": out.splitlines()[-3:]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pjdfstest", type=Path, help="a pjdfstest checkout")
    ap.add_argument("--jobs", type=int, default=2, help="prove -j (default 2)")
    ap.add_argument("--only", default="", help="comma-separated test directories (chmod,...)")
    ap.add_argument("--out", default="bench/results/posix", help="output prefix")
    args = ap.parse_args(argv)
    if not (args.pjdfstest / "tests").is_dir():
        ap.error(f"{args.pjdfstest} is not a pjdfstest checkout (no tests/ directory)")
    if shutil.which("prove") is None:
        ap.error("`prove` (Perl's Test::Harness) is not installed")
    build(args.pjdfstest)
    only = [o for o in args.only.split(",") if o]
    info = machine_info()
    base = Path(tempfile.mkdtemp(prefix="posix-bench-"))
    base.chmod(0o755)
    results = {}
    try:
        for target in (LocalTarget(base), P2pfsTarget(base)):
            progress("posix", f"{target.name}: starting")
            try:
                target.start()
            except TargetUnavailable as e:
                results[target.name] = {"unavailable": str(e)}
                continue
            try:
                target.path.chmod(0o755)
                progress("posix", f"{target.name}: running pjdfstest")
                results[target.name] = run_suite(args.pjdfstest, target.path, args.jobs, only)
                results[target.name]["details"] = target.details
            finally:
                target.stop()
            res = results[target.name]
            progress("posix", f"{target.name}: {res['checks']} checks, {res['failed_checks']} failed, "
                     f"{res['wall_s']} s")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"machine": info, "results": results},
                                                   indent=2) + "\n")
    lines = ["# POSIX conformance (pjdfstest) through the mount", "",
             f"`bench/posix.py {args.pjdfstest} --jobs {args.jobs}"
             + (f" --only {args.only}" if only else "") + "`", "", machine_markdown(info), "",
             "| target | test files | checks | failed checks | failed files | wall s |",
             "|---|---:|---:|---:|---|---:|"]
    for name, r in results.items():
        if "unavailable" in r:
            lines.append(f"| {name} | - | - | - | {r['unavailable']} | - |")
            continue
        bad = ", ".join(f"{k} ({v})" for k, v in sorted(r["failed_files"].items())) or "none"
        lines.append(f"| {name} | {r['files']} | {r['checks']} | {r['failed_checks']} | {bad} "
                     f"| {r['wall_s']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r.get("passed") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
