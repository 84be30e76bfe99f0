"""VIRT_ComputerSystem (one per domain) and its VIRT_EnabledLogicalElementCapabilities.

Converters: `system_path(uuid)` / Backend.record_for(path) between CIM paths and
inventory keys, `system_values(record)` from a record to properties. The state
mapping and RequestStateChange follow the tables in docs/architecture.md ("States", "RequestStateChange").
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pywbem
from pywbem import CIMError, CIMInstance, CIMInstanceName

from ..domain.records import DomainRecord, Kind, RunState, canonical_uuid
from ..domain.sources import SourceError, Timeout
from ..wbem.instance import split_values
from ..wbem.render import instance_xml_of
from ..wbem.writer import esc
from ..wbem.provider import Instance, Provider
from .backend import CS_CLASS, VIRT_NS, Backend, make
from .evidence import follow_state
from .jobs import (EVIDENCE, LIBVIRT, MANAGER, RC_JOB_STARTED, Jobs, job_path, libvirt_abort,
                   set_phase)

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
# Not running, and libvirt stopped it on a failure (DomainRecord.stop_reason).
_CRASHED = (DISABLED, [6], 20)
_PERSISTENT_TEXT = "running, definition held by libvirt; the Manager is not on the bus"

_KIND_TEXT = {Kind.RUNNING_ONLY: "running, no defined configuration (transient)",
              Kind.PASSIVE_ONLY: "defined, not running",
              Kind.BOTH: "running, with a defined configuration"}


def _nonzero_interval(value: Any) -> bool:
    """True unless `value` is a zero interval (a timestamp is never 'zero')."""
    return not (getattr(value, "is_interval", False) and not value.timedelta)


_CS_KEYS = ("CreationClassName", "Name")


def system_path(uuid: str) -> CIMInstanceName:
    return CIMInstanceName(CS_CLASS, {"CreationClassName": CS_CLASS, "Name": uuid},
                           namespace=VIRT_NS)


def state_of(rec: DomainRecord) -> tuple[int, list[int], int]:
    if rec.running is None:
        return _CRASHED if rec.stop_reason else _PASSIVE
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
    return _values(rec.uuid, rec.name, rec.current.title, _kind_text(rec), state_of(rec),
                   requested, _autostart(rec), rec.stop_reason if rec.running is None else None)


def _autostart(rec: DomainRecord) -> bool | None:
    """The defined configuration's flag when there is one, else the live one's."""
    return rec.defined.autostart if rec.defined is not None else rec.current.autostart


def _kind_text(rec: DomainRecord) -> str:
    if rec.kind is Kind.RUNNING_ONLY and rec.running is not None and rec.running.persistent:
        return _PERSISTENT_TEXT
    return _KIND_TEXT[rec.kind]


def _values(uuid: str, name: str, title: str | None, kind: str,
            state: tuple[int, list[int], int], requested: int, autostart: bool | None,
            stop_reason: str | None) -> dict[str, Any]:
    enabled, opstatus, health = state
    return {
        "CreationClassName": CS_CLASS, "Name": uuid,
        "ElementName": name,
        "Caption": title or name,
        "Description": f"Virtual system {name}: {kind}",
        "NameFormat": "Other",
        "OtherIdentifyingInfo": [uuid], "IdentifyingDescriptions": ["UUID"],
        "Dedicated": [0],
        "EnabledState": enabled, "RequestedState": requested,
        "EnabledDefault": 7 if autostart is None else (ENABLED if autostart else DISABLED),
        "OperationalStatus": opstatus, "HealthState": health,
        "PrimaryStatus": 1 if health == 5 else 3,
        "StatusDescriptions": [stop_reason] if stop_reason else None,
    }


# A system's INSTANCE written from a template per class and kind of record (issue 16:
# start-up renders 10,000 of them before the first enumeration answers, ~20 µs each the
# general way). A template is what render.py writes for the values of `_values` with
# three markers in place of the UUID, the name and the title, turned into a format
# string (its own braces doubled, each marker a numbered field); a system is its
# template formatted with the three values escaped (writer.esc works character by
# character, so escaping a value inside a string equals escaping the pieces). The
# markers are private-use characters that esc leaves alone; no fixed text holds them.
_MARK_UUID, _MARK_NAME, _MARK_TITLE = "\ue000U\ue001", "\ue000N\ue001", "\ue000T\ue001"
_FIELDS = {_MARK_UUID: "{0}", _MARK_NAME: "{1}", _MARK_TITLE: "{2}"}
_MARKS = re.compile("(\ue000[UNT]\ue001)")
_TEMPLATES: dict[tuple, tuple[Any, str]] = {}
_TEMPLATES_MAX = 256           # kinds of record x states x RequestedState: a few dozen


def _template(cls: Any, key: tuple) -> str:
    """The INSTANCE text for `key` (see system_body) as a format string: field 0 the
    UUID, 1 the name, 2 the title."""
    hit = _TEMPLATES.get(key)
    if hit is not None and hit[0] is cls:
        return hit[1]
    _cls_id, titled, kind, state, requested, autostart = key
    values = _values(_MARK_UUID, _MARK_NAME, _MARK_TITLE if titled else None, kind,
                     (state[0], list(state[1]), state[2]), requested, autostart, None)
    pieces = _MARKS.split(instance_xml_of(CS_CLASS, *split_values(cls, values)))
    # fixed text at even indexes, markers at odd ones
    template = "".join(_FIELDS[p] if i % 2 else p.replace("{", "{{").replace("}", "}}")
                       for i, p in enumerate(pieces))
    if len(_TEMPLATES) >= _TEMPLATES_MAX:
        _TEMPLATES.clear()
    _TEMPLATES[key] = (cls, template)
    return template


def system_body(rec: DomainRecord, requested: int, cls: Any) -> str | None:
    """The INSTANCE text of the system of `rec` from its template; None when the
    general way has to write it (a stop reason shown, a value not a plain str)."""
    title, name = rec.current.title, rec.name
    if rec.stop_reason and rec.running is None or type(name) is not str \
            or type(rec.uuid) is not str or title and type(title) is not str:
        return None
    enabled, opstatus, health = state_of(rec)
    key = (id(cls), bool(title), _kind_text(rec), (enabled, tuple(opstatus), health),
           requested, _autostart(rec))
    return _template(cls, key).format(esc(rec.uuid), esc(name), esc(title) if title else "")


class SystemInstance(Instance):
    """A VIRT_ComputerSystem that keeps only its record, the RequestedState it shows
    and its class: properties and path are made from them when read, and the
    dispatcher keeps its rendered CIM-XML (wbem/instance.py). ~150 bytes beside the
    XML, where the pywbem objects took ~6 KB."""
    __slots__ = ("rec", "req", "cls")
    rec: DomainRecord | None         # None once written through (an ordinary instance)

    def __init__(self, rec: DomainRecord, req: int, cls: Any):
        self._blank(CS_CLASS)
        self.rec, self.req, self.cls = rec, req, cls

    def _is_lazy(self) -> bool:
        return self.rec is not None

    def shaped(self) -> Any:
        if self.rec is None:
            return None
        return split_values(self.cls, system_values(self.rec, self.req))

    def body_text(self) -> str | None:
        if self.rec is None or self.classname != CS_CLASS:
            return None
        return system_body(self.rec, self.req, self.cls)

    def _lazy_properties(self) -> Any:
        shaped = self.shaped()
        return None if shaped is None else shaped[0].properties(shaped[1])

    def _lazy_path(self) -> CIMInstanceName | None:
        return None if self.rec is None else system_path(self.rec.uuid)

    def path_namespace(self) -> str | None:
        return VIRT_NS if self.rec is not None else super().path_namespace()

    def path_parts(self) -> Any:
        if self.rec is None:
            return None
        return CS_CLASS, _CS_KEYS, (CS_CLASS, self.rec.uuid), VIRT_NS

    def _stop_lazy(self) -> None:
        self.rec = None

    def built_from(self) -> Any:
        return self.cls if self.rec is not None else None


class ComputerSystemProvider(Provider):
    namespace = VIRT_NS
    classnames = (CS_CLASS,)
    # Asked even for a system this server does not show: a farm system placed on
    # another host is left out of this host's lists, and a start of it answers
    # CIM_ERR_FAILED naming that host (`_startable`), else CIM_ERR_NOT_FOUND as usual.
    invokes_on_missing = frozenset({"requeststatechange"})

    def __init__(self, backend: Backend):
        self.b = backend
        # Long requests become jobs (providers/jobs.py) when set; a shutdown, reboot
        # or start not seen within `shutdown_timeout` seconds fails.
        self.jobs: Jobs | None = None
        self.shutdown_timeout = 300.0
        self._by_uuid: dict[str, SystemInstance] = {}
        # The last enumeration: (records tuple, RequestedState generation, instances).
        # The same tuple while neither changed, so the dispatcher reuses its rendering.
        self._all: tuple[Any, int, tuple[SystemInstance, ...]] | None = None

        def forget(change) -> None:
            if change.kind == "deleted":
                self._by_uuid.pop(change.uuid, None)
        backend.inventory.subscribe(forget)

    async def close(self) -> None:
        """The templates hold this server's class (see wbem/instance.forget_classes)."""
        _TEMPLATES.clear()

    def instance(self, rec: DomainRecord) -> CIMInstance:
        """The system of a record: the same object while the record (and the
        RequestedState shown) is unchanged."""
        req = self.b.requested_state.get(rec.uuid, 12)
        inst = self._by_uuid.get(rec.uuid)
        if inst is None or inst.rec is not rec or inst.req != req:
            inst = self._by_uuid[rec.uuid] = SystemInstance(rec, req, self.b.cls(CS_CLASS))
        return inst

    async def enumerate_instances(self, classname: str) -> Iterable[CIMInstance]:
        records = self.b.inventory.records()
        gen = self.b.requested_generation
        last = self._all
        if last is not None and last[0] is records and last[1] == gen:
            return last[2]
        out = tuple(self.instance(r) for r in records)
        self._all = (records, gen, out)
        return out

    async def enumerate_keys(self, classname: str) -> Sequence[Any]:
        """The inventory's tuple of records: a pull context makes the systems of each
        page when it is pulled (wbem/provider.py, instances_of)."""
        return self.b.inventory.records()

    async def instances_of(self, classname: str, keys: Sequence[Any], start: int,
                           stop: int) -> Sequence[CIMInstance]:
        """The systems of `keys[start:stop]` (records) as they are now; a record gone
        since is left out."""
        last, inv = self._all, self.b.inventory
        if last is not None and last[0] is keys and inv.records() is keys \
                and last[1] == self.b.requested_generation:
            return last[2][start:stop]           # nothing changed: the enumeration's own
        out = []
        for rec in keys[start:stop]:
            cur = inv.get(rec.uuid)
            if cur is not None:
                out.append(self.instance(cur))
        return out

    async def get_instance(self, path: CIMInstanceName) -> CIMInstance:
        return self.instance(self.b.record_for(path))

    def instance_by_keys(self, classname: str, keys: Mapping[str, str]) -> CIMInstance | None:
        rec = self.b.record_named(keys)
        return None if rec is None else self.instance(rec)

    async def invoke_method(self, target, method: str, params: Mapping[str, Any]):
        if method != "RequestStateChange" or not isinstance(target, CIMInstanceName):
            return await super().invoke_method(target, method, params)
        return await self._request_state_change(target, params)

    async def request_state_change(self, target: CIMInstanceName,
                                   params: Mapping[str, Any]) -> int:
        return (await self._request_state_change(target, params))[0]

    async def _request_state_change(self, target: CIMInstanceName,
                                    params: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        """docs/architecture.md, "RequestStateChange" table and "Jobs"."""
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
            return RC_NOT_SUPPORTED, {}
        # CIM_EnabledLogicalElement.RequestStateChange, TimeoutPeriod: "If this property
        # does not contain 0 or null and the implementation does not support this
        # parameter, a return code of 'Use Of Timeout Parameter Not Supported' shall be
        # returned." Every action already runs under the server's own timeout.
        timeout = params.get("TimeoutPeriod")
        if timeout is not None and _nonzero_interval(timeout):
            return RC_TIMEOUT_NOT_SUPPORTED, {}
        rec = await self._startable(target) if requested == ENABLED \
            else self.b.record_for(target)
        if requested not in states_supported(rec):
            return RC_INVALID_TRANSITION, {}
        uuid = rec.uuid
        # Shown before acting, so the inventory change the action causes (and the
        # lifecycle indication built from it) already carries the new RequestedState;
        # withdrawn if the action fails, without touching what a request on the same
        # system that overlaps this one has recorded (Backend.end_request).
        if rec.running is None:
            self.b.require_manager()
        else:
            self.b.require_libvirt()
        ticket = self.b.begin_request(uuid, requested)
        jobs = self.jobs
        work = self._change(rec, requested, ticket)
        if jobs is None:
            await work
            return RC_OK, {}
        job, _ = await jobs.run("RequestStateChange", uuid,
                                f"RequestStateChange({requested}) of {rec.name}", work)
        if job is None:
            return RC_OK, {}
        return RC_JOB_STARTED, {"Job": job_path(job.instance_id)}

    async def _startable(self, target: CIMInstanceName) -> DomainRecord:
        """The record a start (2) names; CIM_ERR_FAILED with the AlreadyRunning reason
        naming the host when a farm Manager has the definition placed already: on
        this host (it runs here, listed with `Host`) or on another (left out of this
        host's lists; GetDomain says where). So a start that loses a race gets the
        same answer whether or not its server saw the winner's start yet
        (docs/architecture.md, "RequestStateChange"; MANAGER.md, "Farm keys")."""
        manager = self.b.manager
        try:
            rec = self.b.record_for(target)
        except CIMError as exc:
            placement = getattr(manager, "placement", None)
            name = target.keybindings.get("Name")
            if (exc.status_code != pywbem.CIM_ERR_NOT_FOUND or placement is None
                    or manager is None or not manager.present or canonical_uuid(name) != name
                    or target.keybindings.get("CreationClassName") != CS_CLASS):
                raise
            host = await placement(name)
            if not host:
                raise
            raise CIMError(pywbem.CIM_ERR_FAILED, f"the Manager did not start {name}: it "
                           f"is already running on host {host}") from None
        placed_on = getattr(manager, "placed_on", None)
        placement = getattr(manager, "placement", None)
        if rec.running is not None and rec.defined is not None and placed_on is not None \
                and placement is not None and ENABLED not in states_supported(rec):
            # The list may not carry the placement yet (libvirt's event came first).
            host = placed_on(rec.uuid) or await placement(rec.uuid)
            if host:
                raise CIMError(pywbem.CIM_ERR_FAILED, f"the Manager did not start {rec.name}: "
                               f"{rec.name} ({rec.uuid}) is already running on host {host}")
        return rec

    async def _change(self, rec: DomainRecord, requested: int, ticket: int) -> None:
        """The state change itself, ended on evidence (providers/evidence.py,
        follow_state); a source call that times out is followed, not failed."""
        uuid = rec.uuid
        succeeded = False
        reboots = self.b.libvirt.reboots(uuid) if self.b.libvirt is not None else 0
        try:
            if rec.running is None:                      # 2 from passive: through the Manager
                manager = self.b.require_manager()
                set_phase(MANAGER)                       # a D-Bus call: cannot be stopped
                started: str | None = uuid
                try:
                    new_uuid = await manager.start_domain(uuid)
                except Timeout as exc:
                    if self.jobs is None:
                        raise CIMError(pywbem.CIM_ERR_FAILED, f"the Manager did not start "
                                       f"{rec.name}: {exc.message}") from None
                    log.info("StartDomain of %s: %s; following the domain", uuid, exc)
                    # Not known to have started: its definition stays until the
                    # Manager's list says otherwise (dropped at once, the system would
                    # look gone while that list is read).
                    new_uuid, started = uuid, None
                except SourceError as exc:
                    log.info("Manager refused to start %s: %s", uuid, exc)
                    raise CIMError(pywbem.CIM_ERR_FAILED, f"the Manager did not start "
                                   f"{rec.name}: {exc.message}") from None
                set_phase(EVIDENCE)          # the call is over: from here on, following
                await self._settle(new_uuid or uuid)
                if new_uuid and new_uuid != uuid:
                    await self._settle(uuid)
                # The Manager's set just changed: running first (so the system never
                # looks gone), then its list, so the next read shows the twin or not.
                await self.b.settle_defined(started=started)
            else:
                src = self.b.require_libvirt()
                action, act = {ENABLED: ("resume", src.resume), DISABLED: ("destroy", src.destroy),
                               4: ("shutdown", src.shutdown), QUIESCE: ("suspend", src.suspend),
                               10: ("reboot", src.reboot), 11: ("reset", src.reset)}[requested]
                set_phase(LIBVIRT, libvirt_abort(src, uuid))
                try:
                    await act(uuid)
                except Timeout as exc:
                    if self.jobs is None:
                        raise CIMError(pywbem.CIM_ERR_FAILED, f"libvirt could not {action} "
                                       f"{rec.name}: {exc.message}") from None
                    log.info("libvirt %s of %s: %s; following the domain", action, uuid, exc)
                except SourceError as exc:
                    raise CIMError(pywbem.CIM_ERR_FAILED,
                                   f"libvirt could not {action} {rec.name}: {exc.message}") from None
                set_phase(EVIDENCE)
                await self._settle(uuid)
            await follow_state(self.b, uuid, requested, timeout=self.shutdown_timeout,
                               from_passive=rec.running is None, reboots_before=reboots)
            succeeded = True
        finally:
            self.b.end_request(uuid, ticket, succeeded)
        if uuid not in self.b.requested_state and self.b.inventory.get(uuid) is not None:
            # The record went away and came back while the change was followed (the
            # Manager dropped its definition before libvirt showed the guest running):
            # the system is the same one, and this request succeeded.
            self.b.end_request(uuid, self.b.begin_request(uuid, requested), True)

    async def _settle(self, uuid: str) -> None:
        """Read the domain back. With jobs, a read that fails is retried in the
        background and the evidence is awaited anyway (follow_state); without, the
        failure is the answer (CIM_ERR_FAILED rather than a 0 the next read contradicts)."""
        try:
            await self.b.settle_running(uuid)
        except CIMError as exc:
            if self.jobs is None:
                raise
            log.info("%s; waiting for libvirt's events", exc.status_description)


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

    async def enumerate_keys(self, classname: str) -> Sequence[Any]:
        """The inventory's tuple of records (pull pages: wbem/provider.py)."""
        return self.b.inventory.records()

    async def instances_of(self, classname: str, keys: Sequence[Any], start: int,
                           stop: int) -> Sequence[CIMInstance]:
        inv = self.b.inventory
        return [self.instance(cur) for rec in keys[start:stop]
                if (cur := inv.get(rec.uuid)) is not None]

    async def get_instance(self, path: CIMInstanceName) -> CIMInstance:
        iid = path.keybindings.get("InstanceID")
        rec = None
        if isinstance(iid, str) and iid.startswith(self.PREFIX):
            rec = self.b.inventory.get(iid[len(self.PREFIX):])
        if rec is None:
            raise CIMError(pywbem.CIM_ERR_NOT_FOUND, f"no capabilities {iid!r}")
        return self.instance(rec)
