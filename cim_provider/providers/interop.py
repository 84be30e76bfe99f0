"""interop namespace: CIM_Namespace (one per served namespace) and CIM_ObjectManager.

pywbemcli's `namespace list` / `namespace interop` read CIM_Namespace here, and
`server brand` / `server info` need exactly one CIM_ObjectManager whose Description
ends in "version X.Y.Z".
"""
from __future__ import annotations

from collections.abc import Iterable

from pywbem import CIMInstance, CIMInstanceName

from .. import __version__
from ..wbem.provider import Provider, build_instance
from ..wbem.repository import Repository

INTEROP = "interop"
HOST_CLASS = "VIRT_HostSystem"
OM_CLASS = "CIM_ObjectManager"
OM_NAME = "cim-provider"


def object_manager_path(host: str) -> CIMInstanceName:
    return CIMInstanceName(OM_CLASS, {"SystemCreationClassName": HOST_CLASS,
                                      "SystemName": host, "CreationClassName": OM_CLASS,
                                      "Name": OM_NAME}, namespace=INTEROP)


class NamespaceProvider(Provider):
    namespace = INTEROP
    classnames = ("CIM_Namespace",)

    def __init__(self, repo: Repository, host: str):
        cls = repo.namespace(INTEROP).get("CIM_Namespace")
        self._instances = []
        for name in repo.namespace_names:
            keys = {"SystemCreationClassName": HOST_CLASS, "SystemName": host,
                    "ObjectManagerCreationClassName": OM_CLASS, "ObjectManagerName": OM_NAME,
                    "CreationClassName": "CIM_Namespace", "Name": name}
            path = CIMInstanceName("CIM_Namespace", keys, namespace=INTEROP)
            self._instances.append(build_instance(
                cls, {**keys, "ClassInfo": 3, "ClassType": 2,
                      "DescriptionOfClassInfo": None,
                      "ElementName": name, "Caption": f"namespace {name}"}, path))

    async def enumerate_instances(self, classname: str) -> Iterable[CIMInstance]:
        return list(self._instances)


class ObjectManagerProvider(Provider):
    namespace = INTEROP
    classnames = (OM_CLASS,)

    def __init__(self, repo: Repository, host: str):
        cls = repo.namespace(INTEROP).get(OM_CLASS)
        path = object_manager_path(host)
        self._instance = build_instance(cls, {
            **path.keybindings,
            "ElementName": OM_NAME,
            "Caption": "cim-provider WBEM server",
            "Description": f"cim-provider WBEM server for libvirt and org.example.virt.Manager "
                           f"version {__version__}",
            "Started": True, "EnabledState": 2, "RequestedState": 12,
            "OperationalStatus": [2], "HealthState": 5,
        }, path)

    async def enumerate_instances(self, classname: str) -> Iterable[CIMInstance]:
        return [self._instance]


def interop_providers(repo: Repository, host: str) -> list[Provider]:
    return [NamespaceProvider(repo, host), ObjectManagerProvider(repo, host)]
