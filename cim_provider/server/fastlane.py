"""The fast lane: a plain keep-alive GetInstance answered before aiohttp sees it.

aiohttp spends ~150 µs on each request (request and response objects, a task, the
router, the response writer) where a GetInstance of a cached instance needs ~30 µs
of our own. On a connection of an unauthenticated server, the lane reads each
request's bytes as they arrive (http.py's parser wrapper hands them over first),
frames complete requests itself, and answers the common one: POST to /cimom or / over
HTTP/1.1, plain headers, a Content-Length body, the CIM headers of a GetInstance
whose body parses and matches them, when aiohttp has nothing in hand on the
connection. The answer is the dispatcher's, with the head aiohttp would write (only
Date can differ), in one transport.write. Anything else (another method or path,
M-POST, chunked or compressed bodies, Expect, Upgrade, Connection: close, HTTP/1.0,
limits exceeded, a header or body the lane would have to judge, a dispatch that does
not complete at once) goes to aiohttp unchanged and in order, which then answers as
it always did, errors included.

aiohttp internals this relies on (aiohttp 3.9 to 3.14, pinned <3.15 in
pyproject.toml): RequestHandler's `_waiter` (set while it awaits the next request),
`_messages`, `_current_request`, `_request_handler` (the application's bound
`_handle`), `_keepalive_timeout` and `_next_keepalive_close_time` (the idle deadline,
moved on after each answer). If they change, `_idle` is False and every request
takes aiohttp's path: slower, never wrong. tests/test_perf_paths.py checks that the
lane answers, and that it answers exactly what aiohttp would.
"""
from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import Any

from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE

from ..wbem.context import OperationContext
from ..wbem.dispatch import Dispatcher
from ..wbem.request import RequestError, parse_request

log = logging.getLogger(__name__)

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE = re.compile(rb"[\t\x20-\x7e]*")
_PASS = object()                  # frame(): the bytes cannot be framed here
_REFUSED_HEADERS = frozenset((b"transfer-encoding", b"expect", b"upgrade",
                              b"content-encoding", b"te", b"trailer"))
# Seconds a request's body may take to follow its head before the request (and the
# connection) is left to aiohttp; a client sends both at once, or nearly.
HOLD_BODY = 0.05
_PREFIX = (b"HTTP/1.1 200 OK\r\nContent-Type: application/xml; charset=\"utf-8\"\r\n"
           b"CIMOperation: MethodResponse\r\nContent-Length: ")


class FastLane:
    """One per application: what every connection's lane answers with."""

    def __init__(self, dispatcher: Dispatcher, *, max_body: int, max_depth: int,
                 max_line: int, max_field: int, max_headers: int, max_request: int,
                 check_headers: Callable[[dict[str, str], Any], None]):
        self.dispatcher = dispatcher
        self.max_body = max_body
        self.max_depth = max_depth
        self.max_line = max_line
        self.max_field = max_field
        self.max_headers = max_headers
        self.max_request = max_request          # larger bodies: aiohttp (parsed off the loop)
        self.check_headers = check_headers
        self.hold = max_line + max_headers * (max_field + 4) + max_request
        self.answered = 0

    def connection(self, protocol: Any) -> Connection:
        return Connection(self, protocol)


class Connection:
    """The lane of one connection: bytes held until a request is complete, and
    whether the lane still looks at this connection's requests."""

    __slots__ = ("lane", "protocol", "buf", "active", "answered", "_client", "_timer")

    def __init__(self, lane: FastLane, protocol: Any):
        self.lane = lane
        self.protocol = protocol
        self.buf = b""
        self.active = True
        self.answered = 0                      # requests answered here (connections.py)
        self._client: str | None = None
        self._timer: asyncio.TimerHandle | None = None

    def feed(self, data: bytes, feed: Callable[[bytes], tuple]) -> tuple:
        """Answer what can be answered; give everything else to `feed` (aiohttp's
        parser) in order. Returns what aiohttp's feed_data returns."""
        buf = self.buf + data if self.buf else data
        self.buf = b""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        messages: list = []
        upgraded, tail = False, b""
        handed = False              # a request went to aiohttp: the rest follows it
        while buf and self.active:
            framed = self._frame(buf)
            if framed is None:                       # incomplete: wait for more
                if len(buf) > self.lane.hold:
                    framed = _PASS
                else:
                    self.buf = buf
                    if b"\r\n\r\n" in buf:            # a body on its way: see _release
                        self._timer = asyncio.get_running_loop().call_later(
                            HOLD_BODY, self._release)
                    return messages, upgraded, tail
            if framed is _PASS:
                self.active = False
                break
            size, headers, body = framed
            one, buf = buf[:size], buf[size:]
            if not handed and self._idle() and self._answer(headers, body):
                continue
            handed = True
            got = feed(one)
            messages += got[0]
            upgraded, tail = got[1], got[2]
            if upgraded:
                self.active = False
                if buf:
                    tail += buf
                return messages, upgraded, tail
        if buf:
            got = feed(buf)
            messages += got[0]
            upgraded, tail = got[1], got[2]
        return messages, upgraded, tail

    def _release(self) -> None:
        """A body that does not follow its head at once goes to aiohttp, with the rest
        of the connection: its read timeout (408) applies as without the lane."""
        self._timer = None
        if self.active and self.buf:
            self.active = False
            data, self.buf = self.buf, b""
            self.protocol.data_received(data)

    # ---- framing ------------------------------------------------------------------------

    def _frame(self, buf: bytes) -> Any:
        """(size, headers, body) of the first request in `buf`; None: not complete yet;
        _PASS: not one the lane frames (aiohttp takes it from here on)."""
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return None if buf[:5] == b"POST "[:len(buf[:5])] else _PASS
        lines = buf[:end].split(b"\r\n")
        lane = self.lane
        first = lines[0]
        if first not in (b"POST /cimom HTTP/1.1", b"POST / HTTP/1.1") \
                or len(lines) - 1 > lane.max_headers:
            return _PASS
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or len(line) > lane.max_field or _TOKEN.fullmatch(name) is None \
                    or _VALUE.fullmatch(value) is None:
                return _PASS
            key = name.lower()
            if key in _REFUSED_HEADERS:
                return _PASS
            text = key.decode("ascii")
            if text in headers:
                return _PASS                    # a repeated header: aiohttp judges
            headers[text] = value.strip(b" \t").decode("ascii")
        conn = headers.get("connection")
        if conn is not None and conn.lower() != "keep-alive":
            return _PASS
        length = headers.get("content-length")
        if length is None or not length.isdigit() or len(length) > 12:
            return _PASS
        n = int(length)
        if n > lane.max_request or n > lane.max_body:
            return _PASS
        start = end + 4
        if len(buf) < start + n:
            return None
        return start + n, headers, buf[start:start + n]

    # ---- answering ------------------------------------------------------------------------

    def _idle(self) -> bool:
        """aiohttp awaits the next request on this connection and holds none."""
        p = self.protocol
        waiter = getattr(p, "_waiter", None)
        return waiter is not None and not waiter.done() and not getattr(p, "_messages", True) \
            and getattr(p, "_current_request", True) is None

    def _answer(self, headers: dict[str, str], body: bytes) -> bool:
        """Answer a GetInstance; False (nothing done) for anything aiohttp should see."""
        method = headers.get("cimmethod")
        if method is None or method.strip().lower() != "getinstance":
            return False
        op = headers.get("cimoperation")
        pv = headers.get("cimprotocolversion")
        if op is None or op.strip().lower() != "methodcall" or (
                pv is not None and not pv.strip().startswith("1.")):
            return False
        lane = self.lane
        try:
            req = parse_request(body, lane.max_depth)
            lane.check_headers(headers, req)
        except RequestError:
            return False
        if not req.intrinsic or req.method.lower() != "getinstance":
            return False
        coro = lane.dispatcher.respond(req, OperationContext(client=self._peer(),
                                                             direct=True))
        try:
            coro.send(None)
        except StopIteration as done:
            pieces = done.value
        except Exception:        # unexpected (CIM errors are answered): run it again
            log.debug("fast lane: GetInstance raised; aiohttp's path runs it again",
                      exc_info=True)
            return False
        else:
            # It waits for something: a read, so it can be dropped and run again by
            # aiohttp's path (GeneratorExit at its await; nothing was written).
            coro.close()
            return False
        transport = self.protocol.transport
        if transport is None or transport.is_closing():
            return True                          # gone: nothing to answer to
        data = b"".join(pieces.pieces)
        self.answered += 1
        lane.answered += 1
        self._keepalive()
        transport.write(b"%s%d\r\nDate: %s\r\nServer: %s\r\n\r\n%s" % (
            _PREFIX, len(data), rfc822_formatted_time().encode(), SERVER_SOFTWARE.encode(),
            data))
        return True

    def _peer(self) -> str:
        client = self._client
        if client is None:
            transport = self.protocol.transport
            peer = transport.get_extra_info("peername") if transport is not None else None
            client = str(peer[0]) if isinstance(peer, (list, tuple)) else \
                (str(peer) if peer else "unknown")
            self._client = client
        return client

    def _keepalive(self) -> None:
        """Move aiohttp's idle deadline, as it does after each response it writes."""
        p = self.protocol
        timeout = getattr(p, "_keepalive_timeout", None)
        if timeout:
            p._next_keepalive_close_time = p._loop.time() + timeout
