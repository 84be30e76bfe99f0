"""Blocking libvirt reads and the translation of libvirt's errors into ours.

Everything here blocks: the source runs it in its own threads with a timeout. libvirt's
exceptions become the `domain.sources` error family, libvirt's own message kept.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, TypeVar

import libvirt

import dataclasses
import xml.etree.ElementTree as ET
from collections.abc import Mapping

from ..domain.domxml import DomainXMLError, parse_domain_xmls
from ..domain.records import (DomainConfig, HostCapacity, Network, RunningDomain, RunState,
                              StoragePool, canonical_uuid)
from ..domain.sources import (Failed, NotFound, NotSupported, Refused, SourceError, Timeout,
                              Unavailable)

log = logging.getLogger(__name__)

# Domain XML documents parsed together at start-up: a new parser per document no longer
# counts, and a batch stays small beside 10,000 domains.
PARSE_BATCH = 64

_T = TypeVar("_T")
_NO_DOMAIN = libvirt.VIR_ERR_NO_DOMAIN
# Errors that mean "libvirt understood and said no" (the caller's input, not libvirt).
_REFUSALS = tuple(getattr(libvirt, name) for name in (
    "VIR_ERR_INVALID_ARG", "VIR_ERR_XML_ERROR", "VIR_ERR_CONFIG_UNSUPPORTED",
    "VIR_ERR_OPERATION_INVALID", "VIR_ERR_XML_DETAIL") if hasattr(libvirt, name))


class LibvirtError(SourceError):
    """A libvirt call failed; `message` is libvirt's own text, `code` its virErrorNumber."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message, code=code)


class LibvirtFailed(LibvirtError, Failed):
    """libvirt tried and failed (any error that is not one of the others)."""


class DomainNotFound(LibvirtError, NotFound):
    """No domain with that UUID (or the UUID is not a UUID)."""


class LibvirtUnavailable(LibvirtError, Unavailable):
    """There is no working connection to libvirt right now."""


class LibvirtTimeout(LibvirtUnavailable, Timeout):
    """libvirt did not answer within the call timeout."""


class LibvirtNotSupported(LibvirtError, NotSupported):
    """The connection's driver does not offer this call (VIR_ERR_NO_SUPPORT)."""


class LibvirtRefused(LibvirtError, Refused):
    """libvirt understood and refused: an invalid argument, a device it cannot take."""



_RUN_STATES = {s.value: s for s in RunState}


def _run_state(value: int | None) -> RunState:
    """libvirt's state number as a RunState; NOSTATE for one we do not know (a dict
    lookup: the Enum call was ~1.5 µs of each domain's first read)."""
    return _RUN_STATES.get(value, RunState.NOSTATE) if type(value) is int \
        else RunState.NOSTATE


@dataclasses.dataclass(slots=True)
class _Raw:
    """What libvirt said of one active domain, its XML not yet parsed."""
    dom: libvirt.virDomain
    state: int
    xml: str
    autostart: bool | None
    persistent: bool
    id: int | None


def _read_raw(dom: libvirt.virDomain, state: int | None, *, persistent: bool | None,
              autostart: bool | None) -> _Raw | None:
    try:
        if state is None:
            state = dom.state()[0]
        if state == libvirt.VIR_DOMAIN_SHUTOFF:
            return None
        xml = dom.XMLDesc(0)
        if autostart is None:
            try:
                autostart = bool(dom.autostart())
            except libvirt.libvirtError:
                autostart = None
        if persistent is None:
            persistent = bool(dom.isPersistent())
        dom_id = dom.ID()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == _NO_DOMAIN:
            return None
        raise
    return _Raw(dom, state, xml, autostart, persistent, dom_id)


def _running(raw: _Raw, config: DomainConfig | DomainXMLError,
             capacities: Mapping[str, int] | None) -> RunningDomain | None:
    if isinstance(config, DomainXMLError):
        log.warning("skipping running domain %s: %s", raw.dom.UUIDString(), config)
        return None
    full = _with_capacities(raw.dom, config, capacities)
    return RunningDomain(config=full, state=_run_state(raw.state), persistent=raw.persistent,
                         id=raw.id if raw.id is not None and raw.id >= 0 else None)


def _with_capacities(dom: libvirt.virDomain, config, known: Mapping[str, int] | None):
    """`config` with each disk's capacity (libvirt's block info): from `known` when the
    bulk statistics had it, else one virDomainGetBlockInfo per disk with a source. A
    configuration without disks (or none whose capacity is learnt) is returned as it is:
    no copy per domain at start-up (issue 16)."""
    if not config.disks:
        return config
    disks = []
    for disk in config.disks:
        cap = (known or {}).get(disk.target)
        if cap is None and disk.source:
            try:
                cap = int(dom.blockInfo(disk.target)[0])
            except libvirt.libvirtError as exc:       # no media, no support, gone
                log.debug("no block info for %s of %s: %s", disk.target, config.name, exc)
        disks.append(dataclasses.replace(disk, capacity_bytes=cap) if cap else disk)
    if all(new is old for new, old in zip(disks, config.disks)):
        return config
    return dataclasses.replace(config, disks=tuple(disks))


def _capacities(stats: Mapping[str, object]) -> dict[str, int]:
    """Disk target -> capacity from one domain's block statistics (block.N.*)."""
    out: dict[str, int] = {}
    count = stats.get("block.count")
    for i in range(count if isinstance(count, int) else 0):
        name, cap = stats.get(f"block.{i}.name"), stats.get(f"block.{i}.capacity")
        if isinstance(name, str) and isinstance(cap, int) and cap > 0:
            out[name] = cap
    return out


def _uuids(conn: libvirt.virConnect, flags: int) -> set[str]:
    return {d.UUIDString() for d in conn.listAllDomains(flags)}


def read_all(conn: libvirt.virConnect) -> dict[str, RunningDomain]:
    """Every active domain: one bulk statistics call names them (with their state and
    disk capacities), one UUIDString each; persistence and autostart from the listings
    of the exceptions (transient domains, autostart ones); then one XML each.

    A driver without bulk statistics lists the active domains instead. At 10,000
    domains each call per domain costs tens of milliseconds of the start-up (issue 16:
    spawn to the first complete enumeration within libvirt's own list time + 1 s), so
    none is made twice."""
    active = libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE
    bulk: list[tuple[libvirt.virDomain, Mapping[str, Any]]]
    try:
        bulk = conn.getAllDomainStats(
            libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_BLOCK,
            libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
            raise
        log.debug("getAllDomainStats unsupported here; asking each domain for its state")
        bulk = [(dom, {}) for dom in conn.listAllDomains(active)]
    # An active domain is persistent or transient; few are transient or autostart.
    transient = _uuids(conn, active | libvirt.VIR_CONNECT_LIST_DOMAINS_TRANSIENT)
    autostart = _uuids(conn, active | libvirt.VIR_CONNECT_LIST_DOMAINS_AUTOSTART)
    out: dict[str, RunningDomain] = {}
    # The XML documents are parsed PARSE_BATCH at a time (domxml.parse_domain_xmls).
    for start in range(0, len(bulk), PARSE_BATCH):
        raws: list[tuple[_Raw, Mapping[str, Any]]] = []
        for dom, stats in bulk[start:start + PARSE_BATCH]:
            # The UUID only to look it up in the exceptions (none, mostly).
            key = dom.UUIDString() if transient or autostart else ""
            state = stats.get("state.state")
            raw = _read_raw(dom, state if isinstance(state, int) else None,
                            persistent=key not in transient, autostart=key in autostart)
            if raw is not None:
                raws.append((raw, stats))
        configs = parse_domain_xmls([r.xml for r, _ in raws], [r.autostart for r, _ in raws],
                                    detail=True)
        for (raw, stats), config in zip(raws, configs):
            running = _running(raw, config, _capacities(stats) if stats else None)
            if running is not None:
                out[running.uuid] = running
    del bulk
    return out


def read_autostart(conn: libvirt.virConnect) -> set[str]:
    """The UUIDs of the active domains marked autostart (one listing call)."""
    flags = libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE | libvirt.VIR_CONNECT_LIST_DOMAINS_AUTOSTART
    return {canonical_uuid(d.UUIDString()) or d.UUIDString() for d in conn.listAllDomains(flags)}


def read_one(conn: libvirt.virConnect, uuid: str) -> RunningDomain | None:
    try:
        dom = conn.lookupByUUIDString(uuid)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == _NO_DOMAIN:
            return None
        raise
    # Everything asked of the domain itself (read_all passes what its listings know).
    raw = _read_raw(dom, None, persistent=None, autostart=None)
    if raw is None:
        return None
    config = parse_domain_xmls([raw.xml], [raw.autostart], detail=True)[0]
    return _running(raw, config, None)


def quietly(fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except libvirt.libvirtError as exc:
        log.debug("libvirt: %s: %s", getattr(fn, "__name__", fn), exc)


def guarded(fn: Callable[[], _T]) -> _T:
    """Blocking side of `_call`: turn libvirt's exceptions into ours, message kept."""
    try:
        return fn()
    except libvirt.libvirtError as exc:
        code = exc.get_error_code()
        message = exc.get_error_message() or str(exc)
        if code == _NO_DOMAIN:
            raise DomainNotFound(message, code) from None
        if code == libvirt.VIR_ERR_NO_SUPPORT:
            raise LibvirtNotSupported(message, code) from None
        if code in _REFUSALS:
            raise LibvirtRefused(message, code) from None
        if code in (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INVALID_CONN) \
                or exc.get_error_domain() == libvirt.VIR_FROM_RPC:
            raise LibvirtUnavailable(message, code) from None
        raise LibvirtFailed(message, code) from None


# ---- the host: capacity, storage pools, networks ---------------------------------------

def _pool(pool: libvirt.virStoragePool) -> StoragePool:
    """One storage pool's record: its info (capacity, allocation, available) and XML."""
    state, capacity, allocation, available = pool.info()[:4]
    root = ET.fromstring(pool.XMLDesc(0))
    try:
        autostart: bool | None = bool(pool.autostart())
    except libvirt.libvirtError:
        autostart = None
    active = state in (libvirt.VIR_STORAGE_POOL_RUNNING, libvirt.VIR_STORAGE_POOL_DEGRADED)
    return StoragePool(uuid=canonical_uuid(pool.UUIDString()) or pool.UUIDString(),
                       name=pool.name(), type=root.get("type"), active=active,
                       capacity=capacity if active else None,
                       allocation=allocation if active else None,
                       available=available if active else None,
                       path=(root.findtext("target/path") or "").strip() or None,
                       autostart=autostart)


def _network(net: libvirt.virNetwork) -> Network:
    root = ET.fromstring(net.XMLDesc(0))
    bridge = root.find("bridge")
    forward = root.find("forward")
    try:
        autostart: bool | None = bool(net.autostart())
    except libvirt.libvirtError:
        autostart = None
    return Network(uuid=canonical_uuid(net.UUIDString()) or net.UUIDString(),
                   name=net.name(), active=bool(net.isActive()),
                   bridge=bridge.get("name") if bridge is not None else None,
                   forward=(forward.get("mode") or "nat") if forward is not None else None,
                   autostart=autostart)


def _gone(exc: libvirt.libvirtError) -> bool:
    return exc.get_error_code() in (libvirt.VIR_ERR_NO_STORAGE_POOL, libvirt.VIR_ERR_NO_NETWORK)


def read_capacity(conn: libvirt.virConnect) -> HostCapacity:
    info = conn.getInfo()
    return HostCapacity(cpus=int(info[2]), memory_kib=int(info[1]) * 1024)


def read_pools(conn: libvirt.virConnect) -> dict[str, StoragePool]:
    """Every storage pool by name; {} when the driver has no storage."""
    out = {}
    try:
        pools = conn.listAllStoragePools(0)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
            raise
        return {}
    for pool in pools:
        try:
            rec = _pool(pool)
        except libvirt.libvirtError as exc:
            if not _gone(exc):
                raise
            continue
        out[rec.name] = rec
    return out


def read_networks(conn: libvirt.virConnect) -> dict[str, Network]:
    out = {}
    try:
        nets = conn.listAllNetworks(0)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
            raise
        return {}
    for net in nets:
        try:
            rec = _network(net)
        except libvirt.libvirtError as exc:
            if not _gone(exc):
                raise
            continue
        out[rec.name] = rec
    return out


def read_pool(conn: libvirt.virConnect, name: str) -> StoragePool | None:
    """One storage pool again (after its event); None when it no longer exists."""
    try:
        return _pool(conn.storagePoolLookupByName(name))
    except libvirt.libvirtError as exc:
        if _gone(exc):
            return None
        raise


def read_network(conn: libvirt.virConnect, name: str) -> Network | None:
    try:
        return _network(conn.networkLookupByName(name))
    except libvirt.libvirtError as exc:
        if _gone(exc):
            return None
        raise


# Usage statistics: sources/libvirt_stats.py.


# ---- devices --------------------------------------------------------------------------------

def change_device(conn: libvirt.virConnect, uuid: str, op: str, xml: str, *, live: bool,
                  config: bool, undo: str | None = None) -> None:
    """attach / detach / update one device: the live domain first, then (`config`) its
    persistent definition. When the second step fails the first is undone (`undo`: the
    XML that puts the live device back, for update), so nothing is left half-applied."""
    dom = conn.lookupByUUIDString(uuid)
    call = {"attach": dom.attachDeviceFlags, "detach": dom.detachDeviceFlags,
            "update": dom.updateDeviceFlags}[op]
    if live:
        call(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        # A detach the guest must acknowledge (PCI hot-unplug) may still be pending when
        # libvirt returns: the persistent definition is left alone until it is done.
        if op == "detach" and _device_present(dom.XMLDesc(0), xml):
            raise LibvirtFailed(f"libvirt asked the guest to release {_device_name(xml)} "
                                "and the guest has not done so yet (a guest without "
                                "hot-unplug support never does); the persistent definition "
                                "is unchanged")
    if not config:
        return
    try:
        call(xml, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    except libvirt.libvirtError:
        if live:
            try:
                if op == "attach":
                    dom.detachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
                elif op == "update" and undo is not None:
                    dom.updateDeviceFlags(undo, libvirt.VIR_DOMAIN_AFFECT_LIVE)
                elif op == "detach":
                    dom.attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            except libvirt.libvirtError as exc:
                log.error("libvirt: could not undo the live %s on %s after its persistent "
                          "part failed: %s", op, uuid, exc)
        raise


def _device_name(xml: str) -> str:
    """The identity of one <disk> (target dev) or <interface> (MAC) element."""
    elem = ET.fromstring(xml)
    if elem.tag == "disk":
        target = elem.find("target")
        return target.get("dev", "") if target is not None else ""
    mac = elem.find("mac")
    return (mac.get("address") or "").lower() if mac is not None else ""


def _device_present(domain_xml: str, device_xml: str) -> bool:
    """Whether the domain's XML still has the device `device_xml` names."""
    name = _device_name(device_xml)
    root = ET.fromstring(domain_xml)
    if ET.fromstring(device_xml).tag == "disk":
        return any(t.get("dev") == name for t in root.findall("devices/disk/target"))
    return any((m.get("address") or "").lower() == name
               for m in root.findall("devices/interface/mac"))
