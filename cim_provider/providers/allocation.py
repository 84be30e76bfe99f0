"""What can be allocated and what is allocated from where (DSP1041).

- VIRT_AllocationCapabilities: one per pool (InstanceID VIRT:AC:<pool InstanceID>) and
  one per resource type (VIRT:AC:type:<ResourceType>, the host's), with
  VIRT_ElementCapabilities from the pool or the host (AssociationsProvider extension).
- Capability settings (InstanceID VIRT:caps:<ResourceType>/default|min|max|inc,
  served by SettingsProvider) and VIRT_SettingsDefineCapabilities from each
  capabilities instance to those of its resource type: ValueRole 0 Default / 3
  Supported, ValueRange 0 Point / 1 Minimums / 2 Maximums / 3 Increments.
- VIRT_HostedResourcePool: host -> each pool.
- VIRT_ElementAllocatedFromPool: pool -> each device of a running system drawn from it;
  VIRT_ResourceAllocationFromPool: pool -> each RASD (state and defined) drawn from it.
- VIRT_SettingsDefineState from a device to its RASD in the state configuration
  (AssociationsProvider extension).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pywbem
from pywbem import CIMError, CIMInstance, CIMInstanceName

from ..domain.defaults import DEFAULT_MEMORY_KIB
from ..domain.records import Disk, DomainRecord, Nic
from ..wbem.provider import AssociationProvider, Provider, path_key
from .backend import HOST_CLASS, VIRT_NS, Backend, make
from .devices import DevicesProvider, device_specs, split_device_path
from .pools import (PoolsProvider, RT_DISK, RT_ETHERNET, RT_MEMORY, RT_PROCESSOR, pool_class,
                    pool_of, pool_path)
from .settings import EPASD_CLASS, RASD_CLASS, SASD_CLASS, configs_of, split_iid, vssd_iid

AC_CLASS = "VIRT_AllocationCapabilities"
HRP, SDC, EAFP, RAFP = ("VIRT_HostedResourcePool", "VIRT_SettingsDefineCapabilities",
                        "VIRT_ElementAllocatedFromPool", "VIRT_ResourceAllocationFromPool")
SDS, EC = "VIRT_SettingsDefineState", "VIRT_ElementCapabilities"
AC_PREFIX, CAPS_PREFIX = "VIRT:AC:", "VIRT:caps:"
TYPES = (RT_PROCESSOR, RT_MEMORY, RT_ETHERNET, RT_DISK)
_TYPE_NAMES = {RT_PROCESSOR: "Processor", RT_MEMORY: "Memory", RT_ETHERNET: "Ethernet port",
               RT_DISK: "Disk"}
_POOL_TYPE = {"VIRT_ProcessorPool": RT_PROCESSOR, "VIRT_MemoryPool": RT_MEMORY,
              "VIRT_DiskPool": RT_DISK, "VIRT_NetworkPool": RT_ETHERNET}
# role -> (ValueRole, ValueRange)
ROLES = {"default": (0, 0), "min": (3, 1), "max": (3, 2), "inc": (3, 3)}


def ac_path(iid: str) -> CIMInstanceName:
    return CIMInstanceName(AC_CLASS, {"InstanceID": iid}, namespace=VIRT_NS)


def caps_class(rt: int) -> str:
    return {RT_DISK: SASD_CLASS, RT_ETHERNET: EPASD_CLASS}.get(rt, RASD_CLASS)


def _keys(cls: str, a: tuple[str, CIMInstanceName], d: tuple[str, CIMInstanceName]
          ) -> tuple[dict[str, Any], CIMInstanceName]:
    keys = {a[0]: a[1], d[0]: d[1]}
    return keys, CIMInstanceName(cls, keys, namespace=VIRT_NS)


class Capabilities:
    """The capabilities instances and their settings, rebuilt when the host changes."""

    def __init__(self, backend: Backend, pools: PoolsProvider):
        self.b = backend
        self.pools = pools
        self._built: tuple[int, dict[str, Any]] | None = None

    def _settings(self, rt: int) -> list[tuple[str, dict[str, Any]]]:
        """(role, properties) of the capability settings of one resource type."""
        cap = self.b.inventory.resources.capacity
        if rt == RT_PROCESSOR:
            units = {"AllocationUnits": "count", "VirtualQuantityUnits": "count"}
            values = [("default", 1), ("min", 1), ("max", cap.cpus if cap else None),
                      ("inc", 1)]
        elif rt == RT_MEMORY:
            units = {"AllocationUnits": "byte*2^10", "VirtualQuantityUnits": "byte*2^10"}
            values = [("default", DEFAULT_MEMORY_KIB), ("min", 1024),
                      ("max", cap.memory_kib if cap else None), ("inc", 1024)]
        else:
            units, values = {"ResourceSubType": "virtio"}, [("default", None)]
        return [(role, {"InstanceID": f"{CAPS_PREFIX}{rt}/{role}", "ResourceType": rt,
                        "ElementName": f"{_TYPE_NAMES[rt]} {role}", **units,
                        "VirtualQuantity": qty})
                for role, qty in values if role == "default" or qty is not None]

    def _build(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ac": [], "caps": {c: [] for c in (RASD_CLASS, SASD_CLASS,
                                                                  EPASD_CLASS)},
                               "caps_of": {}, "pool_ac": {}}
        for rt in TYPES:
            caps = [make(self.b, caps_class(rt), props,
                         CIMInstanceName(caps_class(rt), {"InstanceID": props["InstanceID"]},
                                         namespace=VIRT_NS))
                    for _role, props in self._settings(rt)]
            out["caps"][caps_class(rt)].extend(caps)
            out["caps_of"][rt] = caps
        rows = [(f"{AC_PREFIX}type:{rt}", rt, f"{_TYPE_NAMES[rt]} allocation") for rt in TYPES]
        for pool in self.pools.all():
            rt = _POOL_TYPE[pool.classname]
            rows.append((AC_PREFIX + pool["InstanceID"], rt,
                         f"Allocation from {pool['ElementName']}"))
            out["pool_ac"][pool["InstanceID"]] = AC_PREFIX + pool["InstanceID"]
        for iid, rt, name in rows:
            out["ac"].append(make(self.b, AC_CLASS, {
                "InstanceID": iid, "ElementName": name, "ResourceType": rt,
                "RequestTypesSupported": 3,                               # General
                "SharingMode": 3 if rt in (RT_PROCESSOR, RT_ETHERNET) else 2,
                "SupportedAddStates": [2, 3] if rt in (RT_DISK, RT_ETHERNET) else [3],
                "SupportedRemoveStates": [2, 3] if rt in (RT_DISK, RT_ETHERNET) else []},
                ac_path(iid)))
        return out

    def model(self) -> dict[str, Any]:
        stamp = self.b.inventory.resources.version
        if self._built is None or self._built[0] != stamp:
            self._built = (stamp, self._build())
        return self._built[1]

    def settings(self, classname: str) -> list[CIMInstance]:
        """The capability settings of one RASD class (for SettingsProvider)."""
        return self.model()["caps"].get(classname, [])

    def setting(self, iid: str) -> CIMInstance | None:
        return next((c for insts in self.model()["caps"].values() for c in insts
                     if c["InstanceID"] == iid), None)


class AllocationCapabilitiesProvider(Provider):
    namespace = VIRT_NS
    classnames = (AC_CLASS,)

    def __init__(self, caps: Capabilities):
        self.caps = caps

    async def enumerate_instances(self, classname: str) -> Iterable[CIMInstance]:
        return list(self.caps.model()["ac"])


class AllocationAssociationsProvider(AssociationProvider):
    """HostedResourcePool, SettingsDefineCapabilities, ElementAllocatedFromPool,
    ResourceAllocationFromPool; plus the EC and SDS extensions of AssociationsProvider."""
    namespace = VIRT_NS
    classnames = (HRP, SDC, EAFP, RAFP)

    def __init__(self, backend: Backend, pools: PoolsProvider, caps: Capabilities,
                 devices: DevicesProvider):
        self.b = backend
        self.pools = pools
        self.caps = caps
        self.devices = devices
        self._cache = backend.new_cache()

    def _assoc(self, cls: str, a: tuple[str, CIMInstanceName], d: tuple[str, CIMInstanceName],
               extra: dict[str, Any] | None = None) -> CIMInstance:
        keys, path = _keys(cls, a, d)
        return make(self.b, cls, {**keys, **(extra or {})}, path)

    # ---- per record: allocations and device settings ---------------------------------

    def _of_record(self, rec: DomainRecord) -> dict[str, list[CIMInstance]]:
        res = self.b.inventory.resources

        def build() -> dict[str, list[CIMInstance]]:
            out: dict[str, list[CIMInstance]] = {EAFP: [], RAFP: [], SDS: []}
            devices = {(i["CreationClassName"], i["DeviceID"]): i.path
                       for i in self.devices.all_of(rec)}
            state = vssd_iid("state", rec.uuid)
            for cls, dev, rasd, obj, _props in device_specs(rec):
                if rasd is None:
                    continue
                rasd_path = CIMInstanceName(self._rasd_class(obj, rasd),
                                            {"InstanceID": f"{state}/{rasd}"}, namespace=VIRT_NS)
                out[SDS].append(self._assoc(SDS, ("ManagedElement", devices[(cls, dev)]),
                                            ("SettingData", rasd_path)))
                pool = pool_of(res, rasd, obj)
                if pool is not None and self.pools.find(pool) is not None:
                    out[EAFP].append(self._assoc(EAFP, ("Antecedent", pool_path(pool)),
                                                 ("Dependent", devices[(cls, dev)])))
            for which, cfg in configs_of(rec):
                base = vssd_iid(which, rec.uuid)
                parts: list[tuple[str, Any]] = [("proc", None), ("mem", None)]
                parts += [(d.target, d) for d in cfg.disks] + [(n.mac, n) for n in cfg.nics]
                for dev, obj in parts:
                    pool = pool_of(res, dev if obj is None else "", obj)
                    if pool is None or self.pools.find(pool) is None:
                        continue
                    rasd_path = CIMInstanceName(self._rasd_class(obj, dev),
                                                {"InstanceID": f"{base}/{dev}"},
                                                namespace=VIRT_NS)
                    out[RAFP].append(self._assoc(RAFP, ("Antecedent", pool_path(pool)),
                                                 ("Dependent", rasd_path)))
            return out
        return self._cache.get((rec.uuid, "alloc"), (rec.version, res.version), build)

    @staticmethod
    def _rasd_class(obj: Any, dev: str) -> str:
        if isinstance(obj, Disk):
            return SASD_CLASS
        if isinstance(obj, Nic):
            return EPASD_CLASS
        return RASD_CLASS

    # ---- host-wide -------------------------------------------------------------------

    def _hosted(self) -> list[CIMInstance]:
        return [self._assoc(HRP, ("GroupComponent", self.b.host_path()),
                            ("PartComponent", p.path)) for p in self.pools.all()]

    def _sdc(self, ac: CIMInstance) -> list[CIMInstance]:
        out = []
        for caps in self.caps.model()["caps_of"][int(ac["ResourceType"])]:
            role = caps["InstanceID"].rsplit("/", 1)[1]
            value_role, value_range = ROLES[role]
            out.append(self._assoc(SDC, ("GroupComponent", ac.path), ("PartComponent", caps.path),
                                   {"PropertyPolicy": 0, "ValueRole": value_role,
                                    "ValueRange": value_range}))
        return out

    def extension_enumerate(self, cls: str) -> list[CIMInstance]:
        """VIRT_ElementCapabilities and VIRT_SettingsDefineState instances of ours."""
        if cls == EC:
            return [self._ec(ac) for ac in self.caps.model()["ac"]]
        if cls == SDS:
            return [a for r in self.b.inventory.records() if r.running is not None
                    for a in self._of_record(r)[SDS]]
        return []

    def _ec(self, ac: CIMInstance) -> CIMInstance:
        iid = ac["InstanceID"][len(AC_PREFIX):]
        element = self.b.host_path() if iid.startswith("type:") else pool_path(iid)
        return self._assoc(EC, ("ManagedElement", element), ("Capabilities", ac.path),
                           {"Characteristics": [2]})

    def extension_references(self, cls: str, source: CIMInstanceName) -> list[CIMInstance]:
        key = path_key(source, VIRT_NS)
        if cls == EC:
            scls = source.classname.lower()
            if scls == HOST_CLASS.lower() or pool_class(source.keybindings.get("InstanceID")) \
                    or scls == AC_CLASS.lower():
                return [a for a in self.extension_enumerate(EC) if _names(a, key)]
            return []
        if cls == SDS:
            rec = self._record(source)
            return [a for a in self._of_record(rec)[SDS] if _names(a, key)] if rec else []
        return []

    def _record(self, source: CIMInstanceName) -> DomainRecord | None:
        parts = split_device_path(source)
        if parts is not None:
            return self.b.inventory.get(parts[1])
        iid = split_iid(source.keybindings.get("InstanceID"))
        return self.b.inventory.get(iid[0]) if iid else None

    # ---- the provider ------------------------------------------------------------------

    def _canon(self, classname: str) -> str:
        return next(c for c in self.classnames if c.lower() == classname.lower())

    async def enumerate_instances(self, classname: str) -> Iterable[CIMInstance]:
        cls = self._canon(classname)
        if cls == HRP:
            return self._hosted()
        if cls == SDC:
            return [a for ac in self.caps.model()["ac"] for a in self._sdc(ac)]
        return [a for r in self.b.inventory.records() for a in self._of_record(r)[cls]]

    async def references(self, classname: str, source: CIMInstanceName) -> Iterable[CIMInstance]:
        cls = self._canon(classname)
        key = path_key(source, VIRT_NS)
        scls = source.classname.lower()
        iid = source.keybindings.get("InstanceID")
        if cls == HRP:
            if scls == HOST_CLASS.lower() or pool_class(iid):
                return [a for a in self._hosted() if _names(a, key)]
            return []
        if cls == SDC:
            if scls == AC_CLASS.lower() or (isinstance(iid, str) and iid.startswith(CAPS_PREFIX)):
                return [a for ac in self.caps.model()["ac"] for a in self._sdc(ac)
                        if _names(a, key)]
            return []
        if pool_class(iid):                        # a pool: everything drawn from it (O(N))
            return [a for r in self.b.inventory.records() for a in self._of_record(r)[cls]
                    if _names(a, key)]
        rec = self._record(source)
        return [a for a in self._of_record(rec)[cls] if _names(a, key)] if rec else []

    async def get_instance(self, path: CIMInstanceName) -> CIMInstance:
        key = path_key(path, VIRT_NS)
        refs = [v for v in path.keybindings.values() if isinstance(v, CIMInstanceName)]
        # from the side that costs O(1): the device, RASD, capabilities or the pool
        for ref in sorted(refs, key=lambda r: pool_class(r.keybindings.get("InstanceID")) is not None):
            for inst in await self.references(path.classname, ref):
                if path_key(inst.path) == key:
                    return inst
        raise CIMError(pywbem.CIM_ERR_NOT_FOUND, f"no {path.classname} with those references")


def _names(assoc: CIMInstance, key: tuple) -> bool:
    return any(p.type == "reference" and p.value is not None and path_key(p.value) == key
               for p in assoc.properties.values())
