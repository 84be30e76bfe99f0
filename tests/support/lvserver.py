"""The server fed by libvirt alone (no Manager), for the device, pool, metric and hot-plug
tests: either in-process on libvirt's test:///default (one connection shared by the
server and the test, so both see the same state) or on a real private libvirtd
(tests/support/libvirtd.py, or any URI) that the test reaches through a connection of
its own. Nothing is mocked.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

import pywbem

try:
    from tests.support.model import HOST, VIRT, LoopThread, connect_wbem, reset_test_default
except ImportError:  # tests/ itself on sys.path
    from support.model import HOST, VIRT, LoopThread, connect_wbem, reset_test_default  # type: ignore


class LibvirtServer:
    """`start_sources` + `start_server` on 127.0.0.1:<free port> in a LoopThread.

    `uri` None: test:///default, opened once and shared (`self.libvirt`); else the
    server opens `uri` itself and `self.libvirt` is the test's own connection to it.
    """

    def __init__(self, uri: str | None = None, metrics_interval: float = 0.0,
                 call_timeout: float = 10.0) -> None:
        self.uri = uri
        self.metrics_interval = metrics_interval
        self.call_timeout = call_timeout
        if uri is None:
            reset_test_default()
        self.lt = LoopThread()
        self.server: Any = None
        self.libvirt: Any = None
        try:
            self.lt.run(self._start())
        except BaseException:
            self.close()
            raise
        self.url = f"http://127.0.0.1:{self.server.addresses[0][1]}"

    async def _start(self) -> None:
        import libvirt

        from cim_provider.server.main import start_server, start_sources
        from cim_provider.sources.libvirt import ensure_event_loop_impl
        loop = asyncio.get_running_loop()
        ensure_event_loop_impl()
        self.libvirt = await loop.run_in_executor(None, libvirt.open,
                                                  self.uri or "test:///default")
        sources = await start_sources(
            libvirt_uri=self.uri, libvirt_conn=self.libvirt if self.uri is None else None,
            manager_bus=None, call_timeout=self.call_timeout,
            metrics_interval=self.metrics_interval)
        if self.uri is not None and not await sources.libvirt.wait_connected(20):
            await sources.close()
            raise AssertionError(f"the server did not connect to {self.uri}")
        self.server = await start_server([("127.0.0.1", 0)], sources=sources, host=HOST)

    @property
    def source(self) -> Any:
        return self.server.sources.libvirt

    @property
    def inventory(self) -> Any:
        return self.server.sources.inventory

    @property
    def resources(self) -> Any:
        return self.inventory.resources

    def conn(self, namespace: str = VIRT) -> pywbem.WBEMConnection:
        return connect_wbem(self.url, namespace)

    def on_loop(self, fn: Callable[[], Any]) -> Any:
        """Call `fn` on the server's loop (where the inventory lives)."""
        async def call() -> Any:
            return fn()
        return self.lt.run(call())

    def wait(self, predicate: Callable[[], Any], within: float = 10.0,
             what: str = "condition") -> Any:
        deadline = time.monotonic() + within
        while True:
            value = self.on_loop(predicate)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not reached within {within} s")
            time.sleep(0.02)

    def sample(self) -> None:
        """One usage sample now (what the sampler does every interval)."""
        self.lt.run(self.source.sample_usage())

    def close(self) -> None:
        async def shutdown() -> None:
            if self.server is not None:
                await self.server.close()
            if self.libvirt is not None:
                self.libvirt.close()
        try:
            if self.uri is None:
                reset_test_default()
            self.lt.run(shutdown(), 30)
        finally:
            self.lt.stop()
