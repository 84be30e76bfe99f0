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
