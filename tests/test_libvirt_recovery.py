"""LibvirtSource against a libvirtd whose calls hang: hung calls must not starve the rest.

A libvirtd stopped with SIGSTOP accepts connections and requests but answers none, so
every blocking call into it hangs, and a thread running one cannot be taken back. The
source must not let such calls wedge every later call and every reconnect: once all of
a connection's call threads are stuck it gives that connection up and opens a new one
with new threads. Real daemons, no mocks (see tests/support/libvirtd.py).

libvirt's client keepalive would, after a while, drop a connection to a silent daemon
by itself; the tests stretch it far beyond their deadlines so that what they see is the
source's own recovery. Nothing here asserts on how long anything took: each step waits
for what it expects, with a generous deadline.
"""
from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid as uuidlib
from typing import Awaitable, Callable, TypeVar

import libvirt
import psutil
import pytest

import cim_provider.sources.libvirt as libvirt_source
from cim_provider.domain.records import RunState
from cim_provider.sources.libvirt import LibvirtSource, LibvirtTimeout, LibvirtUnavailable

try:
    from tests.support import TEST_DOMAIN_UUID as TEST_DOMAIN
    from tests.support.libvirtd import Libvirtd
except ImportError:          # tests/ itself is on sys.path (rootdir-less layout)
    from support import TEST_DOMAIN_UUID as TEST_DOMAIN
    from support.libvirtd import Libvirtd

_T = TypeVar("_T")

CALL_TIMEOUT = 0.5
POOL_SIZE = libvirt_source.POOL_SIZE     # threads per connection: the calls to exceed


def domain_xml(name: str, uuid: str) -> str:
    return (f"<domain type='test'><name>{name}</name><uuid>{uuid}</uuid>"
            "<memory unit='KiB'>65536</memory><vcpu>1</vcpu>"
            "<os><type arch='x86_64'>hvm</type></os></domain>")


def run(coro_fn: Callable[[], Awaitable[None]], timeout: float = 90) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(coro_fn(), timeout)
    asyncio.run(bounded())


async def until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `pred` until true or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.02)


async def succeeds(op: Callable[[], Awaitable[_T]], timeout: float, what: str) -> _T:
    """Retry `op` while libvirt is unavailable; its first result, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await op()
        except LibvirtUnavailable as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout} s: {what} ({exc.message})") from exc
        await asyncio.sleep(0.05)


def state_of(src: LibvirtSource, uuid: str) -> RunState | None:
    dom = src.running.get(uuid)
    return dom.state if dom else None


async def create_domain(uri: str, name: str) -> str:
    """A transient domain, created by a client of our own (not through the source)."""
    uuid = str(uuidlib.uuid4())

    def create() -> None:
        client = libvirt.open(uri)
        try:
            client.createXML(domain_xml(name, uuid), 0)
        finally:
            client.close()

    await asyncio.to_thread(create)
    return uuid


def threads_in_libvirt_open() -> int:
    """How many of our threads are blocked in libvirt.open right now."""
    count = 0
    for frame in sys._current_frames().values():
        while frame is not None:
            if frame.f_code.co_name == "open" and frame.f_code.co_filename == libvirt.__file__:
                count += 1
                break
            frame = frame.f_back
    return count


def daemon_clients(daemon: Libvirtd) -> int:
    """Client connections the daemon has accepted on its read-write socket."""
    assert daemon.proc is not None
    path = str(daemon.socket)
    socks = psutil.Process(daemon.proc.pid).net_connections(kind="unix")
    return sum(1 for c in socks if c.laddr == path) - 1      # minus the listener


async def wedge(src: LibvirtSource) -> list[type]:
    """Call into the stopped daemon until the source gives its connection up.

    Returns the kinds of errors the calls got. Each call is a read (host_info, not
    cached: no call has succeeded yet) that blocks one of the connection's threads.
    """
    kinds: list[type] = []
    while src.connected:
        assert len(kinds) < 3 * POOL_SIZE, f"the source never gave up its connection: {kinds}"
        with pytest.raises(LibvirtUnavailable) as exc:
            await src.host_info()
        kinds.append(type(exc.value))
    return kinds


@pytest.fixture
def libvirtd():
    daemon = Libvirtd()
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.cleanup()


@pytest.fixture
def no_keepalive_rescue(monkeypatch):
    """Make libvirt's keepalive give up on a silent daemon only after ten minutes."""
    monkeypatch.setattr(libvirt_source, "KEEPALIVE", (60, 10))


def test_a_stopped_libvirtd_that_resumes_is_used_again_without_a_restart(
        libvirtd, no_keepalive_rescue):
    async def body() -> None:
        src = LibvirtSource(libvirtd.uri, call_timeout=CALL_TIMEOUT)
        await src.start()
        pid = libvirtd.proc.pid
        stopped = False
        try:
            assert src.connected and list(src.running) == [TEST_DOMAIN]
            os.kill(pid, signal.SIGSTOP)
            stopped = True
            # Each of the connection's threads is stuck in a call in turn; then the
            # source gives the connection up instead of queueing calls behind them.
            kinds = await wedge(src)
            assert kinds[:POOL_SIZE] == [LibvirtTimeout] * POOL_SIZE, kinds
            # While the daemon stays stopped, a call fails at once: nothing waits in a
            # queue behind the stuck threads any more (it would time out).
            for _ in range(POOL_SIZE + 2):
                with pytest.raises(LibvirtUnavailable) as exc:
                    await src.host_info()
                assert not isinstance(exc.value, LibvirtTimeout), exc.value.message
            assert not src.connected
            # It keeps trying to connect: an open that hangs does not hold up the next.
            await until(lambda: threads_in_libvirt_open() >= 2, timeout=20,
                        what="a second open under way while the first still hangs")
            os.kill(pid, signal.SIGCONT)
            stopped = False

            # The same source connects again by itself: reads, events and actions work.
            info = await succeeds(src.host_info, timeout=30, what="reads work again")
            assert info["hypervisor"] == "TEST"
            assert src.connected and list(src.running) == [TEST_DOMAIN]
            assert (await src.refresh(TEST_DOMAIN)).state is RunState.RUNNING
            uuid = await create_domain(libvirtd.uri, "after-resume")
            await until(lambda: uuid in src.running, timeout=10, what="an event after resume")
            await src.suspend(uuid)
            assert state_of(src, uuid) is RunState.PAUSED
            await src.resume(uuid)
            assert state_of(src, uuid) is RunState.RUNNING
            await src.destroy(uuid)
            assert uuid not in src.running
            # What it gave up along the way (the wedged connection, the opens that
            # answered late) is closed once the daemon answers: one connection is left.
            await until(lambda: daemon_clients(libvirtd) == 1, timeout=20,
                        what="only the live connection left")
            assert src.connected
        finally:
            if stopped:
                os.kill(pid, signal.SIGCONT)
            await src.stop()
    run(body)


def test_a_libvirtd_that_never_answers_is_left_for_its_successor(libvirtd, no_keepalive_rescue):
    """The stopped daemon stays stopped for good, its socket moved aside; a new daemon
    serves the same socket path. The connection to the old one hangs forever (it is
    neither closed nor answered), so the source must move on by itself."""
    successor = Libvirtd()
    successor.sock_dir, successor.socket = libvirtd.sock_dir, libvirtd.socket
    assert successor.uri == libvirtd.uri

    async def body() -> None:
        snapshots: list[set[str]] = []
        src = LibvirtSource(libvirtd.uri, call_timeout=CALL_TIMEOUT,
                            on_snapshot=lambda snap: snapshots.append(set(snap)))
        await src.start()
        try:
            assert src.connected
            # A domain only the first daemon knows: its successor starts afresh.
            old_only = await create_domain(libvirtd.uri, "old-daemon-only")
            await until(lambda: old_only in src.running, timeout=10, what="event from the old")

            os.kill(libvirtd.proc.pid, signal.SIGSTOP)
            kinds = await wedge(src)
            assert kinds[:POOL_SIZE] == [LibvirtTimeout] * POOL_SIZE, kinds

            # Connections and opens under way stay with the stopped daemon's sockets;
            # new ones reach its successor.
            libvirtd.sock_dir.rename(libvirtd.dir / "sock-stopped")
            await asyncio.to_thread(successor.start)

            await until(lambda: src.connected and set(src.running) == {TEST_DOMAIN},
                        timeout=30, what="the successor's domains seen")
            assert snapshots[0] == {TEST_DOMAIN} and snapshots[-1] == {TEST_DOMAIN}
            info = await succeeds(src.host_info, timeout=10, what="reads on the successor")
            assert info["hypervisor"] == "TEST"

            uuid = await create_domain(successor.uri, "new-daemon")
            await until(lambda: uuid in src.running, timeout=10, what="event from the new")
            await src.suspend(uuid)
            assert state_of(src, uuid) is RunState.PAUSED
            assert old_only not in src.running
        finally:
            await src.stop()
    try:
        run(body)
    finally:
        if libvirtd.proc is not None:
            libvirtd.proc.kill()        # SIGKILL ends a stopped process too
        successor.cleanup()
