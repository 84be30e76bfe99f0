"""What the root/virt providers read and act through, and the names they share.

The providers never talk to libvirt or D-Bus themselves: reads come from the
inventory (a cache kept fresh by events), actions go through the two sources, and
after an action the inventory is brought up to date before the method returns, so
the next read by any client shows the new state.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pywbem
from pywbem import CIMClass, CIMError, CIMInstance, CIMInstanceName

from ..inventory.inventory import Inventory
from ..domain.records import canonical_uuid
from ..domain.sources import DefinitionSource, RunningSource, SourceError
from ..wbem.provider import build_instance
from ..wbem.repository import Namespace, Repository

log = logging.getLogger(__name__)

VIRT_NS = "root/virt"
INTEROP_NS = "interop"
CS_CLASS = "VIRT_ComputerSystem"
HOST_CLASS = "VIRT_HostSystem"
VSMS_CLASS = "VIRT_VirtualSystemManagementService"
VSMS_NAME = "VirtualSystemManagementService"
STATE_PREFIX = "VIRT:state:"
DEFINED_PREFIX = "VIRT:defined:"


@dataclass
class Backend:
    repo: Repository
    inventory: Inventory
    host: str                                  # host FQDN: VIRT_HostSystem.Name
    libvirt: RunningSource | None = None       # the running domains (libvirt)
    manager: DefinitionSource | None = None    # the passive definitions (a Manager)
    # RequestedState per UUID (12 when absent): the newest RequestStateChange that has
    # not failed. Written only through begin_request / end_request / forget_requests.
    requested_state: dict[str, int] = field(default_factory=dict)
    # The RequestStateChange calls in progress per UUID (ticket -> value), and the
    # newest that succeeded (ticket, value); tickets are issued in call order.
    _requests: dict[str, dict[int, int]] = field(default_factory=dict, init=False, repr=False)
    _succeeded: dict[str, tuple[int, int]] = field(default_factory=dict, init=False,
                                                  repr=False)
    _tickets: Iterator[int] = field(default_factory=lambda: itertools.count(1),
                                    init=False, repr=False)
    # Bumped on every change of `requested_state`: caches of whole enumerations that
    # show it stay valid while it and the inventory's records are unchanged.
    requested_generation: int = field(default=0, init=False)
    _host_path: CIMInstanceName | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        # A system that vanished takes its RequestedState with it: one that appears
        # later with the same UUID is a new system and starts at 12 again.
        def forget(change) -> None:
            if change.kind == "deleted":
                self.forget_requests(change.uuid)
        self.inventory.subscribe(forget)

    # ---- RequestedState -------------------------------------------------------------

    def begin_request(self, uuid: str, value: int) -> int:
        """A RequestStateChange to `value` is about to act on `uuid`: show it now (so
        the inventory change the action causes, and the lifecycle indication built from
        it, already carry it); returns the ticket to hand to `end_request`."""
        ticket = next(self._tickets)
        self._requests.setdefault(uuid, {})[ticket] = value
        self.requested_state[uuid] = value
        self.requested_generation += 1
        return ticket

    def end_request(self, uuid: str, ticket: int, succeeded: bool) -> None:
        """The request `ticket` on `uuid` is over.

        Requests on one system may overlap (two clients), so RequestedState shows the
        newest request that has not failed: one still in progress, or else the last
        that succeeded (none: 12). A failure withdraws its own value only; it never
        puts back what it saw before, which would clobber a later request's value.
        """
        pending = self._requests.get(uuid)
        value = pending.pop(ticket, None) if pending is not None else None
        if value is None:
            return              # the system went away meanwhile (forget_requests)
        if not pending:
            del self._requests[uuid]
        if succeeded:
            last = self._succeeded.get(uuid)
            if last is None or last[0] < ticket:
                self._succeeded[uuid] = (ticket, value)
        shown = list((pending or {}).items())
        if uuid in self._succeeded:
            shown.append(self._succeeded[uuid])
        if shown:
            self.requested_state[uuid] = max(shown)[1]
        else:
            self.requested_state.pop(uuid, None)
        self.requested_generation += 1

    def forget_requests(self, uuid: str) -> None:
        """`uuid` is gone: its RequestedState and its requests in progress with it."""
        self.requested_state.pop(uuid, None)
        self._requests.pop(uuid, None)
        self._succeeded.pop(uuid, None)
        self.requested_generation += 1

    @property
    def ns(self) -> Namespace:
        return self.repo.namespace(VIRT_NS)

    def cls(self, name: str, namespace: str = VIRT_NS) -> CIMClass:
        return self.repo.namespace(namespace).get(name)

    def host_path(self) -> CIMInstanceName:
        """The host's path: one object, shared by every instance that refers to the
        host (10,000 HostedDependency instances need not hold 10,000 copies); paths
        are never changed once handed out (wbem/provider.py)."""
        path = self._host_path
        if path is None:
            path = self._host_path = CIMInstanceName(
                HOST_CLASS, {"CreationClassName": HOST_CLASS, "Name": self.host},
                namespace=VIRT_NS)
        return path

    def vsms_path(self) -> CIMInstanceName:
        return CIMInstanceName(VSMS_CLASS, {
            "SystemCreationClassName": HOST_CLASS, "SystemName": self.host,
            "CreationClassName": VSMS_CLASS, "Name": VSMS_NAME}, namespace=VIRT_NS)

    @staticmethod
    def _system_uuid(keys: Mapping[str, Any]) -> str | None:
        """The UUID a VIRT_ComputerSystem's keys (CreationClassName, Name) name, or None.
        The key is the canonical form itself: "{...}", "urn:uuid:...", upper case or no
        dashes name no instance (else two paths would name one system)."""
        name = keys.get("Name")
        uuid = canonical_uuid(name)
        if keys.get("CreationClassName") != CS_CLASS or uuid is None or uuid != name:
            return None
        return uuid

    def record_named(self, keys: Mapping[str, Any]):
        """The record of a VIRT_ComputerSystem's keys, or None (record_for's lookup
        without its errors)."""
        uuid = self._system_uuid(keys)
        return None if uuid is None else self.inventory.get(uuid)

    def record_for(self, path: CIMInstanceName):
        """The inventory record a VIRT_ComputerSystem path names; CIM_ERR_NOT_FOUND else."""
        kb = path.keybindings
        uuid = self._system_uuid(kb)
        if uuid is None:
            raise CIMError(pywbem.CIM_ERR_NOT_FOUND, f"no virtual system {kb.get('Name')!r}")
        rec = self.inventory.get(uuid)
        if rec is None:
            why = ""
            if self.manager is not None and not self.manager.present:
                why = ("; no org.example.virt.Manager is on the bus, so no passive "
                       "system is known now")
            raise CIMError(pywbem.CIM_ERR_NOT_FOUND, f"no virtual system with UUID {uuid}{why}")
        return rec

    def new_cache(self) -> "RecordCache":
        """A RecordCache that forgets a record when the inventory deletes it."""
        cache = RecordCache()

        def on_change(change) -> None:
            if change.kind == "deleted":
                cache.drop(change.uuid)
        self.inventory.subscribe(on_change)
        return cache

    def require_manager(self) -> DefinitionSource:
        if self.manager is None or not self.manager.present:
            raise CIMError(pywbem.CIM_ERR_FAILED,
                           "no org.example.virt.Manager is on the bus; passive domains "
                           "cannot be started, defined or changed now")
        return self.manager

    def require_libvirt(self) -> RunningSource:
        if self.libvirt is None or not self.libvirt.connected:
            raise CIMError(pywbem.CIM_ERR_FAILED, "libvirt is not connected")
        return self.libvirt

    async def settle_running(self, uuid: str) -> None:
        """Read one domain from libvirt again so the inventory shows an action's result.

        When that read fails or times out the result may not show yet: CIM_ERR_FAILED
        with libvirt's reason, rather than a success the next read contradicts.
        """
        if self.libvirt is not None:
            try:
                await self.libvirt.refresh(uuid)
            except SourceError as exc:
                raise CIMError(pywbem.CIM_ERR_FAILED, f"cannot read {uuid} back from "
                               f"libvirt to show the result: {exc.message}") from None

    async def settle_defined(self, started: str | None = None) -> None:
        """Re-read the Manager's list so a start/define/undefine/update shows at once.
        `started`: the UUID just started through it (see DefinitionSource.refresh)."""
        if self.manager is not None:
            await self.manager.refresh(started)


class RecordCache:
    """Instances derived from one record, rebuilt only when the record changes.

    Keyed by uuid, then by what was built; valid while the record's version (and any
    extra state folded into `stamp`) is unchanged. Instances are never mutated once
    built, so the dispatcher may cache their rendered XML too. A deleted record's
    entries are dropped (Backend.new_cache wires that to the change feed).
    """

    def __init__(self) -> None:
        # uuid -> (what, stamp, value) while one thing is cached for the uuid (the
        # common case: no dict per record), else what -> (stamp, value)
        self._data: dict[str, Any] = {}

    def get(self, key: tuple[str, str], stamp: Any, build: Callable[[], Any]) -> Any:
        uuid, what = key
        per = self._data.get(uuid)
        if per is not None:
            if type(per) is tuple:
                if per[0] == what and per[1] == stamp:
                    return per[2]
            else:
                hit = per.get(what)
                if hit is not None and hit[0] == stamp:
                    return hit[1]
        value = build()
        if per is None or (type(per) is tuple and per[0] == what):
            self._data[uuid] = (what, stamp, value)
        elif type(per) is tuple:
            self._data[uuid] = {per[0]: (per[1], per[2]), what: (stamp, value)}
        else:
            per[what] = (stamp, value)
        return value

    def drop(self, uuid: str) -> None:
        self._data.pop(uuid, None)


def make(backend: Backend, classname: str, values: dict[str, Any],
         path: CIMInstanceName) -> CIMInstance:
    return build_instance(backend.cls(classname, path.namespace or VIRT_NS), values, path)
