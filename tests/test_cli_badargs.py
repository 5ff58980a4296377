"""Bad arguments to every command line (issue 10; DESIGN.md "What must always
hold": bad input anywhere, the CLI included, gets a clear error).

Every ``p2pfs`` subcommand (``p2pfs --help``; a test checks none is missed)
and the node processes ``python -m storage``, ``python -m overlay`` and
``python -m storage.ringnode`` are run as real subprocesses with malformed or
unusable arguments. Each must exit with its usage code (2) or its documented
code (p2pfs: 1 the operation failed, fsck: 4 could not check; nodes: 3 no
bootstrap node joined, 4 data directory unusable; ringnode: 2 bad
configuration), print exactly one line saying what is wrong on stderr
(argparse's usage lines besides), and never a traceback.

The processes run concurrently from one module fixture (six at a time: most
of a case is waiting). Cases that show a bug in a file this suite may not
change are ``xfail(strict=True)`` with the failing command in the reason.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from overlay.wire.ids import Identity
from storage.certificate import RingDescriptor

PY = sys.executable
HEX = "ab" * 32
TIMEOUT = 40          # a case still running after this is a failure ("accepted")
ACCEPT_TIMEOUT = 6    # cases that would wrongly start a long-running process


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]   # after the interpreter; {tmp}, {file}, {busy}, ... substituted
    code: int
    says: str               # a regular expression the error line must match
    bug: str | None = None  # an xfail reason: the bug this case shows
    timeout: float = TIMEOUT


def p2pfs(*a):
    return ("-m", "p2pfs", *a)


def storage(*a):
    return ("-m", "storage", *a)


def overlay(*a):
    return ("-m", "overlay", *a)


def ringnode(*a):
    return ("-m", "storage.ringnode", *a)


CLI = "p2pfs/cli.py (file is another engineer's)"
CASES = [
    # ---- p2pfs: argparse
    Case("p2pfs-unknown-command", p2pfs("bogus"), 2, r"invalid choice: 'bogus'"),
    Case("init-missing-value", p2pfs("init", "--home"), 2, r"--home: expected one argument"),
    Case("init-extra-argument", p2pfs("init", "extra"), 2, r"unrecognized arguments: extra"),
    Case("mkfs-missing-dir", p2pfs("mkfs"), 2, r"required: volume_dir"),
    Case("mkfs-replicas-not-int", p2pfs("mkfs", "{tmp}/v1", "-r", "x"), 2, r"invalid int value"),
    Case("mount-missing-args", p2pfs("mount"), 2, r"required: volume_dir, mountpoint"),
    Case("umount-missing-arg", p2pfs("umount"), 2, r"required: mountpoint"),
    Case("demo-missing-arg", p2pfs("demo"), 2, r"required: mountpoint"),
    Case("demo-nodes-not-int", p2pfs("demo", "{tmp}/m1", "-n", "x"), 2, r"invalid int value"),
    Case("node-missing-data", p2pfs("node"), 2, r"required: --data"),
    Case("node-unknown-flag", p2pfs("node", "--data", "{tmp}/n0", "--bogus"), 2,
         r"unrecognized arguments: --bogus"),
    # ---- p2pfs: values argparse accepts, the command refuses (exit 1)
    Case("mkfs-replicas-zero", p2pfs("mkfs", "{tmp}/v2", "-r", "0", "--bootstrap",
                                     f"127.0.0.1:1#{HEX}"), 1, r"must be in 1\.\.16"),
    Case("mkfs-bootstrap-garbage", p2pfs("mkfs", "{tmp}/v3", "--bootstrap", "junk"), 1,
         r"expected HOST:PORT#NODEID"),
    Case("mkfs-bootstrap-short-id", p2pfs("mkfs", "{tmp}/v4", "--bootstrap", "127.0.0.1:1#00"),
         1, r"64 hex digits"),
    Case("mkfs-on-a-file", p2pfs("mkfs", "{file}"), 1, r"not a directory"),
    Case("mkfs-name-too-long", p2pfs("mkfs", "{tmp}/v6", "--name", "x" * 300), 1,
         r"at most 255"),
    Case("mkfs-under-a-file", p2pfs("mkfs", "{file}/sub"), 1, r"sub"),
    Case("init-home-is-a-file", p2pfs("init", "--home", "{file}"), 1, r"file"),
    Case("mount-no-such-volume", p2pfs("mount", "{tmp}/nosuch", "{tmp}/mnt"), 1,
         r"no such volume directory"),
    Case("mount-not-a-volume", p2pfs("mount", "{file}", "{tmp}/mnt"), 1,
         r"not a p2pfs volume"),
    Case("mount-format-not-a-map", p2pfs("mount", "{listfmt}", "{tmp}/mnt"), 1,
         r"not a p2pfs volume"),
    Case("mount-point-missing", p2pfs("mount", "{localvol}", "{tmp}/nomnt"), 1,
         r"does not exist"),
    Case("mount-point-a-file", p2pfs("mount", "{localvol}", "{file}"), 1, r"not a directory"),
    Case("umount-not-mounted", p2pfs("umount", "{tmp}/nowhere"), 1, r"is not mounted"),
    Case("demo-zero-nodes", p2pfs("demo", "{tmp}/m2", "-n", "0"), 1, r"--nodes must be"),
    Case("demo-too-many-replicas", p2pfs("demo", "{tmp}/m3", "-r", "9"), 1,
         r"--replicas must be"),
    Case("demo-mountpoint-a-file", p2pfs("demo", "{file}"), 1, r"not a directory"),
    Case("demo-data-a-file", p2pfs("demo", "{tmp}/m4", "--data", "{file}", "-n", "1", "-r", "1"),
         1, r"file"),
    # ---- p2pfs: the ring and multi-writer commands
    Case("ring-init-missing-args", p2pfs("ring-init"), 2, r"required: -o/--output, --member"),
    Case("ring-init-f-words", p2pfs("ring-init", "-o", "{tmp}/r.json", "--member", "x", "-f", "x"),
         2, r"invalid int value"),
    Case("ring-init-bad-member", p2pfs("ring-init", "-o", "{tmp}/r.json", "--member", "x"), 1,
         r"not a ring member 'x'"),
    Case("ring-init-too-few-members", p2pfs("ring-init", "-o", "{tmp}/r.json", "--member",
                                            f"{HEX}@127.0.0.1:1"), 1, r"exactly 4 members"),
    Case("ring-init-f-zero", p2pfs("ring-init", "-o", "{tmp}/r.json", "--member",
                                   f"{HEX}@127.0.0.1:1", "-f", "0"), 1, r"at least 1"),
    Case("ring-member-no-args", p2pfs("ring-member"), 2, r"required: --data"),
    Case("ring-member-no-key", p2pfs("ring-member", "--data", "{tmp}/rm"), 2,
         r"cannot read key file"),
    Case("add-writer-missing-args", p2pfs("add-writer"), 2, r"required: volume_dir"),
    Case("add-writer-bad-key", p2pfs("add-writer", "{localvol}", "zz", "--ticket", "{tmp}/t"), 1,
         r"64 hex digits"),
    Case("add-writer-single-node", p2pfs("add-writer", "{localvol}", HEX, "--ticket",
                                         "{tmp}/t"), 1, r"not a network volume"),
    Case("add-writer-no-volume", p2pfs("add-writer", "{tmp}/nosuch", HEX, "--ticket", "{tmp}/t"),
         1, r"not a p2pfs volume"),
    Case("join-missing-args", p2pfs("join"), 2, r"required: ticket, volume_dir"),
    Case("join-no-ticket", p2pfs("join", "{tmp}/none.ticket", "{tmp}/j1"), 1,
         r"cannot read the ticket"),
    Case("join-ticket-not-json", p2pfs("join", "{file}", "{tmp}/j2"), 1, r"cannot read the ticket"),
    Case("join-ticket-incomplete", p2pfs("join", "{ticket_partial}", "{tmp}/j3"), 1,
         r"bad ticket"),
    Case("join-ticket-not-a-map", p2pfs("join", "{ticket_list}", "{tmp}/j4"), 1, r"ticket"),
    Case("remove-writer-missing-args", p2pfs("remove-writer"), 2,
         r"required: volume_dir, writer"),
    Case("remove-writer-single-node", p2pfs("remove-writer", "{localvol}", "abcdef12"), 1,
         r"not a network volume"),
    Case("remove-writer-no-volume", p2pfs("remove-writer", "{tmp}/nosuch", "abcdef12"), 1,
         r"not a p2pfs volume"),
    Case("status-missing-arg", p2pfs("status"), 2, r"required: volume_dir"),
    Case("status-single-node", p2pfs("status", "{localvol}"), 1, r"single-node volume"),
    Case("status-format-not-a-map", p2pfs("status", "{listfmt}"), 1, r"not a p2pfs volume"),
    Case("conflicts-missing-arg", p2pfs("conflicts"), 2, r"required: mountpoint"),
    Case("conflicts-not-a-mount", p2pfs("conflicts", "{tmp}"), 1, r"mount point"),
    Case("mkfs-ring-without-bootstrap", p2pfs("mkfs", "{tmp}/v7", "--ring", "{ring}"), 1,
         r"--ring needs --bootstrap"),
    Case("mkfs-ring-garbage", p2pfs("mkfs", "{tmp}/v8", "--ring", "{garbage}", "--bootstrap",
                                    f"127.0.0.1:1#{HEX}"), 1, r"not a valid ring descriptor"),
    Case("demo-ring-not-3f1", p2pfs("demo", "{tmp}/m5", "--ring", "2"), 1, r"--ring must be"),
    Case("demo-ring-words", p2pfs("demo", "{tmp}/m6", "--ring", "x"), 2, r"invalid int value"),
    # ---- p2pfs fsck (documented: 4 the volume could not be checked) and inspect
    Case("fsck-missing-arg", p2pfs("fsck"), 2, r"required: volume_dir"),
    Case("fsck-no-volume", p2pfs("fsck", "{tmp}/nosuch"), 4, r"not a p2pfs volume"),
    Case("fsck-on-a-file", p2pfs("fsck", "{file}"), 4, r"unreadable"),
    Case("fsck-format-not-a-map", p2pfs("fsck", "{listfmt}"), 4, r"volume kind"),
    Case("inspect-missing-what", p2pfs("inspect"), 2, r"required: WHAT"),
    Case("inspect-unknown-what", p2pfs("inspect", "bogus"), 2, r"invalid choice: 'bogus'"),
    Case("inspect-node-no-socket", p2pfs("inspect", "node", "{tmp}/nosuch"), 1,
         r"no node answers"),
    Case("inspect-block-bad-bguid", p2pfs("inspect", "block", "{localvol}", "zz"), 1,
         r"64 hex digits"),
    Case("inspect-log-no-writer", p2pfs("inspect", "log", "{localvol}", "zz"), 1,
         r"no writer"),
    Case("inspect-file-missing", p2pfs("inspect", "file", "{localvol}", "/nope"), 1,
         r"nope"),
    # ---- python -m storage (what p2pfs node runs)
    Case("storage-no-args", storage(), 2, r"required: --data"),
    Case("storage-listen-port-range", storage("--data", "{tmp}/s1", "--listen",
                                              "127.0.0.1:99999"), 2, r"listen address"),
    Case("storage-bootstrap-garbage", storage("--data", "{tmp}/s2", "--bootstrap", "junk"), 2,
         r"expected HOST:PORT#NODEID"),
    Case("storage-bootstrap-short-id", storage("--data", "{tmp}/s3", "--bootstrap",
                                               "127.0.0.1:5#00"), 2, r"64 hex digits"),
    Case("storage-quota-negative", storage("--data", "{tmp}/s4", "--quota", "-5"), 2,
         r"a size must be positive"),
    Case("storage-quota-words", storage("--data", "{tmp}/s5", "--quota", "lots"), 2,
         r"not a size"),
    Case("storage-quota-overflow", storage("--data", "{tmp}/s6", "--quota", "1e400"), 2,
         r"not a size|too large"),
    Case("storage-r-zero", storage("--data", "{tmp}/s7", "--r", "0"), 2, r"--r must be in"),
    Case("storage-r-words", storage("--data", "{tmp}/s8", "--r", "three"), 2,
         r"invalid int value"),
    Case("storage-collector-garbage", storage("--data", "{tmp}/s9", "--collector", "zz"), 2,
         r"not a NodeID"),
    Case("storage-heartbeat-words", storage("--data", "{tmp}/s10", "--heartbeat", "x"), 2,
         r"invalid float value"),
    Case("storage-heartbeat-negative", storage("--data", "{tmp}/s11", "--heartbeat", "-1"), 2,
         r"heartbeat_interval must be"),
    Case("storage-dead-after-nan", storage("--data", "{tmp}/s12", "--dead-after", "nan"), 2,
         r"dead_after must be"),
    Case("storage-hop-timeout-inf", storage("--data", "{tmp}/s13", "--hop-timeout", "inf"), 2,
         r"hop_timeout must be"),
    Case("storage-ttl-below-republish", storage("--data", "{tmp}/s14", "--republish", "10",
                                                "--pointer-ttl", "5"), 2, r"pointer_ttl must"),
    Case("storage-log-level", storage("--data", "{tmp}/s15", "--log-level", "loud"), 2,
         r"invalid choice: 'loud'"),
    Case("storage-data-a-file", storage("--data", "{file}"), 4, r"cannot use data directory"),
    Case("storage-bootstrap-unreachable", storage("--data", "{tmp}/s16", "--bootstrap",
                                                  "127.0.0.1:{closed}#" + HEX), 3,
         r"gateway|join|bootstrap"),
    Case("storage-listen-port-busy", storage("--data", "{tmp}/s17", "--listen",
                                             "127.0.0.1:{busy}"), 4, r"127\.0\.0\.1:\d+"),
    # ---- python -m overlay
    Case("overlay-no-args", overlay(), 2, r"required: --data"),
    Case("overlay-listen-garbage", overlay("--data", "{tmp}/o1", "--listen", "x:y"), 2,
         r"listen address"),
    Case("overlay-republish-negative", overlay("--data", "{tmp}/o3", "--republish", "-5"), 2,
         r"republish_interval must be"),
    Case("overlay-data-a-file", overlay("--data", "{file}"), 4, r"cannot use data directory"),
    Case("overlay-bootstrap-unreachable", overlay("--data", "{tmp}/o4", "--bootstrap",
                                                  "127.0.0.1:{closed}#" + HEX), 3,
         r"gateway|join|bootstrap"),
    Case("overlay-listen-port-busy", overlay("--data", "{tmp}/o5", "--listen",
                                             "127.0.0.1:{busy}"), 4, r"127\.0\.0\.1:\d+"),
    # ---- python -m storage.ringnode
    Case("ringnode-no-args", ringnode(), 2, r"required: --data"),
    Case("ringnode-timeout-words", ringnode("--data", "{tmp}/r0", "--request-timeout", "x"), 2,
         r"invalid float value"),
    Case("ringnode-no-key", ringnode("--data", "{tmp}/r1"), 2, r"cannot read key file"),
    Case("ringnode-data-a-file", ringnode("--data", "{file}", "--init"), 2, r"exists"),
    Case("ringnode-no-ring", ringnode("--data", "{member}"), 2, r"--ring is required"),
    Case("ringnode-ring-missing", ringnode("--data", "{member}", "--ring", "{tmp}/none.json"), 2,
         r"No such file"),
    Case("ringnode-ring-garbage", ringnode("--data", "{member}", "--ring", "{garbage}"), 2,
         r"not a ring descriptor"),
    Case("ringnode-ring-infinite-epoch", ringnode("--data", "{member}", "--ring", "{infinite}"),
         2, r"not a ring descriptor"),
    Case("ringnode-ring-deep-json", ringnode("--data", "{member}", "--ring", "{deep}"), 2,
         r"not a ring descriptor"),
    Case("ringnode-ring-forged", ringnode("--data", "{member}", "--ring", "{forged}"), 2,
         r"signature"),
    Case("ringnode-not-a-member", ringnode("--data", "{outsider}", "--ring", "{ring}"), 2,
         r"not a member"),
    Case("ringnode-ring-not-utf8", ringnode("--data", "{member}", "--ring", "{binary}"), 2,
         r"ring"),
    Case("ringnode-listen-garbage", ringnode("--data", "{member}", "--ring", "{ring}",
                                             "--listen", "nope"), 2, r"nope"),
    Case("ringnode-checkpoint-zero", ringnode("--data", "{member}", "--ring", "{ring}",
                                              "--checkpoint", "0"), 2, r"checkpoint",
         timeout=ACCEPT_TIMEOUT),
    Case("ringnode-batch-zero", ringnode("--data", "{member}", "--ring", "{ring}",
                                         "--batch", "0"), 2, r"batch"),
    Case("ringnode-timeout-nan", ringnode("--data", "{member}", "--ring", "{ring}",
                                          "--view-change-timeout", "nan"), 2,
         r"view-change-timeout"),
]


def _write_inputs(tmp) -> dict[str, str]:
    """Files and directories the cases refer to by name."""
    names = {"tmp": str(tmp)}
    (tmp / "a-file").write_text("not a directory\n")
    names["file"] = str(tmp / "a-file")
    lf = tmp / "listfmt"
    lf.mkdir()
    (lf / "FORMAT").write_text("[1]\n")
    names["listfmt"] = str(lf)
    from p2pfs.backend import mkfs_local
    mkfs_local(tmp / "localvol")
    names["localvol"] = str(tmp / "localvol")
    # A ring whose member 0 is {member}'s key; {outsider} has a key of its own.
    member = Identity.load_or_create(tmp / "member" / "node.key")
    Identity.load_or_create(tmp / "outsider" / "node.key")
    names["member"], names["outsider"] = str(tmp / "member"), str(tmp / "outsider")
    owner = Identity.from_seed(b"badargs owner")
    others = [Identity.from_seed(b"badargs %d" % i) for i in range(3)]
    ring = RingDescriptor.create(owner, "badargs", [(member.public_key, "127.0.0.1:0")] +
                                 [(o.public_key, f"127.0.0.1:{9 + i}") for i, o in
                                  enumerate(others)])
    text = ring.to_json()
    files = {
        "ring": text,
        "garbage": "this is not json\n",
        "infinite": text.replace('"epoch": 0', '"epoch": Infinity'),
        "deep": "[" * 200_000 + "]" * 200_000,
        "forged": text.replace('"addr": "127.0.0.1:9"', '"addr": "127.0.0.1:19"'),
    }
    for k, v in files.items():
        (tmp / f"{k}.json").write_text(v)
        names[k] = str(tmp / f"{k}.json")
    (tmp / "ticket_partial").write_text('{"p2pfs-ticket": 1}')
    (tmp / "ticket_list").write_text("[1]")
    names["ticket_partial"] = str(tmp / "ticket_partial")
    names["ticket_list"] = str(tmp / "ticket_list")
    Identity.load_or_create(tmp / "home" / "identity.key")   # this user's, for ring-init
    (tmp / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    names["binary"] = str(tmp / "binary.json")
    return names


@dataclass
class Outcome:
    code: int | None      # None: still running at the timeout (killed)
    stderr: str


def _run(case: Case, names: dict, env: dict) -> Outcome:
    argv = [PY] + [a.format(**names) for a in case.argv]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=case.timeout,
                           env=env, stdin=subprocess.DEVNULL, cwd=names["tmp"])
    except subprocess.TimeoutExpired as e:   # subprocess.run killed it (by its PID)
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
        return Outcome(None, err or "")
    return Outcome(r.returncode, r.stderr)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("badargs")
    names = _write_inputs(tmp)
    env = {**os.environ, "P2PFS_HOME": str(tmp / "home")}
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))            # bound, never listening: connections refused
    names["busy"], names["closed"] = busy.getsockname()[1], closed.getsockname()[1]
    try:
        # Cases on the one local volume run one after the other: two at
        # once would find it locked by the other (VolumeBusy), not their error.
        shared = [c for c in CASES if any("{localvol}" in a for a in c.argv)]
        with ThreadPoolExecutor(max_workers=6) as pool:
            futures = {c.id: pool.submit(_run, c, names, env) for c in CASES
                       if c not in shared}
            in_turn = pool.submit(lambda: {c.id: _run(c, names, env) for c in shared})
            done = {k: f.result() for k, f in futures.items()}
            yield {**done, **in_turn.result()}
    finally:
        busy.close()
        closed.close()


def _params() -> list:
    return [pytest.param(c, id=c.id,
                         marks=[pytest.mark.xfail(strict=True, reason=c.bug)] if c.bug else [])
            for c in CASES]


# A line that reports the error: argparse's "prog: error: ...", the CLI's
# "p2pfs CMD: ...", the ringnode's "ringnode: ...", or a node's ERROR log line.
_ERROR_LINE = re.compile(r"(^[\w .\-]+: error: )|(^p2pfs [\w-]+: )|(^ringnode: )|( ERROR )")


@pytest.mark.parametrize("case", _params())
def test_bad_arguments_get_one_clear_line_and_their_exit_code(case, outcomes):
    out = outcomes[case.id]
    assert "Traceback" not in out.stderr, out.stderr[-1500:]
    assert out.code == case.code, f"exit {out.code}, expected {case.code}: {out.stderr[-800:]}"
    errors = [ln for ln in out.stderr.splitlines() if _ERROR_LINE.search(ln)]
    assert len(errors) == 1, out.stderr[-800:]
    assert re.search(case.says, errors[0]), errors[0]


def test_every_p2pfs_subcommand_has_cases():
    from p2pfs.cli import build_parser
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    covered = {c.argv[2] for c in CASES if c.argv[:2] == ("-m", "p2pfs") and len(c.argv) > 2}
    assert set(sub.choices) <= covered
