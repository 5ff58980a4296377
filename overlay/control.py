"""The local control interface of a running node: a unix socket in the node's
data directory, speaking the same frames as the network (``tap.ctl.*`` in
``messages.py``), used by tests, ``p2pfs status`` and ``tools/inspect``.

Who may use it: whoever can open the socket file, which is created with mode
0600 in the node's own directory; no other check is made. Requests on one
connection are answered in order. A malformed frame closes that connection
with a logged reason, like on the network.

Commands (request -> reply):

* ``tap.ctl.status`` -> ``{"status": {...}}`` counters and sizes;
* ``tap.ctl.table`` -> ``{"table": {...}}`` the routing table, backpointers
  and stored pointers (``RoutingTable.to_dict`` plus ``"pointers"``);
* ``tap.ctl.publish {guid}`` -> roots that acknowledged;
* ``tap.ctl.unpublish {guid}``;
* ``tap.ctl.locate {guid, n}`` -> holders, nearest first;
* ``tap.ctl.route {guid}`` -> root, hops and the nodes visited;
* ``tap.ctl.roots {guid, k}`` -> roots of the k salted GUIDs;
* ``tap.ctl.leave`` -> leave the overlay; the node stops after replying.
"""

from __future__ import annotations

import logging
import os
import socket as _socket
import stat
from itertools import count
from pathlib import Path

import trio

from . import messages as m
from .errors import OverlayError
from .wire import frames
from .wire.transport import Dispatcher, Refused, RemoteError, answer, reply_body

log = logging.getLogger("overlay.control")

SOCKET_NAME = "control.sock"
MAX_SUN_PATH = 107


class ControlError(Exception):
    """The control socket cannot be created, reached, or answered badly."""


class ControlServer:
    def __init__(self, node, path: str | os.PathLike):
        self.node = node
        self.path = Path(path)
        if len(os.fsencode(self.path)) > MAX_SUN_PATH:
            raise ControlError(f"control socket path too long for a unix socket: {self.path}")
        self._stop_after_reply = False
        d = self.dispatcher = Dispatcher()
        d.on(m.CTL_STATUS, self._status)
        d.on(m.CTL_TABLE, self._table)
        d.on(m.CTL_PUBLISH, self._publish)
        d.on(m.CTL_UNPUBLISH, self._unpublish)
        d.on(m.CTL_LOCATE, self._locate)
        d.on(m.CTL_ROUTE, self._route)
        d.on(m.CTL_ROOTS, self._roots)
        d.on(m.CTL_LEAVE, self._leave)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(self.path.lstat().st_mode):
                raise ControlError(f"{self.path} exists and is not a socket")
            self.path.unlink()   # left by a node that was killed
        sock = trio.socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        old = os.umask(0o177)    # the socket file is born 0600
        try:
            await sock.bind(os.fspath(self.path))
        finally:
            os.umask(old)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        try:
            async with trio.open_nursery() as n:
                await n.start(trio.serve_listeners, self._connection, [listener])
                task_status.started(str(self.path))
        finally:
            try:
                self.path.unlink()
            except OSError:
                pass

    async def _connection(self, stream: trio.SocketStream) -> None:
        buf = frames.FrameBuffer()
        async with stream:
            while True:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return
                if not data:
                    return
                try:
                    payloads = buf.feed(data)
                    reqs = [frames.decode(p) for p in payloads]
                except frames.FrameError as e:
                    log.warning("control connection closed: %s", e)
                    return
                for f in reqs:
                    if f.kind != frames.Kind.REQUEST:
                        log.warning("control connection closed: %s is not a request", f.kind.name)
                        return
                    out = await answer(self.dispatcher, b"", f)
                    try:
                        await stream.send_all(out)
                    except trio.BrokenResourceError:
                        return
                    if self._stop_after_reply:
                        self.node.stop()
                        return

    # -------------------------------------------------------------- commands

    async def _status(self, _s, body):
        return {"status": self.node.status()}

    async def _table(self, _s, body):
        node = self.node
        now = trio.current_time()
        t = node.table.to_dict()
        t["pointers"] = [
            {"obj": p.obj.hex(), "holder": p.holder.id.hex(), "holder_addr": p.holder.addr,
             "target": p.target.hex(), "epoch": p.epoch, "rooted": p.rooted,
             "expires_in": round(p.expires - now, 3)}
            for p in node.pointers.all()
        ]
        t["published"] = sorted(g.hex() for g in node.published)
        return {"table": t}

    async def _publish(self, _s, body):
        roots = await self._dolr(self.node.publish(body["guid"]))
        return {"roots": [m.peer_body(p) for p in roots]}

    async def _unpublish(self, _s, body):
        await self._dolr(self.node.unpublish(body["guid"]))
        return {}

    async def _locate(self, _s, body):
        holders = await self._dolr(self.node.locate(body["guid"], body["n"]))
        return {"holders": [m.peer_body(p) for p in holders]}

    async def _route(self, _s, body):
        r = await self._dolr(self.node.find_root(body["guid"], trace=True))
        return {"root": m.peer_body(r.at), "hops": r.hops, "trace": r.trace}

    async def _roots(self, _s, body):
        roots = await self._dolr(self.node.roots(body["guid"], body["k"]))
        return {"roots": [m.peer_body(p) for p in roots]}

    async def _leave(self, _s, body):
        await self.node.maint.leave()
        self._stop_after_reply = True
        return {}

    @staticmethod
    async def _dolr(coro):
        try:
            return await coro
        except OverlayError as e:
            raise Refused(type(e).__name__, str(e)) from None


async def call(path: str | os.PathLike, msg_type: str, body: dict | None = None, *,
               timeout: float = 30.0) -> dict:
    """One request on a node's control socket; returns the reply body.
    Raises ControlError (no node there, or a bad answer) or RemoteError (the
    node refused: the code names the overlay error)."""
    async with ControlClient(path) as c:
        return await c.call(msg_type, body or {}, timeout=timeout)


class ControlClient:
    """A connection to a node's control socket for several requests."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._stream: trio.SocketStream | None = None
        self._ids = count(1)
        self._buf = frames.FrameBuffer()

    async def __aenter__(self) -> "ControlClient":
        try:
            self._stream = await trio.open_unix_socket(self.path)
        except OSError as e:
            raise ControlError(f"no node answers on {self.path}: {e.strerror}") from None
        return self

    async def __aexit__(self, *exc) -> None:
        if self._stream is not None:
            await self._stream.aclose()

    async def call(self, msg_type: str, body: dict, *, timeout: float = 30.0) -> dict:
        rid = next(self._ids)
        data = frames.encode(frames.Kind.REQUEST, msg_type, rid, body)
        with trio.move_on_after(timeout):
            try:
                await self._stream.send_all(data)
                while True:
                    chunk = await self._stream.receive_some(65536)
                    if not chunk:
                        raise ControlError("the node closed the control connection")
                    for p in self._buf.feed(chunk):
                        f = frames.decode(p)
                        if f.id == rid:
                            return reply_body(f, None)
            except (trio.BrokenResourceError, frames.FrameError) as e:
                raise ControlError(f"control connection failed: {e}") from None
        raise ControlError(f"no answer to {msg_type} within {timeout:g}s")


__all__ = ["ControlServer", "ControlClient", "ControlError", "call", "RemoteError", "SOCKET_NAME"]
