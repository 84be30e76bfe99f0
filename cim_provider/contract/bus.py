"""The one place that picks a D-Bus library: dbus-fast by default, dbus-next on request.

Both expose the same asyncio API; everything else in the project imports D-Bus names
from here, so switching (CIM_PROVIDER_DBUS=dbus_next, as CI does for a second run)
changes nothing else. The small differences between the two (arrays and structs
coming back as lists in one and tuples in the other) are smoothed by `plain`.
"""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

log = logging.getLogger(__name__)

LIBRARY = "dbus_next" if os.environ.get("CIM_PROVIDER_DBUS", "").strip() == "dbus_next" \
    else "dbus_fast"

# mypy reads only the dbus-fast branch (the default): the two libraries' classes have the
# same API but are distinct types. `not TYPE_CHECKING` is always true when running.
if not TYPE_CHECKING and LIBRARY == "dbus_next":
    from dbus_next import (BusType, DBusError, ErrorType, Message, MessageFlag,  # noqa: F401
                           MessageType, NameFlag, PropertyAccess, ReleaseNameReply,
                           RequestNameReply, Variant)
    from dbus_next import introspection as intr  # noqa: F401
    from dbus_next.aio import MessageBus  # noqa: F401
    from dbus_next.service import ServiceInterface, dbus_property, method, signal  # noqa: F401
else:
    from dbus_fast import (BusType, DBusError, ErrorType, Message, MessageFlag,  # noqa: F401
                           MessageType, NameFlag, PropertyAccess, ReleaseNameReply,
                           RequestNameReply, Variant)
    from dbus_fast import introspection as intr  # noqa: F401
    from dbus_fast.aio import MessageBus  # noqa: F401
    from dbus_fast.service import ServiceInterface, dbus_property, method, signal  # noqa: F401



def _fix_dbus_fast_writer() -> None:
    """dbus-fast (5.2 at least) drops the connection when the socket is full: it
    writes a new message at once when its queue is empty, even while an earlier,
    larger message is still half written, and its write callback treats send()'s
    BlockingIOError as fatal. A Manager that sends
    a large reply (a page of definitions) and then a signal hits exactly that. Write at
    once only when nothing is in flight; otherwise the writer callback, already
    registered, sends the messages in order as the socket drains. (A private class:
    left alone when it does not look as expected.)"""
    try:
        from dbus_fast.aio import message_bus as amb
        writer = amb._MessageWriter
        original = writer.schedule_write
    except (ImportError, AttributeError):
        return
    if getattr(original, "_in_order", False):
        return

    def schedule_write(self: Any, msg: Any = None, future: Any = None) -> None:
        if getattr(self, "buf", None) is not None and self.bus.unique_name:
            if msg is not None:
                self.buffer_message(msg, future)
            self.loop.add_writer(self.fd, self.write_callback)
            return
        original(self, msg, future)
    def write_callback(self: Any, remove_writer: bool = True) -> None:
        """dbus-fast's own, except that a full socket (BlockingIOError) means "wait
        until writable", not "drop the connection"."""
        import array
        import socket
        sock = self.sock
        try:
            while True:
                if self.buf is None:
                    if not self.messages:
                        if remove_writer:
                            self.loop.remove_writer(self.fd)
                        return
                    buf, unix_fds, fut = self.messages.popleft()
                    self.unix_fds = unix_fds
                    self.buf = memoryview(buf)
                    self.offset = 0
                    self.fut = fut
                try:
                    if self.unix_fds and self.negotiate_unix_fd:
                        ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                    array.array("i", self.unix_fds))]
                        self.offset += sock.sendmsg([self.buf[self.offset:]], ancdata)
                        self.unix_fds = None
                    else:
                        self.offset += sock.send(self.buf[self.offset:])
                except (BlockingIOError, InterruptedError):
                    self.loop.add_writer(self.fd, self.write_callback)
                    return
                if self.offset < len(self.buf):
                    self.loop.add_writer(self.fd, self.write_callback)
                    return
                self.buf = None
                amb._future_set_result(self.fut, None)
        except Exception as exc:
            if self.bus._user_disconnect:
                amb._future_set_result(self.fut, None)
            else:
                amb._future_set_exception(self.fut, exc)
            self.bus._finalize(exc)

    schedule_write._in_order = True     # type: ignore[attr-defined]  # reason: a marker
    writer.schedule_write = schedule_write  # type: ignore[method-assign]  # reason: the fix itself
    if hasattr(amb, "_future_set_result") and hasattr(amb, "_future_set_exception"):
        writer.write_callback = write_callback  # type: ignore[method-assign]  # reason: the fix itself


def _fix_dbus_next_writer() -> None:
    """dbus-next (0.2.3) has the second half of the same bug: its write callback
    treats send()'s BlockingIOError (the socket is full: a burst of signals, a large
    reply) as fatal and drops the connection. A full socket means "wait until
    writable": the callback stays registered and goes on from where it stopped. (A
    private class: left alone when it does not look as expected.)"""
    try:
        from dbus_next.aio import message_bus as nmb
        writer = nmb._MessageWriter
        original = writer.write_callback
    except (ImportError, AttributeError):
        return
    if getattr(original, "_waits_when_full", False):
        return

    def write_callback(self: Any) -> None:
        import array
        import socket
        try:
            while True:
                if self.buf is None:
                    if self.messages.qsize() == 0:
                        self.loop.remove_writer(self.fd)
                        return
                    buf, unix_fds, fut = self.messages.get_nowait()
                    self.unix_fds = unix_fds
                    self.buf = memoryview(buf)
                    self.offset = 0
                    self.fut = fut
                try:
                    if self.unix_fds and self.negotiate_unix_fd:
                        ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                    array.array("i", self.unix_fds))]
                        self.offset += self.sock.sendmsg([self.buf[self.offset:]], ancdata)
                        self.unix_fds = None
                    else:
                        self.offset += self.sock.send(self.buf[self.offset:])
                except (BlockingIOError, InterruptedError):
                    return                      # still registered: called when writable
                if self.offset < len(self.buf):
                    return
                self.buf = None
                nmb._future_set_result(self.fut, None)
        except Exception as exc:
            nmb._future_set_exception(self.fut, exc)
            self.bus._finalize(exc)

    write_callback._waits_when_full = True   # type: ignore[attr-defined]  # reason: a marker
    if hasattr(nmb, "_future_set_result") and hasattr(nmb, "_future_set_exception"):
        writer.write_callback = write_callback  # type: ignore[method-assign]  # reason: the fix itself


if LIBRARY == "dbus_fast":
    _fix_dbus_fast_writer()
else:
    _fix_dbus_next_writer()

__all__ = ["LIBRARY", "BusType", "DBusError", "ErrorType", "Message", "MessageFlag",
           "MessageType", "NameFlag", "PropertyAccess", "ReleaseNameReply",
           "RequestNameReply", "Variant", "intr", "MessageBus", "ServiceInterface",
           "dbus_property", "method", "signal", "connect", "plain"]

# The bus daemon itself, for NameOwnerChanged, GetNameOwner and AddMatch.
DBUS_NAME = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
DBUS_INTERFACE = "org.freedesktop.DBus"


def bus_description(bus: str) -> str:
    """How to name `bus` in a log line (addresses can be long and are still useful)."""
    return bus if bus in ("system", "session") else f"bus at {bus}"


async def connect(bus: str = "system") -> MessageBus:
    """Connect to `system`, `session`, or a D-Bus address such as `unix:path=...`.

    With `system` / `session` the library reads DBUS_SYSTEM_BUS_ADDRESS /
    DBUS_SESSION_BUS_ADDRESS first, as every D-Bus program does.
    """
    if bus == "system":
        mb = MessageBus(bus_type=BusType.SYSTEM)
    elif bus == "session":
        mb = MessageBus(bus_type=BusType.SESSION)
    else:
        mb = MessageBus(bus_address=bus)
    connected = await mb.connect()
    log.debug("connected to %s with %s as %s", bus_description(bus), LIBRARY,
              connected.unique_name)
    return connected


def plain(value: Any) -> Any:
    """Unwrap Variants and turn tuples into lists, recursively.

    Handy for logging and for comparing what the two libraries hand back.
    """
    if isinstance(value, Variant):
        return plain(value.value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value
