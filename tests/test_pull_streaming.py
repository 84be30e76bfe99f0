"""Pull operations stream (issue 14): an enumeration context holds a snapshot of the
providers' keys and a position, and each Open / Pull makes only its own page.

- over 100,000 passive definitions, OpenEnumerateInstances with MaxObjectCount 1000
  makes 1000 systems, and each Pull 1000 more; the context holds no rendered items;
- a system removed between two pulls is left out, not an error; EndOfSequence,
  MaxObjectCount 0, CloseEnumeration and a Pull racing another behave as DSP0200 says;
- the bytes are those of the whole enumeration (round trip against EnumerateInstances),
  also when a page or an EnumerateInstanceNames comes from what was kept rendered;
- pywbem's IterEnumerateInstances / IterEnumerateInstancePaths over a few thousand
  domains give what EnumerateInstances / EnumerateInstanceNames give.
"""
from __future__ import annotations

import asyncio
import re
import uuid as uuidlib

import pytest
import pywbem
from pywbem import CIMError

from cim_provider.domain.records import DomainConfig
from cim_provider.inventory.inventory import Inventory
from cim_provider.providers import Backend, virt_providers
from cim_provider.providers.computer_system import ComputerSystemProvider
from cim_provider.wbem.context import OperationContext
from cim_provider.wbem.dispatch import Dispatcher
from cim_provider.wbem.provider import Registry
from cim_provider.wbem.pull import Cursor, PullContexts
from cim_provider.wbem.request import parse_request

try:
    from tests.support import wbem_server as ws
except ImportError:  # tests/ itself on sys.path
    from support import wbem_server as ws  # type: ignore

CS = "VIRT_ComputerSystem"
N_BIG = 100_000
PAGE = 1000


def _uuid(i: int) -> str:
    return str(uuidlib.UUID(int=0x5EED0000000000000000000000000000 + i))


def _configs(n: int) -> dict[str, DomainConfig]:
    return {_uuid(i): DomainConfig(uuid=_uuid(i), name=f"passive-{i:06d}", type="kvm",
                                   os_type="hvm", arch="x86_64", vcpus=1, memory_kib=1024,
                                   max_memory_kib=1024) for i in range(n)}


def _request(method: str, params: str) -> str:
    return ('<?xml version="1.0" encoding="utf-8" ?><CIM CIMVERSION="2.0" DTDVERSION="2.0">'
            '<MESSAGE ID="1" PROTOCOLVERSION="1.0"><SIMPLEREQ>'
            f'<IMETHODCALL NAME="{method}"><LOCALNAMESPACEPATH><NAMESPACE NAME="root"/>'
            f'<NAMESPACE NAME="virt"/></LOCALNAMESPACEPATH>{params}</IMETHODCALL>'
            '</SIMPLEREQ></MESSAGE></CIM>')


def _value(name: str, value: object) -> str:
    return f'<IPARAMVALUE NAME="{name}"><VALUE>{value}</VALUE></IPARAMVALUE>'


def _classname(value: str) -> str:
    return f'<IPARAMVALUE NAME="ClassName"><CLASSNAME NAME="{value}"/></IPARAMVALUE>'


class Model:
    """The real VIRT providers over an inventory of passive definitions, and the
    dispatcher, driven without HTTP on a private loop."""

    def __init__(self, n: int):
        self.loop = asyncio.new_event_loop()
        self.repo = ws.test_repository()
        self.inventory = Inventory()
        self.inventory.set_defined(_configs(n))
        registry = Registry()
        for prov in virt_providers(Backend(self.repo, self.inventory, ws.TEST_HOST)):
            registry.add(prov)
        self.cs = registry.provider("root/virt", CS)
        assert isinstance(self.cs, ComputerSystemProvider)
        self.dispatcher = Dispatcher(self.repo, registry, ws.TEST_HOST, PullContexts())

    def call(self, method: str, params: str) -> str:
        req = parse_request(_request(method, params).encode())
        pieces = self.loop.run_until_complete(
            self.dispatcher.handle(req, OperationContext(client="t")))
        return "".join(pieces)

    def open(self, count: int, method: str = "OpenEnumerateInstances") -> str:
        return self.call(method, _classname(CS) + _value("MaxObjectCount", count))

    def pull(self, ctx: str, count: int, method: str = "PullInstancesWithPath") -> str:
        return self.call(method, _value("EnumerationContext", ctx)
                         + _value("MaxObjectCount", count))

    def built(self) -> int:
        """Systems the provider has made so far."""
        return len(self.cs._by_uuid)

    def rendered(self) -> int:
        """Systems whose CIM-XML has been written so far."""
        return sum(1 for inst in self.cs._by_uuid.values() if inst._body is not None)


def _names(text: str) -> list[str]:
    return re.findall(r'<KEYBINDING NAME="Name"><KEYVALUE[^>]*>([^<]*)</KEYVALUE>', text)


def _state(text: str) -> tuple[bool, str | None]:
    eos = re.search(r'NAME="EndOfSequence"[^>]*><VALUE>(\w+)</VALUE>', text)
    ctx = re.search(r'NAME="EnumerationContext"[^>]*><VALUE>([^<]+)</VALUE>', text)
    assert eos is not None, text[:500]
    return eos.group(1) == "TRUE", ctx.group(1) if ctx else None


def _walk(small, count: int = 1000) -> list[str]:
    """Every response of one Open + Pulls walk, `count` per page, to EndOfSequence."""
    text = small.open(count)
    pages = [text]
    eos, ctx = _state(text)
    while not eos:
        text = small.pull(ctx, count)
        pages.append(text)
        eos, ctx = _state(text)
    return pages


def _error(text: str) -> int | None:
    m = re.search(r'<ERROR CODE="(\d+)"', text)
    return int(m.group(1)) if m else None


@pytest.fixture(scope="module")
def big():
    model = Model(N_BIG)
    yield model
    model.loop.close()


def test_open_makes_one_page_of_100000(big):
    text = big.open(PAGE)
    eos, ctx = _state(text)
    assert not eos and ctx is not None
    assert len(_names(text)) == PAGE
    # Only the first page was made and rendered; nobody made the whole enumeration.
    assert big.built() <= PAGE and big.rendered() <= PAGE
    assert big.cs._all is None
    # The context holds a cursor over the inventory's own tuple of records, no items.
    held = big.dispatcher.pulls._ctx[ctx]
    assert held.items == () and held.size == 0
    assert held.cursor is not None and held.cursor.segments[0][2] is big.inventory.records()
    for i in range(2, 4):
        text = big.pull(ctx, PAGE)
        eos, ctx = _state(text)
        assert not eos and len(_names(text)) == PAGE
        assert big.built() <= i * PAGE and big.rendered() <= i * PAGE
    big.call("CloseEnumeration", _value("EnumerationContext", ctx))
    assert len(big.dispatcher.pulls) == 0


def test_paths_stream_too(big):
    text = big.open(PAGE, "OpenEnumerateInstancePaths")
    eos, ctx = _state(text)
    assert not eos and len(re.findall("<INSTANCEPATH>", text)) == PAGE
    assert big.dispatcher.pulls._ctx[ctx].items == ()
    text = big.pull(ctx, PAGE, "PullInstancePaths")
    assert len(re.findall("<INSTANCEPATH>", text)) == PAGE
    big.call("CloseEnumeration", _value("EnumerationContext", _state(text)[1]))


def test_capabilities_stream_too(big):
    elec = "VIRT_EnabledLogicalElementCapabilities"
    prov = big.dispatcher.registry.provider("root/virt", elec)
    text = big.call("OpenEnumerateInstances", _classname(elec) + _value("MaxObjectCount", PAGE))
    eos, ctx = _state(text)
    assert not eos and text.count("<VALUE.INSTANCEWITHPATH>") == PAGE
    assert len(prov._cache._data) <= PAGE          # one page of capabilities made
    assert big.dispatcher.pulls._ctx[ctx].cursor.segments[0][2] is big.inventory.records()
    big.call("CloseEnumeration", _value("EnumerationContext", ctx))


@pytest.fixture
def small():
    model = Model(2500)
    yield model
    model.loop.close()


@pytest.mark.parametrize("cls", [CS, "VIRT_EnabledLogicalElementCapabilities",
                                 "CIM_ComputerSystem"])
def test_pages_add_up_to_the_enumeration(small, cls):
    whole = small.call("EnumerateInstances", _classname(cls))
    want = re.findall(r"<INSTANCENAME .*?</INSTANCENAME>", whole)
    assert len(want) >= 2500
    for count in (1, 700, 1000, 2499, 2500, 5000):
        text = small.call("OpenEnumerateInstances", _classname(cls)
                          + _value("MaxObjectCount", count))
        got = re.findall(r"<INSTANCENAME .*?</INSTANCENAME>", text)
        eos, ctx = _state(text)
        assert eos == (count >= len(want))
        while not eos:
            text = small.pull(ctx, 1000)
            got += re.findall(r"<INSTANCENAME .*?</INSTANCENAME>", text)
            eos, ctx = _state(text)
        assert got == want, count
    assert len(small.dispatcher.pulls) == 0


def test_pages_are_the_bytes_of_the_instances(small):
    """Each VALUE.INSTANCEWITHPATH carries the INSTANCE EnumerateInstances sends; a
    page kept rendered is the same bytes as the page made the first time."""
    whole = small.call("EnumerateInstances", _classname(CS))
    bodies = re.findall(r"<INSTANCE .*?</INSTANCE>", whole)
    walks = []
    for _ in range(2):
        pages = _walk(small)
        walks.append([re.sub(r'(NAME="EnumerationContext"[^>]*><VALUE>)[^<]+', r"\1", page)
                      for page in pages])
        got = re.findall(r"<INSTANCE .*?</INSTANCE>", "".join(pages))
        assert got == bodies
    assert walks[0] == walks[1]
    assert len(small.dispatcher.pages) > 0


def test_removed_between_pulls_is_left_out(small):
    text = small.open(1000)
    eos, ctx = _state(text)
    first = _names(text)
    records = small.inventory.records()
    # 10 systems of the next page go away: the page is filled from the keys after it.
    gone = {r.uuid for r in records[1000:1010]}
    small.inventory.set_defined({u: c for u, c in _configs(2500).items() if u not in gone})
    text = small.pull(ctx, 1000)
    assert _error(text) is None
    eos, ctx = _state(text)
    second = _names(text)
    assert not eos and len(second) == 1000 and not gone & set(second)
    # Then everything not yet handed out goes away: the next Pull ends the sequence.
    gone |= {r.uuid for r in records[2010:]}
    small.inventory.set_defined({u: c for u, c in _configs(2500).items() if u not in gone})
    text = small.pull(ctx, 1000)
    eos, ctx = _state(text)
    assert (eos, ctx, _names(text), _error(text)) == (True, None, [], None)
    assert first + second == [r.uuid for r in records if r.uuid not in gone]
    assert len(small.dispatcher.pulls) == 0


def test_requested_state_change_between_pulls_shows(small):
    text = small.open(1000)
    _eos, ctx = _state(text)
    uuid = small.inventory.records()[1500].uuid
    ticket = small.cs.b.begin_request(uuid, 9)
    text = small.pull(ctx, 1000)
    m = re.search(r"<INSTANCE CLASSNAME=\"VIRT_ComputerSystem\">(?:(?!</INSTANCE>).)*?"
                  + re.escape(uuid) + r".*?</INSTANCE>", text)
    assert m is not None and 'NAME="RequestedState" TYPE="uint16"><VALUE>9<' in m.group(0)
    small.cs.b.end_request(uuid, ticket, False)
    small.call("CloseEnumeration", _value("EnumerationContext", _state(text)[1]))


def test_zero_count_and_close(small):
    text = small.open(0)
    eos, ctx = _state(text)
    assert not eos and _names(text) == []
    text = small.pull(ctx, 0)
    eos, ctx = _state(text)
    assert not eos and _names(text) == []
    assert _error(small.call("CloseEnumeration", _value("EnumerationContext", ctx))) is None
    assert _error(small.pull(ctx, 10)) == pywbem.CIM_ERR_INVALID_ENUMERATION_CONTEXT


def test_over_max_object_count_is_refused(small):
    text = small.open(100_001)
    assert _error(text) == pywbem.CIM_ERR_INVALID_PARAMETER
    assert len(small.dispatcher.pulls) == 0


def test_a_failing_page_closes_its_context(small, monkeypatch):
    text = small.open(1000)
    _eos, ctx = _state(text)

    async def broken(*args, **kwargs):
        raise CIMError(pywbem.CIM_ERR_FAILED, "the inventory is on fire")
    monkeypatch.setattr(small.cs, "instances_of", broken)
    assert _error(small.pull(ctx, 1000)) == pywbem.CIM_ERR_FAILED
    assert len(small.dispatcher.pulls) == 0


def test_page_pieces_join_only_short_runs():
    from cim_provider.wbem import pullops
    big = b"<INSTANCE>" + b"x" * 2000 + b"</INSTANCE>"
    items = [(b"<A>", b"<path/>", big, b"</A>"), (b"<A>", b"<path/>", big, b"</A>")]
    body, own = pullops._page_pieces(items)
    assert b"".join(body.pieces) == b"".join(b"".join(i) for i in items)
    assert body.size == sum(map(len, body.pieces))
    assert [len(p) for p in body.pieces] == [10, len(big), 14, len(big), 4]
    assert body.pieces[1] is big and body.pieces[3] is big     # the bulk is not copied
    assert own == 10 + 14


def test_pages_kept_within_their_bounds(small, monkeypatch):
    from cim_provider.wbem import pullops
    monkeypatch.setattr(pullops, "PAGE_PIECES", 5000)   # about one page of 1,000 systems
    walks = []
    for _ in range(2):
        pages = _walk(small)
        walks.append(_names("".join(pages)))
        assert len(small.dispatcher.pages) <= 2 and small.dispatcher.pages._pieces <= 5000
    assert walks[0] == walks[1] and len(walks[0]) == 2500


def test_page_shares_bytes_between_systems(small):
    """A kept page holds each system's own cached INSTANCENAME and INSTANCE objects and
    one shared object per run of tags between them: no copy of any system's bytes."""
    _walk(small)
    assert len(small.dispatcher.pages) == 3
    for _insts, body, own in small.dispatcher.pages._pages.values():
        distinct = {id(p): p for p in body.pieces}
        shared = [p for p in distinct.values() if b"<INSTANCENAME" not in p
                  and b"<INSTANCE " not in p]
        assert own <= sum(len(p) for p in shared) < 1024
        assert sum(1 for p in body.pieces if b"<INSTANCENAME" in p) <= 1000
        assert all(p.count(b"<INSTANCENAME") <= 1 for p in body.pieces)


# --- the contexts on their own --------------------------------------------------------

def test_stream_context_caps_and_busy():
    pc = PullContexts(max_contexts=3, max_per_client=2)
    cursor = Cursor([("X", None, tuple(range(10)))])
    cid = pc.open_stream("root/virt", "instances", cursor, 2, 60, "a")
    # busy while its first page is made: another Pull is refused, expiry spares it
    with pytest.raises(CIMError) as exc:
        pc.stream("root/virt", "instances", cid, 2, "a")
    assert exc.value.status_code == pywbem.CIM_ERR_INVALID_ENUMERATION_CONTEXT
    assert pc.release(cid, False) == cid
    assert pc.stream("root/virt", "instances", cid, 2, "a") is cursor
    assert pc.release(cid, True) is None and len(pc) == 0
    pc.open_stream("root/virt", "instances", Cursor([]), 2, 60, "a")
    pc.open_stream("root/virt", "instances", Cursor([]), 2, 60, "a")
    with pytest.raises(CIMError) as exc:
        pc.open_stream("root/virt", "instances", Cursor([]), 2, 60, "a")
    assert exc.value.status_code == pywbem.CIM_ERR_SERVER_LIMITS_EXCEEDED
    # an item context is not a stream: pulled as before
    cid, _, _ = pc.open("root/virt", "paths", ["a", "b", "c"], 1, 60, "b")
    assert pc.stream("root/virt", "paths", cid, 1, "b") is None


def test_cursor_crosses_providers():
    cursor = Cursor([("A", None, (1, 2, 3)), ("B", None, ()), ("C", None, (4, 5))])
    assert cursor.total == 5
    steps = []
    while (step := cursor.next(2)) is not None:
        steps.append((step[0], step[3], step[4]))
    assert steps == [("A", 0, 2), ("A", 2, 3), ("C", 0, 2)] and cursor.done


# --- pywbem against the server -----------------------------------------------------------

@pytest.fixture(scope="module")
def served():
    inventory = Inventory()
    inventory.set_defined(_configs(3000))

    def factory(repo):
        backend = Backend(repo, inventory, ws.TEST_HOST)
        return {f"p{i}": p for i, p in enumerate(virt_providers(backend))}
    srv = ws.InProcessServer(factory)
    yield srv
    srv.stop()


def test_pywbem_iter_enumerate_instances(served):
    conn = pywbem.WBEMConnection(served.url, default_namespace="root/virt", timeout=120)
    whole = conn.EnumerateInstances(CS)
    assert len(whole) == 3000
    for count in (1000, 999):
        got = list(conn.IterEnumerateInstances(CS, MaxObjectCount=count))
        assert [i.path.keybindings["Name"] for i in got] == \
            [i.path.keybindings["Name"] for i in whole]
        assert [dict(i.properties) for i in got] == [dict(i.properties) for i in whole]
        assert all(i.path.namespace == "root/virt" for i in got), got[0].path
    some = list(conn.IterEnumerateInstances(CS, MaxObjectCount=700,
                                            PropertyList=["Name", "EnabledState"]))
    assert len(some) == 3000 and all(set(i.properties) == {"Name", "EnabledState"}
                                     for i in some)
    names = conn.EnumerateInstanceNames(CS)
    paths = list(conn.IterEnumerateInstancePaths(CS, MaxObjectCount=1000))
    assert [p.keybindings["Name"] for p in paths] == [p.keybindings["Name"] for p in names]
    # The second EnumerateInstanceNames comes from the kept (joined) rendering.
    assert [p.keybindings["Name"] for p in conn.EnumerateInstanceNames(CS)] == \
        [p.keybindings["Name"] for p in names]
    assert len(served.dispatcher.pulls) == 0


# --- the HTTP front writes kept, joined renderings as they are ----------------------------

def _loops():
    out = [pytest.param(asyncio.new_event_loop, id="asyncio")]
    try:
        import uvloop
    except ImportError:
        return out
    return out + [pytest.param(uvloop.new_event_loop, id="uvloop")]


@pytest.mark.parametrize("new_loop", _loops())
def test_joined_renderings_go_out_byte_for_byte(new_loop):
    """EnumerateInstanceNames and pull pages, kept as the instances' own cached pieces
    and handed to the transport as they are, arrive as the dispatcher's pieces joined;
    the second response (from what was kept) is the first's bytes."""
    import threading

    from cim_provider.server import http
    from cim_provider.server.main import start_server
    try:
        from tests.test_loop_stall import exchange, imethodcall
    except ImportError:
        from test_loop_stall import exchange, imethodcall  # type: ignore

    inventory = Inventory()
    inventory.set_defined(_configs(3000))
    repo = ws.test_repository()
    loop = new_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(60)
    handle = run(start_server([("127.0.0.1", 0)], repo=repo, host=ws.TEST_HOST,
                              providers=virt_providers(Backend(repo, inventory,
                                                               ws.TEST_HOST))))
    try:
        port = handle.addresses[0][1]

        async def pieces(body: bytes) -> tuple[bytes, int]:
            out = await handle.dispatcher.respond(parse_request(body),
                                                  OperationContext(client="127.0.0.1"))
            return b"".join(out.pieces), len(out.pieces)

        ein = imethodcall("EnumerateInstanceNames", _classname(CS))
        first = exchange(port, "EnumerateInstanceNames", ein)[2]
        second = exchange(port, "EnumerateInstanceNames", ein)[2]
        want, count = run(pieces(ein))
        assert first == second == want and first.count(b"<INSTANCENAME ") == 3000
        assert count >= 3000 and len(want) > http.AS_IS_ABOVE     # a piece per name

        def walk() -> list[bytes]:
            status, _f, data = exchange(port, "OpenEnumerateInstances", imethodcall(
                "OpenEnumerateInstances", _classname(CS) + _value("MaxObjectCount", 1000)))
            pages = [data]
            while (ctx := _state(data.decode())[1]) is not None:
                status, _f, data = exchange(port, "PullInstancesWithPath", imethodcall(
                    "PullInstancesWithPath", _value("EnumerationContext", ctx)
                    + _value("MaxObjectCount", 1000)))
                assert status == 200
                pages.append(data)
            return [re.sub(rb'(NAME="EnumerationContext"[^>]*><VALUE>)[^<]+', rb"\1", p)
                    for p in pages]
        one, two = walk(), walk()
        assert one == two and len(one) == 3
        assert sum(p.count(b"<VALUE.INSTANCEWITHPATH>") for p in one) == 3000
        assert _names(b"".join(one).decode()) == _names(first.decode())
    finally:
        run(handle.close())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
