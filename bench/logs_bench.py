"""Mounting a volume with long logs (issue 6's figures): how long a fresh
mount takes when the writers' logs hold N records, with and without
snapshots, and how many records per second the merge replays.

    .venv/bin/python bench/logs_bench.py [--records 100000] [--writers 1,3] [--out PREFIX]

The volume lives in one LMDB block store on the local disk with sealed
blocks (``storage.localstore``: the log layer's own costs, without the
network's). Writers take turns creating files (create, write, close), each
refreshing before its turn so the logs interleave as concurrent writers'
do; everyone syncs and refreshes at the end, so every record is settled and
the last snapshot covers nearly all of them. Then each scenario mounts a
fresh session as a reader and times it:

* from the logs alone (``use_snapshots=False``): every record is read,
  decoded, ordered and applied;
* from the newest snapshot: only the records after it.

"records merged per second" is records replayed / mount time of the
log-only mount.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine_info, machine_markdown, markdown_table, progress  # noqa: E402
from overlay.wire.ids import Identity  # noqa: E402
from storage.blockstore import BlockStore  # noqa: E402
from storage.localstore import LocalBlocks, LocalHeadBoard  # noqa: E402
from storage.namespace import Namespace  # noqa: E402
from storage.volume import create_volume  # noqa: E402

RECORDS_PER_FILE = 3          # create, write, (setattr from close)


async def build(base: Path, records: int, writers: int, snapshot_every: int):
    ids = [Identity.from_seed(b"bench writer %d" % i) for i in range(writers)]
    view, key = create_volume(ids[0], "bench")
    for ident in ids[1:]:
        view = view.add_writer(ids[0], key, ident.public_key)
    store = BlockStore(base / "blocks", quota=64 << 30, sync=False)
    board = LocalHeadBoard(base / "heads", sync=False)
    blocks = LocalBlocks(store, key)
    ns = [await Namespace.mount(view, i, blocks, board, snapshot_every=snapshot_every)
          for i in ids]
    made = 0
    t = time.perf_counter()
    k = 0
    while sum(n.log.seq for n in ns) < records:
        w = ns[k % writers]
        await w.refresh()
        for _ in range(50):
            a = await w.create(1, f"w{k % writers}-{made:07d}", 0o644, 0, 0)
            await w.open(a.ino, refresh=False)
            await w.write(a.ino, 0, b"%d\n" % made)
            await w.release(a.ino)
            made += 1
        k += 1
        if k % 40 == 0:
            progress("logs", f"{sum(n.log.seq for n in ns):,} records written")
    for w in ns:
        await w.sync()
    for w in ns:
        await w.refresh()
    for w in ns:
        await w.refresh()
    build_s = time.perf_counter() - t
    total = sum(n.log.seq for n in ns)
    return view, key, ids, store, board, blocks, total, made, build_s


async def mount_once(view, ident, blocks, board, use_snapshots: bool) -> dict:
    t = time.perf_counter()
    ns = await Namespace.mount(view, ident, blocks, board, use_snapshots=use_snapshots,
                               publish_on_refresh=False)
    dt = time.perf_counter() - t
    return {"seconds": dt, "records_replayed": ns.reader.records_fetched,
            "snapshot": ns.snapshot_used is not None,
            "entries": len(await ns.readdir(1))}


async def scenario(records: int, writers: int, snapshot_every: int) -> dict:
    base = Path(tempfile.mkdtemp(prefix="logs-bench-"))
    try:
        view, key, ids, store, board, blocks, total, files, build_s = await build(
            base, records, writers, snapshot_every)
        progress("logs", f"{writers} writer(s): {total:,} records, {files:,} files in "
                         f"{build_s:.1f} s; mounting")
        reader = Identity.from_seed(b"bench reader")     # not a writer: mounts read-only
        out = {"writers": writers, "records": total, "files": files, "build_s": build_s}
        for label, snaps in (("logs only", False), ("from snapshot", True)):
            runs = [await mount_once(view, reader, blocks, board, snaps) for _ in range(3)]
            runs.sort(key=lambda r: r["seconds"])
            out[label] = runs[1]                  # the median of three
            assert runs[1]["entries"] == files, (label, runs[1])
            progress("logs", f"  {label}: {runs[1]['seconds']:.2f} s, "
                             f"{runs[1]['records_replayed']:,} records replayed")
        out["merge_rate"] = out["logs only"]["records_replayed"] / out["logs only"]["seconds"]
        store.close()
        board.close()
        return out
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--writers", default="1,3", help="comma list of writer counts")
    p.add_argument("--snapshot-every", type=int, default=2000)
    p.add_argument("--out", help="write PREFIX.md and PREFIX.json")
    a = p.parse_args(argv)
    info = machine_info()
    results = [trio.run(scenario, a.records, int(w), a.snapshot_every)
               for w in a.writers.split(",")]
    info["load_after"] = [round(x, 2) for x in os.getloadavg()]
    rows = [[r["writers"], f"{r['records']:,}", f"{r['files']:,}",
             f"{r['logs only']['seconds']:.2f} s ({r['logs only']['records_replayed']:,})",
             f"{r['from snapshot']['seconds']:.2f} s ({r['from snapshot']['records_replayed']:,})",
             f"{r['logs only']['seconds'] / r['from snapshot']['seconds']:.0f}x",
             f"{r['merge_rate']:,.0f}"] for r in results]
    table = markdown_table(["writers", "records in the logs", "files",
                            "mount from logs only (records replayed)",
                            "mount from newest snapshot (records replayed)", "speed-up",
                            "records merged / s"], rows, right=(1, 2, 3, 4, 5, 6))
    md = (f"# Mounting long logs (bench/logs_bench.py)\n\n"
          f"`bench/logs_bench.py {' '.join(argv or sys.argv[1:])}`; a reader's fresh mount, "
          f"median of 3; snapshots every {a.snapshot_every} settled records; one local LMDB "
          f"block store (no network).\n\n{machine_markdown(info)}\n\n{table}\n")
    print(md)
    if a.out:
        Path(a.out + ".md").write_text(md)
        Path(a.out + ".json").write_text(json.dumps({"machine": info, "args": vars(a),
                                                     "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
