"""The fast lane (server/fastlane.py) answers GetInstance, EnumerateInstanceNames and
EnumerateInstances with exactly the bytes and headers of aiohttp's path, or leaves the
request to it.

Each case is sent on a connection where aiohttp awaits the next request (so the lane
may take it), then on a connection without a lane; status, headers (but Date) and body
must be the same, and the lane must have answered exactly the cases it is meant to:
the common shapes and their variants (PropertyList, IncludeQualifiers,
IncludeClassOrigin, DeepInheritance, LocalOnly: the same parser and dispatcher run),
CIM errors (unknown class, bad namespace, a parameter twice, a wrong parameter type),
but never a request whose headers or body aiohttp's path refuses with an HTTP error.
"""
from __future__ import annotations

import socket

import pytest

from cim_provider.server import fastlane, http
from cim_provider.wbem.instance import build_instance

try:
    from tests.support import wbem_server as ws
    from tests.test_loop_stall import classname, read_body, read_head
except ImportError:  # tests/ itself on sys.path
    from support import wbem_server as ws  # type: ignore
    from test_loop_stall import classname, read_body, read_head  # type: ignore

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server():
    srv = ws.InProcessServer(ws.make_test_providers)
    yield srv
    srv.stop()


def _call(method: str, params: str, ns: str = "root/virt", msg_id: str = "11") -> bytes:
    nsx = "".join(f'<NAMESPACE NAME="{p}"/>' for p in ns.split("/"))
    return (f'<?xml version="1.0" encoding="utf-8" ?><CIM CIMVERSION="2.0" DTDVERSION="2.0">'
            f'<MESSAGE ID="{msg_id}" PROTOCOLVERSION="1.0"><SIMPLEREQ>'
            f'<IMETHODCALL NAME="{method}"><LOCALNAMESPACEPATH>{nsx}</LOCALNAMESPACEPATH>'
            f'{params}</IMETHODCALL></SIMPLEREQ></MESSAGE></CIM>').encode("utf-8")


def _value(name: str, value: str) -> str:
    return f'<IPARAMVALUE NAME="{name}"><VALUE>{value}</VALUE></IPARAMVALUE>'


def _plist(*names: str) -> str:
    values = "".join(f"<VALUE>{n}</VALUE>" for n in names)
    return f'<IPARAMVALUE NAME="PropertyList"><VALUE.ARRAY>{values}</VALUE.ARRAY></IPARAMVALUE>'


def _guest(uuid: str) -> str:
    return ('<IPARAMVALUE NAME="InstanceName"><INSTANCENAME CLASSNAME="VIRT_ComputerSystem">'
            '<KEYBINDING NAME="CreationClassName"><KEYVALUE VALUETYPE="string">'
            'VIRT_ComputerSystem</KEYVALUE></KEYBINDING><KEYBINDING NAME="Name">'
            f'<KEYVALUE VALUETYPE="string">{uuid}</KEYVALUE></KEYBINDING></INSTANCENAME>'
            '</IPARAMVALUE>')


CS = classname("VIRT_ComputerSystem")
EIN, EI, GI = "EnumerateInstanceNames", "EnumerateInstances", "GetInstance"

# (id, CIMMethod header, body, CIMObject header, does the lane answer?)
CASES = [
    ("EIN", EIN, _call(EIN, CS), "root/virt", True),
    ("EIN host", EIN, _call(EIN, classname("VIRT_HostSystem")), "root/virt", True),
    ("EIN superclass", EIN, _call(EIN, classname("CIM_ComputerSystem")), "root/virt", True),
    ("EIN unknown class", EIN, _call(EIN, classname("VIRT_NoSuchClass")), "root/virt", True),
    ("EIN bad namespace", EIN, _call(EIN, CS, ns="root/nowhere"), "root/nowhere", True),
    ("EIN no class", EIN, _call(EIN, ""), "root/virt", True),
    ("EIN twice", EIN, _call(EIN, CS + CS), "root/virt", True),
    ("EIN unknown parameter", EIN, _call(EIN, CS + _value("Bogus", "1")), "root/virt", True),
    ("EI", EI, _call(EI, CS), "root/virt", True),
    ("EI PropertyList", EI, _call(EI, CS + _plist("Name", "ElementName")), "root/virt", True),
    ("EI empty PropertyList", EI, _call(EI, CS + _plist()), "root/virt", True),
    ("EI IncludeQualifiers", EI, _call(EI, CS + _value("IncludeQualifiers", "TRUE")),
     "root/virt", True),
    ("EI IncludeClassOrigin", EI, _call(EI, CS + _value("IncludeClassOrigin", "TRUE")),
     "root/virt", True),
    ("EI not deep", EI, _call(EI, classname("CIM_ComputerSystem")
                              + _value("DeepInheritance", "FALSE")), "root/virt", True),
    ("EI LocalOnly", EI, _call(EI, CS + _value("LocalOnly", "TRUE")), "root/virt", True),
    ("EI wrong type", EI, _call(EI, CS + _value("DeepInheritance", "perhaps")),
     "root/virt", True),
    ("EI unknown class", EI, _call(EI, classname("VIRT_NoSuchClass")), "root/virt", True),
    ("EI bad namespace", EI, _call(EI, CS, ns="root/nowhere"), "root/nowhere", True),
    ("GI", GI, _call(GI, _guest(ws.GUEST_UUIDS[1])), "root/virt", True),
    ("GI missing", GI, _call(GI, _guest("no-such")), "root/virt", True),
    ("GI PropertyList", GI, _call(GI, _guest(ws.GUEST_UUIDS[0]) + _plist("EnabledState")),
     "root/virt", True),
    ("GI IncludeClassOrigin", GI, _call(GI, _guest(ws.GUEST_UUIDS[0])
                                        + _value("IncludeClassOrigin", "TRUE")),
     "root/virt", True),
    # HTTP errors: aiohttp's path answers them
    ("header names another method", EI, _call(EIN, CS), "root/virt", False),
    ("header names another namespace", EIN, _call(EIN, CS), "interop", False),
    ("not XML", EIN, b"<CIM><oops", "root/virt", False),
    ("another operation", "EnumerateClassNames", _call("EnumerateClassNames", ""),
     "root/virt", False),
    ("a pull the lane leaves", "PullInstancesWithPath",
     _call("PullInstancesWithPath", _value("EnumerationContext", "none")
           + _value("MaxObjectCount", "5")), "root/virt", False),
]


def _request(method: str, body: bytes, obj: str) -> bytes:
    return (f"POST /cimom HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f'Content-Type: application/xml; charset="utf-8"\r\nContent-Length: {len(body)}\r\n'
            f"CIMOperation: MethodCall\r\nCIMMethod: {method}\r\nCIMObject: {obj}\r\n"
            f"CIMProtocolVersion: 1.0\r\n\r\n").encode() + body


def _response(s: socket.socket) -> tuple[int, list[tuple[str, str]], bytes]:
    status, fields, rest = read_head(s)
    return status, [(k.lower(), v) for k, v in fields if k.lower() != "date"], \
        read_body(s, fields, rest)


def _warm(s: socket.socket) -> None:
    """One request aiohttp answers: then it awaits the next, and the lane may answer."""
    s.sendall(_request(EIN, _call(EIN, classname("VIRT_HostSystem")), "root/virt"))
    assert _response(s)[0] == 200


def _lane(server) -> fastlane.FastLane:
    return server.handle.runner.app[http._LANE]


def _both(server, monkeypatch, method: str, body: bytes, obj: str) -> tuple:
    """(the answer where the lane may answer, did it, aiohttp's answer)."""
    lane = _lane(server)
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        _warm(s)
        before = lane.answered
        s.sendall(_request(method, body, obj))
        fast = _response(s)
        answered = lane.answered - before
    with monkeypatch.context() as m:
        m.setattr(http, "_lane_of", lambda protocol: None)
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
            s.sendall(_request(method, body, obj))
            slow = _response(s)
    assert lane.answered - before == answered      # nothing went through the lane there
    return fast, answered, slow


@pytest.mark.parametrize("method,body,obj,lane_answers", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_the_lane_answers_what_aiohttp_answers(server, monkeypatch, method, body, obj,
                                               lane_answers):
    fast, answered, slow = _both(server, monkeypatch, method, body, obj)
    assert fast == slow
    assert answered == (1 if lane_answers else 0)


def test_pipelined_enumerations_keep_their_order(server):
    lane = _lane(server)
    ids = [str(i) for i in range(6)]
    stream = b"".join(_request(m, _call(m, p, msg_id=i), "root/virt") for m, p, i in zip(
        [EIN, EI, GI, EI, EIN, GI], [CS, CS, _guest(ws.GUEST_UUIDS[0]), CS, CS,
                                      _guest(ws.GUEST_UUIDS[2])], ids))
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        _warm(s)
        before = lane.answered
        s.sendall(stream)
        buf, got = b"", []
        while len(got) < len(ids):
            head, sep, rest = buf.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0]) \
                if sep else -1
            if sep and len(rest) >= length:
                assert head.startswith(b"HTTP/1.1 200 ")
                got.append(rest[:length])
                buf = rest[length:]
                continue
            chunk = s.recv(1 << 20)
            assert chunk, "connection closed"
            buf += chunk
    assert lane.answered > before
    for i, data in enumerate(got):
        assert f'MESSAGE ID="{i}"'.encode() in data
    assert got[0].count(b"<INSTANCENAME ") == len(ws.GUEST_UUIDS)
    assert got[1].count(b"<VALUE.NAMEDINSTANCE>") == len(ws.GUEST_UUIDS)


@pytest.fixture
def many_guests(server):
    """3,000 large guests, handed out as the same tuple each time (so the dispatcher
    keeps their renderings, as the real providers' do)."""
    guests = server.providers["guests"]
    cls = server.repo.namespace(ws.VIRT).get("VIRT_ComputerSystem")
    insts = tuple(build_instance(cls, {**ws.guest_path(f"g-{i:05d}").keybindings,
                                       "ElementName": f"guest \u00e9 {i} & <x>",
                                       "Roles": ["a"] * 40}, ws.guest_path(f"g-{i:05d}"))
                  for i in range(3000))

    async def enumerate_instances(classname):
        return insts

    guests.enumerate_instances = enumerate_instances
    try:
        yield insts
    finally:
        del guests.enumerate_instances


def test_large_bodies_written_as_they_are_or_left_to_aiohttp(server, monkeypatch,
                                                              many_guests):
    """EnumerateInstanceNames of 3,000 (one kept piece per name, ~1 MB): byte for byte
    aiohttp's answer, and never more than AS_IS_PIECES pieces handed to this loop's
    transport at once (it joins what writelines gets: only uvloop's gathers);
    EnumerateInstances of 3,000 (over 1 MB, in 12,000 pieces, which http.py streams
    chunk by chunk on this loop): made once by the lane, written by aiohttp."""
    writes: list[int] = []
    real = fastlane.Connection._answer

    def spy(self, headers, body):
        transport = self.protocol.transport
        saved = transport.writelines

        def writelines(data):
            data = list(data)
            writes.append(len(data))
            saved(data)
        transport.writelines = writelines
        try:
            return real(self, headers, body)
        finally:
            del transport.writelines
    _both(server, monkeypatch, EIN, _call(EIN, CS), "root/virt")     # rendered, kept
    monkeypatch.setattr(fastlane.Connection, "_answer", spy)
    for _ in range(2):
        fast, answered, slow = _both(server, monkeypatch, EIN, _call(EIN, CS), "root/virt")
        assert fast == slow and answered == 1
        assert fast[2].count(b"<INSTANCENAME ") == 3000
        assert len(fast[2]) > http.AS_IS_ABOVE
    assert all(n <= http.AS_IS_PIECES + 1 for n in writes)
    # first rendered (the lane's dispatch waits for a loop turn: dropped), then kept
    assert _both(server, monkeypatch, EI, _call(EI, CS), "root/virt")[1] == 0
    dispatched: list[str] = []
    respond = server.dispatcher.respond

    async def counting(req, ctx):
        dispatched.append(req.method)
        return await respond(req, ctx)
    monkeypatch.setattr(server.dispatcher, "respond", counting)
    fast, answered, slow = _both(server, monkeypatch, EI, _call(EI, CS), "root/virt")
    assert fast == slow and answered == 0
    assert len(fast[2]) > http.STREAM_ABOVE
    # warm-up, the lane's answer (written by aiohttp, not made again), aiohttp's own
    assert dispatched == [EIN, EI, EI]


def test_a_backlog_leaves_the_request_to_aiohttp(server, monkeypatch):
    """Bytes still waiting in the transport: aiohttp's writer, which waits for the
    client, answers instead of the lane."""
    monkeypatch.setattr(fastlane, "BACKLOG", -1)
    fast, answered, slow = _both(server, monkeypatch, GI, _call(GI, _guest(ws.GUEST_UUIDS[0])),
                                 "root/virt")
    assert fast == slow and answered == 0
