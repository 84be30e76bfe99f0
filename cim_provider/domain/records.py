"""CIM-free records of domains: what the sources report and what the merge produces.

Records are immutable so the inventory can hand them out without copying and a
change feed can carry the old and the new one side by side.
"""
from __future__ import annotations

import enum
import uuid as uuidlib
from dataclasses import dataclass, field


def canonical_uuid(value: object) -> str | None:
    """Canonical lower-case 8-4-4-4-12 form, or None when `value` is not a UUID."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        return str(uuidlib.UUID(value.strip()))
    except ValueError:
        return None


class RunState(enum.Enum):
    """libvirt's domain states (virDomainState), named the way virsh shows them."""
    NOSTATE = 0
    RUNNING = 1
    BLOCKED = 2
    PAUSED = 3
    SHUTDOWN = 4      # shutting down
    SHUTOFF = 5
    CRASHED = 6
    PMSUSPENDED = 7


@dataclass(frozen=True, slots=True)
class Disk:
    target: str                      # "vda", "hdc": unique within a domain
    source: str | None = None        # file, block device or volume
    device: str = "disk"             # disk | cdrom | floppy | lun
    bus: str | None = None           # virtio, ide, sata, scsi, ...
    capacity_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class Nic:
    mac: str                         # lower-case aa:bb:cc:dd:ee:ff: unique within a domain
    type: str | None = None          # network | bridge | user | direct ...
    source: str | None = None        # network or bridge name
    model: str | None = None         # virtio, e1000, ...


@dataclass(frozen=True, slots=True)
class DomainConfig:
    """One configuration of a domain: libvirt's live XML, or a Manager definition."""
    uuid: str                        # canonical lower-case 8-4-4-4-12
    name: str
    title: str | None = None
    type: str | None = None          # KVM, QEMU, Xen, LXC, Test
    os_type: str | None = None       # hvm, xen, exe, linux
    arch: str | None = None          # x86_64, ...
    vcpus: int | None = None
    memory_kib: int | None = None    # current memory
    max_memory_kib: int | None = None
    autostart: bool | None = None
    disks: tuple[Disk, ...] = ()
    nics: tuple[Nic, ...] = ()


@dataclass(frozen=True, slots=True)
class RunningDomain:
    """A domain libvirt reports as active, with its live configuration."""
    config: DomainConfig
    state: RunState
    persistent: bool = False         # libvirt also holds a persistent definition
    id: int | None = None            # libvirt's domain id

    @property
    def uuid(self) -> str:
        return self.config.uuid


class Kind(enum.Enum):
    """The three kinds of system a client must be able to tell apart."""
    RUNNING_ONLY = "running-only"    # running, no passive twin known
    PASSIVE_ONLY = "passive-only"    # a Manager definition that is not running
    BOTH = "both"                    # running, and the Manager holds its definition


@dataclass(frozen=True, slots=True)
class DomainRecord:
    """The merged view of one domain (one CIM system), keyed by UUID.

    `running` is set when libvirt reports the domain active; `defined` when the
    Manager holds a definition for the same UUID. At least one is set. Running wins
    for the current state and name; the Manager's record is the defined configuration.
    """
    uuid: str
    running: RunningDomain | None = None
    defined: DomainConfig | None = None
    # Bumped by the inventory on every change of this record; lets consumers cache
    # whatever they derive from it (rendered CIM-XML, for example).
    version: int = field(default=0, compare=False)

    @property
    def kind(self) -> Kind:
        if self.running is None:
            return Kind.PASSIVE_ONLY
        return Kind.BOTH if self.defined is not None else Kind.RUNNING_ONLY

    @property
    def name(self) -> str:
        return self.running.config.name if self.running else self.defined.name  # type: ignore[union-attr]  # reason: a record is running, defined or both

    @property
    def current(self) -> DomainConfig:
        """The configuration in force now: live if running, else the definition."""
        return self.running.config if self.running else self.defined  # type: ignore[return-value]  # reason: a record is running, defined or both
