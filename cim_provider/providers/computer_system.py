"""VIRT_ComputerSystem (one per domain) and its VIRT_EnabledLogicalElementCapabilities.

Converters: `system_path(uuid)` / Backend.record_for(path) between CIM paths and
inventory keys, `system_values(record)` from a record to properties. The state
mapping and RequestStateChange follow the tables in docs/architecture.md ("States", "RequestStateChange").
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import pywbem
from pywbem import CIMError, CIMInstance, CIMInstanceName

from ..domain.records import DomainRecord, Kind, RunState
from ..domain.sources import SourceError
from ..wbem.provider import Provider
from .backend import CS_CLASS, VIRT_NS, Backend, make

log = logging.getLogger(__name__)

ELEC_CLASS = "VIRT_EnabledLogicalElementCapabilities"

# EnabledState values (CIM_EnabledLogicalElement)
ENABLED, DISABLED, SHUTTING_DOWN, OFFLINE, QUIESCE = 2, 3, 4, 6, 9
# RequestStateChange return codes (DSP1057 / CIM_EnabledLogicalElement)
RC_OK, RC_NOT_SUPPORTED, RC_INVALID_TRANSITION, RC_TIMEOUT_NOT_SUPPORTED = 0, 1, 4097, 4098

# docs/architecture.md "States": libvirt state -> (EnabledState, OperationalStatus, HealthState)
_STATE_MAP: dict[RunState, tuple[int, list[int], int]] = {
    RunState.RUNNING: (ENABLED, [2], 5),
    RunState.BLOCKED: (ENABLED, [2], 5),
    RunState.PAUSED: (QUIESCE, [2], 5),
    RunState.SHUTDOWN: (SHUTTING_DOWN, [2], 5),
    RunState.CRASHED: (DISABLED, [6], 20),
    RunState.PMSUSPENDED: (OFFLINE, [2], 5),
    RunState.SHUTOFF: (DISABLED, [2], 5),
    RunState.NOSTATE: (ENABLED, [2], 5),
}
_PASSIVE = (DISABLED, [2], 5)

_KIND_TEXT = {Kind.RUNNING_ONLY: "running, no defined configuration (transient)",
              Kind.PASSIVE_ONLY: "defined, not running",
              Kind.BOTH: "running, with a defined configuration"}


def _nonzero_interval(value: Any) -> bool:
    """True unless `value` is a zero interval (a timestamp is never 'zero')."""
    return not (getattr(value, "is_interval", False) and not value.timedelta)


def system_path(uuid: str) -> CIMInstanceName:
    return CIMInstanceName(CS_CLASS, {"CreationClassName": CS_CLASS, "Name": uuid},
                           namespace=VIRT_NS)


def state_of(rec: DomainRecord) -> tuple[int, list[int], int]:
    if rec.running is None:
        return _PASSIVE
    return _STATE_MAP.get(rec.running.state, _STATE_MAP[RunState.RUNNING])


def states_supported(rec: DomainRecord) -> list[int]:
    """RequestStateChange values that make sense from the current state."""
    if rec.running is None:
        return [ENABLED]
    st = rec.running.state
    if st == RunState.PAUSED:
        return [ENABLED, DISABLED, 10, 11]
    if st in (RunState.RUNNING, RunState.BLOCKED, RunState.NOSTATE):
        return [DISABLED, 4, QUIESCE, 10, 11]
    return [DISABLED]


def system_values(rec: DomainRecord, requested: int) -> dict[str, Any]:
    cfg = rec.current
    enabled, opstatus, health = state_of(rec)
    autostart = rec.defined.autostart if rec.defined is not None else cfg.autostart
    return {
        "CreationClassName": CS_CLASS, "Name": rec.uuid,
        "ElementName": rec.name,
        "Caption": cfg.title or rec.name,
        "Description": f"Virtual system {rec.name}: {_KIND_TEXT[rec.kind]}",
        "NameFormat": "Other",
        "OtherIdentifyingInfo": [rec.uuid], "IdentifyingDescriptions": ["UUID"],
        "Dedicated": [0],
        "EnabledState": enabled, "RequestedState": requested,
        "EnabledDefault": 7 if autostart is None else (ENABLED if autostart else DISABLED),
        "OperationalStatus": opstatus, "HealthState": health,
        "PrimaryStatus": 1 if health == 5 else 3,
    }


class ComputerSystemProvider(Provider):
    namespace = VIRT_NS
    classnames = (CS_CLASS,)

    def __init__(self, backend: Backend):
        self.b = backend
        self._cache = backend.new_cache()

    def instance(self, rec: DomainRecord) -> CIMInstance:
        req = self.b.requested_state.get(rec.uuid, 12)
        return self._cache.get((rec.uuid, "cs"), (rec.version, req), lambda: make(
            self.b, CS_CLASS, system_values(rec, req), system_path(rec.uuid)))

    async def enumerate_instances(self, classname: str) -> Iterable[CIMInstance]:
        return [self.instance(r) for r in self.b.inventory.records()]

    async def enumerate_instance_names(self, classname: str) -> Iterable[CIMInstanceName]:
        return [self.instance(r).path for r in self.b.inventory.records()]

    async def get_instance(self, path: CIMInstanceName) -> CIMInstance:
        return self.instance(self.b.record_for(path))

    async def invoke_method(self, target, method: str, params: Mapping[str, Any]):
        if method != "RequestStateChange" or not isinstance(target, CIMInstanceName):
            return await super().invoke_method(target, method, params)
        return await self.request_state_change(target, params), {}

    async def request_state_change(self, target: CIMInstanceName,
                                   params: Mapping[str, Any]) -> int:
        """docs/architecture.md, "RequestStateChange" table."""
        requested = params.get("RequestedState")
        # CIM_EnabledLogicalElement.RequestStateChange: ValueMap 2,3,4,6,7,8,9,10,11 and
        # the vendor range 32768..65535; anything else (or nothing) is not a valid value.
        if requested is None:
            raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER, "RequestedState is required")
        requested = int(requested)
        if requested not in (2, 3, 4, 6, 7, 8, 9, 10, 11) and not 32768 <= requested <= 65535:
            raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                           f"RequestedState {requested} is not a value of its ValueMap")
        if requested in (6, 7, 8) or requested >= 32768:
            return RC_NOT_SUPPORTED
        # CIM_EnabledLogicalElement.RequestStateChange, TimeoutPeriod: "If this property
        # does not contain 0 or null and the implementation does not support this
        # parameter, a return code of 'Use Of Timeout Parameter Not Supported' shall be
        # returned." Every action already runs under the server's own timeout.
        timeout = params.get("TimeoutPeriod")
        if timeout is not None and _nonzero_interval(timeout):
            return RC_TIMEOUT_NOT_SUPPORTED
        rec = self.b.record_for(target)
        if requested not in states_supported(rec):
            return RC_INVALID_TRANSITION
        uuid = rec.uuid
        # Shown before acting, so the inventory change the action causes (and the
        # lifecycle indication built from it) already carries the new RequestedState;
        # withdrawn if the action fails, without touching what a request on the same
        # system that overlaps this one has recorded (Backend.end_request).
        ticket = self.b.begin_request(uuid, requested)
        succeeded = False
        try:
            if rec.running is None:                      # 2 from passive: through the Manager
                manager = self.b.require_manager()
                try:
                    new_uuid = await manager.start_domain(uuid)
                except SourceError as exc:
                    log.info("Manager refused to start %s: %s", uuid, exc)
                    raise CIMError(pywbem.CIM_ERR_FAILED, f"the Manager did not start "
                                   f"{rec.name}: {exc.message}") from None
                await self.b.settle_running(new_uuid or uuid)
                if new_uuid and new_uuid != uuid:
                    await self.b.settle_running(uuid)
                # The Manager's set just changed: running first (so the system never
                # looks gone), then its list, so the next read shows the twin or not.
                await self.b.settle_defined(started=uuid)
            else:
                src = self.b.require_libvirt()
                action, act = {ENABLED: ("resume", src.resume), DISABLED: ("destroy", src.destroy),
                               4: ("shutdown", src.shutdown), QUIESCE: ("suspend", src.suspend),
                               10: ("reboot", src.reboot), 11: ("reset", src.reset)}[requested]
                try:
                    await act(uuid)
                except SourceError as exc:
                    raise CIMError(pywbem.CIM_ERR_FAILED,
                                   f"libvirt could not {action} {rec.name}: {exc.message}") from None
                await self.b.settle_running(uuid)
            succeeded = True
        finally:
            self.b.end_request(uuid, ticket, succeeded)
        return RC_OK


class CapabilitiesProvider(Provider):
    """One VIRT_EnabledLogicalElementCapabilities per system: what it accepts now."""
    namespace = VIRT_NS
    classnames = (ELEC_CLASS,)
    PREFIX = "VIRT:ELEC:"

    def __init__(self, backend: Backend):
        self.b = backend
        self._cache = backend.new_cache()

    @classmethod
    def path(cls, uuid: str) -> CIMInstanceName:
        return CIMInstanceName(ELEC_CLASS, {"InstanceID": cls.PREFIX + uuid}, namespace=VIRT_NS)

    def instance(self, rec: DomainRecord) -> CIMInstance:
        return self._cache.get((rec.uuid, "elec"), rec.version, lambda: make(self.b, ELEC_CLASS, {
            "InstanceID": self.PREFIX + rec.uuid,
            "ElementName": f"Capabilities of {rec.name}",
            "RequestedStatesSupported": states_supported(rec),
            "ElementNameEditSupported": False, "StateAwareness": None,
        }, self.path(rec.uuid)))

    async def enumerate_instances(self, classname: str) -> Iterable[CIMInstance]:
        return [self.instance(r) for r in self.b.inventory.records()]

    async def get_instance(self, path: CIMInstanceName) -> CIMInstance:
        iid = path.keybindings.get("InstanceID")
        rec = None
        if isinstance(iid, str) and iid.startswith(self.PREFIX):
            rec = self.b.inventory.get(iid[len(self.PREFIX):])
        if rec is None:
            raise CIMError(pywbem.CIM_ERR_NOT_FOUND, f"no capabilities {iid!r}")
        return self.instance(rec)
