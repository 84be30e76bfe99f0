"""A D-Bus monitor on a private bus, as `dbus-monitor` is: it sees the method calls and
signals other connections send (org.freedesktop.DBus.Monitoring.BecomeMonitor), so a
test can observe what the code under test asked of a Manager, and when, without
patching either of them.

It runs its own event loop in its own thread: a busy test loop, or a test thread
blocked in a call, does not hold back what it records. `Seen.at` is time.monotonic()
when the monitor received the message, so never earlier than it was sent. Messages
are recorded in the order the bus daemon routed them, and the daemon keeps each
sender's messages in the order they were sent.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from cim_provider.contract.bus import (DBUS_NAME, DBUS_PATH, Message, MessageBus,
                                       MessageType, connect)


@dataclass(frozen=True)
class Seen:
    at: float                    # time.monotonic() on arrival at the monitor
    kind: str                    # "call" or "signal"
    sender: str
    destination: str | None
    interface: str | None
    member: str
    body: tuple

    @property
    def property_read(self) -> str | None:
        """The property name of an org.freedesktop.DBus.Properties.Get call."""
        if (self.kind == "call" and self.interface == "org.freedesktop.DBus.Properties"
                and self.member == "Get" and len(self.body) == 2):
            return str(self.body[1])
        return None


class BusMonitor:
    """Records the messages that match `rules` (D-Bus match rules; none: everything)
    from `start()` (or entering the `with` block) until `stop()`."""

    def __init__(self, address: str, rules: Iterable[str] = ()) -> None:
        self.address = address
        self.rules = list(rules)
        self._seen: list[Seen] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="bus-monitor")
        self._bus: MessageBus | None = None

    def __enter__(self) -> BusMonitor:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self, timeout: float = 30.0) -> BusMonitor:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._become_monitor(), self._loop).result(timeout)
        return self

    async def _become_monitor(self) -> None:
        bus = await connect(self.address)
        bus.add_message_handler(self._record)
        reply = await bus.call(Message(destination=DBUS_NAME, path=DBUS_PATH,
                                       interface="org.freedesktop.DBus.Monitoring",
                                       member="BecomeMonitor", signature="asu",
                                       body=[self.rules, 0]))
        if reply is None or reply.message_type != MessageType.METHOD_RETURN:
            bus.disconnect()
            raise RuntimeError(f"BecomeMonitor failed: {reply and reply.body}")
        self._bus = bus

    def _record(self, msg: Message) -> bool | None:
        kind = {MessageType.METHOD_CALL: "call", MessageType.SIGNAL: "signal"}.get(
            msg.message_type)
        if kind is None:
            return None        # a reply: the library's (the one to BecomeMonitor)
        with self._lock:
            self._seen.append(Seen(time.monotonic(), kind, msg.sender or "",
                                   msg.destination, msg.interface, msg.member or "",
                                   tuple(msg.body)))
        # Handled, so the library does not answer a call: a monitor may not send.
        return True

    def stop(self) -> None:
        async def close() -> None:
            if self._bus is not None:
                self._bus.disconnect()
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()

    # ---- what was seen -------------------------------------------------------------

    def seen(self, predicate: Callable[[Seen], Any] | None = None) -> list[Seen]:
        """Everything recorded so far, in order (or what `predicate` selects)."""
        with self._lock:
            out = list(self._seen)
        return out if predicate is None else [s for s in out if predicate(s)]

    def wait(self, predicate: Callable[[list[Seen]], Any], within: float,
             what: str) -> Any:
        """From a test thread: until `predicate(seen())` is true; returns its value."""
        deadline = time.monotonic() + within
        while True:
            value = predicate(self.seen())
            if value:
                return value
            if time.monotonic() >= deadline:
                raise AssertionError(f"{what} not seen on the bus within {within} s")
            time.sleep(0.01)

    async def caught_up(self, bus: MessageBus, destination: str,
                        within: float = 10.0) -> None:
        """From a test's event loop: until every call the daemon routed before now is in
        `seen()`. A call that was answered was routed before its answer, so once a Ping
        sent after it reaches the monitor, so has it (the daemon routes in order).
        The rules must let a Peer.Ping to `destination` through; the Ping is recorded
        like any call (`member == "Ping"`)."""
        def pings(seen: list[Seen]) -> int:
            return sum(1 for s in seen if s.kind == "call" and s.member == "Ping"
                       and s.interface == "org.freedesktop.DBus.Peer")
        before = pings(self.seen())
        await bus.call(Message(destination=destination, path="/",
                               interface="org.freedesktop.DBus.Peer", member="Ping"))
        await self.until(lambda seen: pings(seen) > before, within, "the monitor catching up")

    async def until(self, predicate: Callable[[list[Seen]], Any], within: float,
                    what: str) -> Any:
        """From a test's event loop: as `wait`, without blocking the loop."""
        deadline = time.monotonic() + within
        while True:
            value = predicate(self.seen())
            if value:
                return value
            if time.monotonic() >= deadline:
                raise AssertionError(f"{what} not seen on the bus within {within} s")
            await asyncio.sleep(0.01)
