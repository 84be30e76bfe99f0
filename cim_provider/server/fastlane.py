"""The fast lane: plain keep-alive reads answered before aiohttp sees them.

aiohttp spends ~150 µs on each request (request and response objects, a task, the
router, the response writer) where a GetInstance of a cached instance needs ~30 µs
of our own, and an EnumerateInstanceNames of 10,000 kept INSTANCENAMEs (3 MB) needs
a few µs before its bytes go to the kernel. On a connection of an unauthenticated
server, the lane reads each request's bytes as they arrive (http.py's parser wrapper
hands them over first), frames complete requests itself, and answers the common ones:
POST to /cimom or / over HTTP/1.1, plain headers, a Content-Length body, the CIM
headers of a GetInstance, EnumerateInstanceNames or EnumerateInstances whose body
parses and matches them (the same parser and header checks as aiohttp's path), when
aiohttp has nothing in hand on the connection and the transport has no backlog. The
answer is the dispatcher's, with the head aiohttp would write (only Date can differ):
a small body joined into one transport.write, a large one handed over as its cached
pieces in one transport.writelines when http.py would write it that way too
(`as_is`: nothing joined or copied, docs/architecture.md "Data flow": rendered once,
sent many times). Anything else (another method or path, M-POST, chunked or
compressed bodies, Expect, Upgrade, Connection: close, HTTP/1.0, limits exceeded, a
header or body the lane would have to judge, a dispatch that does not complete at
once, a body http.py would stream chunk by chunk) goes to aiohttp unchanged and in
order, which then answers as it always did, errors included.

aiohttp internals this relies on (aiohttp 3.9 to 3.14, pinned <3.15 in
pyproject.toml): RequestHandler's `_waiter` (set while it awaits the next request),
`_messages`, `_current_request`, `_request_handler` (the application's bound
`_handle`), `_keepalive_timeout` and `_next_keepalive_close_time` (the idle deadline,
moved on after each answer). If they change, `_idle` is False and every request
takes aiohttp's path: slower, never wrong. tests/test_perf_paths.py and
tests/test_fastlane_enumerations.py check that the lane answers, and that it answers
exactly what aiohttp would.
"""
from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import Any

from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE

from ..wbem.context import OperationContext, Pieces
from ..wbem.dispatch import Dispatcher
from ..wbem.request import QuickGet, RequestError, parse_quick

log = logging.getLogger(__name__)

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE = re.compile(rb"[\t\x20-\x7e]*")
_PASS = object()                  # frame(): the bytes cannot be framed here
_REFUSED_HEADERS = frozenset((b"transfer-encoding", b"expect", b"upgrade",
                              b"content-encoding", b"te", b"trailer"))
# Seconds a request's body may take to follow its head before the request (and the
# connection) is left to aiohttp; a client sends both at once, or nearly.
HOLD_BODY = 0.05
# Request heads whose framing is kept (Connection._head), and the longest kept (bytes).
HEADS_KEPT = 64
HEAD_KEPT_MAX = 1024
# The operations the lane answers (CIMMethod, lower case): reads that change nothing,
# so one whose dispatch cannot complete at once is dropped and run again by aiohttp.
METHODS = frozenset(("getinstance", "enumerateinstancenames", "enumerateinstances"))
# Bytes the transport may still hold from earlier answers: above, aiohttp answers
# (its writer waits for the client, the lane never waits).
BACKLOG = 64 * 1024
_PREFIX = (b"HTTP/1.1 200 OK\r\nContent-Type: application/xml; charset=\"utf-8\"\r\n"
           b"CIMOperation: MethodResponse\r\nContent-Length: ")


class FastLane:
    """One per application: what every connection's lane answers with."""

    def __init__(self, dispatcher: Dispatcher, *, max_body: int, max_depth: int,
                 max_line: int, max_field: int, max_headers: int, max_request: int,
                 check_headers: Callable[[dict[str, str], Any], None],
                 as_is: Callable[[Pieces, Any], bool] = lambda body, transport: False,
                 join_max: int = 1024 * 1024):
        self.dispatcher = dispatcher
        self.max_body = max_body
        self.max_depth = max_depth
        self.max_line = max_line
        self.max_field = max_field
        self.max_headers = max_headers
        self.max_request = max_request          # larger bodies: aiohttp (parsed off the loop)
        self.check_headers = check_headers
        self.as_is = as_is        # http.py: the body goes out in one writelines() as it is
        self.join_max = join_max  # larger bodies not `as_is`: aiohttp streams them
        self.hold = max_line + max_headers * (max_field + 4) + max_request
        self.heads: dict[bytes, Any] = {}      # request head -> Connection._head's result
        self.answered = 0

    def connection(self, protocol: Any) -> Connection:
        return Connection(self, protocol)


class Connection:
    """The lane of one connection: bytes held until a request is complete, and
    whether the lane still looks at this connection's requests."""

    __slots__ = ("lane", "protocol", "buf", "active", "answered", "handed", "_client",
                 "_timer")

    def __init__(self, lane: FastLane, protocol: Any):
        self.lane = lane
        self.protocol = protocol
        self.buf = b""
        self.active = True
        self.answered = 0                      # requests answered here (connections.py)
        # (request body, response pieces) of a request answered but not written here
        # (http.py streams it): aiohttp's handler of that very request takes it.
        self.handed: tuple[bytes, Pieces] | None = None
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
        head = buf[:end]
        heads = self.lane.heads
        known = heads.get(head)
        if known is None:
            known = self._head(head)
            if end <= HEAD_KEPT_MAX:
                if len(heads) >= HEADS_KEPT:
                    heads.clear()
                heads[head] = known
        if known is _PASS:
            return _PASS
        headers, n = known
        start = end + 4
        if len(buf) < start + n:
            return None
        return start + n, headers, buf[start:start + n]

    def _head(self, head: bytes) -> Any:
        """(headers, body length) of a request head the lane frames, else _PASS. A
        function of the head's bytes alone: a client's requests repeat their heads,
        so the lane keeps what it made of the last few (`FastLane.heads`); the headers
        dict is shared, and only read."""
        lines = head.split(b"\r\n")
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
        return headers, n

    # ---- answering ------------------------------------------------------------------------

    def _idle(self) -> bool:
        """aiohttp awaits the next request on this connection and holds none."""
        p = self.protocol
        waiter = getattr(p, "_waiter", None)
        return waiter is not None and not waiter.done() and not getattr(p, "_messages", True) \
            and getattr(p, "_current_request", True) is None

    def _answer(self, headers: dict[str, str], body: bytes) -> bool:
        """Answer a read of METHODS; False (nothing written) for anything aiohttp
        should see."""
        method = headers.get("cimmethod")
        if method is None or method.strip().lower() not in METHODS:
            return False
        op = headers.get("cimoperation")
        pv = headers.get("cimprotocolversion")
        if op is None or op.strip().lower() != "methodcall" or (
                pv is not None and not pv.strip().startswith("1.")):
            return False
        transport = self.protocol.transport
        if transport is not None and transport.get_write_buffer_size() > BACKLOG:
            return False
        lane = self.lane
        try:
            req = parse_quick(body, lane.max_depth)
            lane.check_headers(headers, req)
        except RequestError:
            return False
        if not req.intrinsic or req.method.lower() not in METHODS:
            return False
        quick = None
        if isinstance(req, QuickGet):
            # A GetInstance of a shape answered before: its kept plan, else the usual way
            # (which keeps one for the next, and answers errors).
            try:
                answer = lane.dispatcher.quick_get(req)
            except Exception:        # unexpected: the usual way answers (or reports) it
                log.debug("fast lane: a kept GetInstance plan raised", exc_info=True)
                answer = None
            if answer is not None:
                return self._write(answer, transport)
            quick, req = req.shape, req.build()
        coro = lane.dispatcher.respond(req, OperationContext(client=self._peer(),
                                                             direct=True, quick=quick))
        try:
            coro.send(None)
        except StopIteration as done:
            pieces: Pieces = done.value
        except Exception:        # unexpected (CIM errors are answered): run it again
            log.debug("fast lane: %s raised; aiohttp's path runs it again", req.method,
                      exc_info=True)
            return False
        else:
            # It waits for something (a read, or a turn of the loop in a long
            # rendering): dropped and run again by aiohttp's path (GeneratorExit at its
            # await; nothing was written, and these reads change nothing).
            coro.close()
            return False
        if transport is None or transport.is_closing():
            return True                          # gone: nothing to answer to
        if pieces.size > lane.join_max and not lane.as_is(pieces, transport):
            # Streamed chunk by chunk, waiting for the client: aiohttp's writer. The
            # request goes to aiohttp next, and its handler takes the answer made here
            # instead of dispatching again (`take`).
            self.handed = (body, pieces)
            return False
        return self._write(pieces, transport)

    def _write(self, pieces: Pieces, transport: Any) -> bool:
        """Write the answer (head and body) at once; True: the request is answered."""
        if transport is None or transport.is_closing():
            return True                          # gone: nothing to answer to
        lane = self.lane
        as_is = lane.as_is(pieces, transport)
        head = b"%s%d\r\nDate: %s\r\nServer: %s\r\n\r\n" % (
            _PREFIX, pieces.size, rfc822_formatted_time().encode(), SERVER_SOFTWARE.encode())
        self.answered += 1
        lane.answered += 1
        self.handed = None           # aiohttp is idle: whatever it was handed is done
        self._keepalive()
        if as_is:
            # The kept pieces themselves: the transport holds references to them until
            # the kernel has taken their bytes (uvloop: writev, nothing copied).
            transport.writelines([head, *pieces.pieces])
        else:
            transport.write(b"".join([head, *pieces.pieces]))
        return True

    def take(self) -> tuple[bytes, Pieces] | None:
        """(body, answer) of the request the lane handed to aiohttp after answering it,
        once: aiohttp's handler calls this as it starts on each request of the
        connection, so only the first one after the handover (the very request, in
        order) can get it, and uses it when its body is the same."""
        handed, self.handed = self.handed, None
        return handed

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
