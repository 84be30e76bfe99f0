"""Acceptance (devices): the logical devices of running systems, against the in-process
demo (libvirt's test:///default, shared with the server) with pywbem, pywbemcli and
sblim wbemcli. Devices match the domain's live XML as libvirt-python reads it
(XMLDesc, what `virsh dumpxml` prints); their EnabledState follows the system's;
VIRT_SystemDevice leads from a system to its devices, VIRT_SettingsDefineState from a
device to its RASD in the state VSSD, VIRT_ElementAllocatedFromPool to its pool.
"""
import uuid as uuidlib
import xml.etree.ElementTree as ET

import pytest
import pywbem
from pywbem import CIMInstanceName

try:
    from tests.support.model import (demo, CS, GNOME_UUID, TEST_UUID, VIRT, cim_error, cs_path,
                                      iid_path, keys, poll_until, pywbemcli, rsc, wbem_cs,
                                      wbem_url, wbemcli)
except ImportError:
    from support.model import (demo, CS, GNOME_UUID, TEST_UUID, VIRT, cim_error,  # type: ignore  # noqa: F401 (demo: a fixture)
                               cs_path, iid_path, keys, poll_until, pywbemcli, rsc, wbem_cs,
                               wbem_url, wbemcli)

pytestmark = pytest.mark.dbus

DEVICE_CLASSES = ("VIRT_Processor", "VIRT_Memory", "VIRT_LogicalDisk", "VIRT_NetworkPort",
                  "VIRT_DisplayController")
TEST_NIC = "aa:bb:cc:dd:ee:ff"


def device_path(cls, uuid, dev):
    return CIMInstanceName(cls, {"SystemCreationClassName": CS, "SystemName": uuid,
                                 "CreationClassName": cls, "DeviceID": dev}, namespace=VIRT)


def wbem_device(url, cls, uuid, dev):
    return wbem_url(url, VIRT, cls, f'CreationClassName="{cls}",DeviceID="{dev}",'
                    f'SystemCreationClassName="{CS}",SystemName="{uuid}"')


@pytest.fixture
def conn(demo):
    c = demo.conn()
    yield c
    c.close()


def libvirt_devices(demo, uuid):
    """What libvirt says, read independently of the server: the live XML."""
    dom = demo.libvirt.lookupByUUIDString(uuid)
    root = ET.fromstring(dom.XMLDesc(0))
    vcpu = root.find("vcpu")
    out = {"VIRT_Processor": {str(n) for n in range(int(vcpu.get("current") or vcpu.text))},
           "VIRT_Memory": {"mem"}, "VIRT_LogicalDisk": set(), "VIRT_NetworkPort": set(),
           "VIRT_DisplayController": set()}
    facts = {"memory": int(root.findtext("currentMemory")), "disks": {}, "nics": {},
             "graphics": {}}
    for d in root.findall("devices/disk"):
        dev = d.find("target").get("dev")
        out["VIRT_LogicalDisk"].add(dev)
        src = d.find("source")
        facts["disks"][dev] = (src.get("file") if src is not None else None,
                               dom.blockInfo(dev)[0] if src is not None else None)
    for n in root.findall("devices/interface"):
        mac = n.find("mac").get("address")
        out["VIRT_NetworkPort"].add(mac)
        link = n.find("link")
        facts["nics"][mac] = link.get("state") if link is not None else "up"
    seen = {}
    for g in root.findall("devices/graphics"):
        i = seen.setdefault(g.get("type"), 0)
        seen[g.get("type")] = i + 1
        out["VIRT_DisplayController"].add(f"{g.get('type')}{i}")
        facts["graphics"][f"{g.get('type')}{i}"] = (g.get("type"), int(g.get("port")),
                                                    g.get("listen"))
    return out, facts


def served_devices(conn, uuid):
    out = {cls: set() for cls in DEVICE_CLASSES}
    insts = {}
    for cls in DEVICE_CLASSES:
        for inst in conn.EnumerateInstances(cls):
            if inst["SystemName"] == uuid:
                out[cls].add(inst["DeviceID"])
                insts[(cls, inst["DeviceID"])] = inst
    return out, insts


def test_devices_match_the_live_xml(demo, conn):
    want, facts = libvirt_devices(demo, TEST_UUID)
    got, insts = served_devices(conn, TEST_UUID)
    assert got == want
    mem = insts[("VIRT_Memory", "mem")]
    assert mem["BlockSize"] * mem["NumberOfBlocks"] == facts["memory"] * 1024
    for dev, (source, capacity) in facts["disks"].items():
        disk = insts[("VIRT_LogicalDisk", dev)]
        assert disk["Name"] == source
        assert disk["BlockSize"] == 512 and disk["NumberOfBlocks"] == capacity // 512
    for mac, state in facts["nics"].items():
        port = insts[("VIRT_NetworkPort", mac)]
        assert port["PermanentAddress"] == mac
        assert port["LinkState"] == (2 if state == "up" else 3)
    for (cls, dev), inst in insts.items():      # keys and state as documented
        assert inst.path.keybindings == device_path(cls, TEST_UUID, dev).keybindings
        assert (inst["EnabledState"], list(inst["OperationalStatus"])) == (2, [2])
        assert dict(conn.GetInstance(inst.path).items()) == dict(inst.items())


def test_passive_systems_have_no_devices(conn):
    for cls in DEVICE_CLASSES:
        assert not [i for i in conn.EnumerateInstanceNames(cls) if i["SystemName"] == GNOME_UUID]
    assert conn.AssociatorNames(cs_path(GNOME_UUID), AssocClass="VIRT_SystemDevice") == []
    err = cim_error(lambda: conn.GetInstance(device_path("VIRT_Memory", GNOME_UUID, "mem")))
    assert err.status_code == pywbem.CIM_ERR_NOT_FOUND


def test_device_state_follows_the_system(demo, conn):
    path = device_path("VIRT_LogicalDisk", TEST_UUID, "vda")
    assert rsc(conn, TEST_UUID, 9) == 0                      # suspend
    try:
        assert conn.GetInstance(path)["EnabledState"] == 9
        assert {i["EnabledState"] for i in conn.Associators(
            cs_path(TEST_UUID), AssocClass="VIRT_SystemDevice")} == {9}
    finally:
        assert rsc(conn, TEST_UUID, 2) == 0
    assert conn.GetInstance(path)["EnabledState"] == 2


def test_a_console_is_a_display_controller(demo, conn):
    uuid = str(uuidlib.uuid4())
    xml = (f"<domain type='test'><name>console-{uuid[:8]}</name><uuid>{uuid}</uuid>"
           "<memory>65536</memory><vcpu>1</vcpu><os><type>hvm</type></os><devices>"
           "<graphics type='vnc' port='5904' listen='127.0.0.1'/>"
           "<graphics type='spice' port='5905' listen='0.0.0.0'/></devices></domain>")
    dom = demo.libvirt.createXML(xml, 0)
    try:
        poll_until(lambda: demo.inventory.get(uuid), what="the new domain")
        want, facts = libvirt_devices(demo, uuid)
        got, insts = served_devices(conn, uuid)
        assert got == want and want["VIRT_DisplayController"] == {"vnc0", "spice0"}
        for dev, (gtype, port, listen) in facts["graphics"].items():
            inst = insts[("VIRT_DisplayController", dev)]
            assert (inst["GraphicsType"], inst["RemotePort"], inst["ListenAddress"]) == \
                (gtype, port, listen)
        # and it goes with the domain
        dom.destroy()
        poll_until(lambda: demo.inventory.get(uuid) is None, what="the domain gone")
        got, _ = served_devices(conn, uuid)
        assert not any(got.values())
    finally:
        try:
            dom.destroy()
        except Exception:       # a transient domain is gone once destroyed
            pass


def test_system_device_and_settings_define_state(conn):
    devices = conn.AssociatorNames(cs_path(TEST_UUID), AssocClass="VIRT_SystemDevice")
    assert {(p.classname, p["DeviceID"]) for p in devices} == {
        ("VIRT_Processor", "0"), ("VIRT_Processor", "1"), ("VIRT_Memory", "mem"),
        ("VIRT_LogicalDisk", "vda"), ("VIRT_NetworkPort", TEST_NIC)}
    for dev in devices:                        # and back
        assert keys(conn.AssociatorNames(dev, AssocClass="CIM_SystemDevice")) == \
            keys([cs_path(TEST_UUID)])
    rasd = {"0": "proc", "1": "proc", "mem": "mem", "vda": "vda", TEST_NIC: TEST_NIC}
    for dev in devices:
        got = conn.AssociatorNames(dev, AssocClass="VIRT_SettingsDefineState")
        assert [p["InstanceID"] for p in got] == \
            [f"VIRT:state:{TEST_UUID}/{rasd[dev['DeviceID']]}"]
    # from the processors' RASD: both vCPUs
    proc = iid_path("VIRT_ResourceAllocationSettingData", f"VIRT:state:{TEST_UUID}/proc")
    got = conn.AssociatorNames(proc, AssocClass="VIRT_SettingsDefineState")
    assert sorted(p["DeviceID"] for p in got) == ["0", "1"]


def test_device_to_pool(conn):
    for dev, pool in ((device_path("VIRT_Processor", TEST_UUID, "1"), "VIRT:pool:processor"),
                      (device_path("VIRT_Memory", TEST_UUID, "mem"), "VIRT:pool:memory"),
                      (device_path("VIRT_NetworkPort", TEST_UUID, TEST_NIC),
                       "VIRT:pool:network:default")):
        got = conn.Associators(dev, AssocClass="VIRT_ElementAllocatedFromPool")
        assert [p["InstanceID"] for p in got] == [pool]
    # /guest/diskimage1 is in no storage pool of the test driver
    assert conn.AssociatorNames(device_path("VIRT_LogicalDisk", TEST_UUID, "vda"),
                                AssocClass="VIRT_ElementAllocatedFromPool") == []


def test_pywbemcli_associators(demo, tmp_path):
    system = f'VIRT_ComputerSystem.CreationClassName="{CS}",Name="{TEST_UUID}"'
    proc = pywbemcli(demo.url, tmp_path, "-d", VIRT, "instance", "associators", system,
                     "--assoc-class", "VIRT_SystemDevice", "--names-only")
    assert proc.returncode == 0, proc.stderr
    for cls in ("VIRT_Processor", "VIRT_Memory", "VIRT_LogicalDisk", "VIRT_NetworkPort"):
        assert f"root/virt:{cls}." in proc.stdout
    assert proc.stdout.count("root/virt:VIRT_Processor.") == 2
    port = (f'VIRT_NetworkPort.CreationClassName="VIRT_NetworkPort",DeviceID="{TEST_NIC}",'
            f'SystemCreationClassName="{CS}",SystemName="{TEST_UUID}"')
    proc = pywbemcli(demo.url, tmp_path, "-d", VIRT, "instance", "associators", port,
                     "--assoc-class", "VIRT_ElementAllocatedFromPool")
    assert proc.returncode == 0, proc.stderr
    assert "instance of VIRT_NetworkPool" in proc.stdout
    assert 'InstanceID = "VIRT:pool:network:default"' in proc.stdout


def test_wbemcli_associators(demo):
    out = wbemcli("ain", "-ac", "VIRT_SystemDevice", wbem_cs(demo.url, TEST_UUID)).stdout
    assert out.count("VIRT_Processor.") == 2 and "VIRT_LogicalDisk." in out
    assert 'DeviceID="vda"' in out
    out = wbemcli("ai", "-ac", "VIRT_ElementAllocatedFromPool",
                  wbem_device(demo.url, "VIRT_Memory", TEST_UUID, "mem")).stdout
    assert 'InstanceID="VIRT:pool:memory"' in out and "Capacity=" in out
    out = wbemcli("gi", wbem_device(demo.url, "VIRT_NetworkPort", TEST_UUID, TEST_NIC)).stdout
    assert f'PermanentAddress="{TEST_NIC}"' in out and "LinkState=2" in out


def test_enumerating_devices_never_asks_libvirt(demo, conn):
    """Devices come from the inventory: reads move no per-domain libvirt read."""
    src = demo.demo.sources.libvirt
    before = src.domain_reads
    for _ in range(3):
        for cls in DEVICE_CLASSES:
            conn.EnumerateInstances(cls)
    assert src.domain_reads == before
