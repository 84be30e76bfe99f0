"""Acceptance (live hot-plug) on a real hypervisor: QEMU (TCG, no guest OS) under a
private, unprivileged libvirtd with only the qemu driver. libvirt's test driver cannot
hot-plug at all, so this is where AddResourceSettings, RemoveResourceSettings and
ModifyResourceSettings of a running system are seen in libvirt's own XML (XMLDesc,
what `virsh dumpxml` prints; live and persistent), on the next read, and where a
device attached behind the server's back appears by libvirt's device events.

Needs qemu-system-x86_64 (Debian: qemu-system-x86) and, as root, setpriv to run the
daemon as `nobody`; skipped otherwise. Without a guest OS nothing acknowledges a PCI
unplug, so a NIC cannot be removed live: that answer is checked too. Disks on the
virtio-scsi bus need no acknowledgement.
"""
import os
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET

import pytest
import pywbem
from pywbem import CIMInstance, CIMInstanceName, CIMProperty, Uint16

try:
    from tests.support.model import (CS, EPASD, SASD, VIRT, cim_error, iid_path, vsms_path,
                                      vssd_path)
    from tests.support.qemu import QEMU, needs_qemu, qemu_server
except ImportError:
    from support.qemu import QEMU, needs_qemu, qemu_server  # type: ignore
    from support.model import (CS, EPASD, SASD, VIRT, cim_error, iid_path,  # type: ignore
                               vsms_path, vssd_path)

pytestmark = [pytest.mark.qemu, needs_qemu]

MAC0, MAC1 = "52:54:00:51:00:01", "52:54:00:51:00:02"
INACTIVE = 2          # VIR_DOMAIN_XML_INACTIVE


def domain_xml(uuid: str, name: str, disk: str) -> str:
    return (f"<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid>"
            "<memory unit='MiB'>64</memory><vcpu>1</vcpu>"
            "<os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features>"
            f"<devices><emulator>{QEMU}</emulator>"
            "<controller type='scsi' model='virtio-scsi'/>"
            "<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
            f"<source file='{disk}'/><target dev='sda' bus='scsi'/></disk>"
            "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>"
            "<target dev='sdc' bus='scsi'/><readonly/></disk>"
            f"<interface type='user'><mac address='{MAC0}'/><model type='virtio'/></interface>"
            "<graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1'/>"
            "<memballoon model='virtio'/></devices></domain>")


@pytest.fixture(scope="module")
def qemu():
    with qemu_server(metrics_interval=0.5) as (daemon, srv):
        uuid = str(uuidlib.uuid4())
        dom = srv.libvirt.defineXML(domain_xml(uuid, "hot", daemon.image("root.img")))
        dom.create()
        srv.wait(lambda: srv.inventory.get(uuid) is not None, what="the qemu guest")
        yield daemon, srv, dom, uuid


def device(cls, uuid, dev):
    return CIMInstanceName(cls, {"SystemCreationClassName": CS, "SystemName": uuid,
                                 "CreationClassName": cls, "DeviceID": dev}, namespace=VIRT)


def xml_targets(dom, flags=0):
    root = ET.fromstring(dom.XMLDesc(flags))
    return ({t.get("dev") for t in root.findall("devices/disk/target")},
            {m.get("address") for m in root.findall("devices/interface/mac")})


def add(conn, uuid, rasds):
    rv, out = conn.InvokeMethod("AddResourceSettings", vsms_path(),
                                AffectedConfiguration=vssd_path("state", uuid),
                                ResourceSettings=list(rasds))
    return int(rv), out.get("ResultingResourceSettings")


def test_devices_of_a_qemu_guest(qemu):
    _daemon, srv, dom, uuid = qemu
    c = srv.conn()
    disks, nics = xml_targets(dom)
    devs = c.AssociatorNames(CIMInstanceName(CS, {"CreationClassName": CS, "Name": uuid},
                                             namespace=VIRT), AssocClass="VIRT_SystemDevice")
    assert {d["DeviceID"] for d in devs if d.classname == "VIRT_LogicalDisk"} == disks
    assert {d["DeviceID"] for d in devs if d.classname == "VIRT_NetworkPort"} == nics
    graphics = ET.fromstring(dom.XMLDesc(0)).find("devices/graphics")
    vnc = c.GetInstance(device("VIRT_DisplayController", uuid, "vnc0"))
    assert (vnc["GraphicsType"], vnc["RemotePort"], vnc["ListenAddress"]) == \
        ("vnc", int(graphics.get("port")), "127.0.0.1")
    assert vnc["RemotePort"] >= 5900
    sda = c.GetInstance(device("VIRT_LogicalDisk", uuid, "sda"))
    assert sda["BlockSize"] * sda["NumberOfBlocks"] == dom.blockInfo("sda")[0]


def test_hot_plug_a_disk_and_a_nic_into_a_running_guest(qemu):
    daemon, srv, dom, uuid = qemu
    c = srv.conn()
    image = daemon.image("data.img", 2 << 20)
    rv, paths = add(c, uuid, [
        CIMInstance(SASD, properties={"ResourceType": Uint16(17), "Address": "sdb",
                                      "ResourceSubType": "scsi", "HostResource": [image]}),
        CIMInstance(EPASD, properties={"ResourceType": Uint16(10), "Address": MAC1,
                                       "OtherResourceType": "user",
                                       "ResourceSubType": "virtio"})])
    assert rv == 0
    assert [p["InstanceID"] for p in paths] == [f"VIRT:state:{uuid}/sdb",
                                                f"VIRT:state:{uuid}/{MAC1}"]
    # libvirt's own XML, live and persistent (the guest is persistent)
    for flags in (0, INACTIVE):
        disks, nics = xml_targets(dom, flags)
        assert "sdb" in disks and MAC1 in nics, flags
    # the next read
    assert c.GetInstance(device("VIRT_LogicalDisk", uuid, "sdb"))["NumberOfBlocks"] == \
        (2 << 20) // 512
    assert c.GetInstance(device("VIRT_NetworkPort", uuid, MAC1))["PermanentAddress"] == MAC1
    assert c.GetInstance(paths[0])["HostResource"] == [image]

    # ModifyResourceSettings: the NIC's link goes down, live and persistent
    epasd = c.GetInstance(paths[1])
    epasd["LinkState"] = Uint16(3)
    rv, _ = c.InvokeMethod("ModifyResourceSettings", vsms_path(), ResourceSettings=[epasd])
    assert int(rv) == 0
    for flags in (0, INACTIVE):
        nic = next(n for n in ET.fromstring(dom.XMLDesc(flags)).findall("devices/interface")
                   if n.find("mac").get("address") == MAC1)
        assert nic.find("link").get("state") == "down", flags
    assert c.GetInstance(device("VIRT_NetworkPort", uuid, MAC1))["LinkState"] == 3

    # removal of the disk (virtio-scsi: no guest acknowledgement needed)
    rv, _ = c.InvokeMethod("RemoveResourceSettings", vsms_path(), ResourceSettings=[paths[0]])
    assert int(rv) == 0
    for flags in (0, INACTIVE):
        assert "sdb" not in xml_targets(dom, flags)[0]
    err = cim_error(lambda: c.GetInstance(device("VIRT_LogicalDisk", uuid, "sdb")))
    assert err.status_code == pywbem.CIM_ERR_NOT_FOUND

    # a NIC is a PCI device: without a guest OS nothing releases it. Said so, and the
    # persistent definition keeps it.
    # The wait for the guest may outlast --sync-wait: then the refusal is the outcome
    # of the job (docs/architecture.md, "Jobs").
    try:
        rv, out = c.InvokeMethod("RemoveResourceSettings", vsms_path(),
                                 ResourceSettings=[paths[1]])
    except pywbem.CIMError as exc:
        code, text = exc.status_code, exc.status_description
    else:
        assert int(rv) == 4096, rv
        deadline = time.monotonic() + 60
        while (job := c.GetInstance(out["Job"]))["JobState"] == 4:
            assert time.monotonic() < deadline, "the RemoveResourceSettings job did not end"
            time.sleep(0.1)
        assert job["JobState"] == 10, job["JobState"]
        code, text = job["ErrorCode"], job["ErrorDescription"]
    assert code == pywbem.CIM_ERR_FAILED
    assert "has not done so" in text
    assert MAC1 in xml_targets(dom, INACTIVE)[1]


def test_cdrom_media_change(qemu):
    daemon, srv, dom, uuid = qemu
    c = srv.conn()
    iso = daemon.image("media.iso", 1 << 20)
    path = iid_path(SASD, f"VIRT:state:{uuid}/sdc")
    sasd = c.GetInstance(path)
    assert sasd["ResourceType"] == 16 and sasd.get("HostResource") is None
    sasd["HostResource"] = [iso]
    rv, _ = c.InvokeMethod("ModifyResourceSettings", vsms_path(), ResourceSettings=[sasd])
    assert int(rv) == 0
    cdrom = next(d for d in ET.fromstring(dom.XMLDesc(0)).findall("devices/disk")
                 if d.find("target").get("dev") == "sdc")
    assert cdrom.find("source").get("file") == iso
    assert c.GetInstance(path)["HostResource"] == [iso]
    sasd["HostResource"] = CIMProperty("HostResource", None, type="string", is_array=True)
    rv, _ = c.InvokeMethod("ModifyResourceSettings", vsms_path(), ResourceSettings=[sasd])
    assert int(rv) == 0
    cdrom = next(d for d in ET.fromstring(dom.XMLDesc(0)).findall("devices/disk")
                 if d.find("target").get("dev") == "sdc")
    assert cdrom.find("source") is None or cdrom.find("source").get("file") is None


def test_a_failed_live_attach_changes_nothing(qemu):
    """qemu (running as nobody) cannot open a root-only image: the live attach fails,
    and the persistent definition stays as it was."""
    daemon, srv, dom, uuid = qemu
    if os.geteuid() != 0:
        pytest.skip("needs an image the daemon's user cannot read")
    c = srv.conn()
    secret = daemon.image("secret.img", mode=0o600, owner=False)
    live, config = dom.XMLDesc(0), dom.XMLDesc(INACTIVE)
    err = cim_error(lambda: add(c, uuid, [CIMInstance(SASD, properties={
        "ResourceType": Uint16(17), "Address": "sdd", "HostResource": [secret]})]))
    assert err.status_code == pywbem.CIM_ERR_FAILED
    assert (dom.XMLDesc(0), dom.XMLDesc(INACTIVE)) == (live, config)
    err = cim_error(lambda: c.GetInstance(device("VIRT_LogicalDisk", uuid, "sdd")))
    assert err.status_code == pywbem.CIM_ERR_NOT_FOUND


def test_a_device_attached_elsewhere_appears_within_a_second(qemu):
    """Attached through libvirt directly (another client): the device-added event
    makes the server read the guest again."""
    daemon, srv, dom, uuid = qemu
    c = srv.conn()
    image = daemon.image("outside.img")
    xml = (f"<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
           f"<source file='{image}'/><target dev='sde' bus='scsi'/></disk>")
    t0 = time.monotonic()
    dom.attachDeviceFlags(xml, 1)          # VIR_DOMAIN_AFFECT_LIVE
    path = device("VIRT_LogicalDisk", uuid, "sde")
    while True:
        try:
            c.GetInstance(path)
            break
        except pywbem.CIMError:
            assert time.monotonic() - t0 < 1.0, "not seen within a second"
            time.sleep(0.02)
    dom.detachDeviceFlags(xml, 1)
    t0 = time.monotonic()
    while True:
        try:
            c.GetInstance(path)
        except pywbem.CIMError:
            break
        assert time.monotonic() - t0 < 1.0, "still seen a second after the removal"
        time.sleep(0.02)


def test_metrics_of_a_qemu_guest(qemu):
    """With QEMU the bulk statistics carry everything (virDomainListGetStats per slice)."""
    _daemon, srv, _dom, uuid = qemu
    start = srv.on_loop(lambda: srv.resources.samples)
    srv.wait(lambda: srv.resources.samples >= start + 2, what="two samples")
    c = srv.conn()
    values = {v["MetricDefinitionId"]: v for v in c.EnumerateInstances("VIRT_BaseMetricValue")
              if v["InstanceID"].startswith(f"VIRT:metric:{uuid}:")}
    assert {"VIRT:metric:cpu", "VIRT:metric:memory", "VIRT:metric:disk-read"} <= set(values)
    assert 0.0 <= float(values["VIRT:metric:cpu"]["MetricValue"]) <= 100.0
