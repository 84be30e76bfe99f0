"""What libvirt says about domains it stopped on a failure (blocking reads).

Why a domain stopped, when that was a failure (lifecycle STOPPED's details, a SHUTOFF
state's reasons), and the persistent definition libvirt still holds of such a domain:
the libvirt source keeps both, so a crashed persistent domain stays a system while the
Manager does not list it (docs/architecture.md, "States"). Runs in the source's threads.
"""
from __future__ import annotations

import dataclasses
import logging

import libvirt

from ..domain.domxml import DomainXMLError, parse_domain_xml
from ..domain.records import DomainConfig, canonical_uuid

log = logging.getLogger(__name__)
_NO_DOMAIN = libvirt.VIR_ERR_NO_DOMAIN


# Why libvirt stopped a domain, when that was a failure: lifecycle event STOPPED's
# details, and the reasons of a domain's SHUTOFF state (virDomainShutoffReason).
STOPPED_FAILURES = {
    getattr(libvirt, "VIR_DOMAIN_EVENT_STOPPED_CRASHED", 2):
        "the guest crashed (libvirt: stopped, crashed)",
    getattr(libvirt, "VIR_DOMAIN_EVENT_STOPPED_FAILED", 5):
        "the hypervisor process ended unexpectedly or the start failed in the guest "
        "(libvirt: stopped, failed)",
}
SHUTOFF_FAILURES = {
    getattr(libvirt, "VIR_DOMAIN_SHUTOFF_CRASHED", 3):
        "the guest crashed or its hypervisor process ended (libvirt: shut off, crashed)",
    getattr(libvirt, "VIR_DOMAIN_SHUTOFF_FAILED", 6):
        "the start failed in the guest (libvirt: shut off, failed)",
}


@dataclasses.dataclass(frozen=True)
class Stopped:
    """What libvirt says about its inactive domains at connect (`read_stopped`)."""
    reasons: dict[str, str]          # UUID -> why libvirt shut it off, when a failure
    held: dict[str, DomainConfig]    # UUID -> persistent definition, for those in `reasons`
    inactive: frozenset[str]         # every inactive domain's UUID


def read_stopped(conn: libvirt.virConnect) -> Stopped:
    """Every inactive (so persistent) domain libvirt shut off on a failure, with its
    reason and its persistent definition: one listing, one state call per inactive
    domain, then the definition of those that failed (docs/architecture.md, "States")."""
    reasons: dict[str, str] = {}
    held: dict[str, DomainConfig] = {}
    inactive: set[str] = set()
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_INACTIVE):
        uuid = canonical_uuid(dom.UUIDString()) or dom.UUIDString()
        inactive.add(uuid)
        try:
            state, reason = dom.state()[:2]
        except libvirt.libvirtError as exc:
            log.debug("no state for %s: %s", uuid, exc)
            continue
        if state == libvirt.VIR_DOMAIN_SHUTOFF and reason in SHUTOFF_FAILURES:
            reasons[uuid] = SHUTOFF_FAILURES[reason]
            cfg = _definition(dom)
            if cfg is not None:
                held[uuid] = cfg
    return Stopped(reasons, held, frozenset(inactive))


def read_definition(conn: libvirt.virConnect, uuid: str) -> DomainConfig | None:
    """The persistent definition of a domain that is not running, read as the Manager's
    libvirt store reads it; None when the domain is gone, running or transient."""
    try:
        dom = conn.lookupByUUIDString(uuid)
        if dom.isActive() or not dom.isPersistent():
            return None
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == _NO_DOMAIN:
            return None
        raise
    return _definition(dom)


def _definition(dom: libvirt.virDomain) -> DomainConfig | None:
    try:
        xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        try:
            autostart: bool | None = bool(dom.autostart())
        except libvirt.libvirtError:
            autostart = None
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == _NO_DOMAIN:
            return None
        raise
    try:
        return parse_domain_xml(xml, autostart)
    except DomainXMLError as exc:
        log.warning("skipping the definition of %s: %s", dom.UUIDString(), exc)
        return None
