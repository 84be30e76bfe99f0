"""Connection-level limits aiohttp does not offer: a cap on open connections and a
deadline for request headers (slow senders), plus counts for introspection.

aiohttp's own keep-alive timer closes a connection that sits idle between requests;
nothing stops a client from trickling the *headers* of a request one byte at a time
(only that idle timer, if short). Each connection gets a small protocol wrapper: when
bytes of a new request arrive, a deadline starts; it is cancelled once aiohttp has a
complete request head. The body then has the front's own read timeout (http.py).

Connections over the cap get a minimal 503 and are closed at once, before any request
is parsed: a flood cannot make the server hold more than `max_connections` parsers.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from typing import cast

from aiohttp import web
from yarl import URL

from .http import answered_fast

log = logging.getLogger(__name__)

_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n"
         b"Retry-After: 1\r\n\r\n")


@dataclass
class ConnectionStats:
    open: int = 0          # connections now open (TLS: after the handshake)
    accepted: int = 0      # since start
    refused: int = 0       # over the cap, answered 503
    header_timeouts: int = 0


class ConnectionGuard:
    """Shared by every listener of one server."""

    def __init__(self, max_connections: int = 256, header_timeout: float = 30.0):
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.stats = ConnectionStats()
        self._warned = False

    def factory(self, server: web.Server):
        return lambda: _GuardedProtocol(self, server())


class _GuardedProtocol(asyncio.Protocol):
    """Delegates to aiohttp's RequestHandler; counts, caps and times request heads."""

    __slots__ = ("_guard", "_inner", "_counted", "_deadline")

    def __init__(self, guard: ConnectionGuard, inner) -> None:
        self._guard = guard
        self._inner = inner
        self._counted = False
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        g = self._guard
        if g.stats.open >= g.max_connections:
            g.stats.refused += 1
            if not g._warned:
                log.warning("connection limit (%d) reached; refusing new connections",
                            g.max_connections)
                g._warned = True
            try:
                # a stream server's transports (asyncio's, uvloop's) are write transports
                cast(asyncio.WriteTransport, transport).write(_BUSY)
            finally:
                transport.close()
            return
        g._warned = False
        g.stats.open += 1
        g.stats.accepted += 1
        self._counted = True
        self._inner.connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel()
        if self._counted:
            self._counted = False
            self._guard.stats.open -= 1
            self._inner.connection_lost(exc)

    def _busy(self) -> bool:
        # A parsed request is queued or being handled. aiohttp has no public "request
        # head complete" hook, so this reads RequestHandler internals: `_messages` (the
        # deque of parsed, not yet handled requests) and `_current_request` (the one
        # being handled), both present in aiohttp 3.9 to 3.14 (pyproject.toml pins
        # <3.15). If either is renamed, getattr returns None and no request ever looks
        # parsed: every connection is then closed header_timeout after its first bytes,
        # even in the middle of a request or a response.
        inner = self._inner
        return bool(getattr(inner, "_messages", None)) or \
            getattr(inner, "_current_request", None) is not None

    def data_received(self, data: bytes) -> None:
        if not self._counted:
            return
        answered = answered_fast(self._inner)
        self._inner.data_received(data)
        # A request answered by http.py's fast lane ends the head deadline too.
        if self._busy() or answered_fast(self._inner) != answered:
            self._cancel()
        elif data and self._deadline is None and self._guard.header_timeout > 0:
            loop = asyncio.get_running_loop()
            self._deadline = loop.call_later(self._guard.header_timeout, self._expired)

    def _expired(self) -> None:
        self._deadline = None
        if self._counted and not self._busy():
            self._guard.stats.header_timeouts += 1
            log.info("closing a connection whose request head did not arrive in %.0f s",
                     self._guard.header_timeout)
            self._inner.force_close()

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def eof_received(self):
        if self._counted:
            return self._inner.eof_received()
        return None

    def pause_writing(self) -> None:
        if self._counted:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._counted:
            self._inner.resume_writing()


class GuardedSite(web.BaseSite):
    """A TCP listener (plain or TLS) whose connections go through a ConnectionGuard."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, guard: ConnectionGuard,
                 ssl_context: ssl.SSLContext | None = None, backlog: int = 128,
                 handshake_timeout: float = 30.0) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host = host
        self._port = port
        self._guard = guard
        self._handshake_timeout = handshake_timeout

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return str(URL.build(scheme=scheme, host=self._host, port=self._port))

    # BaseSite's `_runner`, `_ssl_context`, `_backlog` and `_server` are aiohttp's own
    # interface for its sites (TCPSite uses them; same names in aiohttp 3.9 to 3.14).
    # If they are renamed, start() fails with AttributeError (every server test fails),
    # or, for `_server`, runner.cleanup() no longer closes this listener.

    @property
    def sockets(self) -> list:
        # BaseSite declares `_server` as AbstractServer; start() stores an asyncio.Server
        server = cast("asyncio.Server | None", self._server)
        return list(server.sockets) if server is not None else []

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None        # BaseSite.__init__ refuses a runner not set up
        self._server = await loop.create_server(
            self._guard.factory(server), self._host, self._port,
            ssl=self._ssl_context, backlog=self._backlog, reuse_address=True,
            ssl_handshake_timeout=self._handshake_timeout if self._ssl_context else None)
