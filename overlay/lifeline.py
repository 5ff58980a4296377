"""Child processes that do not outlive the process that started them.

The demo, the test clusters and the local inner ring start node processes
in sessions of their own (so a terminal's Ctrl-C reaches only the parent,
which then stops them in order). If the parent is killed outright
(``kill -9``, the OOM killer, a ``timeout`` wrapper), nobody stops them,
and they would run on holding ports, disk and CPU.

A lifeline is a pipe: the parent keeps its write end (close-on-exec, so no
other program inherits it) and hands each child the read end. A child that
was given one (``LIFELINE_ENV`` names the descriptor) watches it from a
daemon thread; end of file means every write end is closed, which the
kernel does when the parent exits however it ends. The child then sends
itself SIGTERM, its ordinary graceful stop (leave the overlay, close the
stores). ``prctl(PR_SET_PDEATHSIG)`` was the alternative; but it fires
when the *thread* that forked the child exits, so a child started from a
short-lived worker thread would be stopped with that thread.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger(__name__)

LIFELINE_ENV = "P2PFS_LIFELINE_FD"


class Lifeline:
    """The parent's end. Pass ``env(base)`` and ``pass_fds`` to each
    ``subprocess.Popen``; ``close()`` (or the parent's exit) cuts it, and
    every child still running stops."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()       # both close-on-exec (PEP 446)

    @property
    def pass_fds(self) -> tuple[int, ...]:
        return (self._r,) if self._r >= 0 else ()

    def env(self, base: dict[str, str]) -> dict[str, str]:
        if self._r < 0:
            raise RuntimeError("the lifeline is closed")
        return {**base, LIFELINE_ENV: str(self._r)}

    def close(self) -> None:
        for fd in (self._r, self._w):
            if fd >= 0:
                os.close(fd)
        self._r = self._w = -1

    def __del__(self) -> None:
        try:
            self.close()
        except OSError:
            pass


def watch_parent() -> bool:
    """In a child: if started with a lifeline, stop (SIGTERM to ourselves)
    once it is cut. Returns whether there was one to watch. Call before the
    program's signal handling is set up or after; before, SIGTERM's default
    action ends the process, which is what the parent's death asks for."""
    value = os.environ.pop(LIFELINE_ENV, None)
    if not value:
        return False
    try:
        fd = int(value)
        os.fstat(fd)
    except (ValueError, OSError) as e:
        log.warning("%s=%r is not an open descriptor (%s); not watching the parent",
                    LIFELINE_ENV, value, e)
        return False

    def wait() -> None:
        try:
            while os.read(fd, 64):
                pass                # nobody writes; tolerate it all the same
        except OSError:
            pass
        log.warning("the process that started this one is gone: stopping")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait, name="lifeline", daemon=True).start()
    return True
