"""CIM-free records of domains: what the sources report and what the merge produces.

Records are immutable so the inventory can hand them out without copying and a
change feed can carry the old and the new one side by side.
"""
from __future__ import annotations

import enum
import re
import sys
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import dataclass, field


_CANONICAL = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


# Values most domains of a host share (a type, an architecture, a bus, a network, a
# memory size) are kept once rather than once per record, whichever source made the
# record (libvirt's XML, the Manager's D-Bus values): records live as long as their
# domain, 10,000 of them in the benchmark (issue 16: memory per domain).
_NUMBERS: dict[int, int] = {}


def shared_word(text: str | None) -> str | None:
    """`text`, interned (None stays None)."""
    return None if text is None else sys.intern(text)


def shared_number(value: int | None) -> int | None:
    """`value` as the one int object kept for it (the first 1,024 values seen)."""
    if value is None or type(value) is not int:
        return value
    if len(_NUMBERS) < 1024:
        return _NUMBERS.setdefault(value, value)
    return _NUMBERS.get(value, value)


def canonical_uuid(value: object) -> str | None:
    """Canonical lower-case 8-4-4-4-12 form, or None when `value` is not a UUID."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    if type(value) is str and _CANONICAL.fullmatch(value):   # libvirt's: as uuid.UUID gives it
        return value
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
    source_type: str | None = None   # file | block | volume | network | dir (libvirt's type=)
    pool: str | None = None          # storage pool of a volume source (<source pool=>)
    block_size: int | None = None    # logical block size (<blockio>), None: 512
    format: str | None = None        # image format (<driver type=>): raw, qcow2, ...


@dataclass(frozen=True, slots=True)
class Nic:
    mac: str                         # lower-case aa:bb:cc:dd:ee:ff: unique within a domain
    type: str | None = None          # network | bridge | user | direct ...
    source: str | None = None        # network or bridge name
    model: str | None = None         # virtio, e1000, ...
    link_state: str | None = None    # "up" | "down" (<link state=>); None: up


@dataclass(frozen=True, slots=True)
class Graphics:
    """A remote console of a domain (<graphics>): VNC, SPICE, ..."""
    type: str                        # vnc | spice | rdp | sdl | ...
    port: int | None = None          # the TCP port; None while unknown (autoport)
    listen: str | None = None        # the address it listens on
    autoport: bool = False


@dataclass(frozen=True, slots=True)
class DomainConfig:
    """One configuration of a domain: libvirt's live XML, or a Manager definition."""
    uuid: str                        # canonical lower-case 8-4-4-4-12
    name: str
    title: str | None = None
    type: str | None = None          # KVM, QEMU, Xen, LXC, Test
    os_type: str | None = None       # hvm, xen, exe, linux
    arch: str | None = None          # x86_64, ...
    vcpus: int | None = None         # current vCPUs
    max_vcpus: int | None = None     # the most vCPUs it may have (<vcpu>): hot-plug limit
    memory_kib: int | None = None    # current memory
    max_memory_kib: int | None = None
    autostart: bool | None = None
    disks: tuple[Disk, ...] = ()
    nics: tuple[Nic, ...] = ()
    graphics: tuple[Graphics, ...] = ()
    # A Manager definition's start policy (contract keys Priority, MinMemoryKiB): higher
    # priority may displace lower; the least memory a start may be shrunk to.
    priority: int | None = None
    min_memory_kib: int | None = None


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
    # Why libvirt last stopped this domain, when that was a failure (it crashed, its
    # hypervisor process died, its start failed in the guest); set only while it is
    # not running, cleared by the next start. docs/architecture.md, "States".
    stop_reason: str | None = None

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


# ---- the host's resources (libvirt: node info, storage pools, networks) ---------------

@dataclass(frozen=True, slots=True)
class HostCapacity:
    """What the host offers to virtual systems (virNodeGetInfo)."""
    cpus: int                        # logical CPUs
    memory_kib: int


@dataclass(frozen=True, slots=True)
class StoragePool:
    """A libvirt storage pool (virStoragePoolGetInfo + its XML)."""
    uuid: str
    name: str
    type: str | None = None          # dir | logical | netfs | ...
    active: bool = False
    capacity: int | None = None      # bytes
    allocation: int | None = None
    available: int | None = None
    path: str | None = None          # <target><path>
    autostart: bool | None = None


@dataclass(frozen=True, slots=True)
class Network:
    """A libvirt virtual network."""
    uuid: str
    name: str
    active: bool = False
    bridge: str | None = None
    forward: str | None = None       # nat | route | bridge | ... ; None: isolated
    autostart: bool | None = None


# ---- usage samples ----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class DomainStats:
    """One domain's counters at one moment (getAllDomainStats, or per-domain calls)."""
    cpu_time_ns: int | None = None           # total CPU time used since start
    vcpus: int | None = None                 # vcpu.current
    max_vcpus: int | None = None             # vcpu.maximum
    memory_used_kib: int | None = None       # from the balloon: available - unused, or rss
    block_rd_bytes: int | None = None        # summed over the disks
    block_wr_bytes: int | None = None
    net_rx_bytes: int | None = None          # summed over the NICs
    net_tx_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class StatsSample:
    """Every running domain's counters, taken together once per interval."""
    time: float                              # wall clock (time.time()) of the sample
    monotonic: float                         # time.monotonic() of the sample
    stats: Mapping[str, DomainStats] = field(default_factory=dict)   # by UUID
