"""VIRT_VirtualSystemManagementService (+ its Capabilities): define, destroy, modify.

Every change of a definition goes through the Manager (DefineDomain,
UndefineDomain, UpdateDomain), so the tool that owns definitions keeps its policy;
disks and NICs of a running system change through libvirt (hot-plug, hotplug.py:
AddResourceSettings, RemoveResourceSettings, the device part of
ModifyResourceSettings). Converters: `definition_from_settings` (embedded VSSD + RASDs
-> the Manager's DefineDomain dict) and `changes_from_*` (ModifySystemSettings /
ModifyResourceSettings -> UpdateDomain changes).

Every method checks its input first (bad input is an error at once, never a job), then
runs the change itself through Jobs.run (`run_job`): 0 with its output parameters when
it is done within `sync_wait`, else 4096 and a VIRT_ConcreteJob whose
VIRT_AffectedJobElement names the systems changed (docs/architecture.md, "Jobs").
"""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Coroutine, Iterable, Mapping
from typing import Any, TypeVar

import pywbem
from pywbem import CIMError, CIMInstance, CIMInstanceName

from ..domain.sources import NotFound, NotSupported, SourceError
from ..wbem.provider import Provider, path_key
from .backend import VIRT_NS, VSMS_CLASS, Backend, make
from .computer_system import system_path
from .health import Health, health_of
from .hotplug import HotPlug, rasd_path
from .jobs import (LIBVIRT, MANAGER, RC_JOB_STARTED, Jobs, MethodReturn, affects, job_path,
                   set_phase)
from .settings import RASD_CLASS, RT_DISK, RT_DVD, RT_ETHERNET, RT_FLOPPY, RT_MEMORY, RT_PROCESSOR, split_iid
from .templates import Templates

log = logging.getLogger(__name__)
_T = TypeVar("_T")

VSMC_CLASS = "VIRT_VirtualSystemManagementCapabilities"
VSMC_IID = "VIRT:VirtualSystemManagementCapabilities"
RC_OK, RC_NOT_SUPPORTED = 0, 1
Outcome = tuple[int, dict[str, Any]]
# VIRT_VirtualSystemManagementCapabilities.*MethodsSupported: DefineSystem 2,
# DestroySystem 3, ModifyResourceSettings 5, ModifySystemSettings 6,
# RemoveResourceSettings 7, AddResourceSettings 10. Each answers 0 when done within
# --sync-wait (synchronously) and 4096 with a job otherwise (asynchronously).
METHODS_SUPPORTED = [2, 3, 5, 6, 7, 10]
# the EmbeddedInstance classes of the methods' parameters
VSSD_BASE, RASD_BASE = "CIM_VirtualSystemSettingData", "CIM_ResourceAllocationSettingData"
_UNIT_KIB = {"byte*2^10": 1, "kilobytes": 1, "kb": 1, "byte*2^20": 1024, "megabytes": 1024,
             "mb": 1024, "byte*2^30": 1024 ** 2, "gigabytes": 1024 ** 2, "gb": 1024 ** 2,
             "byte": None}


def vsmc_path() -> CIMInstanceName:
    return CIMInstanceName(VSMC_CLASS, {"InstanceID": VSMC_IID}, namespace=VIRT_NS)


def _memory_kib(rasd: CIMInstance) -> int | None:
    qty = rasd.get("VirtualQuantity")
    if qty is None:
        return None
    units = (rasd.get("AllocationUnits") or rasd.get("VirtualQuantityUnits") or "byte*2^10")
    unit = "".join(units.split()).lower()       # DSP0004 writes "byte * 2^10" too
    factor = _UNIT_KIB.get(unit)
    if unit == "byte":
        return int(qty) // 1024
    if factor is None:
        raise ValueError(f"memory AllocationUnits {units!r} not understood")
    return int(qty) * factor


def _autostart(vssd: CIMInstance) -> bool | None:
    action = vssd.get("AutomaticStartupAction")
    return None if action is None else int(action) in (3, 4)


def definition_from_settings(vssd: CIMInstance, rasds: list[CIMInstance]) -> dict[str, Any]:
    """Embedded VSSD + RASDs -> the Manager's DefineDomain dict (contract keys)."""
    name = vssd.get("ElementName") or vssd.get("VirtualSystemIdentifier")
    if not name:
        raise ValueError("SystemSettings needs ElementName (the domain name)")
    out: dict[str, Any] = {"Name": str(name)}
    if vssd.get("VirtualSystemType"):
        out["Type"] = str(vssd["VirtualSystemType"])
    if _autostart(vssd) is not None:
        out["Autostart"] = _autostart(vssd)
    disks: list[dict[str, Any]] = []
    nics: list[dict[str, Any]] = []
    for i, r in enumerate(rasds):
        try:
            _add_resource(out, disks, nics, r)
        except ValueError as exc:
            raise ValueError(f"ResourceSettings[{i}]: {exc}") from None
    if disks:
        out["Disks"] = disks
    if nics:
        out["NICs"] = nics
    return out


def _at_least_one(what: str, value: int) -> int:
    if value < 1:
        raise ValueError(f"{what} must be at least 1, not {value}")
    return value


def _add_resource(out: dict[str, Any], disks: list, nics: list, r: CIMInstance) -> None:
    """One embedded RASD of DefineSystem into the DefineDomain dict."""
    rt = r.get("ResourceType")
    rt = int(rt) if rt is not None else None
    if rt == RT_PROCESSOR:
        if r.get("VirtualQuantity") is not None:
            out["VCPUs"] = _at_least_one("the number of processors (VirtualQuantity)",
                                         int(r["VirtualQuantity"]))
    elif rt == RT_MEMORY:
        kib = _memory_kib(r)
        if kib is not None:
            out["MemoryKiB"] = _at_least_one("memory in KiB (VirtualQuantity)", kib)
            out["MaxMemoryKiB"] = max(kib, _memory_kib_limit(r) or 0)
    elif rt in (RT_DISK, RT_DVD, RT_FLOPPY):
        target = r.get("Address") or r.get("ElementName")
        if not target:
            raise ValueError("a disk RASD needs Address (the target device, e.g. vda)")
        disk: dict[str, Any] = {"Target": str(target),
                                "Device": {RT_DVD: "cdrom", RT_FLOPPY: "floppy"}.get(rt, "disk")}
        if r.get("HostResource"):
            disk["Source"] = str(r["HostResource"][0])
        if r.get("ResourceSubType"):
            disk["Bus"] = str(r["ResourceSubType"])
        if r.get("VirtualQuantity") is not None and (r.get("AllocationUnits") or "byte") == "byte":
            disk["CapacityBytes"] = int(r["VirtualQuantity"])
        disks.append(disk)
    elif rt == RT_ETHERNET:
        mac = r.get("Address")
        if not mac:
            raise ValueError("a NIC RASD needs Address (the MAC address)")
        nic: dict[str, Any] = {"MAC": str(mac).lower()}
        src = (r.get("Connection") or r.get("HostResource") or [None])[0]
        if src:
            nic["Source"] = str(src)
            nic["Type"] = "network"
        if r.get("ResourceSubType"):
            nic["Model"] = str(r["ResourceSubType"])
        nics.append(nic)
    else:
        raise ValueError(f"ResourceType {rt} is not supported (3, 4, 10, 14, 16, 17 are)")


def _defined_only(name: str, parts: tuple[str, str, str | None]) -> None:
    """Changes go to the Manager's definition: a live ("state") configuration is not
    something a client can modify here, and must not silently change the definition."""
    uuid, which, _dev = parts
    if which != "defined":
        raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                       f"{name}: VIRT:state:{uuid} is the live configuration of a running "
                       f"system and cannot be modified; modify its definition "
                       f"VIRT:defined:{uuid} instead")


def _memory_kib_limit(r: CIMInstance) -> int | None:
    lim = r.get("Limit")
    if lim is None:
        return None
    clone = r.copy()
    clone["VirtualQuantity"] = lim
    return _memory_kib(clone)


class ManagementServiceProvider(Provider):
    namespace = VIRT_NS
    classnames = (VSMS_CLASS, VSMC_CLASS)

    def __init__(self, backend: Backend):
        self.b = backend
        self._service_values = {
            **backend.vsms_path().keybindings,
            "ElementName": "Virtual system management", "Caption": "Virtual system management",
            "Description": "Defines, destroys and modifies virtual systems through the "
                           "org.example.virt.Manager",
            "EnabledState": 2, "RequestedState": 12, "EnabledDefault": 2, "Started": True}
        self._service: CIMInstance | None = None
        self._service_health: Health | None = None
        self._caps = make(backend, VSMC_CLASS, {
            "InstanceID": VSMC_IID, "ElementName": "Virtual system management capabilities",
            "SynchronousMethodsSupported": METHODS_SUPPORTED,
            "AsynchronousMethodsSupported": METHODS_SUPPORTED,
            "VirtualSystemTypesSupported": ["KVM", "QEMU", "Xen", "LXC", "Test"],
        }, vsmc_path())
        self.hotplug = HotPlug(backend, self._embedded, self._manager_call, self.run_job)
        # the Manager's templates: reference configurations for DefineSystem
        self.templates = Templates(backend)
        # Where the methods become jobs (virt_providers hands in the server's Jobs);
        # None: they run synchronously.
        self.jobs: Jobs | None = None

    async def run_job(self, method: str, uuids: list[str], title: str,
                      work: Coroutine[Any, Any, Outcome]) -> Outcome:
        """Run a method's checked change (docs/architecture.md, "Jobs"): its own
        (return code, output) when done within sync_wait, else 4096 and `Job`. A
        change that ends Not Supported (1) after 4096 ends its job in Exception."""
        jobs = self.jobs
        if jobs is None:
            return await work

        async def checked() -> dict[str, Any]:
            rc, out = await work
            if rc != RC_OK:
                raise MethodReturn(rc, f"{method}: not supported (return code {rc}): the "
                                   "Manager or libvirt's driver does not offer this change")
            return out
        try:
            job, out = await jobs.run(method, uuids, title, checked())
        except MethodReturn as exc:
            return exc.rc, {}
        if job is None:
            return RC_OK, out
        return RC_JOB_STARTED, {"Job": job_path(job.instance_id)}

    def service(self) -> CIMInstance:
        """The service instance, showing the sources' health (rebuilt when it changes)."""
        health = health_of(self.b)
        if self._service is None or health != self._service_health:
            self._service = make(self.b, VSMS_CLASS, {**self._service_values,
                                                      **health.properties()},
                                 self.b.vsms_path())
            self._service_health = health
        return self._service

    async def enumerate_instances(self, classname: str) -> Iterable[CIMInstance]:
        return [self.service()] if classname.lower() == VSMS_CLASS.lower() else [self._caps]

    async def get_instance(self, path: CIMInstanceName) -> CIMInstance:
        for inst in await self.enumerate_instances(path.classname):
            if path_key(inst.path) == path_key(path):
                return inst
        raise CIMError(pywbem.CIM_ERR_NOT_FOUND, f"no {path.classname} with those keys")

    async def invoke_method(self, target, method: str, params: Mapping[str, Any]):
        if target.classname.lower() != VSMS_CLASS.lower():
            return await super().invoke_method(target, method, params)
        handler = {"DefineSystem": self.define_system, "DestroySystem": self.destroy_system,
                   "ModifySystemSettings": self.modify_system_settings,
                   "ModifyResourceSettings": self.modify_resource_settings,
                   "AddResourceSettings": self.hotplug.add_resource_settings,
                   "RemoveResourceSettings": self.hotplug.remove_resource_settings}.get(method)
        if handler is None:
            return await super().invoke_method(target, method, params)
        return await handler(params)

    def _embedded(self, name: str, value: Any, base: str) -> CIMInstance:
        """One embedded instance (the dispatcher parsed and typed it against the
        parameter's EmbeddedInstance class); it must be a `base`."""
        if not isinstance(value, CIMInstance) or not self.b.ns.is_subclass(value.classname, base):
            what = value.classname if isinstance(value, CIMInstance) else type(value).__name__
            raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                           f"{name}: an instance of {what} is not a {base}")
        return value

    @staticmethod
    async def _manager_call(what: str, call: Awaitable[_T]) -> _T:
        """Await one Manager call; its failures become CIM_ERR_FAILED with the Manager's
        reason, except NotSupported, which the caller turns into return code 1."""
        try:
            return await call
        except NotSupported:
            raise
        except SourceError as exc:
            raise CIMError(pywbem.CIM_ERR_FAILED, f"the Manager could not {what}: {exc.message}") from None

    async def define_system(self, params: Mapping[str, Any]):
        """DefineSystem: VSSD + RASDs -> Manager.DefineDomain; ResultingSystem out. With
        ReferenceConfiguration (a template VSSD), Manager.DefineFromTemplate (templates.py)."""
        if params.get("SystemSettings") is None:
            raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER, "SystemSettings is required")
        vssd = self._embedded("SystemSettings", params["SystemSettings"], VSSD_BASE)
        rasds = [self._embedded(f"ResourceSettings[{i}]", r, RASD_BASE)
                 for i, r in enumerate(params.get("ResourceSettings") or [])]
        name = vssd.get("ElementName") or vssd.get("VirtualSystemIdentifier") or "a system"
        title = f"DefineSystem of {name}"
        if params.get("ReferenceConfiguration") is not None:
            async def from_template() -> Outcome:
                set_phase(MANAGER)
                rc, out = await self.templates.define_system(
                    vssd, rasds, params["ReferenceConfiguration"])
                if out.get("ResultingSystem") is not None:
                    affects(out["ResultingSystem"]["Name"])
                return rc, out
            return await self.run_job("DefineSystem", [], title, from_template())
        try:
            definition = definition_from_settings(vssd, rasds)
        except (ValueError, TypeError) as exc:
            raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER, str(exc)) from None
        manager = self.b.require_manager()
        if not manager.offers("DefineDomain"):
            return RC_NOT_SUPPORTED, {}

        async def define() -> Outcome:
            set_phase(MANAGER)
            try:
                uuid = await self._manager_call("define the system",
                                                manager.define_domain(definition))
            except NotSupported:
                return RC_NOT_SUPPORTED, {}
            affects(uuid)           # VIRT_AffectedJobElement: the new system
            await self.b.settle_defined()
            return RC_OK, {"ResultingSystem": system_path(uuid)}
        return await self.run_job("DefineSystem", [], title, define())

    async def destroy_system(self, params: Mapping[str, Any]):
        """DestroySystem: undefine the Manager's definition, then destroy the running domain.

        The Manager is asked first: it may refuse (its policy, snapshots), and a refusal
        must leave the guest running and defined, untouched. Once the definition is gone,
        a running domain is only transient, so a failing destroy loses nothing either.
        """
        target = params.get("AffectedSystem")
        if target is None:
            raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER, "AffectedSystem is required")
        rec = self.b.record_for(target)
        src = self.b.require_libvirt() if rec.running is not None else None
        manager = self.b.require_manager() if rec.defined is not None else None
        if manager is not None and not manager.offers("UndefineDomain"):
            return RC_NOT_SUPPORTED, {}

        async def destroy() -> Outcome:
            if manager is not None:
                set_phase(MANAGER)
                try:
                    await self._manager_call("undefine the system",
                                             manager.undefine_domain(rec.uuid))
                except NotSupported:
                    return RC_NOT_SUPPORTED, {}
                await self.b.settle_defined()
            if src is not None:
                set_phase(LIBVIRT)   # the definition is gone already: no stopping here
                try:
                    await src.destroy(rec.uuid)
                except NotFound:
                    pass
                except SourceError as exc:
                    raise CIMError(pywbem.CIM_ERR_FAILED, f"libvirt could not destroy "
                                   f"{rec.name}: {exc.message}") from None
                await self.b.settle_running(rec.uuid)
            self.b.forget_requests(rec.uuid)
            return RC_OK, {}
        return await self.run_job("DestroySystem", [rec.uuid], f"DestroySystem of {rec.name}",
                                  destroy())

    def _updatable(self, uuid: str) -> str | None:
        """The name of the definition `uuid` when the Manager can update it, None when it
        does not offer UpdateDomain; CIM_ERR_NOT_FOUND without a definition."""
        rec = self.b.inventory.get(uuid)
        if rec is None or rec.defined is None:
            raise CIMError(pywbem.CIM_ERR_NOT_FOUND,
                           f"no defined configuration for {uuid}: only the Manager's "
                           "definitions can be modified")
        return rec.name if self.b.require_manager().offers("UpdateDomain") else None

    async def _update(self, uuid: str, changes: dict[str, Any]) -> int:
        """Manager.UpdateDomain (checked with _updatable before)."""
        if changes:
            manager = self.b.require_manager()
            set_phase(MANAGER)
            try:
                await self._manager_call("modify the system",
                                         manager.update_domain(uuid, changes))
            except NotSupported:
                return RC_NOT_SUPPORTED
            await self.b.settle_defined()
        return RC_OK

    async def modify_system_settings(self, params: Mapping[str, Any]):
        """ModifySystemSettings: ElementName and AutomaticStartupAction of a definition."""
        if params.get("SystemSettings") is None:
            raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER, "SystemSettings is required")
        vssd = self._embedded("SystemSettings", params["SystemSettings"], VSSD_BASE)
        parts = split_iid(vssd.get("InstanceID"))
        if parts is None or parts[2] is not None:
            raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                           "SystemSettings.InstanceID must name a VIRT_VirtualSystemSettingData")
        _defined_only("SystemSettings", parts)
        changes: dict[str, Any] = {}
        if vssd.get("ElementName") is not None:
            changes["Name"] = str(vssd["ElementName"])
        if _autostart(vssd) is not None:
            changes["Autostart"] = _autostart(vssd)
        name = self._updatable(parts[0])
        if name is None:
            return RC_NOT_SUPPORTED, {}

        async def modify() -> Outcome:
            return await self._update(parts[0], changes), {}
        return await self.run_job("ModifySystemSettings", [parts[0]],
                                  f"ModifySystemSettings of {name}", modify())

    async def modify_resource_settings(self, params: Mapping[str, Any]):
        """ModifyResourceSettings: vCPUs (proc) and memory (mem) of a definition; a disk's
        source and a NIC's link state (hotplug.py), of a definition or a running system."""
        settings = params.get("ResourceSettings")
        if not settings:
            raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER, "ResourceSettings is required")
        per_uuid: dict[str, dict[str, Any]] = {}
        devices: list[Any] = []
        paths = []
        for i, text in enumerate(settings):
            rasd = self._embedded(f"ResourceSettings[{i}]", text, RASD_BASE)
            parts = split_iid(rasd.get("InstanceID"))
            if parts is None or parts[2] is None:
                raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                               f"ResourceSettings[{i}].InstanceID: it must name a setting "
                               "(VIRT:state|defined:<uuid>/<proc, mem, target or MAC>)")
            if parts[2] not in ("proc", "mem"):
                rec, cfg, old, new = self.hotplug.device_change(rasd, parts,
                                                                f"ResourceSettings[{i}]")
                devices.append((rec, cfg, old, new, parts[1]))
                paths.append(rasd_path(parts[1], rec.uuid, new))
                continue
            _defined_only(f"ResourceSettings[{i}]", parts)
            if rasd.get("VirtualQuantity") is None:
                raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                               f"ResourceSettings[{i}]: VirtualQuantity is required")
            ch = per_uuid.setdefault(parts[0], {})
            try:
                if parts[2] == "proc":
                    ch["VCPUs"] = _at_least_one("the number of processors (VirtualQuantity)",
                                                int(rasd["VirtualQuantity"]))
                else:
                    qty, limit = _memory_kib(rasd), _memory_kib_limit(rasd)
                    assert qty is not None          # VirtualQuantity was checked above
                    kib = _at_least_one("memory in KiB (VirtualQuantity)", qty)
            except ValueError as exc:
                raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                               f"ResourceSettings[{i}]: {exc}") from None
            if parts[2] != "proc":
                ch["MemoryKiB"] = kib
                # The maximum follows: Limit when given (never below the memory), else
                # raised to the new memory if that is above it. Otherwise libvirt
                # refuses the change, or a start quietly caps the memory at the old max.
                known = self.b.inventory.get(parts[0])
                old_max = known.defined.max_memory_kib if known and known.defined else None
                if limit is not None:
                    ch["MaxMemoryKiB"] = max(kib, limit)
                elif old_max is not None and kib > old_max:
                    ch["MaxMemoryKiB"] = kib
            # proc and mem are always VIRT_ResourceAllocationSettingData, whatever
            # class (CIM_ResourceAllocationSettingData, say) the client embedded.
            paths.append(CIMInstanceName(RASD_CLASS, {"InstanceID": rasd["InstanceID"]},
                                         namespace=VIRT_NS))
        names = {}
        for uuid in per_uuid:
            name = self._updatable(uuid)
            if name is None:
                return RC_NOT_SUPPORTED, {}
            names[uuid] = name
        uuids = list(dict.fromkeys([rec.uuid for rec, *_ in devices] + list(per_uuid)))
        names.update({rec.uuid: rec.name for rec, *_ in devices})

        async def modify() -> Outcome:
            if devices:         # first: the likelier to fail (libvirt, the guest)
                rc = await self.hotplug.apply_device_changes(devices)
                if rc != RC_OK:
                    return rc, {}
            for uuid, changes in per_uuid.items():
                rc = await self._update(uuid, changes)
                if rc != RC_OK:
                    return rc, {}
            return RC_OK, {"ResultingResourceSettings": paths}
        return await self.run_job("ModifyResourceSettings", uuids, "ModifyResourceSettings of "
                                  + ", ".join(names[u] for u in uuids), modify())
