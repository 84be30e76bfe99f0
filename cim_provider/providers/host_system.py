"""VIRT_HostSystem: exactly one, the host that runs the virtual systems."""
from __future__ import annotations

import logging
from collections.abc import Iterable

import pywbem
from pywbem import CIMError, CIMInstance, CIMInstanceName

from ..wbem.provider import Provider, path_key
from .backend import HOST_CLASS, VIRT_NS, Backend, make

log = logging.getLogger(__name__)


class HostSystemProvider(Provider):
    namespace = VIRT_NS
    classnames = (HOST_CLASS,)

    def __init__(self, backend: Backend):
        self.b = backend
        self._instance: CIMInstance | None = None
        self._facts: dict | None = None

    async def _facts_now(self) -> dict:
        src = self.b.libvirt
        if src is not None and getattr(src, "connected", False):
            try:
                return await src.host_info()
            except Exception as exc:  # facts are decoration: never fail the read
                log.debug("host facts unavailable: %s", exc)
        return {}

    async def instance(self) -> CIMInstance:
        facts = await self._facts_now()
        if self._instance is None or facts != self._facts:
            hv = facts.get("hypervisor")
            desc = "Virtualization host"
            if hv:
                desc += f" ({hv} via libvirt {facts.get('uri', '')})".rstrip()
            self._facts = facts
            self._instance = make(self.b, HOST_CLASS, {
                "CreationClassName": HOST_CLASS, "Name": self.b.host,
                "ElementName": facts.get("hostname") or self.b.host.split(".")[0],
                "Caption": "Host system", "Description": desc,
                "NameFormat": "IP", "Dedicated": [0],
                "EnabledState": 2, "RequestedState": 12, "EnabledDefault": 2,
                "OperationalStatus": [2], "HealthState": 5, "PrimaryStatus": 1,
            }, self.b.host_path())
        return self._instance

    async def enumerate_instances(self, classname: str) -> Iterable[CIMInstance]:
        return [await self.instance()]

    async def get_instance(self, path: CIMInstanceName) -> CIMInstance:
        if path_key(path) != path_key(self.b.host_path()):
            raise CIMError(pywbem.CIM_ERR_NOT_FOUND, f"no host system {path.keybindings.get('Name')!r}")
        return await self.instance()
