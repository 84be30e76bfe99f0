"""domain/domxml.parse_domain_xml walks the tree itself (issue 16: start-up parses every
running domain's XML): it must pick exactly what the ElementPath version before it
picked, for libvirt's XML and for any other document (first of a tag, document order,
missing and repeated elements, namespaces, comments, malformed input). The old version
is kept here as the reference.
"""
from __future__ import annotations

import uuid as uuidlib
import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape, quoteattr

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cim_provider.domain.domxml import (_TYPE_NAMES, _UNIT_KIB, DomainXMLError, _int, _kib,
                                        _roots_together, config_to_domain_xml,
                                        parse_domain_xml, parse_domain_xmls)
from cim_provider.domain.records import (Disk, DomainConfig, Graphics, Nic, canonical_uuid)


def reference_kib(elem: ET.Element | None) -> int | None:
    """domxml._kib before it kept its answers, verbatim."""
    if elem is None:
        return None
    value = _int(elem.text)
    factor = _UNIT_KIB.get((elem.get("unit") or "KiB").lower())
    if value is None or factor is None:
        return None
    return int(value * factor)


def reference_parse(xml: str, autostart: bool | None = None, *,
                     detail: bool = False) -> DomainConfig:
    """parse_domain_xml before issue 16 (ElementPath lookups), verbatim."""
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
        source = pool = None
        if src is not None:
            source = src.get("file") or src.get("dev") or src.get("volume") or src.get("name")
            pool = src.get("pool")
        blockio = d.find("blockio") if detail else None
        driver = d.find("driver") if detail else None
        disks.append(Disk(target=dev, source=source,
                          device=d.get("device") or "disk", bus=target.get("bus"),
                          source_type=d.get("type") if detail else None,
                          pool=pool if detail else None,
                          block_size=_int(blockio.get("logical_block_size"))
                          if blockio is not None else None,
                          format=(driver.get("type") or None) if driver is not None
                          else None))
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
        link = n.find("link") if detail else None
        nics.append(Nic(mac=address.lower(), type=n.get("type"), source=source,
                        model=model.get("type") if model is not None else None,
                        link_state=link.get("state") if link is not None else None))
    graphics = []
    for g in root.findall("devices/graphics") if detail else ():
        if not g.get("type"):
            continue
        port = _int(g.get("port"))
        listen = g.get("listen")
        if listen is None:
            first = g.find("listen")
            listen = first.get("address") if first is not None else None
        graphics.append(Graphics(type=g.get("type") or "", port=port or None, listen=listen,
                                 autoport=g.get("autoport") == "yes"))
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
        max_vcpus=_int(vcpu.text) if vcpu is not None else None,
        memory_kib=reference_kib(root.find("currentMemory")) or
        reference_kib(root.find("memory")),
        max_memory_kib=reference_kib(root.find("memory")),
        autostart=None if autostart is None else bool(autostart),
        disks=tuple(disks), nics=tuple(nics), graphics=tuple(graphics))


def outcome(fn, xml, autostart, detail):
    try:
        return fn(xml, autostart, detail=detail)
    except DomainXMLError as exc:
        return ("error", str(exc))


UUID = "5e1f0000-0000-4000-8000-00000000000a"
LIBVIRT_LIKE = f"""<domain type='kvm' id='7'>
  <name>web</name>
  <uuid>{UUID.upper()}</uuid>
  <title>Web &amp; co</title>
  <memory unit='GiB'>2</memory>
  <currentMemory unit='MiB'>1536</currentMemory>
  <vcpu placement='static' current='2'>4</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/web.qcow2'/><target dev='vda' bus='virtio'/>
      <blockio logical_block_size='4096'/></disk>
    <disk type='volume' device='cdrom'><source pool='iso' volume='boot.iso'/>
      <target dev='hdc' bus='ide'/><readonly/></disk>
    <disk type='file' device='disk'><source file='/x'/></disk>
    <interface type='network'><mac address='52:54:00:AA:BB:CC'/><source network='default'/>
      <model type='virtio'/><link state='down'/></interface>
    <interface type='bridge'><source bridge='br0'/></interface>
    <graphics type='vnc' port='5901' autoport='no' listen='127.0.0.1'>
      <listen type='address' address='127.0.0.1'/></graphics>
    <graphics type='spice' autoport='yes'><listen type='address' address='0.0.0.0'/></graphics>
    <graphics port='1'/>
  </devices>
  <devices><disk type='block'><source dev='/dev/sdb'/><target dev='sdb'/></disk></devices>
</domain>"""


@pytest.mark.parametrize("detail", [False, True])
@pytest.mark.parametrize("autostart", [None, True, 0])
def test_libvirt_like_document(detail, autostart):
    new = parse_domain_xml(LIBVIRT_LIKE, autostart, detail=detail)
    assert new == reference_parse(LIBVIRT_LIKE, autostart, detail=detail)
    assert new.uuid == UUID and new.memory_kib == 1536 * 1024 and new.vcpus == 2
    assert [d.target for d in new.disks] == ["vda", "hdc", "sdb"]
    assert len(new.graphics) == (2 if detail else 0)


def test_round_trip_of_our_own_xml():
    cfg = DomainConfig(uuid=UUID, name="a<b", title="t", type="Test", os_type="hvm",
                       arch="x86_64", vcpus=2, max_vcpus=2, memory_kib=1024,
                       max_memory_kib=2048,
                       disks=(Disk(target="vda", source="/i", bus="virtio", source_type="file",
                                   format="raw"),),
                       nics=(Nic(mac="52:54:00:00:00:01", type="network", source="default",
                                 model="virtio"),))
    xml = config_to_domain_xml(cfg)
    assert parse_domain_xml(xml, detail=True) == reference_parse(xml, detail=True)


KIB_CASES = [
    # (description, element, KiB)
    ("no unit: KiB", "<memory>1024</memory>", 1024),
    ("MiB", "<memory unit='MiB'>2</memory>", 2048),
    ("unit in any case", "<memory unit='gib'>1</memory>", 1024 ** 2),
    ("decimal units", "<memory unit='MB'>1</memory>", 976),
    ("bytes", "<memory unit='bytes'>4096</memory>", 4),
    ("padded number", "<memory unit='KiB'> 512 </memory>", 512),
    ("unknown unit", "<memory unit='parsecs'>1</memory>", None),
    ("negative", "<memory>-1</memory>", None),
    ("no number", "<memory unit='KiB'>lots</memory>", None),
    ("empty", "<memory/>", None),
]


@pytest.mark.parametrize("desc, xml, expected", KIB_CASES, ids=[c[0] for c in KIB_CASES])
def test_kib_kept_answers_are_the_computed_ones(desc, xml, expected):
    """Asked again (an answer kept by (text, unit)) the same as asked first, and as the
    computation it stands for."""
    first, again = _kib(ET.fromstring(xml)), _kib(ET.fromstring(xml))
    assert first == again == reference_kib(ET.fromstring(xml)) == expected


EDGE_DOCUMENTS = [
    "", "not xml", "<domain>", "<other/>", "<domain/>", "<domain><uuid>x</uuid></domain>",
    f"<domain><uuid>{UUID}</uuid></domain>", f"<domain><uuid>{UUID}</uuid><name> </name></domain>",
    f"<domain xmlns='urn:x'><uuid>{UUID}</uuid><name>n</name></domain>",
    f"<domain><x:uuid xmlns:x='urn:x'>{UUID}</x:uuid><name>n</name></domain>",
    f"<domain><uuid>{UUID}</uuid><uuid>00000000-0000-0000-0000-000000000001</uuid>"
    "<name>n<!-- c -->m<b/>tail</name></domain>",
    f"<domain><!-- c --><uuid> {{{UUID}}} </uuid><name>n</name><title></title>"
    "<os/><os><type>  </type></os><vcpu current=''>x</vcpu><memory unit='zz'>5</memory>"
    "</domain>",
    f"<?xml version='1.0'?><domain><uuid>{UUID}</uuid><name><![CDATA[n&]]></name></domain>",
    f"<domain><uuid>{UUID}</uuid><name>&undefined;</name></domain>",
    f"<domain><uuid>{UUID}</uuid><name>n</name></domain><junk/>",
]


@pytest.mark.parametrize("xml", EDGE_DOCUMENTS)
def test_edge_documents(xml):
    for detail in (False, True):
        assert outcome(parse_domain_xml, xml, None, detail) == \
            outcome(reference_parse, xml, None, detail)


# ---- any document built from libvirt's vocabulary ----------------------------------------

TAGS = ["uuid", "name", "title", "os", "type", "vcpu", "memory", "currentMemory", "devices",
        "disk", "interface", "graphics", "target", "source", "mac", "model", "link", "listen",
        "blockio", "driver", "boot", "{urn:x}disk"]
ATTRS = ["type", "dev", "bus", "device", "file", "volume", "name", "pool", "address",
         "network", "bridge", "state", "port", "listen", "autoport", "current", "unit",
         "arch", "logical_block_size"]
VALUES = ["", "vda", "KiB", "MiB", "g", "bytes", "2", "-1", " 3 ", "yes", "no", "up",
          "52:54:00:AB:cd:ef", "virtio", "kvm", "TEST", "x86_64", "default", "/p"]
TEXTS = ["", " ", "hvm", "4", " 1024 ", "x", "n", UUID, UUID.upper(), "&amp;", "<!-- c -->",
         "<![CDATA[cd]]>"]


def _element(children):
    return st.builds(
        lambda tag, attrs, text, kids, tail: (
            "<{t}{ns}{a}>{x}{k}</{t}>{tail}".format(
                t=tag.split("}")[-1] if "}" in tag else tag,
                ns=" xmlns='urn:x'" if "}" in tag else "",
                a="".join(f" {n}={quoteattr(v)}" for n, v in attrs.items()), x=text,
                k="".join(kids), tail=tail)),
        st.sampled_from(TAGS), st.dictionaries(st.sampled_from(ATTRS), st.sampled_from(VALUES),
                                               max_size=3),
        st.sampled_from(TEXTS), children, st.sampled_from(["", " ", "\n"]))


ELEMENTS = st.recursive(_element(st.just([])), lambda inner: _element(st.lists(inner, max_size=5)),
                        max_leaves=40)


@st.composite
def documents(draw):
    head = [f"<uuid>{draw(st.sampled_from([UUID, UUID.upper(), 'bad', '']))}</uuid>",
            f"<name>{escape(draw(st.sampled_from(['web', ' ', 'a&b'])))}</name>"]
    body = draw(st.lists(ELEMENTS, max_size=8))
    parts = draw(st.permutations(head + body))
    dtype = draw(st.sampled_from(["", " type='kvm'", " type='QEMU'", " type='odd'"]))
    return f"<domain{dtype}>" + "".join(parts) + "</domain>"


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(documents(), st.booleans(), st.sampled_from([None, True, False]))
def test_any_document_reads_as_before(xml, detail, autostart):
    assert outcome(parse_domain_xml, xml, autostart, detail) == \
        outcome(reference_parse, xml, autostart, detail)


@given(st.one_of(st.uuids().map(str), st.uuids().map(lambda u: str(u).upper()),
                 st.uuids().map(lambda u: u.hex), st.uuids().map(lambda u: f"{{{u}}}"),
                 st.text(max_size=40)))
def test_canonical_uuid_is_uuid_module(value):
    try:
        want = str(uuidlib.UUID(value.strip())) if len(value) <= 64 else None
    except ValueError:
        want = None
    assert canonical_uuid(value) == want


# ---- many documents parsed as one (read_all at start-up) -----------------------------------

def _alone(xmls, autostarts, detail):
    return [outcome(parse_domain_xml, x, a, detail) for x, a in zip(xmls, autostarts)]


def _together(xmls, autostarts, detail):
    return [("error", str(r)) if isinstance(r, DomainXMLError) else r
            for r in parse_domain_xmls(xmls, autostarts, detail=detail)]


def _doc(i: int) -> str:
    return config_to_domain_xml(DomainConfig(uuid=str(uuidlib.UUID(int=i + 1)), name=f"d{i}"))


# Documents that try to move the boundaries between their neighbours: each must read as
# it reads alone, and its neighbours too.
FORGERIES = [
    f"<domain><uuid>{UUID}</uuid><name>a</name></domain></w><w t='0'>",
    f"<domain><uuid>{UUID}</uuid><name>a</name></domain></w><w>" + _doc(7),
    "</w>", "</w></b>", "<w t='x'>", "</b><b>",
    f"<domain><uuid>{UUID}</uuid><name>a</name>",
    "</domain>",
    f"<domain><uuid>{UUID}</uuid><name>a</name></domain> text after",
    f"text before <domain><uuid>{UUID}</uuid><name>a</name></domain>",
    f"<!DOCTYPE domain><domain><uuid>{UUID}</uuid><name>a</name></domain>",
    f"<!-- c --><domain><uuid>{UUID}</uuid><name>a</name></domain><?pi x?>\n",
    f"\n  <domain><uuid>{UUID}</uuid><name>a</name></domain>\n\n",
]

BATCHES = [
    ("libvirt's own documents", [LIBVIRT_LIKE] + [_doc(i) for i in range(5)]),
    ("one document", [LIBVIRT_LIKE]),
    ("none", []),
    ("every edge document, in one batch", EDGE_DOCUMENTS),
] + [(f"forgery {i} between good ones", [_doc(1), forged, _doc(2)])
     for i, forged in enumerate(FORGERIES)] + [
    ("two halves of one document", [f"<domain><uuid>{UUID}</uuid>", "<name>a</name></domain>"]),
    ("a stray end tag and a missing one", ["<domain><name>a</name></domain></domain>",
                                           f"<domain><uuid>{UUID}</uuid><name>b</name>"]),
]


@pytest.mark.parametrize("detail", [False, True])
@pytest.mark.parametrize("desc, xmls", BATCHES, ids=[b[0] for b in BATCHES])
def test_a_batch_reads_as_each_document_alone(desc, xmls, detail):
    autostarts = [(None, True, False)[i % 3] for i in range(len(xmls))]
    assert _together(xmls, autostarts, detail) == _alone(xmls, autostarts, detail)


def test_well_formed_documents_are_parsed_together():
    """The batch is really parsed as one (else start-up pays a parser per document)."""
    xmls = [LIBVIRT_LIKE] + [_doc(i) for i in range(63)] + \
        [f"<domain><uuid>{UUID}</uuid><name>n</name></domain>\n"]
    roots = _roots_together(xmls)
    assert roots is not None and len(roots) == len(xmls)
    assert [r.findtext("name") for r in roots] == \
        [ET.fromstring(x).findtext("name") for x in xmls]


@pytest.mark.parametrize("forged", FORGERIES[:-2])
def test_a_document_that_would_move_a_boundary_is_parsed_alone(forged):
    """The check that sends a batch back to one parse per document sees every forgery
    that is well-formed enough to survive the batch parse."""
    assert _roots_together([_doc(1), forged, _doc(2)]) is None


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.one_of(documents(), st.sampled_from(EDGE_DOCUMENTS + FORGERIES)),
                max_size=6), st.booleans())
def test_any_batch_reads_as_each_document_alone(xmls, detail):
    autostarts = [None] * len(xmls)
    assert _together(xmls, autostarts, detail) == _alone(xmls, autostarts, detail)
