"""Request limits (issue 5), each configured small on an in-process server and crossed:
body size, header size and count, idle keep-alive, slow request heads and bodies,
concurrent connections, open pull contexts per client, XML nesting depth; and the
`serve` options that set them.
"""
from __future__ import annotations

import argparse
import socket
import time

import pytest
import pywbem

try:
    from tests.support import secure as sec
    from tests.support import wbem_server as ws
except ImportError:
    from support import secure as sec  # type: ignore
    from support import wbem_server as ws  # type: ignore

from cim_provider.server.http import HTTPLimits

pytestmark = pytest.mark.timeout(120)

LIMITS = HTTPLimits(max_body=4096, max_depth=12, read_timeout=1.0, max_line_size=1024,
                    max_field_size=1024, max_headers=20, keepalive_timeout=1.0,
                    max_connections=8)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = sec.SecureServer(tmp_path_factory.mktemp("limits"), limits=LIMITS,
                           max_pull_per_client=2)
    yield srv
    srv.stop()


def raw_head(method="POST", length=None, extra=""):
    cl = f"Content-Length: {length}\r\n" if length is not None else ""
    return (f"{method} /cimom HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/xml; charset=\"utf-8\"\r\nCIMOperation: MethodCall\r\n"
            f"CIMMethod: EnumerateInstanceNames\r\nCIMObject: root/virt\r\n{cl}{extra}\r\n").encode()


def status_of(reply: bytes) -> int:
    assert reply.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")), reply[:100]
    return int(reply[9:12])


def test_body_over_limit_413(server):
    body = sec.ENUM_NAMES + " " * 5000
    status, _h, _b = sec.post(server.port, body, sec.cim_headers("EnumerateInstanceNames"))
    assert status == 413
    sec.assert_alive(server.port)


def test_body_under_limit_served(server):
    body = sec.ENUM_NAMES + " " * (4096 - len(sec.ENUM_NAMES) - 1)
    status, _h, b = sec.post(server.port, body, sec.cim_headers("EnumerateInstanceNames"))
    assert status == 200 and b.count(b"<INSTANCENAME ") == 3


def test_header_field_too_large(server):
    status, _h, _b = sec.post(server.port, sec.ENUM_NAMES,
                              sec.cim_headers("EnumerateInstanceNames", **{"X-Big": "a" * 2000}))
    assert status in (400, 431)
    sec.assert_alive(server.port)


def test_request_line_too_long(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /cimom?" + b"a" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(sec.read_until_closed(s)) in (400, 414, 431)


def test_too_many_headers(server):
    extra = {f"X-H{i}": "v" for i in range(30)}
    status, _h, _b = sec.post(server.port, sec.ENUM_NAMES,
                              sec.cim_headers("EnumerateInstanceNames", **extra))
    assert status in (400, 431)
    extra = {f"X-H{i}": "v" for i in range(8)}        # within the limit
    status, _h, _b = sec.post(server.port, sec.ENUM_NAMES,
                              sec.cim_headers("EnumerateInstanceNames", **extra))
    assert status == 200


def test_idle_keepalive_closed(server):
    body = sec.ENUM_NAMES.encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as s:
        s.sendall(raw_head(length=len(body)) + body)
        first = s.recv(65536)
        assert status_of(first) == 200
        # the response may come in pieces; then the server must hang up on its own
        rest = sec.read_until_closed(s)
        assert b"HTTP/1.1" not in rest        # closed, not answered again


def test_connection_without_request_closed(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as s:
        assert sec.read_until_closed(s) == b""


def test_slow_request_head_cut(server):
    """One header byte every 0.1 s: the head never completes within read_timeout (1 s),
    though the connection is never idle; the server closes it before we finish."""
    # Earlier tests' connections must be gone first: under load their close can lag, and
    # a connection over the cap is refused (503) rather than timed out.
    deadline = time.monotonic() + 30
    while server.stats()["connections_open"] and time.monotonic() < deadline:
        time.sleep(0.05)
    before = server.stats()["header_timeouts"]
    head = raw_head(length=10, extra="X-Padding: " + "p" * 200 + "\r\n")
    cut = False
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as s:
        for i in range(len(head)):        # 300+ bytes: 30 s if never cut
            try:
                s.sendall(head[i:i + 1])
            except (BrokenPipeError, ConnectionResetError):
                cut = True
                break
            s.settimeout(0.1)
            try:
                if s.recv(1024) == b"":
                    cut = True
                    break
            except socket.timeout:
                pass
            except ConnectionResetError:
                cut = True
                break
    assert cut, "the server waited for the whole slow head"
    assert server.stats()["header_timeouts"] > before
    sec.assert_alive(server.port)


def test_slow_body_cut(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as s:
        s.sendall(raw_head(length=1000))
        reply = b""
        for _ in range(100):             # 10 s if never cut
            try:
                s.sendall(b" ")
            except (BrokenPipeError, ConnectionResetError):
                break
            s.settimeout(0.1)
            try:
                chunk = s.recv(65536)
                if not chunk:
                    break
                reply += chunk
            except socket.timeout:
                pass
        assert reply and status_of(reply) == 408, reply[:200]
    sec.assert_alive(server.port)


def test_connection_cap(server):
    socks = []
    try:
        for _ in range(LIMITS.max_connections):
            socks.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
        # the server has seen all of them before it sees the next one (accept order)
        deadline = time.monotonic() + 10
        while server.stats()["connections_open"] < LIMITS.max_connections:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        refused = server.stats()["connections_refused"]
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as extra:
            reply = sec.read_until_closed(extra)
        assert status_of(reply) == 503
        assert server.stats()["connections_refused"] == refused + 1
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + 10
    while server.stats()["connections_open"] > 0:
        assert time.monotonic() < deadline, "closed connections still counted"
        time.sleep(0.02)
    sec.assert_alive(server.port)


def test_pull_contexts_per_client(server):
    conn = server.conn()
    first = conn.OpenEnumerateInstancePaths("VIRT_ComputerSystem", MaxObjectCount=1)
    second = conn.OpenEnumerateInstancePaths("VIRT_ComputerSystem", MaxObjectCount=1)
    with pytest.raises(pywbem.CIMError) as exc:
        conn.OpenEnumerateInstancePaths("VIRT_ComputerSystem", MaxObjectCount=1)
    assert exc.value.status_code == pywbem.CIM_ERR_SERVER_LIMITS_EXCEEDED
    assert server.stats()["pull_contexts"] == 2
    conn.CloseEnumeration(first.context)
    third = conn.OpenEnumerateInstancePaths("VIRT_ComputerSystem", MaxObjectCount=1)
    for ctx in (second, third):
        conn.CloseEnumeration(ctx.context)
    assert server.stats()["pull_contexts"] == 0


def nested(depth: int) -> str:
    """An EnumerateInstanceNames whose ClassName IPARAMVALUE hides `depth` levels of
    VALUE.ARRAY (invalid CIM-XML below the limit, refused for depth above it)."""
    inner = "<VALUE.ARRAY>" * depth + "</VALUE.ARRAY>" * depth
    return sec.imethodcall("EnumerateInstanceNames",
                           f'<IPARAMVALUE NAME="ClassName">{inner}</IPARAMVALUE>')


def test_xml_depth_limit(server):
    headers = sec.cim_headers("EnumerateInstanceNames")
    status, h, body = sec.post(server.port, nested(20), headers)
    assert status == 400 and h["CIMError"] == "request-not-well-formed"
    assert b"deeper than 12" in body
    # below the limit the same shape reaches CIM-XML validation instead
    status, h, body = sec.post(server.port, nested(2), headers)
    assert b"deeper than" not in body and status in (200, 400)
    sec.assert_alive(server.port)


def test_serve_options_set_every_limit():
    from cim_provider.server import security
    from cim_provider.server.main import add_arguments
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--max-body", "100", "--max-header-size", "200", "--max-headers", "7",
                         "--keepalive-timeout", "3", "--read-timeout", "4",
                         "--max-connections", "5", "--max-pull-contexts", "6",
                         "--max-xml-depth", "9", "--login-burst", "2", "--login-refill", "8"])
    lim = security.limits_from_args(args)
    assert (lim.max_body, lim.max_line_size, lim.max_field_size, lim.max_headers,
            lim.keepalive_timeout, lim.read_timeout, lim.max_connections, lim.max_depth) == \
        (100, 200, 200, 7, 3.0, 4.0, 5, 9)
    assert (args.max_pull_contexts, args.login_burst, args.login_refill) == (6, 2, 8.0)
    defaults = security.limits_from_args(p.parse_args([]))
    assert defaults == HTTPLimits()      # serve's defaults are the library's
    assert defaults.max_body == 16 * 1024 * 1024


def test_serve_subprocess_applies_options(tmp_path):
    """The real command line: --max-connections 2 and --max-pull-contexts 1 take effect."""
    srv = ws.SubprocessServer(tmp_path / "serve.log",
                              ["--max-connections", "2", "--max-pull-contexts", "1",
                               "--state-dir", str(tmp_path / "state"),
                               "--manager-bus", "unix:path=/nonexistent",
                               "--libvirt-uri", "test:///default"])
    try:
        conn = pywbem.WBEMConnection(srv.url, default_namespace="interop", timeout=30)
        res = conn.OpenEnumerateInstancePaths("CIM_Namespace", MaxObjectCount=1)
        with pytest.raises(pywbem.CIMError) as exc:
            conn.OpenEnumerateInstancePaths("CIM_Namespace", MaxObjectCount=1)
        assert exc.value.status_code == pywbem.CIM_ERR_SERVER_LIMITS_EXCEEDED
        conn.CloseEnumeration(res.context)
        conn.close()                  # frees its keep-alive connection
        held = []
        deadline = time.monotonic() + 20
        while len(held) < 2:          # two connections in the middle of a request head
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            s.sendall(b"POST /cimom HTTP/1.1\r\n")
            s.settimeout(0.3)
            try:
                gone = s.recv(100)    # 503: pywbem's closed connection not yet counted out
            except socket.timeout:
                held.append(s)
                continue
            s.close()
            assert gone.startswith(b"HTTP/1.1 503") and time.monotonic() < deadline
            time.sleep(0.1)
        try:
            with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as extra:
                assert status_of(sec.read_until_closed(extra)) == 503
        finally:
            for s in held:
                s.close()
    finally:
        srv.stop()


def test_tls_handshake_never_started_is_cut(tmp_path):
    """A TCP connection to the HTTPS port that never says hello is closed after the
    read timeout (it is not counted as a connection before its handshake)."""
    srv = sec.SecureServer(tmp_path, https=True, limits=LIMITS)
    try:
        with socket.create_connection(("127.0.0.1", srv.tls_port), timeout=20) as s:
            assert sec.read_until_closed(s) == b""       # timeout 20 s: a hang fails
        sec.assert_alive(srv.tls_port, tls=True)
    finally:
        srv.stop()
