"""libvirt domain XML <-> DomainConfig, both ways, as pure functions.

The libvirt source reads a running domain's live XML with `parse_domain_xml`; the
reference Manager starts one of its own definitions as a transient libvirt domain
with `config_to_domain_xml`. Input is libvirt's XML, which we still treat as data:
anything missing or malformed becomes None rather than an exception, except for the
UUID and name, without which there is no domain.
"""
from __future__ import annotations

import secrets
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from xml.sax.saxutils import escape, quoteattr

from .defaults import DEFAULT_ARCH, DEFAULT_MEMORY_KIB, DEFAULT_OS_TYPE, DEFAULT_VCPUS
from .records import (Disk, DomainConfig, Graphics, Nic, canonical_uuid, shared_number,
                      shared_word)

# libvirt's <domain type=...> spelled the way CIM's VirtualSystemType shows it.
_TYPE_NAMES = {"kvm": "KVM", "qemu": "QEMU", "xen": "Xen", "lxc": "LXC", "test": "Test",
               "vmware": "VMware", "hyperv": "Hyper-V", "bhyve": "bhyve", "vbox": "VirtualBox"}
_UNIT_KIB = {"b": 1 / 1024, "bytes": 1 / 1024, "kb": 1000 / 1024, "k": 1, "kib": 1,
             "mb": 1000 ** 2 / 1024, "m": 1024, "mib": 1024, "gb": 1000 ** 3 / 1024,
             "g": 1024 ** 2, "gib": 1024 ** 2, "tb": 1000 ** 4 / 1024, "t": 1024 ** 3,
             "tib": 1024 ** 3}


class DomainXMLError(ValueError):
    """The XML has no usable UUID or name, or is not XML."""


def _int(text: str | None) -> int | None:
    try:
        v = int((text or "").strip())
    except ValueError:
        return None
    return v if v >= 0 else None


# _kib's answers by (text, unit): the hosts' domains share a few memory sizes, and
# start-up reads two of them per domain (issue 16). Bounded, and only for short texts;
# full, it only misses. Entries are never removed, so threads may share it unlocked.
_KIB_SEEN: dict[tuple[str | None, str | None], int | None] = {}
_KIB_SEEN_MAX = 1024
_UNSEEN = object()


def _kib(elem: ET.Element | None) -> int | None:
    if elem is None:
        return None
    key = (elem.text, elem.get("unit"))
    hit = _KIB_SEEN.get(key, _UNSEEN)
    if hit is not _UNSEEN:
        return hit  # type: ignore[return-value]
    value = _int(key[0])
    factor = _UNIT_KIB.get((key[1] or "KiB").lower())
    kib = None if value is None or factor is None else shared_number(int(value * factor))
    if len(_KIB_SEEN) < _KIB_SEEN_MAX and len(key[0] or "") <= 32 and len(key[1] or "") <= 8:
        _KIB_SEEN[key] = kib
    return kib


def _first(elem: ET.Element, tag: str) -> ET.Element | None:
    """`elem.find(tag)` for a plain child tag, without ElementPath's machinery."""
    for child in elem:
        if child.tag == tag:
            return child
    return None


def parse_domain_xml(xml: str, autostart: bool | None = None, *,
                     detail: bool = False) -> DomainConfig:
    """Parse libvirt's domain XML (virDomainGetXMLDesc) into a DomainConfig.

    `detail`: also what only a running domain's devices show (the disks' source type,
    pool and block size, the NICs' link state, the consoles): the libvirt source asks
    for it; a definition (the reference Manager's libvirt store) keeps to what the
    Manager contract carries, so that it compares equal to its D-Bus round trip.

    The server parses every running domain's XML at start-up (10,000 in the benchmark,
    docs/architecture.md "Sources": "a full read only at (re)connect"): one walk over
    the root's children and the devices', the same elements ElementPath's `find`,
    `findall` and `findtext` would pick (the first of a tag, in document order), at a
    third of their cost."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise DomainXMLError(f"not XML: {exc}") from None
    return config_from_root(root, autostart, detail=detail)


def parse_domain_xmls(xmls: Sequence[str], autostarts: Sequence[bool | None], *,
                      detail: bool = False) -> list[DomainConfig | DomainXMLError]:
    """`parse_domain_xml` of each of `xmls` (with the autostart flag at the same index):
    a DomainConfig, or the DomainXMLError that document alone raises.

    The documents are parsed as one: each inside a wrapper element that carries a
    token drawn for this call, all inside one root. A new expat parser per document
    was a third of the parse at start-up (issue 16). The split is trusted only when the
    root holds exactly one wrapper per document, each with the token and one element;
    a document that is not well-formed alone (an XML declaration, a DOCTYPE, a stray
    end tag) breaks the whole parse or that check, and then every document of the
    batch is parsed alone."""
    roots = _roots_together(xmls)
    out: list[DomainConfig | DomainXMLError] = []
    for i, xml in enumerate(xmls):
        try:
            if roots is None:
                out.append(parse_domain_xml(xml, autostarts[i], detail=detail))
            else:
                out.append(config_from_root(roots[i], autostarts[i], detail=detail))
        except DomainXMLError as exc:
            out.append(exc)
    return out


def _roots_together(xmls: Sequence[str]) -> list[ET.Element] | None:
    """The root element of each document from one parse of all of them, or None when
    they cannot be told apart that way (see parse_domain_xmls)."""
    if len(xmls) < 2:
        return None
    token = secrets.token_hex(8)
    open_tag = f'<w t="{token}">'
    try:
        batch = ET.fromstring(f"<b>{open_tag}" + f"</w>{open_tag}".join(xmls) + "</w></b>")
    except ET.ParseError:
        return None
    if len(batch) != len(xmls) or (batch.text or "").strip():
        return None
    roots = []
    for wrapper in batch:
        if wrapper.get("t") != token or len(wrapper) != 1 or (wrapper.text or "").strip() \
                or (wrapper.tail or "").strip() or (wrapper[0].tail or "").strip():
            return None
        roots.append(wrapper[0])
    return roots


def config_from_root(root: ET.Element, autostart: bool | None = None, *,
                     detail: bool = False) -> DomainConfig:
    """The DomainConfig of a parsed domain XML document (parse_domain_xml)."""
    if root.tag != "domain":
        raise DomainXMLError(f"root element is <{root.tag}>, not <domain>")
    # The first child of each tag (find / findtext), every <devices> and <os> (findall
    # "devices/disk" and find "os/type" look under each of them, in order).
    first: dict[str, ET.Element] = {}
    devices: list[ET.Element] = []
    oses: list[ET.Element] = []
    for child in root:
        tag = child.tag
        if tag == "devices":
            devices.append(child)
        elif tag == "os":
            oses.append(child)
        if tag not in first and isinstance(tag, str):
            first[tag] = child
    uuid_el, name_el, title_el = first.get("uuid"), first.get("name"), first.get("title")
    uuid = canonical_uuid(uuid_el.text or "" if uuid_el is not None else None)
    name = ((name_el.text or "") if name_el is not None else "").strip()
    if uuid is None or not name:
        raise DomainXMLError("domain XML without a valid uuid or name")
    os_type = None
    for os_el in oses:
        os_type = _first(os_el, "type")
        if os_type is not None:
            break
    disks = []
    nics = []
    graphics = []
    for dev in devices:
        for d in dev:
            tag = d.tag
            if tag == "disk":
                disk = _disk(d, detail)
                if disk is not None:
                    disks.append(disk)
            elif tag == "interface":
                nic = _nic(d, detail)
                if nic is not None:
                    nics.append(nic)
            elif tag == "graphics" and detail:
                g = _graphics(d)
                if g is not None:
                    graphics.append(g)
    vcpu = first.get("vcpu")
    max_vcpus = vcpus = None
    if vcpu is not None:
        max_vcpus = _int(vcpu.text)
        current = vcpu.get("current")
        vcpus = _int(current) if current else None
        if vcpus is None:
            vcpus = max_vcpus
    dtype = (root.get("type") or "").lower()
    memory = first.get("memory")
    max_memory = _kib(memory)
    return DomainConfig(
        uuid=uuid, name=name,
        title=((title_el.text or None) if title_el is not None else None),
        type=_TYPE_NAMES.get(dtype) or shared_word(root.get("type")),
        os_type=shared_word(os_type.text.strip()) if os_type is not None and os_type.text else None,
        arch=shared_word(os_type.get("arch")) if os_type is not None else None,
        vcpus=vcpus,
        max_vcpus=max_vcpus,
        memory_kib=_kib(first.get("currentMemory")) or max_memory,
        max_memory_kib=max_memory,
        autostart=None if autostart is None else bool(autostart),
        disks=tuple(disks), nics=tuple(nics), graphics=tuple(graphics))


def _disk(d: ET.Element, detail: bool) -> Disk | None:
    target = _first(d, "target")
    dev = target.get("dev") if target is not None else None
    if target is None or not dev:
        return None
    src = _first(d, "source")
    source = pool = None
    if src is not None:
        source = src.get("file") or src.get("dev") or src.get("volume") or src.get("name")
        pool = shared_word(src.get("pool"))
    blockio = _first(d, "blockio") if detail else None
    driver = _first(d, "driver") if detail else None
    return Disk(target=sys.intern(dev), source=source,
                device=shared_word(d.get("device")) or "disk", bus=shared_word(target.get("bus")),
                source_type=shared_word(d.get("type")) if detail else None,
                pool=pool if detail else None,
                block_size=_int(blockio.get("logical_block_size"))
                if blockio is not None else None,
                format=(shared_word(driver.get("type")) or None) if driver is not None else None)


def _nic(n: ET.Element, detail: bool) -> Nic | None:
    mac = _first(n, "mac")
    address = mac.get("address") if mac is not None else None
    if mac is None or not address:
        return None
    src = _first(n, "source")
    source = None
    if src is not None:
        source = shared_word(src.get("network") or src.get("bridge") or src.get("dev"))
    model = _first(n, "model")
    link = _first(n, "link") if detail else None
    return Nic(mac=address.lower(), type=shared_word(n.get("type")), source=source,
               model=shared_word(model.get("type")) if model is not None else None,
               link_state=shared_word(link.get("state")) if link is not None else None)


def _graphics(g: ET.Element) -> Graphics | None:
    if not g.get("type"):
        return None
    port = _int(g.get("port"))
    listen = g.get("listen")
    if listen is None:
        first = _first(g, "listen")
        listen = first.get("address") if first is not None else None
    return Graphics(type=shared_word(g.get("type")) or "", port=port or None,
                    listen=shared_word(listen),
                    autoport=g.get("autoport") == "yes")


def config_to_domain_xml(cfg: DomainConfig, libvirt_type: str = "test") -> str:
    """Domain XML that libvirt can create from a definition (same UUID and name)."""
    memory = cfg.max_memory_kib or cfg.memory_kib or DEFAULT_MEMORY_KIB
    current = min(cfg.memory_kib or memory, memory)
    parts = [f"<domain type={quoteattr(libvirt_type)}>",
             f"<name>{escape(cfg.name)}</name>", f"<uuid>{cfg.uuid}</uuid>"]
    if cfg.title:
        parts.append(f"<title>{escape(cfg.title)}</title>")
    parts += [f"<memory unit='KiB'>{memory}</memory>",
              f"<currentMemory unit='KiB'>{current}</currentMemory>",
              f"<vcpu>{cfg.vcpus or DEFAULT_VCPUS}</vcpu>",
              f"<os><type arch={quoteattr(cfg.arch or DEFAULT_ARCH)}>"
              f"{escape(cfg.os_type or DEFAULT_OS_TYPE)}</type></os>", "<devices>"]
    parts += [disk_to_xml(d) for d in cfg.disks]
    parts += [nic_to_xml(n) for n in cfg.nics]
    parts.append("</devices></domain>")
    return "".join(parts)


def disk_to_xml(d: Disk) -> str:
    """One <disk> element (domain XML, or a device to attach, detach or update)."""
    kind = d.source_type if d.source_type in ("file", "block", "volume") else "file"
    src = ""
    if d.source:
        if kind == "volume":
            # a Manager definition names its volume `pool/volume`
            name, pool_name = d.source, d.pool
            if not pool_name and "/" in name:
                pool_name, _, name = name.partition("/")
            pool = f" pool={quoteattr(pool_name)}" if pool_name else ""
            src = f"<source{pool} volume={quoteattr(name)}/>"
        else:
            src = f"<source {'dev' if kind == 'block' else 'file'}={quoteattr(d.source)}/>"
    bus = f" bus={quoteattr(d.bus)}" if d.bus else ""
    blockio = f"<blockio logical_block_size='{int(d.block_size)}'/>" if d.block_size else ""
    # the image format: never left for the hypervisor to guess (a qcow2 read as raw)
    driver = f"<driver type={quoteattr(d.format)}/>" if d.format else ""
    return (f"<disk type='{kind}' device={quoteattr(d.device or 'disk')}>{driver}{src}"
            f"<target dev={quoteattr(d.target)}{bus}/>{blockio}</disk>")


NIC_TYPES = ("network", "bridge", "direct", "user")


def nic_kind(nic_type: str | None, source: str | None) -> tuple[str, str | None]:
    """(libvirt interface type, source name) of a NIC: a source spelled `bridge:br0`,
    `network:default` or `direct:eth0` says its type itself; otherwise the type given,
    and without one a source names a libvirt network (no source: user networking)."""
    if source:
        prefix, sep, rest = source.partition(":")
        if sep and prefix in NIC_TYPES and prefix != "user" and rest:
            return prefix, rest
        if nic_type in NIC_TYPES and nic_type != "user":
            return nic_type, source
        return "network", source
    return "user", None


def nic_to_xml(n: Nic) -> str:
    """One <interface> element (domain XML, or a device to attach, detach or update)."""
    if n.type == "user":
        ntype, source = "user", None
    else:
        ntype, source = nic_kind(n.type, n.source)
    src = ""
    if source and ntype in ("network", "bridge"):
        src = f"<source {ntype}={quoteattr(source)}/>"
    elif source and ntype == "direct":
        src = f"<source dev={quoteattr(source)} mode='bridge'/>"
    model = f"<model type={quoteattr(n.model)}/>" if n.model else ""
    link = f"<link state={quoteattr(n.link_state)}/>" if n.link_state else ""
    return (f"<interface type='{ntype}'><mac address={quoteattr(n.mac)}/>"
            f"{src}{model}{link}</interface>")
