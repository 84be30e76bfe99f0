"""The Manager client's errors, and the one mapping from D-Bus error replies to them.

Every failure of a Manager call is a `ManagerError`, which is also one of the
`domain.sources` errors (Unavailable, Timeout, NotFound, Refused, NotSupported, Failed),
so providers never need to know this module (docs/architecture.md, "Errors").
"""
from __future__ import annotations

from ..contract import (ERROR_ALREADY_RUNNING, ERROR_INVALID_ARGUMENT, ERROR_NOT_FOUND,
                        ERROR_NOT_SUPPORTED, ERROR_REFUSED)
from ..domain.sources import (Failed, NotFound, NotSupported, Refused, SourceError, Timeout,
                              Unavailable)

# Our own error names, for failures that are not a D-Bus error reply.
ERR_UNAVAILABLE = "cim_provider.Manager.Unavailable"
ERR_TIMEOUT = "cim_provider.Manager.Timeout"
ERR_BAD_REPLY = "cim_provider.Manager.BadReply"

_ABSENT_ERRORS = {"org.freedesktop.DBus.Error.ServiceUnknown",
                  "org.freedesktop.DBus.Error.NameHasNoOwner",
                  "org.freedesktop.DBus.Error.NoReply",
                  "org.freedesktop.DBus.Error.Disconnected"}
_UNSUPPORTED_ERRORS = {"org.freedesktop.DBus.Error.UnknownMethod",
                       "org.freedesktop.DBus.Error.UnknownInterface",
                       "org.freedesktop.DBus.Error.UnknownObject",
                       "org.freedesktop.DBus.Error.UnknownProperty",
                       ERROR_NOT_SUPPORTED}
# Only these say "this Manager does not have the member at all", so that the client may
# stop using it for as long as this Manager runs. A contract Error.NotSupported (or any
# other reply) is a failure of this one call, never a reason to stop asking.
ABSENT_MEMBER_ERRORS = {"org.freedesktop.DBus.Error.UnknownMethod",
                         "org.freedesktop.DBus.Error.UnknownInterface",
                         "org.freedesktop.DBus.Error.UnknownProperty"}


class ManagerError(SourceError):
    """A Manager call failed; `name` is the D-Bus error name (or one of ours)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message, name=name)


class ManagerUnavailable(ManagerError, Unavailable):
    """No Manager owns org.example.virt (or the bus itself is unreachable)."""


class ManagerTimeout(ManagerError, Timeout):
    """The Manager did not answer within the call timeout."""


class ManagerNotSupported(ManagerError, NotSupported):
    """The Manager does not offer this (optional) member."""


class ManagerNotFound(ManagerError, NotFound):
    """The Manager has no definition with that UUID."""


class ManagerRefused(ManagerError, Refused):
    """The Manager said no: its policy, already running, or a bad argument."""


class ManagerFailed(ManagerError, Failed):
    """Any other error reply, or a reply that breaks the contract."""


_REFUSED_ERRORS = {ERROR_REFUSED, ERROR_ALREADY_RUNNING, ERROR_INVALID_ARGUMENT}


def error_from_dbus(name: str, text: str, member: str) -> ManagerError:
    """The one mapping from a D-Bus error reply to our exceptions."""
    message = text or f"{member} failed with {name}"
    if name in _ABSENT_ERRORS:
        return ManagerUnavailable(name, f"no Manager on the bus ({message})")
    if name in _UNSUPPORTED_ERRORS:
        return ManagerNotSupported(name, f"the Manager does not offer {member}: {message}")
    if name == ERROR_NOT_FOUND:
        return ManagerNotFound(name, message)
    if name in _REFUSED_ERRORS:
        return ManagerRefused(name, message)
    return ManagerFailed(name, message)
