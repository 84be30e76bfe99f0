"""A Manager that offers only what the contract requires: ListInactiveDomains and
StartDomain. Its data is whatever the test hands it (even nonsense), and it records
every StartDomain call. Runs in-process, on its own bus connection.

(No `from __future__ import annotations`: the D-Bus decorators read the annotations.)
"""
import asyncio
from typing import Any, List, Optional

from cim_provider.contract import BUS_NAME, ERROR_NOT_FOUND, INTERFACE, OBJECT_PATH
from cim_provider.contract.bus import (DBusError, MessageBus, NameFlag, ServiceInterface,
                                       connect, method)


class MinimalManager(ServiceInterface):
    def __init__(self, entries: Optional[List[Any]] = None, delay: float = 0.0) -> None:
        super().__init__(INTERFACE)
        self.entries: List[Any] = list(entries or [])
        self.delay = delay            # seconds every call waits: a slow Manager
        self.starts: List[str] = []   # StartDomain arguments, in order

    @method()
    async def ListInactiveDomains(self) -> "aa{sv}":
        if self.delay:
            await asyncio.sleep(self.delay)
        return self.entries

    @method()
    async def StartDomain(self, uuid: "s") -> "s":
        self.starts.append(uuid)
        if self.delay:
            await asyncio.sleep(self.delay)
        for e in self.entries:
            if getattr(e.get("UUID"), "value", None) == uuid:
                self.entries.remove(e)
                return uuid
        raise DBusError(ERROR_NOT_FOUND, f"no definition with UUID {uuid}")


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
                        delay: float = 0.0) -> RunningMinimalManager:
    bus = await connect(address)
    manager = MinimalManager(entries, delay)
    bus.export(OBJECT_PATH, manager)
    await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
    return RunningMinimalManager(bus, manager)
