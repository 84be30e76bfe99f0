"""What a definition's disk sources are, asked of the host and of libvirt.

A definition names a disk by its `Source`: a path (a regular file: an image; a block
device) or `pool/volume` (a libvirt storage volume). The Manager writes the disk with
the matching libvirt type (file, block, volume) and the image format libvirt needs in
<driver type=...>: `qemu-img info` for files and devices, the volume's own XML for
volumes. A format that cannot be found out is left unset, never guessed (a qcow2
image started as raw would show the guest its qcow2 header as its disk). What the
definition states itself (`Type`, `Format`, `CapacityBytes`) is kept. A templated
definition's rendered XML is resolved the same way (`resolve_domain_xml`).

Blocking (a subprocess, libvirt calls): called off the event loop.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import stat
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import replace
from typing import Any

import libvirt

from ..domain.records import Disk, DomainConfig

log = logging.getLogger(__name__)

QEMU_IMG_TIMEOUT = 30.0


class DiskError(Exception):
    """A disk source that cannot be used (a volume libvirt does not have)."""


def source_kind(source: str) -> str:
    """file, block or volume, from what `source` names on this host."""
    if not os.path.isabs(source):
        return "volume" if "/" in source else "file"
    try:
        st = os.stat(source)
    except OSError:
        return "file"              # libvirt says what is wrong with it at start
    return "block" if stat.S_ISBLK(st.st_mode) else "file"


def image_info(path: str) -> dict[str, Any] | None:
    """`qemu-img info --output=json` of a regular file or block device (format,
    virtual-size), or None when it cannot be read (no qemu-img, no such file, not an
    image, a FIFO that would block)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        return None
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        log.warning("qemu-img is not installed: the format of %s is not known (give the "
                    "disk a Format)", path)
        return None
    try:
        # -U: an image in use by a running guest can still be read
        out = subprocess.run([qemu_img, "info", "-U", "--output=json", "--", path],
                             capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT,
                             check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("qemu-img info %s failed: %s", path, exc)
        return None
    if out.returncode != 0:
        log.warning("qemu-img info %s failed: %s", path, out.stderr.strip()[:300])
        return None
    try:
        info = json.loads(out.stdout)
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


def volume_info(conn: libvirt.virConnect, source: str) -> tuple[str | None, int | None]:
    """(format, capacity in bytes) of the libvirt storage volume `pool/volume`; DiskError
    when libvirt has no such pool or volume."""
    pool_name, _, vol_name = source.partition("/")
    if not pool_name or not vol_name:
        raise DiskError(f"{source!r} does not name a storage volume as pool/volume")
    try:
        pool = conn.storagePoolLookupByName(pool_name)
    except libvirt.libvirtError as exc:
        raise DiskError(f"no storage pool {pool_name!r}: "
                        f"{exc.get_error_message() or exc}") from None
    try:
        vol = pool.storageVolLookupByName(vol_name)
    except libvirt.libvirtError as exc:
        raise DiskError(f"storage pool {pool_name} has no volume {vol_name!r}: "
                        f"{exc.get_error_message() or exc}") from None
    fmt = None
    capacity = None
    try:
        root = ET.fromstring(vol.XMLDesc(0))
        element = root.find("target/format")
        fmt = element.get("type") if element is not None else None
        capacity = int(vol.info()[1])
    except (libvirt.libvirtError, ET.ParseError, ValueError) as exc:
        log.warning("cannot read storage volume %s: %s", source, exc)
    return fmt or None, capacity


def resolve_disk(conn: libvirt.virConnect | None, d: Disk, *, strict: bool) -> Disk:
    """`d` with its Type, Format and CapacityBytes filled in from what its source is.
    `strict`: a volume libvirt does not have is a DiskError (at start); otherwise the
    disk is kept as it is (a definition may name a volume made later)."""
    if not d.source:
        return d
    kind = d.source_type or source_kind(d.source)
    fmt, capacity = d.format, d.capacity_bytes
    if kind == "volume":
        if fmt is None or capacity is None:
            if conn is None:
                if strict:
                    raise DiskError(f"cannot look up storage volume {d.source}: no libvirt")
            else:
                try:
                    vfmt, vcap = volume_info(conn, d.source)
                except DiskError:
                    if strict:
                        raise
                    vfmt, vcap = None, None
                fmt = fmt or vfmt
                capacity = capacity if capacity is not None else vcap
    elif fmt is None or capacity is None:
        info = image_info(d.source)
        if info is not None:
            found = info.get("format")
            fmt = fmt or (found if isinstance(found, str) and found else None)
            size = info.get("virtual-size")
            if capacity is None and isinstance(size, int) and size >= 0:
                capacity = size
    return replace(d, source_type=kind, format=fmt, capacity_bytes=capacity)


def resolve_disks(conn: libvirt.virConnect | None, cfg: DomainConfig, *,
                  strict: bool = False) -> DomainConfig:
    """`cfg` with every disk resolved (resolve_disk)."""
    if not cfg.disks:
        return cfg
    disks = []
    for d in cfg.disks:
        try:
            disks.append(resolve_disk(conn, d, strict=strict))
        except DiskError as exc:
            raise DiskError(f"{cfg.name}: disk {d.target}: {exc}") from None
    return replace(cfg, disks=tuple(disks))


def resolve_domain_xml(conn: libvirt.virConnect | None, xml: str, *, strict: bool) -> str:
    """Domain XML written by someone else (a rendered template) with its disks resolved
    as an ordinary definition's are: a path disk (`<source file=>` or `<source dev=>`)
    gets the type of what the path is on this host (file or block, its source attribute
    to match), and every disk whose `<driver>` states no type gets the image format
    (qemu-img info; a storage volume's own XML). What the XML states in `<driver
    type=>` is kept; disks of other types (network, dir, ...) are left as written.
    `strict`: a storage volume libvirt does not have is a DiskError (at start). XML that
    needs no change, or that does not parse (the caller's parser says why), comes back
    as it was."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return xml
    changed = False
    for el in root.findall("devices/disk"):
        src, target = el.find("source"), el.find("target")
        if src is None:
            continue
        dev = (target.get("dev") if target is not None else None) or "?"
        driver = el.find("driver")
        stated = (driver.get("type") or None) if driver is not None else None
        kind = el.get("type") or "file"
        if kind in ("file", "block"):
            path = src.get("file") or src.get("dev")
            if not path or not os.path.isabs(path):
                continue
            # a path this host does not have stays as written: libvirt says what is wrong
            disk = Disk(dev, path, source_type=source_kind(path) if os.path.exists(path)
                        else kind, format=stated)
        elif kind == "volume" and src.get("pool") and src.get("volume"):
            disk = Disk(dev, f"{src.get('pool')}/{src.get('volume')}", source_type="volume",
                        format=stated)
        else:
            continue
        if stated is None:       # the format (and the size, unused here) from the image
            try:
                disk = resolve_disk(conn, disk, strict=strict)
            except DiskError as exc:
                raise DiskError(f"disk {dev}: {exc}") from None
        if disk.source_type in ("file", "block") and disk.source_type != kind:
            el.set("type", disk.source_type)
            src.attrib.pop("file", None)
            src.attrib.pop("dev", None)
            src.set("dev" if disk.source_type == "block" else "file", disk.source or "")
            changed = True
        if disk.format and not stated:
            if driver is None:
                driver = ET.Element("driver")
                el.insert(0, driver)
            driver.set("type", disk.format)
            changed = True
    if not changed:
        return xml
    _keep_prefixes(xml)
    return ET.tostring(root, encoding="unicode")


def _keep_prefixes(xml: str) -> None:
    """Write the namespaces of `xml` (`qemu:commandline`, metadata) with their own
    prefixes, not ElementTree's ns0, ns1."""
    try:
        for _event, (prefix, uri) in ET.iterparse(io.StringIO(xml), events=("start-ns",)):
            if prefix:
                with contextlib.suppress(ValueError):
                    ET.register_namespace(prefix, uri)
    except ET.ParseError:
        pass


__all__ = ["DiskError", "resolve_disk", "resolve_disks", "resolve_domain_xml", "source_kind",
           "image_info", "volume_info"]
