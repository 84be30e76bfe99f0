"""Profile registration (DSP1033): VIRT_RegisteredProfile, ElementConformsToProfile
(crossing from interop to root/virt and back) and ReferencedProfile.

Central instances: System Virtualization (DSP1042) -> the host system; Virtual System
(DSP1057) -> each virtual system; Profile Registration (DSP1033) -> the object
manager. System Virtualization references Virtual System and Resource Allocation.
"""
from __future__ import annotations

from collections.abc import Iterable

import pywbem
from pywbem import CIMError, CIMInstance, CIMInstanceName

from ..wbem.provider import AssociationProvider, Provider, path_key
from .backend import CS_CLASS, INTEROP_NS, Backend, make
from .computer_system import system_path
from ..providers.interop import object_manager_path

RP_CLASS = "VIRT_RegisteredProfile"
ECTP_CLASS = "VIRT_ElementConformsToProfile"
REF_CLASS = "VIRT_ReferencedProfile"

# (key, RegisteredName, RegisteredVersion, DSP number)
PROFILES = [
    ("DSP1042", "System Virtualization", "1.0.0"),
    ("DSP1057", "Virtual System", "1.0.0"),
    ("DSP1041", "Resource Allocation", "1.1.0"),
    ("DSP1033", "Profile Registration", "1.0.0"),
]
REFERENCES = [("DSP1042", "DSP1057"), ("DSP1042", "DSP1041"), ("DSP1057", "DSP1041")]


def profile_path(key: str) -> CIMInstanceName:
    return CIMInstanceName(RP_CLASS, {"InstanceID": f"VIRT:{key}"}, namespace=INTEROP_NS)


class RegisteredProfileProvider(Provider):
    namespace = INTEROP_NS
    classnames = (RP_CLASS,)

    def __init__(self, backend: Backend):
        self._instances = [make(backend, RP_CLASS, {
            "InstanceID": f"VIRT:{key}", "RegisteredOrganization": 2,   # DMTF
            "RegisteredName": name, "RegisteredVersion": version,
            "AdvertiseTypes": [2], "ElementName": f"{name} {version} ({key})",
            "Caption": name}, profile_path(key)) for key, name, version in PROFILES]

    async def enumerate_instances(self, classname: str) -> Iterable[CIMInstance]:
        return list(self._instances)


class ReferencedProfileProvider(AssociationProvider):
    namespace = INTEROP_NS
    classnames = (REF_CLASS,)

    def __init__(self, backend: Backend):
        # Antecedent: the referenced profile; Dependent: the referencing one.
        self._instances = []
        for referencing, referenced in REFERENCES:
            keys = {"Antecedent": profile_path(referenced), "Dependent": profile_path(referencing)}
            self._instances.append(make(backend, REF_CLASS, keys,
                                        CIMInstanceName(REF_CLASS, keys, namespace=INTEROP_NS)))

    async def enumerate_instances(self, classname: str) -> Iterable[CIMInstance]:
        return list(self._instances)


class ConformsToProfileProvider(AssociationProvider):
    """One per namespace (interop and root/virt): the same links seen from either side."""
    classnames = (ECTP_CLASS,)

    def __init__(self, backend: Backend, namespace: str):
        self.b = backend
        self.namespace = namespace

    def _link(self, profile: str, element: CIMInstanceName) -> CIMInstance:
        keys = {"ConformantStandard": profile_path(profile), "ManagedElement": element}
        return make(self.b, ECTP_CLASS, keys,
                    CIMInstanceName(ECTP_CLASS, keys, namespace=self.namespace))

    def _static(self) -> list[CIMInstance]:
        return [self._link("DSP1042", self.b.host_path()),
                self._link("DSP1033", object_manager_path(self.b.host))]

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
