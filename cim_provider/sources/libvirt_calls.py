"""Blocking libvirt reads and the translation of libvirt's errors into ours.

Everything here blocks: the source runs it in its own threads with a timeout. libvirt's
exceptions become the `domain.sources` error family, libvirt's own message kept.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, TypeVar

import libvirt

from ..domain.domxml import DomainXMLError, parse_domain_xml
from ..domain.records import RunningDomain, RunState
from ..domain.sources import Failed, NotFound, SourceError, Timeout, Unavailable

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_NO_DOMAIN = libvirt.VIR_ERR_NO_DOMAIN


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



def _run_state(value: int | None) -> RunState:
    try:
        return RunState(int(value))  # type: ignore[arg-type]  # reason: int(None) raises TypeError, caught below
    except (TypeError, ValueError):
        return RunState.NOSTATE


def _read_domain(dom: libvirt.virDomain, state: int | None = None, *,
                 persistent: bool | None = None,
                 autostart: bool | None = None) -> RunningDomain | None:
    """The RunningDomain for `dom`, or None when it is not active (or gone).

    What the caller already knows from bulk listings is passed in and not asked again.
    """
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
    try:
        config = parse_domain_xml(xml, autostart)
    except DomainXMLError as exc:
        log.warning("skipping running domain %s: %s", dom.UUIDString(), exc)
        return None
    return RunningDomain(config=config, state=_run_state(state), persistent=persistent,
                         id=dom_id if dom_id is not None and dom_id >= 0 else None)


def _uuids(conn: libvirt.virConnect, flags: int) -> set[str]:
    return {d.UUIDString() for d in conn.listAllDomains(flags)}


def read_all(conn: libvirt.virConnect) -> dict[str, RunningDomain]:
    """Every active domain: listings and one stats call in bulk, then one XML each."""
    active = libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE
    doms = conn.listAllDomains(active)
    # Bulk answers to what would otherwise be two more round trips per domain.
    persistent = _uuids(conn, active | libvirt.VIR_CONNECT_LIST_DOMAINS_PERSISTENT)
    autostart = _uuids(conn, active | libvirt.VIR_CONNECT_LIST_DOMAINS_AUTOSTART)
    states: dict[str, int] = {}
    try:
        for dom, stats in conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE,
                                                 libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE):
            if "state.state" in stats:
                states[dom.UUIDString()] = stats["state.state"]
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
            raise
        log.debug("getAllDomainStats unsupported here; asking each domain for its state")
    out: dict[str, RunningDomain] = {}
    for dom in doms:
        key = dom.UUIDString()
        running = _read_domain(dom, states.get(key), persistent=key in persistent,
                               autostart=key in autostart)
        if running is not None:
            out[running.uuid] = running
    return out


def read_one(conn: libvirt.virConnect, uuid: str) -> RunningDomain | None:
    try:
        dom = conn.lookupByUUIDString(uuid)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == _NO_DOMAIN:
            return None
        raise
    return _read_domain(dom)


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
        if code in (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INVALID_CONN) \
                or exc.get_error_domain() == libvirt.VIR_FROM_RPC:
            raise LibvirtUnavailable(message, code) from None
        raise LibvirtFailed(message, code) from None
