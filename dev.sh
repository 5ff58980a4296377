#!/usr/bin/env bash
# p2pfs developer entry point: sets up what a fresh machine lacks, then runs.
#
#   ./dev.sh demo [MOUNTPOINT]   set up, then start an embedded local p2pfs network
#   ./dev.sh test [PYTEST ARGS]  set up, then run the test suite
#   ./dev.sh setup               only set up (Debian packages + .venv)
#
# Setup is idempotent and quick when nothing changed: it installs the Debian
# packages fuse3, libfuse3-dev and pkg-config when missing (needs root, or
# prints the command to run), and the Python packages into ./.venv.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
venv="$here/.venv"

say() { printf '[dev.sh] %s\n' "$*" >&2; }

need_debs() {
    local missing=()
    for pkg in fuse3 libfuse3-dev pkg-config; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        say "missing Debian packages: ${missing[*]}"
        say "run as root:  apt-get update && apt-get install -y ${missing[*]}"
        say "then run this command again."
        exit 1
    fi
    say "installing Debian packages: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

find_python() {
    for cand in python3.13 python3.12 python3.11 python3; do
        if command -v "$cand" >/dev/null 2>&1 &&
           "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
            command -v "$cand"; return 0
        fi
    done
    say "Python 3.11 or newer is required"; exit 1
}

need_venv() {
    local stamp="$venv/.p2pfs-setup" want
    want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/p2pfs" ]; then
        return 0
    fi
    if [ ! -x "$venv/bin/python" ]; then
        say "creating virtual environment in .venv"
        "$(find_python)" -m venv "$venv"
    fi
    say "installing Python packages into .venv (first time takes a minute)"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q -e ".[test,bench]"
    echo "$want" > "$stamp"
}

setup() { need_debs; need_venv; }

cmd="${1:-help}"; shift || true
case "$cmd" in
    setup) setup ;;
    demo)  setup; exec "$venv/bin/p2pfs" demo "$@" ;;
    test)  setup; exec "$venv/bin/python" -m pytest "$@" ;;
    *)     sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; [ "$cmd" = help ] || exit 2 ;;
esac
