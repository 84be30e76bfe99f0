"""Add, remove and change disks and NICs: AddResourceSettings, RemoveResourceSettings and
the device part of ModifyResourceSettings (VIRT_VirtualSystemManagementService).

Where a change goes depends on the configuration it names:
- a running system's live configuration (VSSD `VIRT:state:<uuid>`, its RASDs): libvirt,
  on the live domain (attach / detach / update), and on its persistent libvirt
  definition too when it has one; a failed live change leaves that definition alone;
- a definition the Manager holds (`VIRT:defined:<uuid>`): Manager.UpdateDomain with the
  new Disks / NICs list.

Everything in a call is checked before anything is applied (bad input is an error at
once), then the change runs through the service's `run_job` (Jobs.run: 0 when done
within --sync-wait, else 4096 and a job; docs/architecture.md, "Jobs"); a call that fails
half way undoes what it did, so nothing is left half-applied. Bad input is
CIM_ERR_INVALID_PARAMETER naming the parameter and field: an unknown ResourceType, a
target already in use, a MAC already present, a file or device that does not exist on
this host (libvirt's test driver does not check paths), a RASD of another system.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
import re
import stat
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, TypeVar

import pywbem
from pywbem import CIMError, CIMInstance, CIMInstanceName

from ..domain.records import Disk, DomainConfig, DomainRecord, Nic
from ..domain.sources import NotSupported, SourceError
from .backend import VIRT_NS, Backend
from .jobs import LIBVIRT, MANAGER, set_phase
from .settings import (EPASD_CLASS, RT_DISK, RT_DVD, RT_ETHERNET, RT_FLOPPY, SASD_CLASS,
                       split_iid, vssd_iid)

log = logging.getLogger(__name__)
_T = TypeVar("_T")

RC_OK, RC_NOT_SUPPORTED = 0, 1
Outcome = tuple[int, dict[str, Any]]
RunJob = Callable[[str, list[str], str, Coroutine[Any, Any, Outcome]], Awaitable[Outcome]]
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_DEVICE = {RT_DISK: "disk", RT_DVD: "cdrom", RT_FLOPPY: "floppy"}


def bad(what: str, why: str) -> CIMError:
    return CIMError(pywbem.CIM_ERR_INVALID_PARAMETER, f"{what}: {why}")


def _first(values: Any) -> str | None:
    if not values:
        return None
    return str(values[0]) if values[0] is not None else None


def source_kind(path: str, what: str) -> str:
    """"block" or "file" for a source path that exists on this host (the server's: with
    libvirt's test driver nothing else checks it); CIM_ERR_INVALID_PARAMETER else."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise bad(what, f"{path} does not exist on this host ({exc.strerror})") from None
    return "block" if stat.S_ISBLK(st.st_mode) else "file"


def disk_from_rasd(r: CIMInstance, what: str) -> Disk:
    rt = int(r["ResourceType"])
    target = r.get("Address")
    if not target:
        raise bad(f"{what}.Address", "a disk needs its target device (vdb, sdc, hdc)")
    source = _first(r.get("HostResource"))
    device = _DEVICE[rt]
    if source is None and device == "disk":
        raise bad(f"{what}.HostResource", "a disk needs a source (a file or block device)")
    kind = source_kind(source, f"{what}.HostResource") if source else None
    return Disk(target=str(target), source=source, device=device,
                bus=str(r["ResourceSubType"]) if r.get("ResourceSubType") else None,
                source_type=kind)


def nic_from_rasd(r: CIMInstance, what: str) -> Nic:
    mac = str(r.get("Address") or "").strip().lower()
    if not mac:
        mac = "52:54:00:" + ":".join(f"{random.randrange(256):02x}" for _ in range(3))
    elif not _MAC.match(mac):
        raise bad(f"{what}.Address", f"{mac!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
    source = _first(r.get("Connection")) or _first(r.get("HostResource"))
    kind = str(r.get("OtherResourceType") or ("network" if source else "user"))
    if kind not in ("network", "bridge", "user"):
        raise bad(f"{what}.OtherResourceType", f"{kind!r} is not network, bridge or user")
    link = r.get("LinkState") if "LinkState" in r else None
    if link is not None and int(link) not in (2, 3):
        raise bad(f"{what}.LinkState", f"{link} is not 2 (up) or 3 (down)")
    return Nic(mac=mac, type=kind, source=source if kind != "user" else None,
               model=str(r["ResourceSubType"]) if r.get("ResourceSubType") else None,
               link_state=None if link is None else ("down" if int(link) == 3 else "up"))


def disk_values(d: Disk) -> dict[str, Any]:
    """A disk as Manager contract keys (MANAGER.md, Disks)."""
    return {k: v for k, v in (("Target", d.target), ("Source", d.source), ("Device", d.device),
                              ("Bus", d.bus), ("CapacityBytes", d.capacity_bytes))
            if v is not None}


def nic_values(n: Nic) -> dict[str, Any]:
    return {k: v for k, v in (("MAC", n.mac), ("Type", n.type), ("Source", n.source),
                              ("Model", n.model)) if v is not None}


def rasd_path(which: str, uuid: str, device: Disk | Nic) -> CIMInstanceName:
    cls, dev = (SASD_CLASS, device.target) if isinstance(device, Disk) else \
        (EPASD_CLASS, device.mac)
    return CIMInstanceName(cls, {"InstanceID": f"{vssd_iid(which, uuid)}/{dev}"},
                           namespace=VIRT_NS)


class HotPlug:
    """The device methods of the management service over one backend."""

    def __init__(self, backend: Backend,
                 embedded: Callable[[str, Any, str], CIMInstance],
                 manager_call: Callable[[str, Awaitable[Any]], Awaitable[Any]],
                 run_job: RunJob | None = None):
        self.b = backend
        self.embedded = embedded
        self.manager_call = manager_call
        self.run_job = run_job

    async def _run(self, method: str, uuids: list[str], title: str,
                   work: Coroutine[Any, Any, Outcome]) -> Outcome:
        if self.run_job is None:
            return await work
        return await self.run_job(method, uuids, title, work)

    # ---- what a call names ------------------------------------------------------------

    def _config(self, parts: tuple[str, str, str | None], what: str
                ) -> tuple[DomainRecord, DomainConfig]:
        uuid, which, _dev = parts
        rec = self.b.inventory.get(uuid)
        cfg = None
        if rec is not None:
            cfg = rec.running.config if which == "state" and rec.running else \
                rec.defined if which == "defined" else None
        if rec is None or cfg is None:
            raise bad(what, f"there is no configuration {vssd_iid(which, uuid)} (a "
                      f"{'running system' if which == 'state' else 'definition'} "
                      f"with UUID {uuid})")
        return rec, cfg

    def _device_of(self, cfg: DomainConfig, dev: str | None, what: str) -> Disk | Nic:
        found: Disk | Nic | None = next((d for d in cfg.disks if d.target == dev), None) \
            or next((n for n in cfg.nics if n.mac == dev), None)
        if dev in ("proc", "mem"):
            raise bad(what, "processors and memory are changed with ModifyResourceSettings "
                            "(VirtualQuantity), not added or removed")
        if found is None:
            raise bad(what, f"{cfg.name} has no disk or NIC {dev!r}")
        return found

    def _check_new(self, cfg: DomainConfig, dev: Disk | Nic, taken: set[str], what: str) -> None:
        if isinstance(dev, Disk):
            if dev.target in taken or any(d.target == dev.target for d in cfg.disks):
                raise bad(f"{what}.Address", f"target {dev.target} is already used by "
                          f"{cfg.name}")
            taken.add(dev.target)
            return
        if dev.mac in taken or any(n.mac == dev.mac for n in cfg.nics):
            raise bad(f"{what}.Address", f"MAC {dev.mac} is already present in {cfg.name}")
        for rec in self.b.inventory.records():
            if rec.uuid != cfg.uuid and any(n.mac == dev.mac for c in
                                            (rec.running.config if rec.running else None,
                                             rec.defined) if c for n in c.nics):
                raise bad(f"{what}.Address", f"MAC {dev.mac} is already present in {rec.name}")
        taken.add(dev.mac)
        nets = self.b.inventory.resources.networks
        if dev.type == "network" and nets and dev.source not in nets:
            raise bad(f"{what}.Connection", f"there is no libvirt network {dev.source!r} "
                      f"(there are: {', '.join(sorted(nets))})")

    # ---- applying ---------------------------------------------------------------------

    async def _update_definition(self, rec: DomainRecord, disks: Sequence[Disk],
                                 nics: Sequence[Nic], what: str) -> int:
        manager = self.b.require_manager()
        if not manager.offers("UpdateDomain"):
            return RC_NOT_SUPPORTED
        changes = {"Disks": [disk_values(d) for d in disks],
                   "NICs": [nic_values(n) for n in nics]}
        set_phase(MANAGER)
        try:
            await self.manager_call(what, manager.update_domain(rec.uuid, changes))
        except NotSupported:
            return RC_NOT_SUPPORTED
        await self.b.settle_defined()
        return RC_OK

    async def _live(self, rec: DomainRecord, steps: list[tuple[str, Disk | Nic, Any]]) -> int:
        """Apply (op, device, old) steps to a running domain; undo the done ones when
        one fails. Returns RC_NOT_SUPPORTED when libvirt's driver cannot do it."""
        src = self.b.require_libvirt()
        assert rec.running is not None
        persistent = rec.running.persistent
        calls: dict[str, Callable[..., Awaitable[None]]] = {
            "attach": src.attach_device, "detach": src.detach_device}
        done: list[tuple[str, Disk | Nic, Any]] = []
        # No abort hook: stopping between steps would leave a change half applied.
        set_phase(LIBVIRT)
        try:
            for op, dev, old in steps:
                if op == "update":
                    await src.update_device(rec.uuid, dev, old, config=persistent)
                else:
                    await calls[op](rec.uuid, dev, config=persistent)
                done.append((op, dev, old))
                if op == "detach":
                    await self._gone(rec.uuid, dev)
        except (SourceError, CIMError) as exc:
            await self._undo(rec.uuid, done, persistent)
            if isinstance(exc, NotSupported):
                log.info("libvirt cannot change devices of %s: %s", rec.name, exc)
                return RC_NOT_SUPPORTED
            if isinstance(exc, CIMError):
                raise
            raise CIMError(pywbem.CIM_ERR_FAILED, f"libvirt could not change the devices of "
                           f"{rec.name}: {exc.message}") from None
        await self.b.settle_running(rec.uuid)
        return RC_OK

    async def _gone(self, uuid: str, dev: Disk | Nic) -> None:
        """After a live detach: the device must be gone. A guest that has not released
        it yet (no ACPI hot-plug) keeps it: say so rather than answer 0."""
        await self.b.settle_running(uuid)
        rec = self.b.inventory.get(uuid)
        cfg = rec.running.config if rec is not None and rec.running else None
        present = cfg is not None and (
            any(d.target == dev.target for d in cfg.disks) if isinstance(dev, Disk)
            else any(n.mac == dev.mac for n in cfg.nics))
        if present:
            name = dev.target if isinstance(dev, Disk) else dev.mac
            raise CIMError(pywbem.CIM_ERR_FAILED,
                           f"libvirt asked the guest to release {name}, and the guest has "
                           f"not done so (a guest without hot-unplug support never does); "
                           f"it disappears when the guest releases it")

    async def _undo(self, uuid: str, done: list[tuple[str, Disk | Nic, Any]],
                    persistent: bool) -> None:
        src = self.b.libvirt
        for op, dev, old in reversed(done):
            try:
                if src is None:
                    break
                if op == "attach":
                    await src.detach_device(uuid, dev, config=persistent)
                elif op == "detach":
                    await src.attach_device(uuid, dev, config=persistent)
                else:
                    await src.update_device(uuid, old, dev, config=persistent)
            except SourceError as exc:
                log.error("could not undo the %s of a device of %s: %s", op, uuid, exc)

    # ---- the methods ------------------------------------------------------------------

    async def add_resource_settings(self, params: Mapping[str, Any]):
        target = params.get("AffectedConfiguration")
        if target is None:
            raise bad("AffectedConfiguration", "it is required (a VIRT_VirtualSystemSettingData)")
        parts = split_iid(target.keybindings.get("InstanceID"))
        if parts is None or parts[2] is not None:
            raise bad("AffectedConfiguration", "it must name a VIRT_VirtualSystemSettingData "
                      "(VIRT:state:<uuid> or VIRT:defined:<uuid>)")
        rec, cfg = self._config(parts, "AffectedConfiguration")
        settings = params.get("ResourceSettings") or []
        if not settings:
            raise bad("ResourceSettings", "at least one RASD is required")
        new: list[Disk | Nic] = []
        taken: set[str] = set()
        for i, text in enumerate(settings):
            what = f"ResourceSettings[{i}]"
            r = self.embedded(what, text, "CIM_ResourceAllocationSettingData")
            other = split_iid(r.get("InstanceID"))
            if other is not None and other[0] != rec.uuid:
                raise bad(f"{what}.InstanceID", f"{r['InstanceID']} is a setting of another "
                          f"system, not of {rec.name}")
            rt = r.get("ResourceType")
            if rt is None or int(rt) not in (RT_DISK, RT_DVD, RT_FLOPPY, RT_ETHERNET):
                raise bad(f"{what}.ResourceType", f"{rt} cannot be added: disks (17), DVD "
                          f"(16), floppy (14) and NICs (10) can")
            dev: Disk | Nic = nic_from_rasd(r, what) if int(rt) == RT_ETHERNET \
                else disk_from_rasd(r, what)
            self._check_new(cfg, dev, taken, what)
            new.append(dev)
        which = parts[1]
        if not self._can_apply(which):
            return RC_NOT_SUPPORTED, {}

        async def apply() -> Outcome:
            if which == "defined":
                rc = await self._update_definition(
                    rec, [*cfg.disks, *(d for d in new if isinstance(d, Disk))],
                    [*cfg.nics, *(n for n in new if isinstance(n, Nic))], "add the devices")
            else:
                rc = await self._live(rec, [("attach", dev, None) for dev in new])
            if rc != RC_OK:
                return rc, {}
            return RC_OK, {"ResultingResourceSettings": [rasd_path(which, rec.uuid, d)
                                                         for d in new]}
        return await self._run("AddResourceSettings", [rec.uuid],
                               f"AddResourceSettings of {rec.name}", apply())

    def _can_apply(self, which: str) -> bool:
        """Checked before a call starts: the source it needs is there (else the usual
        CIM_ERR_FAILED), and a definition change needs Manager.UpdateDomain (False:
        Not Supported)."""
        if which == "defined":
            return self.b.require_manager().offers("UpdateDomain")
        self.b.require_libvirt()
        return True

    async def remove_resource_settings(self, params: Mapping[str, Any]):
        refs = params.get("ResourceSettings") or []
        if not refs:
            raise bad("ResourceSettings", "at least one RASD reference is required")
        groups: dict[tuple[str, str], list[Disk | Nic]] = {}
        records: dict[tuple[str, str], tuple[DomainRecord, DomainConfig]] = {}
        for i, ref in enumerate(refs):
            what = f"ResourceSettings[{i}]"
            parts = split_iid(ref.keybindings.get("InstanceID"))
            if parts is None or parts[2] is None:
                raise bad(what, "it must name a disk or NIC setting (InstanceID "
                                "VIRT:state|defined:<uuid>/<target or MAC>)")
            key = (parts[0], parts[1])
            records.setdefault(key, self._config(parts, what))
            dev = self._device_of(records[key][1], parts[2], what)
            if dev in groups.setdefault(key, []):
                raise bad(what, f"{parts[2]} is named twice")
            groups[key].append(dev)
        if not all(self._can_apply(which) for _uuid, which in groups):
            return RC_NOT_SUPPORTED, {}

        async def apply() -> Outcome:
            for key, devices in groups.items():
                rec, cfg = records[key]
                if key[1] == "defined":
                    rc = await self._update_definition(
                        rec, [d for d in cfg.disks if d not in devices],
                        [n for n in cfg.nics if n not in devices], "remove the devices")
                else:
                    rc = await self._live(rec, [("detach", d, None) for d in devices])
                if rc != RC_OK:
                    return rc, {}
            return RC_OK, {}
        uuids = list(dict.fromkeys(uuid for uuid, _which in groups))
        names = ", ".join(dict.fromkeys(records[k][0].name for k in groups))
        return await self._run("RemoveResourceSettings", uuids,
                               f"RemoveResourceSettings of {names}", apply())

    def device_change(self, r: CIMInstance, parts: tuple[str, str, str | None], what: str
                      ) -> tuple[DomainRecord, DomainConfig, Disk | Nic, Disk | Nic]:
        """ModifyResourceSettings of a disk or NIC: (record, config, old, new). A disk's
        source (HostResource; none ejects a CD-ROM) and a NIC's LinkState change."""
        rec, cfg = self._config(parts, what)
        old = self._device_of(cfg, parts[2], what)
        if isinstance(old, Disk):
            if "HostResource" not in r:
                raise bad(f"{what}.HostResource", "give the new source (empty: eject)")
            source = _first(r.get("HostResource"))
            if source is None and old.device == "disk":
                raise bad(f"{what}.HostResource", "a disk cannot be left without a source")
            kind = source_kind(source, f"{what}.HostResource") if source else old.source_type
            return rec, cfg, old, dataclasses.replace(old, source=source, source_type=kind)
        link = r.get("LinkState") if "LinkState" in r else None
        if link is None or int(link) not in (2, 3):
            raise bad(f"{what}.LinkState", "give 2 (up) or 3 (down)")
        if parts[1] == "defined":
            raise bad(f"{what}.LinkState", "the link state of a definition cannot be changed "
                      "(the Manager's definitions have none); change the running system's")
        return rec, cfg, old, dataclasses.replace(old, link_state="down" if int(link) == 3
                                                  else "up")

    async def apply_device_changes(self, changes: list[tuple[DomainRecord, DomainConfig,
                                                             Disk | Nic, Disk | Nic, str]]) -> int:
        """Apply checked device changes, per configuration."""
        groups: dict[tuple[str, str], list[tuple[DomainRecord, DomainConfig, Any, Any]]] = {}
        for rec, cfg, old, new, which in changes:
            groups.setdefault((rec.uuid, which), []).append((rec, cfg, old, new))
        for (_uuid, which), items in groups.items():
            rec, cfg = items[0][0], items[0][1]
            if which == "defined":
                swap = {old: new for _r, _c, old, new in items}
                rc = await self._update_definition(
                    rec, [swap.get(d, d) for d in cfg.disks], [swap.get(n, n) for n in cfg.nics],
                    "modify the devices")
            else:
                rc = await self._live(rec, [("update", new, old) for _r, _c, old, new in items])
            if rc != RC_OK:
                return rc
        return RC_OK
