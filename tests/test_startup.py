"""A start that fails (a listen port already in use) leaves nothing running behind the
error: start_server closes the runner, the indication service and the sources; start_demo
also stops its private dbus-daemon and removes its folder.
"""
from __future__ import annotations

import asyncio
import errno
import os
import socket
import tempfile
from pathlib import Path

import psutil
import pytest

try:
    from tests.support.model import HOST, LoopThread, reset_test_default
except ImportError:  # tests/ itself on sys.path
    from support.model import HOST, LoopThread, reset_test_default  # type: ignore

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def busy_port():
    """A loopback port with a listener on it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture
def lt():
    reset_test_default()
    lt = LoopThread()
    yield lt
    lt.stop()
    reset_test_default()


def _other_tasks() -> list[asyncio.Task]:
    me = asyncio.current_task()
    return [t for t in asyncio.all_tasks() if t is not me and not t.done()]


def _dbus_daemons() -> set[int]:
    """Our own dbus-daemon children that are still alive."""
    return {p.pid for p in psutil.Process(os.getpid()).children()
            if p.name() == "dbus-daemon" and p.status() != psutil.STATUS_ZOMBIE}


def _demo_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("cim-provider-demo-*"))


@pytest.mark.parametrize("where", ["http", "https"])
def test_start_server_on_a_busy_port_stops_the_sources(lt, busy_port, tmp_path, where):
    import libvirt

    from cim_provider.busdaemon import PrivateBus
    from cim_provider.server.tls import ensure_self_signed, server_context
    from cim_provider.server.main import start_server, start_sources
    from cim_provider.sources.libvirt import ensure_event_loop_impl

    bus = PrivateBus()              # no Manager on it: the client keeps watching for one

    async def scenario():
        loop = asyncio.get_running_loop()
        ensure_event_loop_impl()
        conn = await loop.run_in_executor(None, libvirt.open, "test:///default")
        try:
            sources = await start_sources(libvirt_conn=conn, manager_bus=bus.address)
            assert await sources.libvirt.wait_connected(10)
            running = _other_tasks()
            listen = [("127.0.0.1", 0)]        # starts, then has to be closed again
            https, ctx = [], None
            if where == "http":
                listen.append(("127.0.0.1", busy_port))
            else:
                https = [("127.0.0.1", busy_port)]
                ctx = server_context(*ensure_self_signed(tmp_path / "tls", HOST))
            with pytest.raises(OSError) as err:
                await start_server(listen, sources=sources, host=HOST,
                                   state_dir=tmp_path / "state", https=https,
                                   ssl_context=ctx)
            assert err.value.errno == errno.EADDRINUSE
            return running, _other_tasks(), sources
        finally:
            conn.close()

    try:
        running, left, sources = lt.run(scenario())
    finally:
        bus.stop()
    assert running, "the sources should have had tasks to leak"
    assert left == [], left
    assert not sources.libvirt.connected and sources.manager._bus is None


def test_start_demo_on_a_busy_port_stops_everything(lt, busy_port):
    from cim_provider.demo import start_demo
    daemons, dirs = _dbus_daemons(), _demo_dirs()

    async def scenario():
        with pytest.raises(OSError) as err:
            await start_demo([("127.0.0.1", busy_port)], host=HOST)
        assert err.value.errno == errno.EADDRINUSE
        return _other_tasks()

    assert lt.run(scenario()) == []
    assert _dbus_daemons() - daemons == set(), "the private dbus-daemon is still running"
    assert _demo_dirs() - dirs == set()


def test_demo_asks_for_the_host_name_once(lt, monkeypatch):
    from cim_provider.server import main as server
    from cim_provider.demo import start_demo
    calls = []

    def fqdn(timeout: float = 2.0) -> str:
        calls.append(timeout)
        return "fqdn.example.test"

    monkeypatch.setattr(server, "host_fqdn", fqdn)
    demo = lt.run(start_demo([("127.0.0.1", 0)]))
    try:
        assert len(calls) == 1
        assert demo.server.dispatcher.host == "fqdn.example.test"
    finally:
        lt.run(demo.close(), 30)
