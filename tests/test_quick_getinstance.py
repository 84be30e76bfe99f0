"""GetInstance from a kept plan (issue 16: GetInstance p50 at half of pywbem_mock's).

The fast lane parses a GetInstance whose body matches a known template into a QuickGet
(wbem/request.py): its shape (everything but the message ID and the key values) and
its key values. Once an ordinary GetInstance of that shape has succeeded with the path
kept as sent, the dispatcher keeps what it resolved (namespace, class, provider, view)
and answers the next ones from the provider's `instance_by_keys`, skipping the pywbem
path, the parameter conversion and normalize_path.

These tests drive the real VIRT_ComputerSystem provider over an inventory through the
real HTTP server on loopback: every answer must be the bytes aiohttp's ordinary path
gives (same message ID), the plan must answer exactly the shapes it may, and what it
answers must follow the inventory and the registry.
"""
from __future__ import annotations

import asyncio
import socket
import uuid as uuidlib

import pytest
from pywbem import CIMInstanceName

from cim_provider.domain.records import DomainConfig
from cim_provider.inventory.inventory import Inventory
from cim_provider.providers import Backend, virt_providers
from cim_provider.server import http
from cim_provider.wbem.context import OperationContext
from cim_provider.wbem.provider import Provider
from cim_provider.wbem.request import CIMRequest, QuickGet, parse_quick

try:
    from tests.support import wbem_server as ws
    from tests.test_fastlane_enumerations import _call, _plist, _request, _response, _value, _warm
except ImportError:  # tests/ itself on sys.path
    from support import wbem_server as ws  # type: ignore
    from test_fastlane_enumerations import (_call, _plist, _request,  # type: ignore
                                            _response, _value, _warm)

pytestmark = pytest.mark.timeout(300)

CS = "VIRT_ComputerSystem"
UUIDS = [str(uuidlib.UUID(int=0x9C1C << 100 | i)) for i in range(8)]


def _configs(name_suffix: str = "") -> dict[str, DomainConfig]:
    return {u: DomainConfig(uuid=u, name=f"quick-{i}{name_suffix}", type="kvm")
            for i, u in enumerate(UUIDS)}


class Served:
    def __init__(self) -> None:
        self.inventory = Inventory()
        self.inventory.set_defined(_configs())

        def factory(repo):
            backend = Backend(repo, self.inventory, ws.TEST_HOST)
            return {i: p for i, p in enumerate(virt_providers(backend))}
        self.srv = ws.InProcessServer(factory)

    @property
    def dispatcher(self):
        return self.srv.dispatcher

    def on_loop(self, fn, *args) -> None:
        asyncio.run_coroutine_threadsafe(_call_soon(fn, *args), self.srv.loop).result(10)


async def _call_soon(fn, *args) -> None:
    fn(*args)


@pytest.fixture(scope="module")
def served():
    s = Served()
    yield s
    s.srv.stop()


def _path(uuid: str, order=("CreationClassName", "Name"), names=None) -> str:
    values = {"CreationClassName": CS, "Name": uuid}
    names = names or {}
    kbs = "".join(f'<KEYBINDING NAME="{names.get(k, k)}"><KEYVALUE VALUETYPE="string">'
                  f"{values[k]}</KEYVALUE></KEYBINDING>" for k in order)
    return (f'<IPARAMVALUE NAME="InstanceName"><INSTANCENAME CLASSNAME="{CS}">{kbs}'
            "</INSTANCENAME></IPARAMVALUE>")


def _get(path: str, *extra: str, msg_id: str = "7") -> bytes:
    return _call("GetInstance", path + "".join(extra), msg_id=msg_id)


# (desc, request body for a UUID, does a kept plan answer it from the third time on?)
# A template gets a recipe at its second sighting (request.py), which is when the plan
# is kept: the third request of a shape is the first a plan can answer.
TESTCASES = [
    ("plain", lambda u: _get(_path(u)), True),
    ("PropertyList", lambda u: _get(_path(u), _plist("EnabledState", "Name")), True),
    ("empty PropertyList", lambda u: _get(_path(u), _plist()), True),
    ("IncludeClassOrigin", lambda u: _get(_path(u), _value("IncludeClassOrigin", "TRUE")), True),
    ("LocalOnly and IncludeQualifiers",
     lambda u: _get(_path(u), _value("LocalOnly", "TRUE"), _value("IncludeQualifiers", "TRUE")),
     True),
    ("keys in the other order", lambda u: _get(_path(u, order=("Name", "CreationClassName"))),
     True),
    # Answered the ordinary way every time:
    ("key names in another case", lambda u: _get(_path(u, names={"Name": "NAME"})), False),
    ("a wrongly typed parameter", lambda u: _get(_path(u), _value("IncludeClassOrigin", "maybe")),
     False),
    # the plain shape's plan is consulted (the test plans it first), finds nothing, and
    # the ordinary way answers CIM_ERR_NOT_FOUND
    ("no such system", lambda u: _get(_path(str(uuidlib.UUID(int=7)))), False),
    ("the UUID in upper case", lambda u: _get(_path(u.upper())), False),
]


def _ordinary(served, monkeypatch, body: bytes) -> tuple:
    with monkeypatch.context() as m:
        m.setattr(http, "_lane_of", lambda protocol: None)
        with socket.create_connection(("127.0.0.1", served.srv.port), timeout=60) as s:
            s.sendall(_request("GetInstance", body, "root/virt"))
            return _response(s)


@pytest.mark.parametrize("desc,make,planned", TESTCASES, ids=[t[0] for t in TESTCASES])
def test_a_kept_plan_answers_what_the_ordinary_path_answers(served, monkeypatch, desc, make,
                                                              planned):
    d = served.dispatcher
    _plan(served, _get(_path(UUIDS[7])))
    with socket.create_connection(("127.0.0.1", served.srv.port), timeout=60) as s:
        _warm(s)
        for i, uuid in enumerate(UUIDS[:5]):
            body = make(uuid)
            before = d.quick_answers
            s.sendall(_request("GetInstance", body, "root/virt"))
            got = _response(s)
            assert got == _ordinary(served, monkeypatch, body), (desc, i)
            if i >= 2:
                assert d.quick_answers - before == (1 if planned else 0), (desc, i)
            if planned:
                _warm(s)             # aiohttp awaits the next request: the lane may take it


def _plan(served, body: bytes) -> None:
    """Send `body` on the lane until a kept plan answers it."""
    d = served.dispatcher
    with socket.create_connection(("127.0.0.1", served.srv.port), timeout=60) as s:
        for _ in range(4):
            _warm(s)
            before = d.quick_answers
            s.sendall(_request("GetInstance", body, "root/virt"))
            assert _response(s)[0] == 200
            if d.quick_answers == before + 1:
                return
    raise AssertionError("no plan answered")


def test_a_parameter_twice_is_never_answered_by_the_plan_of_once(served, monkeypatch):
    d = served.dispatcher
    uuid = UUIDS[5]
    _plan(served, _get(_path(uuid), _plist("Name")))
    twice = _get(_path(uuid), _plist("Name"), _plist("Name"))
    with socket.create_connection(("127.0.0.1", served.srv.port), timeout=60) as s:
        for _ in range(3):
            _warm(s)
            before = d.quick_answers
            s.sendall(_request("GetInstance", twice, "root/virt"))
            got = _response(s)
            assert b'CODE="4"' in got[2] and b"given twice" in got[2]
            assert got == _ordinary(served, monkeypatch, twice)
            assert d.quick_answers == before


def test_a_plan_that_raises_leaves_the_request_to_the_ordinary_way(served, monkeypatch):
    """A failure inside a kept plan (one cannot be made to happen for real: the
    provider's lookup is replaced) is answered the ordinary way, and the connection
    goes on with the requests behind it."""
    from cim_provider.providers.computer_system import ComputerSystemProvider
    uuid = UUIDS[4]
    body = _get(_path(uuid), _plist("ElementName", "Name"))
    _plan(served, body)

    def broken(self, classname, keys):
        raise RuntimeError("broken lookup")
    monkeypatch.setattr(ComputerSystemProvider, "instance_by_keys", broken)
    expected = _ordinary(served, monkeypatch, body)
    with socket.create_connection(("127.0.0.1", served.srv.port), timeout=60) as s:
        _warm(s)
        s.sendall(_request("GetInstance", body, "root/virt") * 2)     # pipelined
        assert _pipelined(s, 2) == [expected, expected]


def _pipelined(s: socket.socket, count: int) -> list[tuple]:
    """`count` responses read off one connection, split by their Content-Length (as
    _response gives them: status, headers but Date, body)."""
    buf, out = b"", []
    while len(out) < count:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            lines = buf[:end].decode("latin-1").split("\r\n")
            fields = [tuple(x.strip() for x in line.split(":", 1)) for line in lines[1:]]
            length = int(dict((k.lower(), v) for k, v in fields)["content-length"])
            if len(buf) >= end + 4 + length:
                out.append((int(lines[0].split()[1]),
                            [(k.lower(), v) for k, v in fields if k.lower() != "date"],
                            buf[end + 4:end + 4 + length]))
                buf = buf[end + 4 + length:]
                continue
        chunk = s.recv(1 << 20)
        assert chunk, "connection closed"
        buf += chunk
    return out


def test_the_message_id_and_key_values_are_not_part_of_the_shape():
    bodies = [_get(_path(u), msg_id=m) for u, m in zip(UUIDS, ("1", "22", "333", "4444"))]
    parsed = [parse_quick(b) for b in bodies]
    quick = [q for q in parsed if isinstance(q, QuickGet)]
    assert len(quick) >= 2                                  # from the second sighting
    assert len({q.shape for q in quick}) == 1
    assert [q.msg_id for q in quick] == ["1", "22", "333", "4444"][-len(quick):]
    assert [dict(zip(("CreationClassName", "Name"), q.keys))["Name"] for q in quick] \
        == UUIDS[4 - len(quick):4]
    full = quick[-1].build()
    assert isinstance(full, CIMRequest) and full.msg_id == "4444"
    assert full.params["InstanceName"] == CIMInstanceName(
        CS, {"CreationClassName": CS, "Name": UUIDS[3]}, namespace=None)


def test_a_plan_follows_the_inventory(served):
    d = served.dispatcher
    uuid = UUIDS[6]
    body = _get(_path(uuid), _plist("ElementName"))
    with socket.create_connection(("127.0.0.1", served.srv.port), timeout=60) as s:
        def ask() -> bytes:
            _warm(s)
            s.sendall(_request("GetInstance", body, "root/virt"))
            status, _fields, got = _response(s)
            assert status == 200
            return got
        for _ in range(3):
            first = ask()
        assert b"quick-6<" in first
        before = d.quick_answers
        served.on_loop(served.inventory.set_defined, _configs("-renamed"))
        renamed = ask()
        assert b"quick-6-renamed<" in renamed and d.quick_answers == before + 1
        gone = {u: c for u, c in _configs("-renamed").items() if u != uuid}
        served.on_loop(served.inventory.set_defined, gone)
        missing = ask()
        assert b'CODE="6"' in missing                      # CIM_ERR_NOT_FOUND, the usual way
        assert d.quick_answers == before + 1
        served.on_loop(served.inventory.set_defined, _configs())


def test_a_plan_is_dropped_when_a_provider_is_registered():
    """On a dispatcher of its own (the real providers, no HTTP)."""
    try:
        from tests.test_pull_streaming import Model
    except ImportError:  # tests/ itself on sys.path
        from test_pull_streaming import Model  # type: ignore
    m = Model(4)
    d = m.dispatcher
    uuids = [r.uuid for r in m.inventory.records()]
    reqs = [parse_quick(_get(_path(u), _plist("Name", "ElementName"), msg_id="5"))
            for u in uuids * 2]
    try:
        for q in reqs:
            if isinstance(q, QuickGet) and d.quick_get(q) is None:
                m.loop.run_until_complete(d.respond(q.build(), OperationContext(
                    client="t", quick=q.shape)))
        last = reqs[-1]
        assert isinstance(last, QuickGet)
        kept = d.quick_get(last)
        assert kept is not None
        ordinary = m.loop.run_until_complete(d.respond(last.build(),
                                                       OperationContext(client="t")))
        assert b"".join(kept.pieces) == b"".join(ordinary.pieces)

        class Another(Provider):
            namespace = "root/virt"
            classnames = ("VIRT_TestAllTypes",)
        d.registry.add(Another())
        assert d.quick_get(last) is None                   # stale: the ordinary way again
    finally:
        m.loop.close()


def _lane_connection():
    from cim_provider.server.fastlane import Connection, FastLane
    lane = FastLane(None, max_body=1 << 20, max_depth=64, max_line=8190, max_field=8190,  # type: ignore[arg-type]
                    max_headers=100, max_request=32768, check_headers=lambda h, r: None)
    return lane, Connection(lane, None)


# (desc, request bytes, framed as (size, body) or "pass" / "incomplete")
BODY = _get(_path(UUIDS[0]))
FRAMES = [
    ("a request", _request("GetInstance", BODY, "root/virt"), (len(BODY), BODY)),
    ("half its body", _request("GetInstance", BODY, "root/virt")[:-10], "incomplete"),
    ("another path", _request("GetInstance", BODY, "root/virt").replace(b"/cimom", b"/x", 1),
     "pass"),
    ("chunked", _request("GetInstance", BODY, "root/virt").replace(
        b"CIMProtocolVersion", b"Transfer-Encoding: chunked\r\nCIMProtocolVersion", 1), "pass"),
]


@pytest.mark.parametrize("desc,data,expected", FRAMES, ids=[f[0] for f in FRAMES])
def test_a_kept_head_frames_as_a_fresh_one(desc, data, expected):
    from cim_provider.server import fastlane
    lane, conn = _lane_connection()
    results = [conn._frame(data) for _ in range(3)]      # the first makes, the rest reuse
    for got in results:
        if expected == "pass":
            assert got is fastlane._PASS
        elif expected == "incomplete":
            assert got is None
        else:
            size, headers, body = got
            assert body == expected[1] and size == len(data)
            assert headers["cimmethod"] == "GetInstance"
            assert headers["content-length"] == str(expected[0])
    assert len(lane.heads) == 1
    if expected not in ("pass", "incomplete"):
        assert results[1][1] is results[2][1]            # the kept headers, shared


def test_heads_kept_are_few_and_short():
    from cim_provider.server import fastlane
    lane, conn = _lane_connection()
    for i in range(fastlane.HEADS_KEPT + 5):
        conn._frame(_request("GetInstance", BODY + b" " * i, "root/virt"))
        assert len(lane.heads) <= fastlane.HEADS_KEPT
    lane.heads.clear()
    long_head = _request("GetInstance", BODY, "root/virt").replace(
        b"Host: 127.0.0.1", b"Host: 127.0.0.1\r\nX-Pad: " + b"p" * fastlane.HEAD_KEPT_MAX, 1)
    assert conn._frame(long_head)[2] == BODY and not lane.heads
