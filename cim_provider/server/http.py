"""The HTTP front (DSP0200 over aiohttp): headers, framing, errors with their status.

It checks the CIM headers, reads a bounded body, hands the parsed request to the
dispatcher and writes the pieces it gets back. It knows nothing of domains.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from ..wbem.context import CHUNK, Pieces
from ..wbem.dispatch import Dispatcher, OperationContext
from ..wbem.request import CIMRequest, RequestError, parse_request
from .fastlane import Connection, FastLane
from .security import DEFAULT_MAX_BODY

log = logging.getLogger(__name__)

CIM_PATHS = ("/cimom", "/")
_MAN_NS = re.compile(r";\s*ns\s*=\s*(\d+)", re.I)

# Large bodies and responses must not hold the event loop (HTTP, libvirt events and
# D-Bus share it). Dense CIM-XML parses at 0.2-0.3 µs a byte, so a body above
# PARSE_OFF_LOOP (up to ~10 ms of parsing) is parsed in a worker thread; Python threads
# share the GIL, but the parser's callbacks are Python code, so the loop gets it back
# every switch interval (5 ms). What would still hold the GIL for long is avoided:
# garbage collections over the growing tree (see _CollectorPause) and freeing the
# request's parameters all at once (see _release). The dispatcher answers with UTF-8
# pieces (mostly cached renderings, never copied into one buffer for a large
# response): a response above STREAM_ABOVE bytes is written STREAM_CHUNK bytes at a
# time, yielding between chunks and waiting while the client lags behind. Smaller
# ones are joined and written at once. Nothing is joined, though, for a body above
# AS_IS_ABOVE that a transport can take as it is (docs/architecture.md, "Data flow":
# rendered once, sent many times): one of at most AS_IS_PIECES pieces (a kept
# rendering joined into chunks, render.compact: EnumerateInstanceNames), or, on
# uvloop, whose writelines() gathers the pieces into writev() calls without copying
# them, any body up to WRITELINES_MAX bytes (a pull page of 1,000 systems: ~2 MB in
# ~6,000 cached pieces; joining it, or a loop turn per chunk, measured slower).
PARSE_OFF_LOOP = 32 * 1024        # request bytes
READ_CHUNK = 256 * 1024           # bytes per read of a larger body (never joined whole)
PARSE_THREADS = 2                 # large bodies parsed at once (each tree is ~10x its body)
STREAM_ABOVE = 1024 * 1024        # response bytes
AS_IS_PIECES = 64                 # a body in this few pieces is written without a join
AS_IS_ABOVE = 64 * 1024           # ... when it is larger than this (bytes)
WRITELINES_MAX = 4 * 1024 * 1024  # bytes handed to a gathering transport at once
STREAM_CHUNK = CHUNK              # bytes per write (a join of cached pieces: ~30 µs)
WRITE_AHEAD = 2 * STREAM_CHUNK    # bytes a streamed response may leave to the transport
RELEASE_ABOVE = 1024              # parameters: more are freed in a worker, one at a time


class _CollectorPause:
    """The cyclic garbage collector off while large bodies are parsed.

    A parse builds millions of container objects. With the collector on, each full
    collection walks the growing tree in one C call holding the GIL (up to ~200 ms,
    several per 16 MiB body), and the objects it promotes to the oldest generation
    make one more full collection of the whole process (~300 ms with 10,000
    domains) due soon after. Off, nothing is walked or promoted: the tree, freed by
    reference counting when the parse returns, leaves the collector's counts as they
    were. Process-wide, so counted across the servers of a process (tests run
    several, each on its own thread); left alone when someone else turned it off.
    A pause is not extended past `max_seconds`: under a stream of large bodies the
    collector comes back once the parses in flight are done.
    """

    def __init__(self, max_seconds: float = 10.0) -> None:
        self.max_seconds = max_seconds
        self._lock = threading.Lock()
        self._count = 0
        self._since = 0.0

    def pause(self) -> bool:
        """True when this caller takes part in the pause (then call resume())."""
        with self._lock:
            if self._count == 0:
                if not gc.isenabled():
                    return False
                gc.disable()
                self._since = time.monotonic()
            elif time.monotonic() - self._since > self.max_seconds:
                return False
            self._count += 1
            return True

    def resume(self) -> None:
        with self._lock:
            self._count -= 1
            if self._count == 0:
                gc.enable()


_GC_PAUSE = _CollectorPause()


def _release(params: dict) -> None:
    """Empty a large request's parameter dict one entry at a time (in a worker): freed
    at once, its values hold the GIL (250,000 of them: ~60 ms). Only the dict is
    emptied, which belongs to the request; the dispatcher has copied what it keeps
    into its own dicts, and the values themselves are not touched."""
    while params:
        params.popitem()


@dataclass
class HTTPLimits:
    max_body: int = DEFAULT_MAX_BODY
    max_depth: int = 64
    read_timeout: float = 30.0        # seconds to receive a request head, then its body
    # Connection level (applied by server.py through aiohttp and wbem/connections.py):
    max_line_size: int = 8190         # request line and each header line, bytes
    max_field_size: int = 8190        # one header value, bytes
    max_headers: int = 64             # header fields per request
    keepalive_timeout: float = 15.0   # idle seconds between requests before closing
    max_connections: int = 256        # open at once; more get 503 and are closed


def _cim_headers(request: web.Request) -> tuple[dict[str, str], str | None]:
    """The CIM headers, with M-POST's `NN-` prefixes removed (DSP0200 6.3 / RFC 2774)."""
    if request.method == "POST":
        return {k.lower(): v for k, v in request.headers.items()}, None
    man = request.headers.get("Man", "")
    if "dmtf.org/cim/mapping.http" not in man.lower():
        raise RequestError(400, "unsupported-operation", "M-POST without the CIM Man header")
    m = _MAN_NS.search(man)
    prefix = f"{m.group(1)}-" if m else ""
    out = {}
    for k, v in request.headers.items():
        lk = k.lower()
        out[lk[len(prefix):] if prefix and lk.startswith(prefix) else lk] = v
    return out, prefix


def _error_response(exc: RequestError, prefix: str | None) -> web.Response:
    log.info("HTTP %d %s: %s", exc.status, exc.cim_error, exc.reason)
    headers = {(prefix or "") + "CIMError": exc.cim_error, "Content-Type": "text/plain"}
    if prefix is not None:
        headers["Ext"] = ""
    return web.Response(status=exc.status, text=exc.reason + "\n", headers=headers)


def _check_headers(h: dict[str, str], req) -> None:
    """DSP0200 7.3: CIMMethod must name the method and CIMObject its target."""
    method_hdr = h.get("cimmethod")
    if method_hdr is None:
        raise RequestError(400, "header-mismatch", "CIMMethod header missing")
    if method_hdr.strip().lower() != req.method.lower():
        raise RequestError(400, "header-mismatch",
                           "CIMMethod header does not match the method in the body")
    obj = h.get("cimobject")
    if obj is None:
        raise RequestError(400, "header-mismatch", "CIMObject header missing")
    obj = unquote(obj).strip()
    if not req.intrinsic:
        obj = obj.split(":", 1)[0]       # namespace:path: only the namespace is compared
    if obj.strip("/").lower() != (req.namespace or "").strip("/").lower():
        raise RequestError(400, "header-mismatch",
                           "CIMObject header does not match the namespace in the body")


class _MPostAwareParser:
    """aiohttp's C request parser (llhttp) knows a fixed list of methods and answers
    M-POST with a 400 before any handler runs; its pure-Python parser accepts any
    method token but costs a few hundred µs per request. This parser is the C one
    until a request on the connection starts with M-POST, then the Python one.

    aiohttp has no public way to choose the request parser, so this relies on its
    internals as of aiohttp 3.9 to 3.14 (pyproject.toml pins <3.15): RequestHandler
    builds its parser by calling the module global `web_protocol.HttpRequestParser`
    (replaced by `_accept_m_post`), `http_parser.HttpRequestParserPy` is the pure-Python
    parser taking the same arguments, and `feed_data` returns (messages, upgraded, tail)
    with messages a list of (message, payload StreamReader). If these change, M-POST is
    answered 400 again or parsing fails outright: tests/test_http_errors.py's M-POST
    tests catch both."""

    def __init__(self, *args, **kwargs):
        from aiohttp import http_parser
        self._make = lambda: http_parser.HttpRequestParserPy(*args, **kwargs)
        assert _C_PARSER is not None        # _accept_m_post sets it before installing us
        self._impl = _C_PARSER(*args, **kwargs)
        self._python = _C_PARSER is http_parser.HttpRequestParserPy
        self._payload = None          # body of the last request parsed
        self._held = b""              # a request's first bytes, too few to tell M-POST
        # The fast lane (fastlane.py) of this connection: its RequestHandler is the
        # first argument (aiohttp internals, as above); found at the first bytes.
        self._protocol = args[0] if args else None
        self._lane: Any = _UNSET

    def feed_data(self, data, *args, **kwargs):
        lane = self._lane
        if lane is _UNSET:
            lane = self._lane = _lane_of(self._protocol)
        if lane is not None and lane.active and not self._python:
            return lane.feed(data, lambda d: self._feed(d, *args, **kwargs))
        return self._feed(data, *args, **kwargs)

    def _feed(self, data, *args, **kwargs):
        # Switch only between requests: a body that happens to start with "M-POST "
        # (found by fuzzing) would otherwise be parsed as a new request while its own
        # request waited for the rest of its body.
        if not self._python and (self._payload is None or self._payload.is_eof()):
            data, self._held = self._held + data, b""
            if len(data) < 7 and b"M-POST ".startswith(data):
                self._held = data     # "M-PO" split from "ST ...": wait for the rest
                return [], False, b""
            if data[:7] == b"M-POST ":
                self._impl, self._python = self._make(), True
        result = self._impl.feed_data(data, *args, **kwargs)
        if result[0]:
            self._payload = result[0][-1][1]
        return result

    def __getattr__(self, name):
        return getattr(self._impl, name)


_C_PARSER: type | None = None     # aiohttp's own parser class, kept by _accept_m_post
_UNSET = object()
_LANE = web.AppKey("cim_provider.fast_lane", FastLane)


def _lane_of(protocol: Any) -> Connection | None:
    """The fast lane for a connection of an application that has one: aiohttp's
    RequestHandler keeps the application's bound `_handle` (internals, as above)."""
    app = getattr(getattr(protocol, "_request_handler", None), "__self__", None)
    lane = app.get(_LANE) if isinstance(app, web.Application) else None
    return lane.connection(protocol) if lane is not None else None


def _handed(request: web.Request) -> tuple[bytes, Pieces] | None:
    """What the fast lane of the request's connection answered and left to aiohttp to
    write (fastlane.py, Connection.take); the lane is found as in answered_fast."""
    lane = getattr(getattr(request.protocol, "_parser", None), "_lane", None)
    return lane.take() if isinstance(lane, Connection) else None


def answered_fast(handler: Any) -> int:
    """Requests the fast lane has answered on the connection of `handler` (aiohttp's
    RequestHandler): connections.py's header deadline ends with each of them."""
    lane = getattr(getattr(handler, "_parser", None), "_lane", None)
    return lane.answered if isinstance(lane, Connection) else 0


def _accept_m_post() -> None:
    """Install _MPostAwareParser for the servers of this process (idempotent)."""
    global _C_PARSER
    from aiohttp import web_protocol
    if web_protocol.HttpRequestParser is not _MPostAwareParser:
        # aiohttp internals (see _MPostAwareParser): the name RequestHandler looks up
        _C_PARSER = web_protocol.HttpRequestParser
        web_protocol.HttpRequestParser = _MPostAwareParser  # type: ignore[misc,assignment]  # reason: monkeypatch


def make_app(dispatcher: Dispatcher, limits: HTTPLimits | None = None,
             authenticate=None) -> web.Application:
    """The aiohttp application serving CIM-XML operations on /cimom."""
    limits = limits or HTTPLimits()
    _accept_m_post()
    parse_pool = ThreadPoolExecutor(PARSE_THREADS, thread_name_prefix="cim-parse")

    async def handle(request: web.Request) -> web.StreamResponse:
        handed = _handed(request)
        if request.path not in CIM_PATHS:
            raise web.HTTPNotFound(text="CIM operations are served on /cimom\n")
        if request.method not in ("POST", "M-POST"):
            raise web.HTTPMethodNotAllowed(request.method, ["POST", "M-POST"])
        prefix = None
        try:
            headers, prefix = _cim_headers(request)
            ctx = OperationContext(client=request.remote or "unknown")
            if authenticate is not None:
                denied = await authenticate(request, ctx)
                if denied is not None:
                    return denied
            op = headers.get("cimoperation")
            if op is None or op.strip().lower() != "methodcall":
                raise RequestError(400, "unsupported-operation",
                                   "CIMOperation header must be MethodCall")
            pv = headers.get("cimprotocolversion")
            if pv is not None and not pv.strip().startswith("1."):
                raise RequestError(501, "unsupported-protocol-version",
                                   "CIMProtocolVersion must be 1.x")
            if request.content_length is not None and request.content_length > limits.max_body:
                raise web.HTTPRequestEntityTooLarge(limits.max_body, request.content_length)
            try:
                # asyncio.timeout, not wait_for: no extra task per request (hot path).
                async with asyncio.timeout(limits.read_timeout):
                    body = await _read_body(request, limits.max_body)
            except TimeoutError:
                raise web.HTTPRequestTimeout(text="request body not received in time\n") from None
            except asyncio.IncompleteReadError:
                raise RequestError(400, "request-not-well-formed",
                                   "request body shorter than its Content-Length") from None
            if _size(body) > PARSE_OFF_LOOP:
                return await large(request, body, headers, prefix, ctx)
            req = parse_request(body, limits.max_depth)
            _check_headers(headers, req)
        except RequestError as exc:
            return _error_response(exc, prefix)
        if handed is not None and handed[0] == body:
            # The fast lane made this very answer and left the writing to us.
            return await write(request, handed[1], prefix)
        return await respond(request, req, ctx, prefix)

    async def large(request: web.Request, body: bytes | list[bytes], headers: dict[str, str],
                    prefix: str | None, ctx: OperationContext) -> web.StreamResponse:
        """A body above PARSE_OFF_LOOP: parsed in a worker thread with the garbage
        collector paused, its parameters freed in the worker afterwards."""
        req = None
        try:
            try:
                paused = _GC_PAUSE.pause()
                try:
                    req = await asyncio.get_running_loop().run_in_executor(
                        parse_pool, parse_request, body, limits.max_depth)
                finally:
                    if paused:
                        _GC_PAUSE.resume()
                _check_headers(headers, req)
            except RequestError as exc:
                return _error_response(exc, prefix)
            return await respond(request, req, ctx, prefix)
        finally:
            if req is not None and len(req.params) > RELEASE_ABOVE:
                try:
                    parse_pool.submit(_release, req.params)
                except RuntimeError:       # the pool is shut down: the server is stopping
                    pass

    async def respond(request: web.Request, req: CIMRequest, ctx: OperationContext,
                      prefix: str | None) -> web.StreamResponse:
        return await write(request, await dispatcher.respond(req, ctx), prefix)

    async def write(request: web.Request, body: Pieces,
                    prefix: str | None) -> web.StreamResponse:
        out_headers = {"Content-Type": 'application/xml; charset="utf-8"',
                       (prefix or "") + "CIMOperation": "MethodResponse"}
        if prefix is not None:
            out_headers["Ext"] = ""
        if body.size > STREAM_ABOVE or _written_as_is(body, request.transport):
            return await _stream(request, body, out_headers)
        return web.Response(body=b"".join(body.pieces), headers=out_headers)

    async def stop_parsing(_app: web.Application) -> None:
        parse_pool.shutdown(wait=False, cancel_futures=True)

    app = web.Application(client_max_size=limits.max_body)
    if authenticate is None:
        # Unauthenticated: plain GetInstance, EnumerateInstanceNames and
        # EnumerateInstances requests take the fast lane (fastlane.py).
        app[_LANE] = FastLane(dispatcher, max_body=limits.max_body,
                              max_depth=limits.max_depth, max_line=limits.max_line_size,
                              max_field=limits.max_field_size,
                              max_headers=limits.max_headers, max_request=PARSE_OFF_LOOP,
                              check_headers=_check_headers, as_is=_written_as_is,
                              join_max=STREAM_ABOVE)
    app.router.add_route("*", "/{tail:.*}", handle)
    app.on_cleanup.append(stop_parsing)
    return app


async def _read_body(request: web.Request, limit: int) -> bytes | list[bytes]:
    """The body: bytes, or above PARSE_OFF_LOOP the chunks it arrived in (at most
    READ_CHUNK bytes each), which nobody joins: the parser feeds them to expat one by
    one (wbem/xmlparse.py). Read in one piece, a 16 MiB body was joined twice on the
    loop (aiohttp's readexactly), each join a C call of milliseconds holding the GIL
    (issue 16, loop stall)."""
    length = request.content_length
    if length and length <= PARSE_OFF_LOOP:
        # Known small length (already checked against the limit): one read, the common case.
        return await request.content.readexactly(length)
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(READ_CHUNK):
        size += len(chunk)
        if size > limit:
            raise web.HTTPRequestEntityTooLarge(limit, size)
        chunks.append(chunk)
    if length and size < length:
        raise asyncio.IncompleteReadError(b"", length)
    return chunks if size > PARSE_OFF_LOOP else b"".join(chunks)


def _size(body: bytes | list[bytes]) -> int:
    return len(body) if isinstance(body, bytes) else sum(map(len, body))


def _chunks(body: Pieces) -> Iterator[bytes]:
    """The pieces joined into writes of about STREAM_CHUNK bytes (longer pieces cut):
    where the body says it may be cut, when it was cut for that size."""
    chunk = STREAM_CHUNK
    if chunk == CHUNK:
        for part in body.chunks():
            yield b"".join(part)
        return
    pieces = body.pieces
    batch: list[bytes] = []
    size = 0
    for piece in pieces:
        n = len(piece)
        if n > chunk:
            if batch:
                yield b"".join(batch)
                batch, size = [], 0
            for i in range(0, n, chunk):
                yield piece[i:i + chunk]
            continue
        batch.append(piece)
        size += n
        if size >= chunk:
            yield b"".join(batch)
            batch, size = [], 0
    if batch:
        yield b"".join(batch)


def _written_as_is(body: Pieces, transport: Any) -> bool:
    """A large body handed to the transport in one writelines() of its pieces, nothing
    joined (see the top of this module): few pieces, or a gathering transport."""
    return body.size > AS_IS_ABOVE and (len(body.pieces) <= AS_IS_PIECES or (
        body.size <= WRITELINES_MAX and _gathers(transport)))


def _gathers(transport: Any) -> bool:
    """The transport writes a list of pieces without joining them first (uvloop's:
    writev; asyncio's own joins them before Python 3.12)."""
    return transport is not None and type(transport).__module__.startswith("uvloop")


async def _stream(request: web.Request, body: Pieces,
                  headers: dict[str, str]) -> web.StreamResponse:
    """Write a large response in bounded chunks with Content-Length (the same bytes and
    headers as the fast path), giving the loop back between chunks: the client's
    pace sets the writing (drain), and the body is never held whole in one buffer.

    A chunk is joined from its cached pieces where the body says to cut (no pass
    over the pieces to find the chunks) and handed to the transport, which may hold
    WRITE_AHEAD bytes the kernel has not taken yet before the writing waits, so the
    loop is woken once per few chunks; aiohttp's own writer (`resp.write`) only when the
    transport is not at hand or the chunk size was changed (tests). A body already
    joined into chunks (at most AS_IS_PIECES pieces), or one of at most WRITELINES_MAX
    bytes on uvloop, is handed over in one writelines() (for a 2 MB pull page,
    measured ~20% faster than joining chunk by chunk with a loop turn each)."""
    resp = web.StreamResponse(headers=headers)
    resp.content_length = body.size
    transport = request.transport
    limits = None
    try:
        await resp.prepare(request)        # sends the head (StreamResponse: at once)
        writer = request.writer
        if transport is None or STREAM_CHUNK != CHUNK:
            for chunk in _chunks(body):
                await resp.write(chunk)            # waits while the client lags behind
                await asyncio.sleep(0)             # write() does not yield when it need not
        else:
            limits = transport.get_write_buffer_limits()
            transport.set_write_buffer_limits(high=WRITE_AHEAD, low=WRITE_AHEAD // 2)
            if len(body.pieces) <= AS_IS_PIECES or (body.size <= WRITELINES_MAX
                                                    and _gathers(transport)):
                # Nothing joined or copied here: what the kernel does not take yet
                # stays with the transport as references to the (mostly kept) pieces,
                # at most a few MB, which the response holds anyway.
                transport.writelines(body.pieces)
                await writer.drain()
            else:
                for part in body.chunks():
                    if transport.is_closing():
                        raise ConnectionResetError("the client went away")
                    transport.write(b"".join(part))
                    await writer.drain()           # waits while the client lags behind
                    await asyncio.sleep(0)         # drain() does not yield when it need not
        await resp.write_eof()
    except ConnectionError:
        # The client went away mid-response: aiohttp's own ending of the response
        # meets the closed transport and drops the connection, as for a plain Response.
        pass
    finally:
        if limits is not None and transport is not None and not transport.is_closing():
            transport.set_write_buffer_limits(high=limits[1], low=limits[0])
    return resp
