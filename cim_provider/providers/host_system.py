"""VIRT_HostSystem: exactly one, the host that runs the virtual systems.

Its OperationalStatus, HealthState and StatusDescriptions are the sources' health
(health.py): a client seeing no guests can tell whether a source is away.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

import pywbem
from pywbem import CIMError, CIMInstance, CIMInstanceName

from ..wbem.provider import Provider, path_key
from .backend import HOST_CLASS, VIRT_NS, Backend, make
from .health import Health, health_of

log = logging.getLogger(__name__)


class HostSystemProvider(Provider):
    namespace = VIRT_NS
    classnames = (HOST_CLASS,)

    def __init__(self, backend: Backend):
        self.b = backend
        self._instance: CIMInstance | None = None
        self._shown: tuple | None = None          # the facts the instance shows
        self._health: Health | None = None          # the health it shows
        self._refresh: asyncio.Task | None = None

    async def _read_facts(self) -> tuple:
        """(hostname, hypervisor, uri) from libvirt; () when libvirt cannot say."""
        src = self.b.libvirt
        if src is not None and src.connected:
            try:
                f = await src.host_info()
                return (f.get("hostname"), f.get("hypervisor"), f.get("uri"))
            except Exception as exc:  # facts are decoration: never fail the read
                log.debug("host facts unavailable: %s", exc)
        return ()

    async def _update(self) -> None:
        facts = await self._read_facts()
        if self._instance is None or facts != self._shown:
            self._build(facts, health_of(self.b))

    def _build(self, facts: tuple, health: Health) -> None:
        hostname, hv, uri = facts or (None, None, None)
        desc = "Virtualization host"
        if hv:
            desc += f" ({hv} via libvirt {uri or ''})".rstrip()
        self._shown = facts
        self._instance = make(self.b, HOST_CLASS, {
            "CreationClassName": HOST_CLASS, "Name": self.b.host,
            "ElementName": hostname or self.b.host.split(".")[0],
            "Caption": "Host system", "Description": desc,
            "NameFormat": "IP", "Dedicated": [0],
            "EnabledState": 2, "RequestedState": 12, "EnabledDefault": 2,
            **health.properties(),
        }, self.b.host_path())
        self._health = health

    async def instance(self) -> CIMInstance:
        """The first read waits for the facts; later reads are served at once and
        refresh them in the background (reads never wait on libvirt)."""
        if self._instance is None:
            await self._update()
        elif self._refresh is None or self._refresh.done():
            self._refresh = asyncio.get_running_loop().create_task(self._update())
        health = health_of(self.b)
        if health != self._health:      # health is read now, never a read behind
            self._build(self._shown or (), health)
        assert self._instance is not None
        return self._instance

    async def close(self) -> None:
        """Cancel a background refresh still running (it may wait on a stuck libvirt)."""
        task, self._refresh = self._refresh, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def enumerate_instances(self, classname: str) -> Iterable[CIMInstance]:
        return [await self.instance()]

    async def get_instance(self, path: CIMInstanceName) -> CIMInstance:
        if path_key(path) != path_key(self.b.host_path()):
            raise CIMError(pywbem.CIM_ERR_NOT_FOUND, f"no host system {path.keybindings.get('Name')!r}")
        return await self.instance()
