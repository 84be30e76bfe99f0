"""The fast paths of issue 16 give exactly what the paths they bypass give.

- compact instances (wbem/instance.py): the properties and path made on demand are
  those of the eager CIMInstance; a write makes an ordinary instance;
- rendering (wbem/render.py): INSTANCE written from values (with its per-property
  memo), INSTANCENAME from path parts, PropertyList views cut from cached bytes, and
  cached enumerations, against the writer and views applied to the objects;
- Pieces and their cuts; pull items with offsets;
- request templates (wbem/request.py): the request built from a template is the full
  parse's, for every value a template may carry, and nothing else takes that path;
- the HTTP fast lane (server/fastlane.py): answers GetInstance with aiohttp's bytes
  and headers, in order with what aiohttp answers, keeps a busy connection open, and
  leaves everything else to aiohttp;
- a streamed response (writelines) has the bytes of the joined pieces.
"""
from __future__ import annotations

import asyncio
import itertools
import random
import socket
import time

import pytest
from pywbem import CIMInstance, CIMInstanceName, CIMProperty, Uint8, Uint16

from cim_provider.server import http
from cim_provider.wbem import render
from cim_provider.wbem import writer as w
from cim_provider.wbem.context import CHUNK, OperationContext, Pieces
from cim_provider.wbem.instance import Instance, build_instance
from cim_provider.wbem.request import _TEMPLATES, parse_full, parse_request
from cim_provider.wbem.views import instance_view

try:
    from tests.support import wbem_server as ws
    from tests.test_loop_stall import (classname, exchange, imethodcall, read_body,
                                       read_head, send)
except ImportError:  # tests/ itself on sys.path
    from support import wbem_server as ws  # type: ignore
    from test_loop_stall import (classname, exchange, imethodcall, read_body,  # type: ignore
                                 read_head, send)

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def repo():
    return ws.test_repository()


@pytest.fixture(scope="module")
def alltypes(repo):
    return repo.namespace(ws.VIRT).get(ws.ALLTYPES_CLASS)


def eager(cls, values, path):
    """What build_instance built before issue 16: CIMProperty objects up front."""
    props = {}
    for name, value in values.items():
        if value is None:
            continue
        d = cls.properties[name]
        props[d.name] = CIMProperty(d.name, value, type=d.type, reference_class=d.reference_class,
                                    embedded_object=d.embedded_object, is_array=d.is_array)
    return CIMInstance(cls.classname, properties=props, path=path)


VALUE_SETS = [
    ("every type", {"Id": "full", **ws.alltypes_values()}),
    ("nulls", {"Id": "empty & <nulls>", "P_string": None, "A_uint8": None}),
    ("arrays with NULL", {"Id": "n", "A_string": ["a", None, ""], "A_uint16": [None, 3],
                          "A_boolean": [None]}),
    ("plain Python values", {"Id": "p", "P_uint8": 7, "P_uint64": 2**64 - 1, "P_sint8": -128,
                             "A_uint32": [0, 4294967295], "P_boolean": True, "A_boolean": [False],
                             "P_string": "x\ty\nz ]]> \u00e9 \ufffd"}),
    ("empty arrays", {"Id": "e", "A_string": [], "A_uint64": []}),
]


@pytest.mark.parametrize("desc,values", VALUE_SETS, ids=[v[0] for v in VALUE_SETS])
def test_lazy_instance_is_the_eager_one(alltypes, desc, values):
    path = ws.alltypes_path(values["Id"])
    lazy, old = build_instance(alltypes, values, path), eager(alltypes, values, path)
    assert lazy == old
    assert lazy.path == old.path and lazy.properties == old.properties
    for name, prop in old.properties.items():
        assert lazy[name] == prop.value and lazy[name.lower()] == prop.value
    assert lazy.copy() == old
    # rendered from the values (and again, through the memo) as the writer writes it
    assert render.body_of(lazy) == w.instance_xml(old).encode()
    again = build_instance(alltypes, values, path)
    assert render.body_of(again) == w.instance_xml(old).encode()
    assert render.name_of(lazy) == w.instancename_xml(old.path).encode()
    assert render.namespace_of(lazy) == ws.VIRT


def test_memo_tells_true_from_one(repo):
    cls = repo.namespace(ws.VIRT).get(ws.ALLTYPES_CLASS)
    for v in (1, True, Uint8(1), 0, False):
        decl = "P_boolean" if isinstance(v, bool) else "P_uint8"
        inst = build_instance(cls, {"Id": "m", decl: v}, ws.alltypes_path("m"))
        assert render.body_of(inst) == w.instance_xml(eager(cls, {"Id": "m", decl: v},
                                                            inst.path)).encode()


def test_values_the_class_refuses_still_raise(alltypes):
    inst = build_instance(alltypes, {"Id": "bad", "P_uint8": 256}, ws.alltypes_path("bad"))
    with pytest.raises(ValueError):
        render.body_of(inst)
    with pytest.raises(KeyError):
        build_instance(alltypes, {"Id": "x", "NoSuchProperty": 1})


def test_a_write_makes_an_ordinary_instance(alltypes):
    values = {"Id": "w", "P_string": "before"}
    inst = build_instance(alltypes, values, ws.alltypes_path("w"))
    assert render.body_of(inst)                  # rendered and kept
    inst["P_string"] = "after"
    assert inst["P_string"] == "after" and inst.built_from() is None
    assert render.body_of(inst) == w.instance_xml(inst).encode()
    assert b"after" in render.body_of(inst)
    inst.path = ws.alltypes_path("other")
    assert render.name_of(inst) == w.instancename_xml(ws.alltypes_path("other")).encode()


def test_reference_values_without_making_properties(repo):
    cls = repo.namespace(ws.VIRT).get("VIRT_HostedDependency")
    keys = {"Antecedent": ws.host_path(), "Dependent": ws.guest_path(ws.GUEST_UUIDS[0])}
    inst = build_instance(cls, keys, CIMInstanceName(cls.classname, keys, namespace=ws.VIRT))
    assert dict(inst.reference_values()) == keys
    assert inst.reference_values()[0][1] is keys["Antecedent"]


def test_names_with_escapes_from_path_parts(repo):
    cls = repo.namespace(ws.VIRT).get(ws.KEYS_CLASS)
    for k in ws.KEYS_INSTANCES + [("a\"b'<&>\n\t", 1, 2, False)]:
        path = ws.keys_path(*k)
        inst = build_instance(cls, {**path.keybindings, "Value": "v"}, path)
        assert render.name_of(inst) == w.instancename_xml(path).encode()
    path = CIMInstanceName("VIRT_ComputerSystem", {"CreationClassName": "VIRT_ComputerSystem",
                                                   "Name": "a&b<c>\"d\u00e9"}, namespace=ws.VIRT)
    inst = build_instance(repo.namespace(ws.VIRT).get("VIRT_ComputerSystem"),
                          dict(path.keybindings), path)
    assert render.name_of(inst) == w.instancename_xml(path).encode()


def test_property_list_views_cut_from_cached_bytes(repo, alltypes):
    ns = repo.namespace(ws.VIRT)
    inst = build_instance(alltypes, {"Id": "full", **ws.alltypes_values()},
                          ws.alltypes_path("full"))
    names = list(inst.properties)
    rnd = random.Random(16)
    shapes = [[], names, [n.upper() for n in names], ["nosuch", "P_STRING"]]
    shapes += [rnd.sample(names, k) for k in (1, 2, 5, 10, 20) for _ in range(4)]
    views = render.Views()
    for plist in shapes:
        allowed = {p.lower() for p in plist}
        want = w.instance_xml(instance_view(ns, inst, allowed, False)).encode()
        assert render.cut_body(render.body_of(inst), allowed) == want
        assert views.get(ns, ws.ALLTYPES_CLASS, True, plist, False).body(inst) == want
    # class origin: made and written the slow way, as before
    view = views.get(ns, ws.ALLTYPES_CLASS, True, ["P_string"], True)
    assert view.body(inst) == w.instance_xml(instance_view(ns, inst, {"p_string"}, True),
                                             class_origin=True).encode()


def test_a_view_keeping_every_declared_property_is_the_instance(repo, alltypes):
    ns = repo.namespace(ws.VIRT)
    views = render.Views()
    every = list(alltypes.properties)
    inst = build_instance(alltypes, {"Id": "full", **ws.alltypes_values()},
                          ws.alltypes_path("full"))
    assert views.get(ns, ws.ALLTYPES_CLASS, True, every, False).body(inst) is \
        render.body_of(inst)
    # DeepInheritance false on the leaf: the class's own properties are all of them
    assert views.get(ns, ws.ALLTYPES_CLASS, False, None, False).body(inst) is \
        render.body_of(inst)
    # an ordinary instance may hold a property its class does not declare: cut
    odd = CIMInstance(ws.ALLTYPES_CLASS, properties={"Id": "odd", "Extra": "x"},
                      path=ws.alltypes_path("odd"))
    body = views.get(ns, ws.ALLTYPES_CLASS, True, every, False).body(odd)
    assert b"Extra" not in body and b'NAME="Id"' in body


def test_pieces_and_their_cuts():
    rnd = random.Random(3)
    a, whole = Pieces(), Pieces()
    parts = [bytes([65 + i % 26]) * rnd.randrange(1, CHUNK // 3) for i in range(40)]
    a.add_all(parts[:25])
    b = Pieces()
    b.add_all(parts[25:])
    a.extend(b)
    whole.add_all(parts)
    for p in (a, whole):
        assert p.pieces == parts and p.size == sum(map(len, parts))
        assert [x for chunk in p.chunks() for x in chunk] == parts
        assert all(sum(map(len, c)) < 2 * CHUNK for c in p.chunks())
    items = [(b"<", bytes(x), b">") if i % 2 else bytes(x) for i, x in enumerate(parts)]
    offsets = [0]
    for item in items:
        offsets.append(offsets[-1] + (sum(map(len, item)) if type(item) is tuple else len(item)))
    fast, slow = render.pieces_of(items, offsets), render.pieces_of(items)
    assert fast.pieces == slow.pieces and fast.size == slow.size
    assert fast.cuts == slow.cuts and fast.since == slow.since
    assert b"".join(b"".join(c) for c in fast.chunks()) == b"".join(slow.pieces)
    part = render.pieces_of(items[5:17], offsets[5:18])
    assert part.size == offsets[17] - offsets[5] and part.pieces == render.pieces_of(
        items[5:17]).pieces


def test_pieces_added_an_item_at_a_time_are_cut_between_items():
    """Pieces.add_item (an instance's pieces at once): the same pieces and size as one
    add per piece, every cut at an item's end, no chunk past an item beyond CHUNK."""
    rnd = random.Random(5)
    items = [tuple(bytes([97 + j]) * rnd.randrange(1, CHUNK // 4) for j in range(rnd.randrange(1, 5)))
             for _ in range(60)]
    by_item, by_piece = Pieces(), Pieces()
    for item in items:
        by_item.add_item(item)
        by_piece.add_all(item)
    assert by_item.pieces == by_piece.pieces and by_item.size == by_piece.size
    ends = set(itertools.accumulate(len(item) for item in items))
    assert by_item.cuts and set(by_item.cuts) <= ends
    biggest = max(sum(map(len, item)) for item in items)
    for chunk in by_item.chunks():
        assert sum(map(len, chunk)) < CHUNK + biggest
    assert [x for chunk in by_item.chunks() for x in chunk] == by_piece.pieces


def test_enumerations_are_rendered_once_per_tuple(alltypes):
    renders = render.Renders()
    calls = []

    def count(inst):
        calls.append(inst)
        return (render.body_of(inst),)

    insts = tuple(build_instance(alltypes, {"Id": str(i)}, ws.alltypes_path(str(i)))
                  for i in range(5))
    run = asyncio.run
    first = run(renders.flat(("k",), insts, count))
    assert run(renders.flat(("k",), insts, count)) is first and len(calls) == 5
    assert run(renders.flat(("k",), tuple(insts), count)) is first     # the same tuple
    run(renders.flat(("k",), insts[:4] + (insts[4],), count))          # another tuple
    assert len(calls) == 10
    run(renders.flat(("k",), list(insts), count))                       # a list: never kept
    run(renders.flat(("k",), list(insts), count))
    assert len(calls) == 20
    plain = tuple(CIMInstance(ws.ALLTYPES_CLASS, properties={"Id": "p"},
                              path=ws.alltypes_path("p")) for _ in range(2))
    run(renders.flat(("p",), plain, count))
    run(renders.flat(("p",), plain, count))                             # mutable: not kept
    assert len(calls) == 24


# ---- request templates ------------------------------------------------------------------

def _getinstance(name: str, msg_id: str = "1", extra: str = "", typed: bool = True) -> bytes:
    t = ' TYPE="string"' if typed else ""
    return (f'<?xml version="1.0" encoding="utf-8" ?><CIM CIMVERSION="2.0" DTDVERSION="2.0">'
            f'<MESSAGE ID="{msg_id}" PROTOCOLVERSION="1.0"><SIMPLEREQ>'
            f'<IMETHODCALL NAME="GetInstance"><LOCALNAMESPACEPATH><NAMESPACE NAME="root"/>'
            f'<NAMESPACE NAME="virt"/></LOCALNAMESPACEPATH><IPARAMVALUE NAME="InstanceName">'
            f'<INSTANCENAME CLASSNAME="VIRT_ComputerSystem"><KEYBINDING NAME="CreationClassName">'
            f'<KEYVALUE VALUETYPE="string"{t}>VIRT_ComputerSystem</KEYVALUE></KEYBINDING>'
            f'<KEYBINDING NAME="Name"><KEYVALUE VALUETYPE="string"{t}>{name}</KEYVALUE>'
            f'</KEYBINDING></INSTANCENAME></IPARAMVALUE>{extra}</IMETHODCALL></SIMPLEREQ>'
            f'</MESSAGE></CIM>').encode("utf-8")


NAMES = ["1b4e28ba-2fa1-11d2-883f-0016d3cca427", "", " spaced ", "tab\there", "nl\nhere",
         "\u00e9\u4e2d\U0001F600", "quote\"and'apos", "gt>only", "a]]b", "\ue000marker\ue001"]
TRICKY = ["cr\r\nhere", "amp&amp;x", "ctl\x01x", "lt&lt;x", "bad]]>x", "nul\x00x"]
EXTRAS = ["", '<IPARAMVALUE NAME="LocalOnly"><VALUE>false</VALUE></IPARAMVALUE>',
          '<IPARAMVALUE NAME="PropertyList"><VALUE.ARRAY><VALUE>Name</VALUE>'
          '<VALUE>ElementName</VALUE></VALUE.ARRAY></IPARAMVALUE>',
          '<IPARAMVALUE NAME="IncludeClassOrigin"><VALUE>TRUE</VALUE></IPARAMVALUE>'
          '<IPARAMVALUE NAME="includeclassorigin"><VALUE>FALSE</VALUE></IPARAMVALUE>']


def _same_as_full(body: bytes, max_depth: int = 64) -> None:
    try:
        want = parse_full(body, max_depth)
    except Exception as exc:
        with pytest.raises(type(exc)):
            parse_request(body, max_depth)
        return
    got = parse_request(body, max_depth)
    assert got == want
    assert type(got.msg_id) is type(want.msg_id)
    for name, value in want.params.items():
        if isinstance(value, CIMInstanceName):
            assert got.params[name] is not value
            for k, v in value.keybindings.items():
                assert type(got.params[name].keybindings[k]) is type(v)


@pytest.mark.parametrize("extra", EXTRAS, ids=["plain", "LocalOnly", "PropertyList", "duplicate"])
@pytest.mark.parametrize("typed", [True, False], ids=["TYPE", "no TYPE"])
def test_template_requests_are_the_full_parse(extra, typed):
    for i, name in enumerate(NAMES + TRICKY):
        for msg in (str(i), f"id {i} \u00e9", ""):
            _same_as_full(_getinstance(name, msg, extra, typed))


def test_templates_are_used_and_unusual_bodies_never(monkeypatch):
    seen = []
    monkeypatch.setattr("cim_provider.wbem.request.parse_full",
                        lambda body, depth=64, real=parse_full: seen.append(body) or real(body,
                                                                                           depth))
    bodies = [_getinstance(n, str(i)) for i, n in enumerate(NAMES)]
    for b in bodies:
        parse_request(b)
    full = len(seen)
    for b in bodies:
        parse_request(b)
    assert len(seen) == full                 # second round: all from the template
    for name in TRICKY:                       # never from a template
        before = len(seen)
        try:
            parse_request(_getinstance(name, "9"))
        except Exception:
            pass
        assert len(seen) == before + 1
    # a template is kept per max_depth: a tighter limit is still the full parser's
    with pytest.raises(Exception):
        parse_full(bodies[0], 4)
    with pytest.raises(Exception):
        parse_request(bodies[0], 4)
    assert len(_TEMPLATES._recipes) <= _TEMPLATES.MAX


# ---- the HTTP fast lane -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    srv = ws.InProcessServer(ws.make_test_providers, limits=http.HTTPLimits(read_timeout=0.6))
    yield srv
    srv.stop()


def _gi(uuid: str, msg: str = "5") -> bytes:
    return imethodcall("GetInstance", '<IPARAMVALUE NAME="InstanceName"><INSTANCENAME '
                       'CLASSNAME="VIRT_ComputerSystem"><KEYBINDING NAME="CreationClassName">'
                       '<KEYVALUE VALUETYPE="string">VIRT_ComputerSystem</KEYVALUE></KEYBINDING>'
                       f'<KEYBINDING NAME="Name"><KEYVALUE VALUETYPE="string">{uuid}</KEYVALUE>'
                       '</KEYBINDING></INSTANCENAME></IPARAMVALUE>').replace(
        b'MESSAGE ID="7"', f'MESSAGE ID="{msg}"'.encode())


def _lane(server):
    return server.handle.runner.app[http._LANE]


def _comparable(resp):
    status, fields, data = resp
    return status, [(k.lower(), v) for k, v in fields if k.lower() != "date"], data


@pytest.mark.parametrize("uuid", [ws.GUEST_UUIDS[0], ws.GUEST_UUIDS[2], "no-such-guest"],
                         ids=["guest 0", "guest 2", "missing"])
def test_fast_lane_answers_as_aiohttp_does(server, monkeypatch, uuid):
    lane = _lane(server)
    body = _gi(uuid)
    # one connection per answer: aiohttp takes the first request of a connection when
    # it arrives before aiohttp awaits it; a second one on the same connection is fast
    ein = imethodcall("EnumerateInstanceNames", classname("VIRT_HostSystem"))
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        send(s, "EnumerateInstanceNames", ein)
        read_body(s, *read_head(s)[1:])
        before = lane.answered
        send(s, "GetInstance", ein)        # the header says GetInstance, the body does not
        status, fields, rest = read_head(s)
        read_body(s, fields, rest)
        assert status == 400 and lane.answered == before
        send(s, "GetInstance", body)
        status, fields, rest = read_head(s)
        fast = (status, fields, read_body(s, fields, rest))
    assert lane.answered == before + 1
    monkeypatch.setattr(http, "_lane_of", lambda protocol: None)
    slow = exchange(server.port, "GetInstance", body)
    assert _comparable(fast) == _comparable(slow)
    assert fast[0] == 200 and fast[2].rstrip().endswith(b"</CIM>")


class _Responses:
    """Responses one after the other from a connection (pipelined: several per read)."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buf = sock, b""

    def response(self) -> bytes:
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        while len(self.buf) < length:
            self._more()
        body, self.buf = self.buf[:length], self.buf[length:]
        return body

    def _more(self) -> None:
        chunk = self.sock.recv(1 << 20)
        assert chunk, "connection closed"
        self.buf += chunk


def test_fast_lane_keeps_order_and_framing(server):
    lane = _lane(server)
    gi = [_gi(u, str(i)) for i, u in enumerate(ws.GUEST_UUIDS)]
    ein = imethodcall("EnumerateInstanceNames", classname("VIRT_ComputerSystem"))

    def head(method, body):
        return (f"POST /cimom HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                f"CIMOperation: MethodCall\r\nCIMMethod: {method}\r\nCIMObject: root/virt\r\n"
                f"\r\n").encode() + body

    stream = head("EnumerateInstanceNames", ein) + head("GetInstance", gi[0]) \
        + head("GetInstance", gi[1]) + head("EnumerateInstanceNames", ein) \
        + head("GetInstance", gi[2])
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        reader = _Responses(s)
        s.sendall(head("GetInstance", gi[0]))
        reader.response()
        before = lane.answered
        # pipelined, then split at every awkward place
        for cut in ([len(stream)], [3, 40, 200, len(stream) // 2, len(stream) - 5]):
            pos = 0
            for c in cut + [len(stream)]:
                s.sendall(stream[pos:c])
                pos = c
                time.sleep(0.01)
            got = [reader.response() for _ in range(5)]
            assert [b.count(b"<INSTANCENAME ") for b in (got[0], got[3])] == [3, 3]
            for i, j in ((1, 0), (2, 1), (4, 2)):
                assert f'MESSAGE ID="{j}"'.encode() in got[i]
                assert ws.GUEST_UUIDS[j].encode() in got[i]
        assert lane.answered > before


def test_fast_lane_keeps_a_busy_connection_open(server):
    """The head deadline (read_timeout 0.6 s here) ends with each answered request."""
    lane = _lane(server)
    body = _gi(ws.GUEST_UUIDS[1])
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        before = lane.answered
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            send(s, "GetInstance", body)
            status, fields, rest = read_head(s)
            read_body(s, fields, rest)
            assert status == 200
            time.sleep(0.1)
        assert lane.answered > before + 10


def test_a_body_that_lags_goes_to_aiohttp(server):
    """A body that does not follow its head at once: the request (and the connection)
    is left to aiohttp, whose body read timeout then applies as without the lane."""
    from cim_provider.server import fastlane
    lane = _lane(server)
    body = _gi(ws.GUEST_UUIDS[0])
    head = (f"POST /cimom HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            f"CIMOperation: MethodCall\r\nCIMMethod: GetInstance\r\nCIMObject: root/virt\r\n"
            f"\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        before = lane.answered
        s.sendall(head + body[:100])
        time.sleep(4 * fastlane.HOLD_BODY)
        s.sendall(body[100:])
        status, fields, rest = read_head(s)
        assert status == 200 and ws.GUEST_UUIDS[0].encode() in read_body(s, fields, rest)
        assert lane.answered == before
        send(s, "GetInstance", body)                # the connection stays aiohttp's
        status, fields, rest = read_head(s)
        read_body(s, fields, rest)
        assert status == 200 and lane.answered == before


@pytest.mark.parametrize("request_bytes,status", [
    (b"GET /cimom HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    (b"POST /other HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 404),
    (b"POST /cimom HTTP/1.0\r\nContent-Length: 0\r\nCIMOperation: MethodCall\r\n\r\n", 400),
    (b"POST /cimom HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nCIMOperation: "
     b"MethodCall\r\nCIMMethod: GetInstance\r\nCIMObject: root/virt\r\n\r\n0\r\n\r\n", 400),
    (b"POST /cimom HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nCIMOperation: MethodCall\r\n"
     b"CIMMethod: GetInstance\r\nCIMObject: root/virt\r\n\r\n<CIM>", 400),
], ids=["GET", "path", "HTTP/1.0", "chunked", "not XML"])
def test_what_the_lane_leaves_to_aiohttp(server, request_bytes, status):
    lane = _lane(server)
    before = lane.answered
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(request_bytes)
        got, _fields, _rest = read_head(s)
    assert got == status and lane.answered == before


def test_no_lane_with_authentication():
    async def allow(request, ctx):
        return None
    app = http.make_app(object(), authenticate=allow)          # type: ignore[arg-type]
    assert http._LANE not in app


def test_streamed_response_is_the_joined_pieces(server):
    """A response above STREAM_ABOVE goes out by writelines: the bytes of the pieces."""
    guests = server.providers["guests"]
    saved = guests.instances
    try:
        cls = server.repo.namespace(ws.VIRT).get("VIRT_ComputerSystem")
        guests.instances = [build_instance(cls, {**ws.guest_path(f"g-{i:05d}").keybindings,
                                                 "ElementName": f"guest \u00e9 {i} & <x>",
                                                 "Roles": ["a"] * 40},
                                           ws.guest_path(f"g-{i:05d}")) for i in range(3000)]
        body = imethodcall("EnumerateInstances", classname("VIRT_ComputerSystem"))
        status, fields, data = exchange(server.port, "EnumerateInstances", body)
        assert status == 200 and len(data) > http.STREAM_ABOVE
        req = parse_request(body)

        async def pieces():
            return b"".join((await server.dispatcher.respond(req, OperationContext())).pieces)
        want = asyncio.run_coroutine_threadsafe(pieces(), server.loop).result(60)
        assert data == want
    finally:
        guests.instances = saved


def test_instances_cost_little(repo):
    """A rendered system keeps its XML and a few small objects, not pywbem's."""
    import tracemalloc
    cls = repo.namespace(ws.VIRT).get("VIRT_ComputerSystem")
    paths = [ws.guest_path(f"{i:08d}-0000-0000-0000-000000000000") for i in range(2000)]
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        insts = [build_instance(cls, {**p.keybindings, "ElementName": f"guest-{i}",
                                      "EnabledState": Uint16(2), "OperationalStatus": [2],
                                      "HealthState": 5, "Roles": ["guest"]}, p)
                 for i, p in enumerate(paths)]
        xml = sum(len(render.body_of(i)) + len(render.name_of(i)) for i in insts)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    used = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert isinstance(insts[0], Instance)
    assert used / len(insts) < xml / len(insts) + 700, (used / len(insts), xml / len(insts))
