"""The real C source tree the Andrew benchmark copies, scans, reads and builds.

The Andrew benchmark (Howard et al. 1988, as run by Pond and Ivy: PAPERS.md
"Figures to beat") works on the source of a real program. Ours is Lua 5.4.4:
75 files in 3 directories, built by ``make linux`` with gcc, MIT licence.

Where the bytes come from, in order (always checked against one SHA-256):

1. ``bench/data/lua-5.4.4.tar.gz``, shipped in the repository (see
   ``bench/data/README.md``), so a fresh machine needs no network;
2. the cache, ``$P2PFS_BENCH_CACHE`` or ``~/.cache/p2pfs-bench``;
3. Debian's source package ``lua5.4`` through ``apt-get source``, run with a
   private apt configuration under the cache so the system's sources stay as
   they are. The upstream tarball is the package's ``.orig.tar.gz``.

The tarball is unpacked once into the cache; a stamp file holding the SHA-256
marks a complete unpack, so an interrupted one is redone.

    python bench/srctree.py            # print the unpacked tree's path
    python bench/srctree.py --fetch    # download from Debian again and check it
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"


class SourceTreeError(Exception):
    """The source tree cannot be obtained: missing, checksum mismatch, or the
    registry download failed."""


@dataclass(frozen=True)
class SourceTree:
    """A pinned C program: where to get it and how to build and check it."""
    name: str
    version: str
    archive: str            # file name of the tarball
    sha256: str
    topdir: str             # the directory the tarball unpacks into
    debian_source: str      # Debian source package shipping it as .orig.tar.gz
    debian_orig: str        # that .orig.tar.gz's file name
    build: tuple[str, ...]  # run in the tree's top directory
    cflags_var: str         # make variable appended to the compiler flags
    binary: str             # relative to the top directory
    check: tuple[str, ...]  # arguments that make the binary print its version


LUA = SourceTree(
    name="lua", version="5.4.4", archive="lua-5.4.4.tar.gz",
    sha256="164c7849653b80ae67bec4b7473b884bf5cc8d2dca05653475ec2ed27b9ebf61",
    topdir="lua-5.4.4", debian_source="lua5.4", debian_orig="lua5.4_5.4.4.orig.tar.gz",
    # -j1: one compiler at a time, so the phase measures the file system under
    # a sequential build the same way on every target (parallel make would mix
    # in scheduling noise of this 2-core machine).
    build=("make", "-j1", "linux"), cflags_var="MYCFLAGS",
    binary="src/lua", check=("-v",),
)


def cache_dir() -> Path:
    return Path(os.environ.get("P2PFS_BENCH_CACHE", Path.home() / ".cache" / "p2pfs-bench"))


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, tree: SourceTree = LUA) -> Path:
    """Return ``path`` if its SHA-256 is the pinned one, else raise."""
    got = sha256_of(path)
    if got != tree.sha256:
        raise SourceTreeError(f"{path}: SHA-256 {got} is not the pinned {tree.sha256}; "
                              f"delete it and run `python bench/srctree.py --fetch`")
    return path


def fetch_from_debian(tree: SourceTree = LUA, dest: Path | None = None) -> Path:
    """Download the tarball with ``apt-get source`` into ``dest`` (default: the
    cache) and return its checked path."""
    dest = dest or cache_dir()
    if shutil.which("apt-get") is None:
        raise SourceTreeError("apt-get not found: cannot fetch the Debian source package "
                              f"{tree.debian_source}")
    apt = dest / "apt"
    for sub in ("lists/partial", "cache/archives/partial", "download"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    # deb-src lines of this machine's Debian release; private to this download.
    suite = _debian_codename()
    (apt / "sources.list").write_text(
        f"deb-src http://deb.debian.org/debian {suite} main\n"
        f"deb-src http://deb.debian.org/debian-security {suite}-security main\n")
    opts = ["-o", f"Dir::Etc::SourceList={apt / 'sources.list'}",
            "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State::Lists={apt / 'lists'}",
            "-o", f"Dir::Cache={apt / 'cache'}"]
    for argv in (["apt-get", *opts, "-qq", "update"],
                 ["apt-get", *opts, "-qq", "source", "--download-only", tree.debian_source]):
        r = subprocess.run(argv, cwd=apt / "download", capture_output=True, text=True)
        if r.returncode != 0:
            raise SourceTreeError(f"{' '.join(argv[:1] + argv[-3:])} failed: "
                                  f"{(r.stderr or r.stdout).strip()[-400:]}")
    orig = apt / "download" / tree.debian_orig
    if not orig.exists():
        raise SourceTreeError(f"Debian's {tree.debian_source} no longer ships {tree.debian_orig} "
                              f"(upstream version changed); pin a new version in srctree.py")
    verify(orig, tree)
    target = dest / tree.archive
    shutil.copyfile(orig, target)
    shutil.rmtree(apt, ignore_errors=True)
    return target


def _debian_codename() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("VERSION_CODENAME="):
                return line.split("=", 1)[1].strip('"') or "bookworm"
    except OSError:
        pass
    return "bookworm"


def archive(tree: SourceTree = LUA, fetch: bool = True) -> Path:
    """The checked tarball: shipped copy, else cached copy, else downloaded."""
    for cand in (DATA_DIR / tree.archive, cache_dir() / tree.archive):
        if cand.exists():
            return verify(cand, tree)
    if not fetch:
        raise SourceTreeError(f"{tree.archive} is neither in {DATA_DIR} nor in {cache_dir()}")
    return fetch_from_debian(tree)


def ensure_tree(tree: SourceTree = LUA) -> Path:
    """Path of the unpacked, pristine source tree (its top directory)."""
    src = archive(tree)
    root = cache_dir() / f"{tree.name}-{tree.version}-tree"
    stamp = root / ".unpacked"
    if stamp.exists() and stamp.read_text().strip() == tree.sha256:
        return root / tree.topdir
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{tree.name}-", dir=root.parent))
    try:
        with tarfile.open(src) as tf:
            _extract(tf, tmp)
        if not (tmp / tree.topdir).is_dir():
            raise SourceTreeError(f"{src} has no top directory {tree.topdir}")
        (tmp / ".unpacked").write_text(tree.sha256 + "\n")
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root / tree.topdir


def _extract(tf: tarfile.TarFile, dest: Path) -> None:
    """Unpack regular files and directories only, never outside ``dest``."""
    if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4
        tf.extractall(dest, filter="data")
        return
    for m in tf.getmembers():
        parts = Path(m.name).parts
        if m.name.startswith("/") or ".." in parts or not (m.isfile() or m.isdir()):
            raise SourceTreeError(f"refusing tar member {m.name!r}")
    tf.extractall(dest)


@dataclass(frozen=True)
class Listing:
    """The tree as the benchmark replays it: directories parents-first, files
    with their mode and bytes (read once, before any timing)."""
    dirs: tuple[str, ...]
    files: tuple[tuple[str, int, bytes], ...]

    @property
    def nbytes(self) -> int:
        return sum(len(data) for _, _, data in self.files)


def load(top: Path) -> Listing:
    """Walk ``top`` (sorted, so every run replays the same order)."""
    dirs, files = [], []
    for cur, subdirs, names in os.walk(top):
        subdirs.sort()
        rel = os.path.relpath(cur, top)
        for d in subdirs:
            dirs.append(os.path.normpath(os.path.join(rel, d)))
        for n in sorted(names):
            if n == ".unpacked":
                continue
            p = os.path.join(cur, n)
            st = os.lstat(p)
            with open(p, "rb") as f:
                files.append((os.path.normpath(os.path.join(rel, n)), st.st_mode & 0o7777, f.read()))
    return Listing(tuple(dirs), tuple(files))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fetch", action="store_true",
                   help="download the tarball from Debian into the cache and check it")
    args = p.parse_args(argv)
    try:
        if args.fetch:
            print(f"fetched and checked: {fetch_from_debian()}")
        top = ensure_tree()
    except SourceTreeError as e:
        print(f"srctree: {e}", file=sys.stderr)
        return 1
    listing = load(top)
    print(f"{top}\n{len(listing.dirs)} directories, {len(listing.files)} files, "
          f"{listing.nbytes} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
