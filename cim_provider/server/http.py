"""The HTTP front (DSP0200 over aiohttp): headers, framing, errors with their status.

It checks the CIM headers, reads a bounded body, hands the parsed request to the
dispatcher and writes the pieces it gets back. It knows nothing of domains.
"""
from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from urllib.parse import unquote

from aiohttp import web

from ..wbem.dispatch import Dispatcher, OperationContext
from ..wbem.request import RequestError, parse_request

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 16 * 1024 * 1024
CIM_PATHS = ("/cimom", "/")
_MAN_NS = re.compile(r";\s*ns\s*=\s*(\d+)", re.I)


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
    until a request on the connection starts with M-POST, then the Python one."""

    def __init__(self, *args, **kwargs):
        from aiohttp import http_parser
        self._make = lambda: http_parser.HttpRequestParserPy(*args, **kwargs)
        self._impl = _C_PARSER(*args, **kwargs)
        self._python = _C_PARSER is http_parser.HttpRequestParserPy
        self._payload = None          # body of the last request parsed
        self._held = b""              # a request's first bytes, too few to tell M-POST

    def feed_data(self, data, *args, **kwargs):
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


_C_PARSER = None


def _accept_m_post() -> None:
    """Install _MPostAwareParser for the servers of this process (idempotent)."""
    global _C_PARSER
    from aiohttp import web_protocol
    if web_protocol.HttpRequestParser is not _MPostAwareParser:
        _C_PARSER = web_protocol.HttpRequestParser
        web_protocol.HttpRequestParser = _MPostAwareParser


def make_app(dispatcher: Dispatcher, limits: HTTPLimits | None = None,
             authenticate=None) -> web.Application:
    """The aiohttp application serving CIM-XML operations on /cimom."""
    limits = limits or HTTPLimits()
    _accept_m_post()

    async def handle(request: web.Request) -> web.StreamResponse:
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
            req = parse_request(body, limits.max_depth)
            _check_headers(headers, req)
        except RequestError as exc:
            return _error_response(exc, prefix)
        pieces = await dispatcher.handle(req, ctx)
        out_headers = {"Content-Type": 'application/xml; charset="utf-8"',
                       (prefix or "") + "CIMOperation": "MethodResponse"}
        if prefix is not None:
            out_headers["Ext"] = ""
        body = "".join(pieces).encode("utf-8", "replace")
        return web.Response(body=body, headers=out_headers)

    app = web.Application(client_max_size=limits.max_body)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def _read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length:
        # Known length (already checked against the limit): one read, the common case.
        return await request.content.readexactly(request.content_length)
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(65536):
        size += len(chunk)
        if size > limit:
            raise web.HTTPRequestEntityTooLarge(limit, size)
        chunks.append(chunk)
    return b"".join(chunks)
