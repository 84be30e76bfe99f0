"""sd_notify(3): tell systemd (Type=notify) when the server is ready, reloading or
stopping.

The protocol is one datagram of `KEY=value` lines to the AF_UNIX socket named by
`$NOTIFY_SOCKET` (a path, or an abstract name written with a leading '@'); without that
variable every call here does nothing. It is written here instead of taken from a
library: `sdnotify` (PyPI) was last released in 2017 and hides every send error, and
`systemd-python` needs libsystemd's headers and a C compiler to install, for what is
one `sendto`. A notification that cannot be sent is logged once and never raised: the
server serves whether or not anyone listens.
"""
from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)

ENV = "NOTIFY_SOCKET"


def socket_address(value: str) -> str | bytes:
    """`$NOTIFY_SOCKET` as an AF_UNIX address: '@name' is the abstract name '\\0name'."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as MONOTONIC_USEC= wants it (systemd >= 253)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends notifications to `address` (None: a no-op notifier)."""

    def __init__(self, address: str | None) -> None:
        self.address = address or None
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_env(cls, unset: bool = True) -> Notifier:
        """The notifier systemd asked for; `unset` removes $NOTIFY_SOCKET from the
        environment (like sd_notify's unset_environment) so that child processes
        (openssl, ...) cannot speak for the service."""
        address = os.environ.get(ENV)
        if unset:
            os.environ.pop(ENV, None)
        return cls(address)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send `fields` ("READY=1", "STATUS=...") as one datagram; True if sent."""
        if self.address is None:
            return False
        data = "\n".join(fields).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(data, socket_address(self.address))
            return True
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify the service manager at %s: %s", self.address, exc)
            return False

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        # MONOTONIC_USEC in the same datagram: what Type=notify-reload (systemd >= 253)
        # requires; older managers ignore it.
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}",
                           "STATUS=reloading")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1", "STATUS=stopping")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
