"""Large requests and responses do not hold the server's event loop.

The real server (in-process, on loopback, 10,000 guests) is asked something small
while it parses a ~16 MiB request, and while it writes a 10,000-instance response
to a client slow to read it. Order is asserted, never time:
- the parse of the large request is held open (by wrapping the parser the front
  calls) until the small answer is in, so a front that parsed on its loop, where
  that wait blocks every client, fails instead of passing by luck (the wait is
  bounded only so that it fails rather than hangs);
- the small answer comes while the large response is still being written, and the
  server holds the rest of it back chunk by chunk instead of buffering it all.
The streamed response has the bytes and headers of the unchanged fast path, errors
found in large bodies keep their status, and a client leaving mid-response is no
error.
"""
from __future__ import annotations

import asyncio
import gc
import re
import socket
import threading
import time
import uuid

import pytest

from cim_provider.server import http
from cim_provider.wbem import provider as prov

try:
    from tests.support import wbem_server as ws
except ImportError:  # tests/ itself on sys.path
    from support import wbem_server as ws  # type: ignore

pytestmark = pytest.mark.timeout(300)

GUESTS = 10_000
GATE_BOUND = 30.0          # s: only so that a regression fails instead of hanging


def many_guests(repo):
    """The test providers, with GUESTS instances of VIRT_ComputerSystem."""
    provs = ws.make_test_providers(repo)
    cls = repo.namespace(ws.VIRT).get("VIRT_ComputerSystem")
    guests = provs["guests"]
    guests.instances = []
    for i in range(GUESTS):
        path = ws.guest_path(str(uuid.UUID(int=i + 1)))
        guests.instances.append(prov.build_instance(cls, {
            **path.keybindings, "ElementName": f"guest-{i:05d}", "Caption": f"Guest {i} & co",
            "EnabledState": 2, "RequestedState": 12, "OperationalStatus": [2],
            "HealthState": 5, "Roles": ["guest"]}, path))
    return provs


@pytest.fixture(scope="module")
def server():
    srv = ws.InProcessServer(many_guests)
    yield srv
    srv.stop()


# --- raw HTTP ------------------------------------------------------------------------

def imethodcall(method: str, params: str) -> bytes:
    return (f'<?xml version="1.0" encoding="utf-8" ?><CIM CIMVERSION="2.0" DTDVERSION="2.0">'
            f'<MESSAGE ID="7" PROTOCOLVERSION="1.0"><SIMPLEREQ><IMETHODCALL NAME="{method}">'
            f'<LOCALNAMESPACEPATH><NAMESPACE NAME="root"/><NAMESPACE NAME="virt"/>'
            f'</LOCALNAMESPACEPATH>{params}</IMETHODCALL></SIMPLEREQ></MESSAGE></CIM>'
            ).encode("utf-8")


def classname(name: str) -> str:
    return f'<IPARAMVALUE NAME="ClassName"><CLASSNAME NAME="{name}"/></IPARAMVALUE>'


SMALL = imethodcall("EnumerateInstanceNames", classname("VIRT_HostSystem"))
ENUM_GUESTS = imethodcall("EnumerateInstances", classname("VIRT_ComputerSystem"))


def big_getclass(size: int = http.DEFAULT_MAX_BODY - 1024) -> bytes:
    """A valid GetClass of about `size` bytes: a PropertyList with one huge name."""
    base = imethodcall("GetClass", classname("VIRT_HostSystem")
                       + '<IPARAMVALUE NAME="PropertyList"><VALUE.ARRAY><VALUE>@@</VALUE>'
                         '</VALUE.ARRAY></IPARAMVALUE>')
    return base.replace(b"@@", b"P" * (size - len(base) + 2))


def send(sock: socket.socket, cim_method: str, body: bytes, *, mpost: bool = False) -> None:
    p = "73-" if mpost else ""
    head = (f"{'M-POST' if mpost else 'POST'} /cimom HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f'Content-Type: application/xml; charset="utf-8"\r\n'
            f"Content-Length: {len(body)}\r\n"
            + ("Man: http://www.dmtf.org/cim/mapping.http/v1.0 ; ns=73\r\n" if mpost else "")
            + f"{p}CIMOperation: MethodCall\r\n{p}CIMMethod: {cim_method}\r\n"
              f"{p}CIMObject: root/virt\r\n{p}CIMProtocolVersion: 1.0\r\n\r\n")
    sock.sendall(head.encode() + body)


def read_head(sock: socket.socket) -> tuple[int, list[tuple[str, str]], bytes]:
    """(status, header fields in order, body bytes already received)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before the response head: {buf[:200]!r}"
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = [tuple(x.strip() for x in line.split(":", 1)) for line in lines[1:]]
    return int(lines[0].split()[1]), fields, rest


def read_body(sock: socket.socket, fields, rest: bytes) -> bytes:
    hdrs = {k.lower(): v for k, v in fields}
    assert "transfer-encoding" not in hdrs, fields
    length = int(hdrs["content-length"])
    chunks, got = [rest], len(rest)
    while got < length:
        chunk = sock.recv(1 << 20)
        assert chunk, f"connection closed after {got} of {length} bytes"
        chunks.append(chunk)
        got += len(chunk)
    body = b"".join(chunks)
    assert len(body) == length
    return body


def exchange(port: int, cim_method: str, body: bytes, *, mpost: bool = False,
             timeout: float = 2 * GATE_BOUND) -> tuple[int, list[tuple[str, str]], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        send(s, cim_method, body, mpost=mpost)
        status, fields, rest = read_head(s)
        return status, fields, read_body(s, fields, rest)


def header(fields, name: str) -> str | None:
    return next((v for k, v in fields if k.lower() == name.lower()), None)


# --- order ---------------------------------------------------------------------------

def test_small_request_answered_while_a_16mib_request_is_parsed(server, monkeypatch):
    big = big_getclass()
    assert len(big) > http.PARSE_OFF_LOOP
    events: list[str] = []
    parsing, small_done = threading.Event(), threading.Event()
    real_parse = http.parse_request

    def parse_held_open(body, max_depth: int = 64):
        # A large body arrives as the chunks it was read in (http._read_body), unjoined.
        if isinstance(body, bytes) or sum(map(len, body)) != len(big):
            return real_parse(body, max_depth)
        events.append("large: parse started")
        parsing.set()
        small_done.wait(GATE_BOUND)
        try:
            return real_parse(body, max_depth)
        finally:
            events.append("large: parse finished")

    monkeypatch.setattr(http, "parse_request", parse_held_open)
    large: dict = {}

    def large_client() -> None:
        try:
            large["response"] = exchange(server.port, "GetClass", big)
        finally:
            events.append("large: answered")

    client = threading.Thread(target=large_client)
    client.start()
    try:
        assert parsing.wait(2 * GATE_BOUND), "the large request never reached the parser"
        status, _f, body = exchange(server.port, "EnumerateInstanceNames", SMALL)
        events.append("small: answered")
    finally:
        small_done.set()
        client.join(4 * GATE_BOUND)
    assert status == 200 and body.count(b"<INSTANCENAME ") == 1, body[:300]
    assert events == ["large: parse started", "small: answered", "large: parse finished",
                      "large: answered"]
    status, _f, body = large["response"]
    assert status == 200 and b'<CLASS NAME="VIRT_HostSystem"' in body, body[:300]
    assert b"<ERROR" not in body and b"<PROPERTY " not in body
    assert gc.isenabled()


def _largest_write_buffer(server) -> int:
    """Bytes the server's transports hold unsent (read on the server's own loop)."""
    async def largest() -> int:
        sizes = [h.transport.get_write_buffer_size()
                 for h in server.handle.runner.server.connections if h.transport is not None]
        return max(sizes, default=0)
    return asyncio.run_coroutine_threadsafe(largest(), server.loop).result(30)


def test_small_request_answered_while_a_10k_instance_response_is_written(server):
    with socket.socket() as slow:
        # A client that reads the head of the large response, then nothing for a while.
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        slow.settimeout(2 * GATE_BOUND)
        slow.connect(("127.0.0.1", server.port))
        send(slow, "EnumerateInstances", ENUM_GUESTS)
        status, fields, rest = read_head(slow)
        assert status == 200
        length = int(header(fields, "Content-Length"))
        assert length > 8 * http.STREAM_CHUNK      # far more than the socket buffers hold
        # The large response is being written: only its first bytes have arrived.
        small_status, _f, small_body = exchange(server.port, "EnumerateInstanceNames", SMALL)
        events = ["small: answered"]
        assert small_status == 200 and small_body.count(b"<INSTANCENAME ") == 1
        # ... and the server holds the rest back in its chunks instead of buffering it
        # all, so the loop writes a chunk at a time as the client reads.
        assert _largest_write_buffer(server) <= 4 * http.STREAM_CHUNK
        body = read_body(slow, fields, rest)
        events.append("large: answered")
    assert events == ["small: answered", "large: answered"]
    assert body.count(b"<VALUE.NAMEDINSTANCE>") == GUESTS
    assert body.rstrip().endswith(b"</CIM>")
    assert len(set(re.findall(rb"guest-\d{5}", body))) == GUESTS


# --- the same bytes and statuses as before -------------------------------------------

@pytest.mark.parametrize("mpost", [False, True], ids=["POST", "M-POST"])
def test_streamed_response_is_the_fast_paths_bytes(server, monkeypatch, mpost):
    """Forced through the streaming path in 5-character slices (non-ASCII values cut
    anywhere), a response has the fast path's status, headers and bytes."""
    body = imethodcall("EnumerateInstances", classname(ws.ALLTYPES_CLASS))
    fast = exchange(server.port, "EnumerateInstances", body, mpost=mpost)
    monkeypatch.setattr(http, "STREAM_ABOVE", 0)
    monkeypatch.setattr(http, "STREAM_CHUNK", 5)
    streamed = exchange(server.port, "EnumerateInstances", body, mpost=mpost)

    def comparable(resp):
        status, fields, data = resp
        return status, sorted((k.lower(), v) for k, v in fields if k.lower() != "date"), data

    assert comparable(streamed) == comparable(fast)
    assert fast[0] == 200 and "\u4e2d\u6587".encode() in fast[2]
    if mpost:
        assert header(fast[1], "73-CIMOperation") == "MethodResponse"


def test_large_body_errors_keep_their_status(server):
    pad = "x" * (2 * http.PARSE_OFF_LOOP)
    not_xml = imethodcall("EnumerateInstanceNames", classname("VIRT_HostSystem"))[:-10] \
        + pad.encode()
    status, fields, _b = exchange(server.port, "EnumerateInstanceNames", not_xml)
    assert status == 400 and header(fields, "CIMError") == "request-not-well-formed"
    padded = imethodcall("EnumerateInstanceNames",
                         classname("VIRT_HostSystem") + f"<!-- {pad} -->")
    status, fields, _b = exchange(server.port, "GetClass", padded)
    assert status == 400 and header(fields, "CIMError") == "header-mismatch"
    status, fields, body = exchange(server.port, "EnumerateInstanceNames", padded, mpost=True)
    assert status == 200 and body.count(b"<INSTANCENAME ") == 1
    assert gc.isenabled()


def test_client_gone_mid_response_is_not_an_error(server, caplog):
    """A client that leaves while its large response is being written: the server
    stops writing it, logs no error and goes on serving."""
    caplog.set_level("DEBUG")

    def connections() -> int:
        async def count() -> int:
            return len(server.handle.runner.server.connections)
        return asyncio.run_coroutine_threadsafe(count(), server.loop).result(30)

    before = connections()
    with socket.socket() as gone:
        gone.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        gone.connect(("127.0.0.1", server.port))
        send(gone, "EnumerateInstances", ENUM_GUESTS)
        status, _fields, _rest = read_head(gone)
        assert status == 200
        gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    deadline = time.monotonic() + GATE_BOUND      # a bound on the wait, not a measure
    while connections() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert connections() <= before, "the server kept the closed connection"
    status, _f, body = exchange(server.port, "EnumerateInstanceNames", SMALL)
    assert status == 200 and body.count(b"<INSTANCENAME ") == 1
    errors = [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert errors == [], [r.getMessage() for r in errors]
