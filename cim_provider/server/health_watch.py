"""Follows the sources' health: logs it and tells subscribers when it changes.

The health itself is computed where it is shown (providers/health.py, read on every
GetInstance of the host and the management service). Sources have no "status changed"
event of their own (a libvirt connection that drops keeps its last domains; a Manager
that is slow to list changes nothing in the inventory), so this watcher looks once a
second, which is cheap: a few attribute reads.

- A source that stops being ok: WARNING with the reason, then a reminder every
  `reminder` seconds (5 minutes) while it lasts; INFO when it is ok again.
- Any change of the combined health: a CIM_InstModification of VIRT_HostSystem and of
  VIRT_VirtualSystemManagementService (SourceInstance and PreviousInstance), so a
  console subscribed to them learns of it without polling.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from pywbem import CIMInstance

from ..indications.service import IndicationService
from ..providers.backend import Backend
from ..providers.health import health_of
from ..providers.host_system import HostSystemProvider
from ..providers.management_service import ManagementServiceProvider

log = logging.getLogger(__name__)

INTERVAL = 1.0
REMINDER = 300.0


class HealthWatcher:
    def __init__(self, backend: Backend, host: HostSystemProvider,
                 service: ManagementServiceProvider, indications: IndicationService | None,
                 *, interval: float = INTERVAL, reminder: float = REMINDER) -> None:
        self.b = backend
        self.host = host
        self.service = service
        self.indications = indications
        self.interval = interval
        self.reminder = reminder
        self._health = health_of(backend)
        self._reasons: dict[str, tuple[str, float]] = {}   # source -> (reason, last logged)
        self._last: dict[str, CIMInstance] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._last = {"host": await self.host.instance(), "service": self.service.service()}
        self.check_logs()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="health-watch")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except Exception:        # a watcher must never die of a surprise
                log.exception("health check failed")

    async def check(self) -> None:
        self.check_logs()
        health = health_of(self.b)
        if health == self._health:
            return
        self._health = health
        now = {"host": await self.host.instance(), "service": self.service.service()}
        if self.indications is not None:
            for key in ("host", "service"):
                old = self._last.get(key)
                changed = _changed(old, now[key])
                if changed:
                    self.indications.publish(self.indications.indication(
                        "modified", now[key], old, changed, classname="CIM_InstModification"))
        self._last = now

    def check_logs(self) -> None:
        """WARNING when a source goes bad, a reminder while it stays so, INFO when back."""
        now = time.monotonic()
        sources = {"libvirt": self.b.libvirt, "Manager": self.b.manager}
        for name, src in sources.items():
            if src is None:
                continue
            status = src.status
            known = self._reasons.get(name)
            if status.state == "ok":
                if known is not None:
                    log.info("%s is back: %s", name, "ok")
                    del self._reasons[name]
                continue
            if known is None:
                log.warning("%s", status.reason)
                self._reasons[name] = (status.reason, now)
            elif now - known[1] >= self.reminder:
                log.warning("still: %s", status.reason)
                self._reasons[name] = (status.reason, now)


def _changed(old: CIMInstance | None, new: CIMInstance) -> list[str]:
    if old is None:
        return list(new.properties)
    out = [p.name for p in new.properties.values()
           if old.properties.get(p.name) is None or old.properties[p.name].value != p.value]
    return out + [n for n in old.properties if n not in new.properties]
