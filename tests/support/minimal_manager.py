"""A Manager that offers only what the contract requires: ListInactiveDomains and
StartDomain. Its data is whatever the test hands it (even nonsense), and it records
every StartDomain call. It can be told to fail or be slow for its next list calls.
`SignalingManager` adds ListDomains and the three change signals. Runs in-process, on
its own bus connection.

(No `from __future__ import annotations`: the D-Bus decorators read the annotations.)
"""
import asyncio
from typing import Any, List, Optional, Set, Union

from cim_provider.contract import BUS_NAME, ERROR_NOT_FOUND, INTERFACE, OBJECT_PATH
from cim_provider.contract.bus import (DBusError, MessageBus, NameFlag, ServiceInterface,
                                       Variant, connect, method, signal)


class MinimalManager(ServiceInterface):
    def __init__(self, entries: Optional[List[Any]] = None, delay: float = 0.0) -> None:
        super().__init__(INTERFACE)
        self.entries: List[Any] = list(entries or [])
        self.delay = delay            # seconds every call waits: a slow Manager
        self.starts: List[str] = []   # StartDomain arguments, in order
        # What the next list calls do, one item each: an error name to reply with, or
        # seconds to wait before answering (longer than the client's timeout: a stall).
        self.failures: List[Union[str, float]] = []
        self.list_calls = 0           # list calls answered or failed
        self.start_delay = 0.0        # seconds StartDomain takes (a slow guest start)

    async def _listing(self) -> None:
        self.list_calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.failures:
            failure = self.failures.pop(0)
            if isinstance(failure, str):
                raise DBusError(failure, f"failing this once with {failure} (a test)")
            await asyncio.sleep(failure)

    @method()
    async def ListInactiveDomains(self) -> "aa{sv}":
        await self._listing()
        return self.entries

    @method()
    async def StartDomain(self, uuid: "s") -> "s":
        self.starts.append(uuid)
        if self.delay or self.start_delay:
            await asyncio.sleep(self.delay + self.start_delay)
        for e in self.entries:
            if getattr(e.get("UUID"), "value", None) == uuid:
                self.entries.remove(e)
                return uuid
        raise DBusError(ERROR_NOT_FOUND, f"no definition with UUID {uuid}")


class SignalingManager(MinimalManager):
    """Also ListDomains (`active` holds the running UUIDs) and the change signals,
    which it emits only when the test calls them: a change without a signal is a
    lost signal."""

    def __init__(self, entries: Optional[List[Any]] = None, delay: float = 0.0) -> None:
        super().__init__(entries, delay)
        self.active: Set[str] = set()

    @method()
    async def ListDomains(self) -> "aa{sv}":
        await self._listing()
        return [dict(e, Active=Variant("b", getattr(e.get("UUID"), "value", None)
                                       in self.active))
                for e in self.entries]

    @signal()
    def DomainDefined(self, uuid) -> "s":
        return uuid

    @signal()
    def DomainUndefined(self, uuid) -> "s":
        return uuid

    @signal()
    def DomainChanged(self, uuid) -> "s":
        return uuid


class RunningMinimalManager:
    """A MinimalManager exported on a bus, owning org.example.virt until `stop()`."""

    def __init__(self, bus: MessageBus, manager: MinimalManager) -> None:
        self.bus = bus
        self.manager = manager

    async def stop(self) -> None:
        self.bus.disconnect()
        try:
            await self.bus.wait_for_disconnect()
        except Exception:
            pass


async def serve_minimal(address: str, entries: Optional[List[Any]] = None,
                        delay: float = 0.0,
                        manager: Optional[MinimalManager] = None) -> RunningMinimalManager:
    """Serve `manager`, or a MinimalManager over `entries`."""
    bus = await connect(address)
    if manager is None:
        manager = MinimalManager(entries, delay)
    bus.export(OBJECT_PATH, manager)
    await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
    return RunningMinimalManager(bus, manager)
