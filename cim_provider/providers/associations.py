"""The root/virt associations, each computed from inventory records.

`references(source)` answers from the source's own record (or the host), so walking
from one system costs the same with 10 domains or 10,000.

- HostedDependency: Antecedent = host, Dependent = each guest.
- SettingsDefineState: system -> its state VSSD, or its defined VSSD when not running.
- ElementSettingData: system -> defined VSSD, only when the Manager holds a definition.
- VirtualSystemSettingDataComponent: VSSD -> its RASDs.
- HostedService: host -> the management service.
- ElementCapabilities: system -> its capabilities; service -> service capabilities.

Other modules add instances of these classes through `extensions` (an object with
`extension_enumerate(cls)` and `extension_references(cls, source)`): SettingsDefineState
from devices to their RASDs and ElementCapabilities of pools and of the host
(allocation.py), HostedService from the host to the indication service
(indication_service.py).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol
import pywbem
from pywbem import CIMError, CIMInstance, CIMInstanceName

from ..domain.records import DomainRecord
from ..wbem.provider import AssociationProvider, path_key
from .backend import CS_CLASS, HOST_CLASS, VIRT_NS, VSMS_CLASS, Backend, make
from .computer_system import CapabilitiesProvider, ComputerSystemProvider, system_path
from .management_service import vsmc_path
from .settings import SettingsProvider, configs_of, split_iid, vssd_path

HD, SDS, ESD, VSSDC, HS, EC = ("VIRT_HostedDependency", "VIRT_SettingsDefineState",
                               "VIRT_ElementSettingData",
                               "VIRT_VirtualSystemSettingDataComponent",
                               "VIRT_HostedService", "VIRT_ElementCapabilities")


class Extension(Protocol):
    """More instances of the classes AssociationsProvider serves, from another module."""

    def extension_enumerate(self, cls: str) -> list[CIMInstance]: ...

    def extension_references(self, cls: str, source: CIMInstanceName) -> list[CIMInstance]: ...


class AssociationsProvider(AssociationProvider):
    namespace = VIRT_NS
    classnames = (HD, SDS, ESD, VSSDC, HS, EC)

    def __init__(self, backend: Backend, settings: SettingsProvider,
                 extensions: Sequence[Extension] = (),
                 systems: ComputerSystemProvider | None = None):
        self.b = backend
        self.settings = settings
        self.systems = systems          # names the guests from the host (`associated`)
        self.extensions = list(extensions)
        self._cache = backend.new_cache()

    def _assoc(self, cls: str, a: tuple[str, CIMInstanceName], d: tuple[str, CIMInstanceName],
               extra: dict | None = None) -> CIMInstance:
        keys = {a[0]: a[1], d[0]: d[1]}
        return make(self.b, cls, {**keys, **(extra or {})},
                    CIMInstanceName(cls, keys, namespace=VIRT_NS))

    def _of_record(self, rec: DomainRecord, cls: str) -> list[CIMInstance]:
        """The `cls` association instances that involve one system, cached per record
        version and class (walking one association builds only that one). Not
        HostedDependency's: walked from the host it is one instance per system, ~0.9
        KiB each kept (two paths), rebuilt in ~25 µs (issue 16: RSS per domain)."""
        if cls == HD:
            return self._build(rec, cls)
        return self._cache.get((rec.uuid, cls), rec.version, lambda: self._build(rec, cls))

    def _build(self, rec: DomainRecord, cls: str) -> list[CIMInstance]:
        sp = system_path(rec.uuid)
        if cls == HD:
            return [self._assoc(HD, ("Antecedent", self.b.host_path()), ("Dependent", sp))]
        if cls == SDS:
            which = "state" if rec.running is not None else "defined"
            return [self._assoc(SDS, ("ManagedElement", sp),
                                ("SettingData", vssd_path(which, rec.uuid)))]
        if cls == ESD:
            if rec.defined is None:
                return []
            return [self._assoc(ESD, ("ManagedElement", sp),
                                ("SettingData", vssd_path("defined", rec.uuid)),
                                {"IsDefault": 1, "IsCurrent": 2 if rec.running else 1})]
        if cls == EC:
            return [self._assoc(EC, ("ManagedElement", sp),
                                ("Capabilities", CapabilitiesProvider.path(rec.uuid)),
                                {"Characteristics": [2]})]
        out = []                                    # VSSDC: each configuration's parts
        for which, _cfg in configs_of(rec):
            group = vssd_path(which, rec.uuid)
            prefix = group.keybindings["InstanceID"] + "/"
            for part_cls in ("VIRT_ResourceAllocationSettingData",
                             "VIRT_StorageAllocationSettingData",
                             "VIRT_EthernetPortAllocationSettingData"):
                for inst in self.settings.of_record(rec, part_cls):
                    if inst["InstanceID"].startswith(prefix):
                        out.append(self._assoc(VSSDC, ("GroupComponent", group),
                                               ("PartComponent", inst.path)))
        return out

    def _service_assocs(self) -> dict[str, list[CIMInstance]]:
        return {HS: [self._assoc(HS, ("Antecedent", self.b.host_path()),
                                 ("Dependent", self.b.vsms_path()))],
                EC: [self._assoc(EC, ("ManagedElement", self.b.vsms_path()),
                                 ("Capabilities", vsmc_path()), {"Characteristics": [2]})]}

    def _canon(self, classname: str) -> str:
        return next(c for c in self.classnames if c.lower() == classname.lower())

    async def enumerate_instances(self, classname: str) -> Iterable[CIMInstance]:
        cls = self._canon(classname)
        out = list(self._service_assocs().get(cls, ()))
        if cls != HS:
            for rec in self.b.inventory.records():
                out.extend(self._of_record(rec, cls))
        for ext in self.extensions:
            out.extend(ext.extension_enumerate(cls))
        return out

    async def get_instance(self, path: CIMInstanceName) -> CIMInstance:
        key = path_key(path)
        # Look up from the guest side when there is one: from the host, HostedDependency
        # would walk every system (GetInstance must cost the same at any N).
        refs = [v for v in path.keybindings.values() if isinstance(v, CIMInstanceName)]
        source = next((r for r in refs if self._record_of(r) is not None), refs[0] if refs else None)
        for inst in await self.references(path.classname, source):
            if path_key(inst.path) == key:
                return inst
        raise CIMError(pywbem.CIM_ERR_NOT_FOUND, f"no {path.classname} with those references")

    def _record_of(self, source: CIMInstanceName) -> DomainRecord | None:
        """The record a guest-side object belongs to (system, VSSD, RASD, capabilities)."""
        cls = source.classname.lower()
        kb = source.keybindings
        if cls == CS_CLASS.lower():
            try:
                return self.b.record_for(source)
            except CIMError:
                return None
        iid = kb.get("InstanceID")
        if cls == "virt_enabledlogicalelementcapabilities":
            if isinstance(iid, str) and iid.startswith(CapabilitiesProvider.PREFIX):
                return self.b.inventory.get(iid[len(CapabilitiesProvider.PREFIX):])
            return None
        parts = split_iid(iid)
        return self.b.inventory.get(parts[0]) if parts else None

    def associated(self, classname: str,
                   source: CIMInstanceName) -> Sequence[tuple[str, str, CIMInstance]] | None:
        """The guests of the host through HostedDependency, as the systems the
        ComputerSystem provider returns: no association instance is made per guest.
        Everything else walks `references`."""
        cls = self._canon(classname)
        if cls != HD or self.systems is None or source.classname.lower() != HOST_CLASS.lower() \
                or path_key(source, VIRT_NS) != path_key(self.b.host_path()) \
                or any(ext.extension_references(cls, source) for ext in self.extensions):
            return None
        system = self.systems.instance
        return [("Antecedent", "Dependent", system(rec)) for rec in self.b.inventory.records()]

    async def references(self, classname: str, source: CIMInstanceName) -> Iterable[CIMInstance]:
        cls = self._canon(classname)
        if source is None:
            return []
        extra = [a for ext in self.extensions for a in ext.extension_references(cls, source)]
        return extra + await self._own_references(cls, source)

    async def _own_references(self, cls: str, source: CIMInstanceName) -> list[CIMInstance]:
        key = path_key(source, VIRT_NS)
        scls = source.classname.lower()
        if scls == HOST_CLASS.lower():
            if path_key(self.b.host_path()) != key:
                return []
            if cls == HD:
                return [self._of_record(r, HD)[0] for r in self.b.inventory.records()]
            return self._service_assocs().get(cls, []) if cls == HS else []
        if scls in (VSMS_CLASS.lower(), "virt_virtualsystemmanagementcapabilities"):
            return [a for a in self._service_assocs().get(cls, []) if _names(a, key)]
        rec = self._record_of(source)
        if rec is None:
            return []
        if cls == HS:
            return []
        return [a for a in self._of_record(rec, cls) if _names(a, key)]


def _names(assoc: CIMInstance, key: tuple) -> bool:
    return any(p.type == "reference" and p.value is not None and path_key(p.value) == key
               for p in assoc.properties.values())
