"""libvirt's socket watch and keepalive timer changes made by call threads reach the
loop in batches (sources/libvirt_events.py, SYNC_DELAY), and events still arrive.

libvirt turns its socket's watch off and on, and moves its keepalive timer, around every
call a thread makes. These tests make the calls through a real private libvirtd while
the loop is held up, so the number of changes is known and the timing does not matter:
every change then waits for the loop, and the loop must apply them in one go rather
than once each. Then a domain started and destroyed through another connection must
still be seen, which only the loop's watch of the socket can deliver.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
import uuid as uuidlib

import libvirt
import pytest

from cim_provider.domain.domxml import config_to_domain_xml
from cim_provider.sources import libvirt_events as ev

try:
    from tests.support.libvirtd import Libvirtd
    from tests.support.model import domain_config
except ImportError:  # tests/ itself on sys.path
    from support.libvirtd import Libvirtd  # type: ignore
    from support.model import domain_config  # type: ignore

pytestmark = pytest.mark.timeout(180)

CALLS = 200


async def start_and_destroy_elsewhere(uri: str, pool, prefix: str) -> str:
    """A domain started and destroyed through a connection of its own; its name."""
    loop = asyncio.get_running_loop()
    other = await loop.run_in_executor(pool, libvirt.open, uri)
    name = f"{prefix}-{uuidlib.uuid4().hex[:6]}"
    xml = config_to_domain_xml(domain_config(name, memory_kib=1024))
    dom = await loop.run_in_executor(pool, other.createXML, xml, 0)
    await loop.run_in_executor(pool, dom.destroy)
    await loop.run_in_executor(pool, other.close)
    return name


async def until(check, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not check() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


@pytest.fixture
def libvirtd():
    lvd = Libvirtd()
    lvd.start()
    try:
        yield lvd
    finally:
        lvd.cleanup()


def test_watch_changes_from_threads_are_applied_together_and_events_still_arrive(
        libvirtd, monkeypatch):
    syncs: collections.Counter[str] = collections.Counter()
    real_fd, real_timer = ev._AsyncIOImpl._sync_fd, ev._AsyncIOImpl._sync_timer

    def counted_fd(self, fd):
        syncs["fd"] += 1
        return real_fd(self, fd)

    def counted_timer(self, timer):
        syncs["timer"] += 1
        return real_timer(self, timer)

    monkeypatch.setattr(ev._AsyncIOImpl, "_sync_fd", counted_fd)
    monkeypatch.setattr(ev._AsyncIOImpl, "_sync_timer", counted_timer)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ev.ensure_event_loop_impl(loop)
        pool = concurrent.futures.ThreadPoolExecutor(2)
        conn = await loop.run_in_executor(pool, libvirt.open, libvirtd.uri)
        await loop.run_in_executor(pool, conn.setKeepAlive, 5, 3)   # as LibvirtSource does
        seen: list[tuple[str, int]] = []
        conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
            lambda _c, dom, event, _detail, _opaque: seen.append((dom.name(), event)), None)
        try:
            await asyncio.sleep(0.1)
            syncs.clear()
            # The loop held up (a blocking wait on its own thread) while a thread makes
            # CALLS calls: each turns the watch off and on and moves the keepalive timer.
            pool.submit(lambda: [conn.getVersion() for _ in range(CALLS)]).result(60)
            held = dict(syncs)
            await asyncio.sleep(ev.SYNC_DELAY * 10)
            assert held == {}               # nothing ran on the loop while it was held
            assert 1 <= syncs["fd"] <= 3, f"{syncs['fd']} syncs for {2 * CALLS} watch changes"
            assert 1 <= syncs["timer"] <= 3, f"{syncs['timer']} timer syncs for {CALLS} calls"

            # the watch is on again: another connection's start and destroy show
            name = await start_and_destroy_elsewhere(libvirtd.uri, pool, "watch")
            both = [libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STOPPED]
            await until(lambda: [e for n, e in seen if n == name] == both)
            assert [e for n, e in seen if n == name] == both
        finally:
            await loop.run_in_executor(pool, conn.close)
            for _ in range(3):
                await asyncio.sleep(0)
            pool.shutdown()

    asyncio.run(main())


def test_a_flush_armed_on_a_closed_loop_does_not_stop_the_next_one(libvirtd):
    """A change made off the loop just before its loop ends arms a flush that never
    runs; the next loop (rebind) still applies the changes made under it."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    holder: dict = {}

    async def first() -> None:
        loop = asyncio.get_running_loop()
        ev.ensure_event_loop_impl(loop)
        holder["conn"] = await loop.run_in_executor(pool, libvirt.open, libvirtd.uri)
        # a call from the thread as the loop ends: its watch change arms a flush
        pool.submit(holder["conn"].getVersion).result(30)

    async def second() -> None:
        loop = asyncio.get_running_loop()
        impl = ev.ensure_event_loop_impl(loop)
        conn = holder["conn"]
        seen: list[str] = []
        conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
            lambda _c, dom, _e, _d, _o: seen.append(dom.name()), None)
        await loop.run_in_executor(pool, conn.getVersion)
        await asyncio.sleep(ev.SYNC_DELAY * 10)
        assert not impl._flush_armed and not impl._unsynced
        name = await start_and_destroy_elsewhere(libvirtd.uri, pool, "rebind")
        await until(lambda: name in seen)
        assert name in seen
        await loop.run_in_executor(pool, conn.close)
        for _ in range(3):
            await asyncio.sleep(0)

    try:
        asyncio.run(first())
        asyncio.run(second())
    finally:
        pool.shutdown()


def test_a_closed_connection_leaves_its_fd_number_to_whoever_gets_it_next(libvirtd):
    """A connection closed from a call thread: its last call leaves a watch change for
    the flush, then the removal closes the socket. The next socket the loop opens gets
    the same fd number; the flush must leave it alone (a reader another component put
    on it keeps reading, a transport on it raises nothing)."""
    import socket

    async def main() -> None:
        loop = asyncio.get_running_loop()
        errors: list[object] = []
        loop.set_exception_handler(lambda _l, ctx: errors.append(ctx.get("exception")))
        ev.ensure_event_loop_impl(loop)
        pool = concurrent.futures.ThreadPoolExecutor(1)
        keep = await loop.run_in_executor(pool, libvirt.open, libvirtd.uri)
        conn = await loop.run_in_executor(pool, libvirt.open, libvirtd.uri)
        await asyncio.sleep(0.1)
        await loop.run_in_executor(pool, conn.close)
        mine, theirs = socket.socketpair()
        got: list[bytes] = []
        loop.add_reader(mine.fileno(), lambda: got.append(mine.recv(10)))
        await asyncio.sleep(ev.SYNC_DELAY * 10)
        theirs.send(b"x")
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        loop.remove_reader(mine.fileno())
        other, peer = socket.socketpair()            # and as a transport
        await loop.create_connection(asyncio.Protocol, sock=other)
        await loop.run_in_executor(pool, keep.close)
        await asyncio.sleep(ev.SYNC_DELAY * 10)
        for s in (mine, theirs, peer):
            s.close()
        pool.shutdown()
        assert got == [b"x"]
        assert errors == []

    asyncio.run(main())
