"""libvirt domain XML <-> DomainConfig, both ways, as pure functions.

The libvirt source reads a running domain's live XML with `parse_domain_xml`; the
reference Manager starts one of its own definitions as a transient libvirt domain
with `config_to_domain_xml`. Input is libvirt's XML, which we still treat as data:
anything missing or malformed becomes None rather than an exception, except for the
UUID and name, without which there is no domain.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape, quoteattr

from .defaults import DEFAULT_ARCH, DEFAULT_MEMORY_KIB, DEFAULT_OS_TYPE, DEFAULT_VCPUS
from .records import Disk, DomainConfig, Nic, canonical_uuid

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


def _kib(elem: ET.Element | None) -> int | None:
    if elem is None:
        return None
    value = _int(elem.text)
    factor = _UNIT_KIB.get((elem.get("unit") or "KiB").lower())
    if value is None or factor is None:
        return None
    return int(value * factor)


def parse_domain_xml(xml: str, autostart: bool | None = None) -> DomainConfig:
    """Parse libvirt's domain XML (virDomainGetXMLDesc) into a DomainConfig."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise DomainXMLError(f"not XML: {exc}") from None
    if root.tag != "domain":
        raise DomainXMLError(f"root element is <{root.tag}>, not <domain>")
    uuid = canonical_uuid(root.findtext("uuid"))
    name = (root.findtext("name") or "").strip()
    if uuid is None or not name:
        raise DomainXMLError("domain XML without a valid uuid or name")
    os_type = root.find("os/type")
    disks = []
    for d in root.findall("devices/disk"):
        target = d.find("target")
        dev = target.get("dev") if target is not None else None
        if target is None or not dev:
            continue
        src = d.find("source")
        source = None
        if src is not None:
            source = src.get("file") or src.get("dev") or src.get("volume") or src.get("name")
        disks.append(Disk(target=dev, source=source,
                          device=d.get("device") or "disk", bus=target.get("bus")))
    nics = []
    for n in root.findall("devices/interface"):
        mac = n.find("mac")
        address = mac.get("address") if mac is not None else None
        if mac is None or not address:
            continue
        src = n.find("source")
        source = None
        if src is not None:
            source = src.get("network") or src.get("bridge") or src.get("dev")
        model = n.find("model")
        nics.append(Nic(mac=address.lower(), type=n.get("type"), source=source,
                        model=model.get("type") if model is not None else None))
    vcpu = root.find("vcpu")
    vcpus = _int(vcpu.get("current")) if vcpu is not None and vcpu.get("current") else None
    if vcpus is None and vcpu is not None:
        vcpus = _int(vcpu.text)
    dtype = (root.get("type") or "").lower()
    return DomainConfig(
        uuid=uuid, name=name,
        title=(root.findtext("title") or None),
        type=_TYPE_NAMES.get(dtype, root.get("type")),
        os_type=os_type.text.strip() if os_type is not None and os_type.text else None,
        arch=os_type.get("arch") if os_type is not None else None,
        vcpus=vcpus,
        memory_kib=_kib(root.find("currentMemory")) or _kib(root.find("memory")),
        max_memory_kib=_kib(root.find("memory")),
        autostart=None if autostart is None else bool(autostart),
        disks=tuple(disks), nics=tuple(nics))


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
    for d in cfg.disks:
        src = f"<source file={quoteattr(d.source)}/>" if d.source else ""
        bus = f" bus={quoteattr(d.bus)}" if d.bus else ""
        parts.append(f"<disk type='file' device={quoteattr(d.device or 'disk')}>{src}"
                     f"<target dev={quoteattr(d.target)}{bus}/></disk>")
    for n in cfg.nics:
        ntype = n.type if n.type in ("network", "bridge", "user") else "user"
        src = ""
        if n.source and ntype in ("network", "bridge"):
            src = f"<source {ntype}={quoteattr(n.source)}/>"
        model = f"<model type={quoteattr(n.model)}/>" if n.model else ""
        parts.append(f"<interface type='{ntype}'><mac address={quoteattr(n.mac)}/>"
                     f"{src}{model}</interface>")
    parts.append("</devices></domain>")
    return "".join(parts)
