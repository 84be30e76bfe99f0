"""Helpers for the indication tests: a recording pywbem WBEMListener, pywbem's
WBEMSubscriptionManager as the console, listeners that misbehave (a closed port, a
socket that accepts and stalls), and a server fed by libvirt alone (no D-Bus).

Nothing is mocked: the listener is pywbem's, on loopback; the server is ours.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import pywbem
from pywbem import CIMInstance

try:
    from tests.support.model import HOST, LoopThread, connect_wbem, poll_until
    from tests.support.wbem_server import free_port
    from tests.support import reset_test_driver
except ImportError:  # tests/ itself on sys.path
    from support.model import HOST, LoopThread, connect_wbem, poll_until  # type: ignore
    from support.wbem_server import free_port  # type: ignore
    from support import reset_test_driver  # type: ignore

ALL_CS = ("SELECT * FROM CIM_InstIndication WHERE SourceInstance ISA VIRT_ComputerSystem")
ARRIVAL = 1.0     # seconds: each indication must arrive within this of its cause


@dataclass
class Received:
    at: float
    indication: CIMInstance

    @property
    def kind(self) -> str:
        name = self.indication.classname
        for k in ("Created", "Modified", "Deleted"):
            if k in name:
                return k.lower()
        return name

    @property
    def name(self) -> str:
        return self.indication["SourceInstance"]["ElementName"]

    @property
    def uuid(self) -> str:
        return self.indication["SourceInstance"]["Name"]

    @property
    def state(self) -> int:
        return int(self.indication["SourceInstance"]["EnabledState"])

    @property
    def previous_state(self) -> Optional[int]:
        prev = self.indication.get("PreviousInstance")
        return None if prev is None else int(prev["EnabledState"])

    @property
    def filter(self) -> str:
        return self.indication["IndicationFilterName"]


class Listener:
    """pywbem's WBEMListener on a free loopback port, recording what arrives."""

    def __init__(self, tls: Optional[tuple[Path, Path]] = None) -> None:
        """`tls`: (certificate, key) to listen with HTTPS instead of HTTP."""
        self.port = free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.received: list[Received] = []
        self._lock = threading.Lock()
        if tls:
            self.listener = pywbem.WBEMListener("127.0.0.1", https_port=self.port,
                                                certfile=str(tls[0]), keyfile=str(tls[1]))
        else:
            self.listener = pywbem.WBEMListener("127.0.0.1", http_port=self.port)
        self.listener.add_callback(self._got)
        self.listener.start()

    def _got(self, indication: CIMInstance, host: str) -> None:
        with self._lock:
            self.received.append(Received(time.monotonic(), indication))

    def take(self) -> list[Received]:
        with self._lock:
            out, self.received = self.received, []
        return out

    def expect(self, count: int, since: float, within: float = ARRIVAL,
               quiet: float = 0.3) -> list[Received]:
        """Wait for `count` indications, each arriving within `within` s of `since`
        (when their cause happened); then make sure no further one arrives for `quiet`
        seconds. Returns them in arrival order and forgets them."""
        deadline = since + within
        while True:
            with self._lock:
                n = len(self.received)
            if n >= count or time.monotonic() > deadline:
                break
            time.sleep(0.005)
        if quiet:
            time.sleep(quiet)
        got = self.take()
        desc = [(r.kind, r.name, r.state) for r in got]
        assert len(got) == count, f"expected {count} indication(s), got {len(got)}: {desc}"
        late = [(r.kind, r.name, round(r.at - since, 3)) for r in got if r.at - since > within]
        assert not late, f"indications later than {within} s: {late}"
        return got

    def stop(self) -> None:
        self.listener.stop()


class StallingListener:
    """Accepts TCP connections and never answers (nor reads): a hung console."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.conns.append(conn)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(5)
        for c in self.conns:
            c.close()
        self.sock.close()


def restore_libvirt(conn) -> None:
    """Leave test:///default as found (shared by the process's connections)."""
    reset_test_driver(conn)


def dead_url() -> str:
    """A loopback URL nobody listens on (connection refused)."""
    return f"http://127.0.0.1:{free_port()}"


class Console:
    """pywbem's WBEMSubscriptionManager against one server."""

    def __init__(self, url: str, manager_id: str = "test") -> None:
        self.conn = connect_wbem(url, "interop")
        self.server = pywbem.WBEMServer(self.conn)
        self.sm = pywbem.WBEMSubscriptionManager(manager_id)
        self.sid = self.sm.add_server(self.server)

    def subscribe(self, listener_url: str, query: str = ALL_CS, name: str = "f",
                  dest: str = "d", namespaces=("root/virt",)) -> tuple:
        d = self.sm.add_destination(self.sid, listener_url, destination_id=dest)
        f = self.sm.add_filter(self.sid, list(namespaces), query, query_language="WQL",
                               filter_id=name)
        subs = self.sm.add_subscriptions(self.sid, f.path, d.path)
        return f, d, subs

    def close(self, remove: bool = True) -> None:
        if remove:
            self.sm.remove_server(self.sid)
        self.conn.close()


@dataclass
class LibvirtServer:
    """start_sources(libvirt only) + start_server on a LoopThread; restartable with the
    same state directory. The libvirt test:///default connection is the test's own."""
    state_dir: Path
    indication_options: dict = field(default_factory=dict)
    lt: LoopThread = field(default_factory=LoopThread)
    conn: Any = None
    handle: Any = None
    url: str = ""

    def start(self) -> "LibvirtServer":
        self.lt.run(self._start())
        self.url = f"http://127.0.0.1:{self.handle.addresses[0][1]}"
        return self

    async def _start(self) -> None:
        import libvirt

        from cim_provider.server.main import start_server, start_sources
        from cim_provider.sources.libvirt import ensure_event_loop_impl
        loop = asyncio.get_running_loop()
        ensure_event_loop_impl()
        if self.conn is None:
            self.conn = await loop.run_in_executor(None, libvirt.open, "test:///default")
        sources = await start_sources(libvirt_conn=self.conn, manager_bus=None)
        self.handle = await start_server([("127.0.0.1", 0)], sources=sources, host=HOST,
                                         state_dir=self.state_dir,
                                         indication_options=self.indication_options)

    def stop_server(self) -> None:
        if self.handle is not None:
            self.lt.run(self.handle.close(), 30)
            self.handle = None

    def close(self) -> None:
        try:
            self.stop_server()
            if self.conn is not None:
                restore_libvirt(self.conn)
                self.conn.close()
        finally:
            self.lt.stop()

    @property
    def service(self):
        return self.handle.indications


def poll(predicate: Callable[[], Any], within: float, what: str) -> Any:
    """poll_until with a finer interval (indications must arrive within a second)."""
    return poll_until(predicate, within, what, interval=0.02)


def quiet_pywbem_logs() -> None:
    logging.getLogger("pywbem").setLevel(logging.WARNING)
