"""VIRT_VirtualSystemSettingData and its resource settings (RASD, SASD, EPASD).

A running domain has a "state" configuration (libvirt's live XML): InstanceID
`VIRT:state:<uuid>`; a domain the Manager holds has a "defined" one:
`VIRT:defined:<uuid>`. Each configuration has processor and memory RASDs, one SASD
per disk and one EPASD per NIC, with InstanceID `<VSSD InstanceID>/<device id>`.

Converters: `configs_of(record)` (record -> its configurations), `split_iid(iid)`
(InstanceID -> uuid, which, device), `vssd_values` / `device_settings` (config ->
properties).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pywbem
from pywbem import CIMError, CIMInstance, CIMInstanceName

from ..domain.records import DomainConfig, DomainRecord
from ..domain.records import canonical_uuid
from ..wbem.provider import Provider
from .backend import DEFINED_PREFIX, STATE_PREFIX, VIRT_NS, Backend, make

VSSD_CLASS = "VIRT_VirtualSystemSettingData"
RASD_CLASS = "VIRT_ResourceAllocationSettingData"
SASD_CLASS = "VIRT_StorageAllocationSettingData"
EPASD_CLASS = "VIRT_EthernetPortAllocationSettingData"

# DSP1041 ResourceType values
RT_PROCESSOR, RT_MEMORY, RT_ETHERNET, RT_FLOPPY, RT_DVD, RT_DISK = 3, 4, 10, 14, 16, 17
_DISK_TYPES = {"cdrom": RT_DVD, "floppy": RT_FLOPPY}


def vssd_iid(which: str, uuid: str) -> str:
    return (STATE_PREFIX if which == "state" else DEFINED_PREFIX) + uuid


def vssd_path(which: str, uuid: str) -> CIMInstanceName:
    return CIMInstanceName(VSSD_CLASS, {"InstanceID": vssd_iid(which, uuid)}, namespace=VIRT_NS)


def configs_of(rec: DomainRecord) -> list[tuple[str, DomainConfig]]:
    """("state", live config) when running, ("defined", Manager's) when it has one."""
    out = []
    if rec.running is not None:
        out.append(("state", rec.running.config))
    if rec.defined is not None:
        out.append(("defined", rec.defined))
    return out


def split_iid(iid: object) -> tuple[str, str, str | None] | None:
    """InstanceID -> (uuid, "state"|"defined", device id or None); None if not ours."""
    if not isinstance(iid, str):
        return None
    for which, prefix in (("state", STATE_PREFIX), ("defined", DEFINED_PREFIX)):
        if iid.startswith(prefix):
            rest = iid[len(prefix):]
            uuid_text, _, device = rest.partition("/")
            uuid = canonical_uuid(uuid_text)
            if uuid is None or uuid != uuid_text:
                return None
            return uuid, which, (device if _ else None)
    return None


def vssd_values(which: str, rec: DomainRecord, cfg: DomainConfig) -> dict[str, Any]:
    return {
        "InstanceID": vssd_iid(which, rec.uuid),
        "ElementName": cfg.name,
        "Caption": f"{'Live' if which == 'state' else 'Defined'} configuration of {cfg.name}",
        "Description": cfg.title,
        "VirtualSystemIdentifier": cfg.name,
        "VirtualSystemType": cfg.type,
        "ConfigurationName": which,
        "AutomaticStartupAction": None if cfg.autostart is None else (4 if cfg.autostart else 2),
        "ChangeableType": 0 if which == "state" else 1,
    }


def device_settings(base: str, cfg: DomainConfig) -> list[tuple[str, str, dict[str, Any]]]:
    """(class, device id, properties) for every resource of one configuration."""
    out: list[tuple[str, str, dict[str, Any]]] = [
        (RASD_CLASS, "proc", {
            "ResourceType": RT_PROCESSOR, "ElementName": "Processors",
            "AllocationUnits": "count", "VirtualQuantityUnits": "count",
            "VirtualQuantity": cfg.vcpus, "Reservation": cfg.vcpus,
            "Limit": cfg.max_vcpus or cfg.vcpus}),
        (RASD_CLASS, "mem", {
            "ResourceType": RT_MEMORY, "ElementName": "Memory",
            "AllocationUnits": "byte*2^10", "VirtualQuantityUnits": "byte*2^10",
            "VirtualQuantity": cfg.memory_kib, "Reservation": cfg.memory_kib,
            "Limit": cfg.max_memory_kib}),
    ]
    for d in cfg.disks:
        out.append((SASD_CLASS, d.target, {
            "ResourceType": _DISK_TYPES.get(d.device, RT_DISK),
            "ElementName": f"Disk {d.target}", "ResourceSubType": d.bus,
            "Address": d.target, "AddressOnParent": d.bus,
            "HostResource": [d.source] if d.source else None,
            "Format": d.format,
            "VirtualQuantity": d.capacity_bytes,
            "AllocationUnits": "byte" if d.capacity_bytes is not None else None,
            "VirtualQuantityUnits": "byte" if d.capacity_bytes is not None else None}))
    for n in cfg.nics:
        out.append((EPASD_CLASS, n.mac, {
            "ResourceType": RT_ETHERNET, "ElementName": f"NIC {n.mac}",
            "ResourceSubType": n.model, "Address": n.mac,
            "Connection": [n.source] if n.source else None,
            "HostResource": [n.source] if n.source else None,
            "OtherResourceType": n.type,
            "LinkState": 3 if (n.link_state or "").lower() == "down" else 2}))
    for _cls, dev, props in out:
        props["InstanceID"] = f"{base}/{dev}"
    return out


class SettingsProvider(Provider):
    """All four setting classes: they come from the same configurations."""
    namespace = VIRT_NS
    classnames = (VSSD_CLASS, RASD_CLASS, SASD_CLASS, EPASD_CLASS)

    CAPS_PREFIX = "VIRT:caps:"

    def __init__(self, backend: Backend):
        self.b = backend
        self._cache = backend.new_cache()
        # The capability settings of allocation.py (class -> instances), InstanceID
        # VIRT:caps:...; set when the allocation model is served.
        self.capabilities: Callable[[str], list[CIMInstance]] | None = None
        # The Manager's templates (templates.py: class -> instances), InstanceID
        # VIRT:template:<name>; set when the model is served.
        self.templates: Callable[[str], list[CIMInstance]] | None = None

    def _all(self, rec: DomainRecord) -> dict[str, list[CIMInstance]]:
        """Every setting instance of one record, by class (cached per record version)."""
        def build() -> dict[str, list[CIMInstance]]:
            out: dict[str, list[CIMInstance]] = {c: [] for c in self.classnames}
            for which, cfg in configs_of(rec):
                base = vssd_iid(which, rec.uuid)
                out[VSSD_CLASS].append(make(self.b, VSSD_CLASS, vssd_values(which, rec, cfg),
                                            vssd_path(which, rec.uuid)))
                for cls, _dev, props in device_settings(base, cfg):
                    path = CIMInstanceName(cls, {"InstanceID": props["InstanceID"]},
                                           namespace=VIRT_NS)
                    out[cls].append(make(self.b, cls, props, path))
            return out
        return self._cache.get((rec.uuid, "settings"), rec.version, build)

    def of_record(self, rec: DomainRecord, classname: str) -> list[CIMInstance]:
        return self._all(rec)[classname]

    async def enumerate_instances(self, classname: str) -> Iterable[CIMInstance]:
        cls = next(c for c in self.classnames if c.lower() == classname.lower())
        out: list[CIMInstance] = []
        for rec in self.b.inventory.records():
            out.extend(self._all(rec)[cls])
        if self.capabilities is not None:
            out.extend(self.capabilities(cls))
        if self.templates is not None:
            out.extend(self.templates(cls))
        return out

    def find(self, classname: str, iid: object) -> CIMInstance:
        if self.templates is not None and isinstance(iid, str) \
                and iid.startswith("VIRT:template:"):
            cls = next((c for c in self.classnames if c.lower() == classname.lower()), "")
            for inst in self.templates(cls):
                if inst["InstanceID"] == iid:
                    return inst
        if self.capabilities is not None and isinstance(iid, str) \
                and iid.startswith(self.CAPS_PREFIX):
            cls = next((c for c in self.classnames if c.lower() == classname.lower()), "")
            for inst in self.capabilities(cls):
                if inst["InstanceID"] == iid:
                    return inst
        parts = split_iid(iid)
        rec = self.b.inventory.get(parts[0]) if parts else None
        if rec is not None:
            cls = next(c for c in self.classnames if c.lower() == classname.lower())
            for inst in self._all(rec)[cls]:
                if inst.path.keybindings["InstanceID"] == iid:
                    return inst
        raise CIMError(pywbem.CIM_ERR_NOT_FOUND, f"no {classname} with InstanceID {iid!r}")

    async def get_instance(self, path: CIMInstanceName) -> CIMInstance:
        return self.find(path.classname, path.keybindings.get("InstanceID"))
