"""The logical devices of running systems and VIRT_SystemDevice.

Only a running domain has devices (its live configuration): VIRT_Processor (one per
vCPU), VIRT_Memory (one), VIRT_LogicalDisk (one per disk), VIRT_NetworkPort (one per
NIC) and VIRT_DisplayController (one per graphical console). Keys:
SystemCreationClassName = VIRT_ComputerSystem, SystemName = domain UUID,
CreationClassName, DeviceID = the libvirt identity of the device: the vCPU number,
"mem", the target dev, the MAC, the console type and index (vnc0). EnabledState,
OperationalStatus and HealthState are the system's (docs/architecture.md "States").

Converters: `device_specs(record)` (record -> (class, DeviceID, RASD device id, device
record, properties)), `device_path`, `split_device_path`.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pywbem
from pywbem import CIMError, CIMInstance, CIMInstanceName

from ..domain.records import Disk, DomainRecord, Graphics, Nic
from ..wbem.provider import AssociationProvider, Provider, path_key
from .backend import CS_CLASS, VIRT_NS, Backend, make
from .computer_system import state_of, system_path

PROC_CLASS, MEM_CLASS, DISK_CLASS, PORT_CLASS, DISPLAY_CLASS = (
    "VIRT_Processor", "VIRT_Memory", "VIRT_LogicalDisk", "VIRT_NetworkPort",
    "VIRT_DisplayController")
DEVICE_CLASSES = (PROC_CLASS, MEM_CLASS, DISK_CLASS, PORT_CLASS, DISPLAY_CLASS)
SD_CLASS = "VIRT_SystemDevice"
DEFAULT_BLOCK_SIZE = 512
LINK_UP, LINK_DOWN = 2, 3
# CIM_StorageExtent.Access
ACCESS_READ, ACCESS_READ_WRITE = 1, 3


def link_value(state: str | None) -> int:
    """libvirt's <link state=...> as the LinkState value (absent: up)."""
    return LINK_DOWN if (state or "").lower() == "down" else LINK_UP


def device_path(cls: str, uuid: str, device_id: str) -> CIMInstanceName:
    return CIMInstanceName(cls, {"SystemCreationClassName": CS_CLASS, "SystemName": uuid,
                                 "CreationClassName": cls, "DeviceID": device_id},
                           namespace=VIRT_NS)


def split_device_path(path: CIMInstanceName) -> tuple[str, str, str] | None:
    """A device path -> (class, uuid, DeviceID); None when it is not one of ours."""
    cls = next((c for c in DEVICE_CLASSES if c.lower() == path.classname.lower()), None)
    kb = path.keybindings
    if cls is None or kb.get("SystemCreationClassName") != CS_CLASS \
            or kb.get("CreationClassName") != cls:
        return None
    uuid, dev = kb.get("SystemName"), kb.get("DeviceID")
    if not isinstance(uuid, str) or not isinstance(dev, str):
        return None
    return cls, uuid, dev


# (class, DeviceID, RASD device id or None, the device record or None, properties)
Spec = tuple[str, str, str | None, Disk | Nic | Graphics | None, dict[str, Any]]


def device_specs(rec: DomainRecord) -> list[Spec]:
    """Every device of a running record (none when it is not running)."""
    if rec.running is None:
        return []
    cfg = rec.running.config
    enabled, opstatus, health = state_of(rec)
    common = {"EnabledState": enabled, "RequestedState": 12, "EnabledDefault": 2,
              "OperationalStatus": opstatus, "HealthState": health,
              "PrimaryStatus": 1 if health == 5 else 3}
    out: list[Spec] = []
    for n in range(cfg.vcpus or 0):
        out.append((PROC_CLASS, str(n), "proc", None, {
            "ElementName": f"vCPU {n} of {cfg.name}", "Role": "Central Processor",
            "CPUStatus": 1 if enabled == 2 else 0}))
    if cfg.memory_kib is not None:
        out.append((MEM_CLASS, "mem", "mem", None, {
            "ElementName": f"Memory of {cfg.name}", "BlockSize": 1024,
            "NumberOfBlocks": cfg.memory_kib, "ConsumableBlocks": cfg.memory_kib,
            "Volatile": True, "Access": ACCESS_READ_WRITE, "Primordial": False}))
    for d in cfg.disks:
        size = d.block_size or DEFAULT_BLOCK_SIZE
        blocks = d.capacity_bytes // size if d.capacity_bytes is not None else None
        out.append((DISK_CLASS, d.target, d.target, d, {
            "ElementName": f"Disk {d.target} of {cfg.name}", "Name": d.source,
            "Purpose": d.device, "BlockSize": size, "NumberOfBlocks": blocks,
            "ConsumableBlocks": blocks, "Primordial": False,
            "Access": ACCESS_READ if d.device == "cdrom" else ACCESS_READ_WRITE}))
    for nic in cfg.nics:
        out.append((PORT_CLASS, nic.mac, nic.mac, nic, {
            "ElementName": f"NIC {nic.mac} of {cfg.name}", "PermanentAddress": nic.mac,
            "NetworkAddresses": [nic.mac], "LinkTechnology": 2,     # Ethernet
            "LinkState": link_value(nic.link_state)}))
    seen: dict[str, int] = {}
    for g in cfg.graphics:
        index = seen.get(g.type, 0)
        seen[g.type] = index + 1
        out.append((DISPLAY_CLASS, f"{g.type}{index}", None, g, {
            "ElementName": f"{g.type.upper()} console of {cfg.name}",
            "GraphicsType": g.type, "RemotePort": g.port, "ListenAddress": g.listen}))
    for cls, dev, _rasd, _obj, props in out:
        props.update(common, SystemCreationClassName=CS_CLASS, SystemName=rec.uuid,
                     CreationClassName=cls, DeviceID=dev)
    return out


class DevicesProvider(Provider):
    """Every device class: they come from the same live configuration."""
    namespace = VIRT_NS
    classnames = DEVICE_CLASSES

    def __init__(self, backend: Backend):
        self.b = backend
        self._cache = backend.new_cache()
        # The last enumeration per class: (records tuple, instances). The same tuple
        # while the inventory is unchanged, so the dispatcher reuses its rendering.
        self._all: dict[str, tuple[Any, tuple[CIMInstance, ...]]] = {}

    def _canon(self, classname: str) -> str:
        return next(c for c in self.classnames if c.lower() == classname.lower())

    def of_class(self, rec: DomainRecord, cls: str) -> list[CIMInstance]:
        """The devices of one class of one record (built, and cached per record version,
        only when that class is asked for)."""
        def build() -> list[CIMInstance]:
            return [make(self.b, cls, props, device_path(cls, rec.uuid, dev))
                    for c, dev, _rasd, _obj, props in device_specs(rec) if c == cls]
        return self._cache.get((rec.uuid, cls), rec.version, build)

    def of_record(self, rec: DomainRecord) -> dict[str, list[CIMInstance]]:
        """The devices of one record by class."""
        return {cls: self.of_class(rec, cls) for cls in self.classnames}

    def all_of(self, rec: DomainRecord) -> list[CIMInstance]:
        return [i for cls in self.classnames for i in self.of_class(rec, cls)]

    async def enumerate_instances(self, classname: str) -> Iterable[CIMInstance]:
        cls = self._canon(classname)
        records = self.b.inventory.records()
        last = self._all.get(cls)
        if last is not None and last[0] is records:
            return last[1]
        out = tuple(i for rec in records if rec.running is not None
                    for i in self.of_class(rec, cls))
        self._all[cls] = (records, out)
        return out

    def find(self, path: CIMInstanceName) -> CIMInstance | None:
        parts = split_device_path(path)
        rec = self.b.inventory.get(parts[1]) if parts else None
        if parts is None or rec is None:
            return None
        key = path_key(path, VIRT_NS)
        return next((i for i in self.of_class(rec, parts[0]) if path_key(i.path) == key), None)

    async def get_instance(self, path: CIMInstanceName) -> CIMInstance:
        inst = self.find(path)
        if inst is None:
            raise CIMError(pywbem.CIM_ERR_NOT_FOUND, f"no device {path.keybindings.get('DeviceID')!r}"
                           f" of a running system {path.keybindings.get('SystemName')!r}")
        return inst


class SystemDeviceProvider(AssociationProvider):
    """VIRT_SystemDevice: GroupComponent = the system, PartComponent = each device."""
    namespace = VIRT_NS
    classnames = (SD_CLASS,)

    def __init__(self, backend: Backend, devices: DevicesProvider):
        self.b = backend
        self.devices = devices
        self._cache = backend.new_cache()

    def of_record(self, rec: DomainRecord) -> list[CIMInstance]:
        def build() -> list[CIMInstance]:
            sp = system_path(rec.uuid)
            out = []
            for dev in self.devices.all_of(rec):
                keys = {"GroupComponent": sp, "PartComponent": dev.path}
                out.append(make(self.b, SD_CLASS, keys,
                                CIMInstanceName(SD_CLASS, keys, namespace=VIRT_NS)))
            return out
        return self._cache.get((rec.uuid, "sysdev"), rec.version, build)

    async def enumerate_instances(self, classname: str) -> Iterable[CIMInstance]:
        out: list[CIMInstance] = []
        for rec in self.b.inventory.records():
            if rec.running is not None:
                out.extend(self.of_record(rec))
        return out

    async def references(self, classname: str, source: CIMInstanceName) -> Iterable[CIMInstance]:
        if source.classname.lower() == CS_CLASS.lower():
            try:
                rec = self.b.record_for(source)
            except CIMError:
                return []
            return self.of_record(rec)
        parts = split_device_path(source)
        rec = self.b.inventory.get(parts[1]) if parts else None
        if rec is None:
            return []
        key = path_key(source, VIRT_NS)
        return [a for a in self.of_record(rec) if path_key(a["PartComponent"]) == key]

    async def get_instance(self, path: CIMInstanceName) -> CIMInstance:
        part = path.keybindings.get("PartComponent")
        if isinstance(part, CIMInstanceName):
            for inst in await self.references(SD_CLASS, part):
                if path_key(inst.path) == path_key(path, VIRT_NS):
                    return inst
        raise CIMError(pywbem.CIM_ERR_NOT_FOUND, "no such VIRT_SystemDevice")
