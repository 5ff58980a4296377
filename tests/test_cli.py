"""The p2pfs command: version, help, usage errors and exit codes, run as a
real subprocess the way users run it."""

import os
import stat
import subprocess
import sys

import pytest

P2PFS = [sys.executable, "-m", "p2pfs"]


def run(*args, env=None):
    return subprocess.run([*P2PFS, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_version():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("p2pfs ")


def test_no_command_prints_help_and_usage_code():
    r = run()
    assert r.returncode == 2 and "COMMAND" in r.stdout


@pytest.mark.parametrize("args", [["no-such-command"], ["init", "--no-such-flag"]])
def test_bad_arguments_exit_2_with_message(args):
    r = run(*args)
    assert r.returncode == 2
    assert "error" in r.stderr and "Traceback" not in r.stderr


def test_init_creates_private_identity_once(tmp_path):
    home = tmp_path / "home"
    first = run("init", env={"P2PFS_HOME": str(home)})
    assert first.returncode == 0, first.stderr
    key = home / "identity.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    second = run("init", env={"P2PFS_HOME": str(home)})
    assert second.returncode == 0
    assert first.stdout.splitlines()[-1] == second.stdout.splitlines()[-1]


def test_init_refuses_world_readable_key_with_clear_error(tmp_path):
    home = tmp_path / "home"
    assert run("init", env={"P2PFS_HOME": str(home)}).returncode == 0
    os.chmod(home / "identity.key", 0o644)
    r = run("init", env={"P2PFS_HOME": str(home)})
    assert r.returncode == 1
    assert "chmod 600" in r.stderr and "Traceback" not in r.stderr
