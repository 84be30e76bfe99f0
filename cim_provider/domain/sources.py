"""What the providers may ask of the two sources, and the one error family both raise.

The providers import this module, never `sources/`: the libvirt source and the Manager
client satisfy these Protocols (checked by mypy where the server wires them), and every
failure they report is one of the `SourceError` subclasses below, so a provider maps
source failures to CIM status codes without knowing which library failed.
See docs/architecture.md, "Sources".
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from .records import (Disk, DomainConfig, HostCapacity, Network, Nic, RunningDomain,
                      StatsSample, StoragePool)


class SourceError(Exception):
    """A source call failed. `message` is the source's own text (libvirt's, the
    Manager's); `code` is libvirt's virErrorNumber, `name` the D-Bus error name."""

    def __init__(self, message: str, *, code: int | None = None, name: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.name = name or type(self).__name__

    def __str__(self) -> str:
        return self.message


class Unavailable(SourceError):
    """The source is not reachable now (no connection, no Manager on the bus)."""


class Timeout(Unavailable):
    """The source did not answer within the call's timeout; the outcome is unknown."""


class NotFound(SourceError):
    """The source has no such domain."""


class Refused(SourceError):
    """The source understood and said no: policy, already running, a bad argument."""


class NotSupported(SourceError):
    """The source does not offer this operation."""


class Failed(SourceError):
    """The operation was attempted and failed for another reason."""


@dataclass(frozen=True)
class SourceStatus:
    """How a source is doing, for the health the host and the management service show.

    `state`: "ok"; "degraded" (some of what clients see may be missing or old); "down"
    (the source shows nothing). `reason` says what clients miss, for StatusDescriptions;
    `since` is the wall-clock time (time.time()) the present condition began.
    """
    state: Literal["ok", "degraded", "down"] = "ok"
    reason: str = ""
    since: float | None = None

    @staticmethod
    def stamp(when: float | None) -> str:
        """`when` as a local ISO time without microseconds, for messages."""
        if when is None:
            return "start-up"
        return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(when))


class RunningSource(Protocol):
    """libvirt as the providers see it: the running domains and actions on them."""

    @property
    def connected(self) -> bool: ...

    @property
    def status(self) -> SourceStatus: ...

    async def refresh(self, uuid: str) -> RunningDomain | None: ...

    def reboots(self, uuid: str) -> int:
        """How many reboot events libvirt has reported for `uuid` on this connection
        (a job compares it before and after RequestStateChange 10)."""
        ...

    async def resume(self, uuid: str) -> None: ...

    async def suspend(self, uuid: str) -> None: ...

    async def destroy(self, uuid: str) -> None: ...

    async def shutdown(self, uuid: str) -> None: ...

    async def reboot(self, uuid: str) -> None: ...

    async def reset(self, uuid: str) -> None: ...

    async def abort_job(self, uuid: str) -> bool:
        """Abort libvirt's own job on the domain (save, dump, migration); False when it
        has none. For a CIM job a client stops (docs/architecture.md, "Jobs")."""
        ...

    async def host_info(self) -> dict[str, Any]: ...

    # Devices of a running domain (hot-plug). Each acts on the live domain, and with
    # `config` on its persistent libvirt definition too; when the second part fails the
    # first is undone. The domain is read back before they return.

    async def attach_device(self, uuid: str, device: Disk | Nic, *, config: bool) -> None: ...

    async def detach_device(self, uuid: str, device: Disk | Nic, *, config: bool) -> None: ...

    async def update_device(self, uuid: str, device: Disk | Nic, old: Disk | Nic, *,
                            config: bool) -> None:
        """Change a device in place (a disk's medium, a NIC's link state); `old` is the
        device as it is now, put back if the persistent part fails."""


class ResourceFeed(Protocol):
    """Where the libvirt source puts what it learns of the host besides its domains
    (inventory.resources.HostResources): read in full at each connect, then kept fresh
    by storage-pool and network events and by the usage sampler."""

    def set_host(self, capacity: HostCapacity | None, pools: Mapping[str, StoragePool],
                 networks: Mapping[str, Network]) -> None: ...

    def update_pool(self, name: str, pool: StoragePool | None) -> None: ...

    def update_network(self, name: str, network: Network | None) -> None: ...

    def set_sample(self, sample: StatsSample) -> None: ...

    def set_sampling(self, interval: float) -> None:
        """Usage is sampled every `interval` seconds (0: not at all)."""


class DefinitionSource(Protocol):
    """An org.example.virt.Manager as the providers see it: the passive definitions."""

    @property
    def present(self) -> bool: ...

    @property
    def status(self) -> SourceStatus: ...

    def offers(self, member: str) -> bool: ...

    async def refresh(self, started: str | None = None) -> None:
        """Re-read the definitions now. `started`: a UUID StartDomain just started, which
        a Manager without ListDomains no longer lists (its twin is then unknown)."""

    async def start_domain(self, uuid: str) -> str: ...

    async def define_domain(self, props: Mapping[str, Any]) -> str: ...

    async def undefine_domain(self, uuid: str) -> None: ...

    async def get_domain(self, uuid: str) -> DomainConfig: ...

    async def update_domain(self, uuid: str, changes: Mapping[str, Any]) -> None: ...
