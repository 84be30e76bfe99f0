"""Profile registration (DSP1033): VIRT_RegisteredProfile, ElementConformsToProfile
(crossing from interop to root/virt and back) and ReferencedProfile.

Central instances: System Virtualization (DSP1042) -> the host system; Virtual System
(DSP1057) -> each virtual system; Profile Registration (DSP1033) -> the object
manager; Resource Allocation (DSP1041) -> every resource pool; the resource
virtualization profiles -> their pools (Processor DSP1044, Memory DSP1045, Storage
DSP1047, Ethernet Port DSP1050); Base Metrics (DSP1053) -> the metric definitions;
Indications (DSP1054) -> the indication service. A profile whose central instances
would be none now (no storage pool, no network, metrics off) is not listed, so
`pywbemcli profile centralinsts` finds instances for every profile listed.
System Virtualization references Virtual System, Resource Allocation and the resource
virtualization profiles, which reference Resource Allocation.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import pywbem
from pywbem import CIMError, CIMInstance, CIMInstanceName

from ..wbem.provider import AssociationProvider, Provider, path_key
from .backend import CS_CLASS, INTEROP_NS, Backend, make
from .computer_system import system_path
from ..providers.interop import object_manager_path

RP_CLASS = "VIRT_RegisteredProfile"
ECTP_CLASS = "VIRT_ElementConformsToProfile"
REF_CLASS = "VIRT_ReferencedProfile"

# (key, RegisteredName, RegisteredVersion)
PROFILES = [
    ("DSP1042", "System Virtualization", "1.0.0"),
    ("DSP1057", "Virtual System", "1.0.0"),
    ("DSP1041", "Resource Allocation", "1.1.0"),
    ("DSP1033", "Profile Registration", "1.0.0"),
    ("DSP1044", "Processor Device Resource Virtualization", "1.0.0"),
    ("DSP1045", "Memory Resource Virtualization", "1.0.0"),
    ("DSP1047", "Storage Resource Virtualization", "1.0.0"),
    ("DSP1050", "Ethernet Port Resource Virtualization", "1.0.0"),
    ("DSP1053", "Base Metrics", "1.0.1"),
    ("DSP1054", "Indications", "1.2.0"),
]
STATIC = ("DSP1042", "DSP1057", "DSP1033")       # their central instances always exist
REFERENCES = [("DSP1042", "DSP1057"), ("DSP1042", "DSP1041"), ("DSP1057", "DSP1041"),
              ("DSP1042", "DSP1044"), ("DSP1042", "DSP1045"), ("DSP1042", "DSP1047"),
              ("DSP1042", "DSP1050"), ("DSP1044", "DSP1041"), ("DSP1045", "DSP1041"),
              ("DSP1047", "DSP1041"), ("DSP1050", "DSP1041")]
# What the central instances of the other profiles are, by profile: provided by the
# providers that serve them (pools, metric definitions, the indication service).
Centrals = Callable[[], dict[str, list[CIMInstanceName]]]


def _listed(centrals: Centrals | None) -> set[str]:
    """The profiles shown now: the static ones and those with central instances."""
    dynamic = centrals() if centrals is not None else {}
    return set(STATIC) | {k for k, paths in dynamic.items() if paths}


def profile_path(key: str) -> CIMInstanceName:
    return CIMInstanceName(RP_CLASS, {"InstanceID": f"VIRT:{key}"}, namespace=INTEROP_NS)


class RegisteredProfileProvider(Provider):
    namespace = INTEROP_NS
    classnames = (RP_CLASS,)

    def __init__(self, backend: Backend, centrals: Centrals | None = None):
        self.centrals = centrals
        self._instances = {key: make(backend, RP_CLASS, {
            "InstanceID": f"VIRT:{key}", "RegisteredOrganization": 2,   # DMTF
            "RegisteredName": name, "RegisteredVersion": version,
            "AdvertiseTypes": [2], "ElementName": f"{name} {version} ({key})",
            "Caption": name}, profile_path(key)) for key, name, version in PROFILES}

    async def enumerate_instances(self, classname: str) -> Iterable[CIMInstance]:
        listed = _listed(self.centrals)
        return [inst for key, inst in self._instances.items() if key in listed]


class ReferencedProfileProvider(AssociationProvider):
    namespace = INTEROP_NS
    classnames = (REF_CLASS,)

    def __init__(self, backend: Backend, centrals: Centrals | None = None):
        # Antecedent: the referenced profile; Dependent: the referencing one.
        self.centrals = centrals
        self._instances = []
        for referencing, referenced in REFERENCES:
            keys = {"Antecedent": profile_path(referenced), "Dependent": profile_path(referencing)}
            self._instances.append(((referencing, referenced), make(
                backend, REF_CLASS, keys, CIMInstanceName(REF_CLASS, keys, namespace=INTEROP_NS))))

    async def enumerate_instances(self, classname: str) -> Iterable[CIMInstance]:
        listed = _listed(self.centrals)
        return [inst for pair, inst in self._instances if set(pair) <= listed]


class ConformsToProfileProvider(AssociationProvider):
    """One per namespace (interop and root/virt): the same links seen from either side."""
    classnames = (ECTP_CLASS,)

    def __init__(self, backend: Backend, namespace: str, centrals: Centrals | None = None):
        self.b = backend
        self.namespace = namespace
        self.centrals = centrals

    def _link(self, profile: str, element: CIMInstanceName) -> CIMInstance:
        keys = {"ConformantStandard": profile_path(profile), "ManagedElement": element}
        return make(self.b, ECTP_CLASS, keys,
                    CIMInstanceName(ECTP_CLASS, keys, namespace=self.namespace))

    def _static(self) -> list[CIMInstance]:
        """Every link but the virtual systems' (a few dozen at most: pools, metric
        definitions, the host, the object manager, the indication service)."""
        out = [self._link("DSP1042", self.b.host_path()),
               self._link("DSP1033", object_manager_path(self.b.host))]
        for key, paths in (self.centrals() if self.centrals is not None else {}).items():
            out.extend(self._link(key, p) for p in paths)
        return out

    async def enumerate_instances(self, classname: str) -> Iterable[CIMInstance]:
        return self._static() + [self._link("DSP1057", system_path(r.uuid))
                                 for r in self.b.inventory.records()]

    async def references(self, classname: str, source: CIMInstanceName) -> Iterable[CIMInstance]:
        key = path_key(source, self.namespace)
        if source.classname.lower() == CS_CLASS.lower():
            try:
                rec = self.b.record_for(source)
            except CIMError:
                return []
            return [self._link("DSP1057", system_path(rec.uuid))]
        if path_key(source) == path_key(profile_path("DSP1057")):
            return [self._link("DSP1057", system_path(r.uuid)) for r in self.b.inventory.records()]
        return [a for a in self._static()
                if any(path_key(a[p]) == key for p in ("ConformantStandard", "ManagedElement"))]

    async def get_instance(self, path: CIMInstanceName) -> CIMInstance:
        me = path.keybindings.get("ManagedElement")
        if isinstance(me, CIMInstanceName):
            for inst in await self.references(ECTP_CLASS, me):
                if path_key(inst.path) == path_key(path):
                    return inst
        raise CIMError(pywbem.CIM_ERR_NOT_FOUND, "no such ElementConformsToProfile")
