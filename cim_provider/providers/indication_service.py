"""The indication service (DSP1054) in interop, so clients find indication support the
standard way: VIRT_IndicationService (+ VIRT_IndicationServiceCapabilities through
VIRT_ElementCapabilities), hosted by the object manager's system, the host
(VIRT_HostedService: Antecedent = VIRT_HostSystem in root/virt; served in interop and,
through the AssociationsProvider extension, in root/virt too).

Keys: SystemCreationClassName = VIRT_HostSystem, SystemName = host, CreationClassName =
VIRT_IndicationService, Name = "cim-provider:IndicationService"; the capabilities'
InstanceID is VIRT:IndicationServiceCapabilities. The figures are those of
indications/delivery.py: DeliveryRetryAttempts retries after the first attempt, the
first after DeliveryRetryInterval seconds at least (then doubling); a failing listener
never removes a subscription (SubscriptionRemovalAction 4, Ignore).
"""
from __future__ import annotations

import math
from collections.abc import Iterable

from pywbem import CIMInstance, CIMInstanceName

from ..indications import delivery
from ..wbem.provider import AssociationProvider, Provider, path_key
from .backend import HOST_CLASS, INTEROP_NS, VIRT_NS, Backend, make

IS_CLASS = "VIRT_IndicationService"
ISC_CLASS = "VIRT_IndicationServiceCapabilities"
IS_NAME = "cim-provider:IndicationService"
ISC_IID = "VIRT:IndicationServiceCapabilities"
HS, EC = "VIRT_HostedService", "VIRT_ElementCapabilities"


def service_path(host: str) -> CIMInstanceName:
    return CIMInstanceName(IS_CLASS, {"SystemCreationClassName": HOST_CLASS, "SystemName": host,
                                      "CreationClassName": IS_CLASS, "Name": IS_NAME},
                           namespace=INTEROP_NS)


def capabilities_path() -> CIMInstanceName:
    return CIMInstanceName(ISC_CLASS, {"InstanceID": ISC_IID}, namespace=INTEROP_NS)


class IndicationServiceProvider(Provider):
    namespace = INTEROP_NS
    classnames = (IS_CLASS, ISC_CLASS)

    def __init__(self, backend: Backend):
        path = service_path(backend.host)
        self._service = make(backend, IS_CLASS, {
            **path.keybindings, "ElementName": "Indication service",
            "Caption": "Indication service",
            "Description": "Lifecycle indications of virtual systems, delivered over "
                           "CIM-XML to the listener destinations of the subscriptions "
                           "in this namespace",
            "FilterCreationEnabled": True,
            "DeliveryRetryAttempts": delivery.ATTEMPTS - 1,
            "DeliveryRetryInterval": max(1, math.ceil(delivery.BASE_DELAY)),
            "SubscriptionRemovalAction": 4,
            "EnabledState": 2, "RequestedState": 12, "EnabledDefault": 2, "Started": True,
            "OperationalStatus": [2], "HealthState": 5, "PrimaryStatus": 1}, path)
        self._caps = make(backend, ISC_CLASS, {
            "InstanceID": ISC_IID, "ElementName": "Indication service capabilities",
            "FilterCreationEnabledIsSettable": False,
            "DeliveryRetryAttemptsIsSettable": False,
            "DeliveryRetryIntervalIsSettable": False,
            "SubscriptionRemovalActionIsSettable": False,
            "SubscriptionRemovalTimeIntervalIsSettable": False,
            "SubscriptionsPersisted": True}, capabilities_path())

    async def enumerate_instances(self, classname: str) -> Iterable[CIMInstance]:
        return [self._service] if classname.lower() == IS_CLASS.lower() else [self._caps]


class ServiceLinks:
    """The two associations, built once; `for_namespace` gives those a namespace serves."""

    def __init__(self, backend: Backend):
        self.b = backend

    def hosted(self, namespace: str) -> CIMInstance:
        keys = {"Antecedent": self.b.host_path(), "Dependent": service_path(self.b.host)}
        return make(self.b, HS, keys, CIMInstanceName(HS, keys, namespace=namespace))

    def capabilities(self) -> CIMInstance:
        keys = {"ManagedElement": service_path(self.b.host), "Capabilities": capabilities_path()}
        return make(self.b, EC, {**keys, "Characteristics": [2]},
                    CIMInstanceName(EC, keys, namespace=INTEROP_NS))

    # AssociationsProvider extension (root/virt): host -> indication service
    def extension_enumerate(self, cls: str) -> list[CIMInstance]:
        return [self.hosted(VIRT_NS)] if cls == HS else []

    def extension_references(self, cls: str, source: CIMInstanceName) -> list[CIMInstance]:
        if cls != HS:
            return []
        key = path_key(source, VIRT_NS)
        inst = self.hosted(VIRT_NS)
        return [inst] if key in (path_key(inst["Antecedent"]), path_key(inst["Dependent"])) \
            else []


class ServiceAssociationsProvider(AssociationProvider):
    """VIRT_HostedService and VIRT_ElementCapabilities in interop."""
    namespace = INTEROP_NS
    classnames = (HS, EC)

    def __init__(self, links: ServiceLinks):
        self._insts = {HS: [links.hosted(INTEROP_NS)], EC: [links.capabilities()]}

    async def enumerate_instances(self, classname: str) -> Iterable[CIMInstance]:
        return list(self._insts[HS if classname.lower() == HS.lower() else EC])
