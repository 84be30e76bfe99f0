"""Acceptance (hot-plug) against the in-process demo: AddResourceSettings,
RemoveResourceSettings and ModifyResourceSettings of disks and NICs of a passive
system (through the reference Manager's UpdateDomain, checked with its own GetDomain),
every bad input refused with CIM_ERR_INVALID_PARAMETER naming the field and nothing
half-applied, and a running system on libvirt's test driver (which cannot hot-plug:
return code 1, nothing changed). Clients: pywbem and sblim wbemcli (`cm` with an
embedded RASD). Live hot-plug on a real hypervisor: test_hotplug_qemu.py.
"""
import re
import xml.etree.ElementTree as ET

import pytest
import pywbem
from pywbem import CIMInstance, CIMProperty, Uint16

try:
    from tests.support.model import (demo, EPASD, GNOME_UUID, RASD, SASD, TEST_UUID, cim_error,
                                      iid_path, manager_get_domain, vsms_path, vssd_path,
                                      wbem_vsms, wbemcli)
except ImportError:
    from support.model import (demo, EPASD, GNOME_UUID, RASD, SASD, TEST_UUID,  # type: ignore  # noqa: F401 (demo: a fixture)
                               cim_error, iid_path, manager_get_domain, vsms_path, vssd_path,
                               wbem_vsms, wbemcli)

pytestmark = pytest.mark.dbus

GNOME_NIC = "52:54:00:6a:10:01"
TEST_NIC = "aa:bb:cc:dd:ee:ff"


@pytest.fixture
def conn(demo):
    c = demo.conn()
    yield c
    c.close()


@pytest.fixture
def images(tmp_path):
    paths = []
    for name in ("a.img", "b.iso", "c.iso"):
        path = tmp_path / name
        path.write_bytes(b"\0" * 4096)
        paths.append(str(path))
    return paths


def manager_view(demo, uuid):
    return demo.lt.run(manager_get_domain(demo.bus, uuid))


def disk(target, source=None, rt=17, **kw):
    props = {"ResourceType": Uint16(rt), "Address": target, **kw}
    if source is not None:
        props["HostResource"] = [source]
    return CIMInstance(SASD, properties=props)


def nic(mac, network="default", **kw):
    return CIMInstance(EPASD, properties={"ResourceType": Uint16(10), "Address": mac,
                                          "Connection": [network], **kw})


def add(conn, which, uuid, rasds):
    rv, out = conn.InvokeMethod("AddResourceSettings", vsms_path(),
                                AffectedConfiguration=vssd_path(which, uuid),
                                ResourceSettings=list(rasds))
    return int(rv), out.get("ResultingResourceSettings")


def remove(conn, paths):
    rv, _out = conn.InvokeMethod("RemoveResourceSettings", vsms_path(),
                                 ResourceSettings=list(paths))
    return int(rv)


def modify(conn, rasds):
    rv, out = conn.InvokeMethod("ModifyResourceSettings", vsms_path(),
                                ResourceSettings=list(rasds))
    return int(rv), out.get("ResultingResourceSettings")


def defined_devices(conn, uuid):
    parts = conn.Associators(vssd_path("defined", uuid),
                             AssocClass="VIRT_VirtualSystemSettingDataComponent")
    prefix = f"VIRT:defined:{uuid}/"
    return {p["InstanceID"][len(prefix):]: p for p in parts}


def manager_devices(demo, uuid):
    view = manager_view(demo, uuid)
    return ({d["Target"]: d.get("Source") for d in view.get("Disks", [])},
            {n["MAC"]: n.get("Source") for n in view.get("NICs", [])})


def test_capabilities_list_the_methods(conn):
    caps = conn.EnumerateInstances("VIRT_VirtualSystemManagementCapabilities")[0]
    # DefineSystem, DestroySystem, ModifyResourceSettings, ModifySystemSettings,
    # RemoveResourceSettings, AddResourceSettings
    assert sorted(caps["SynchronousMethodsSupported"]) == [2, 3, 5, 6, 7, 10]


def test_add_and_remove_on_a_passive_system(demo, conn, images):
    before = manager_devices(demo, GNOME_UUID)
    rv, paths = add(conn, "defined", GNOME_UUID,
                    [disk("vdb", images[0], ResourceSubType="virtio"),
                     nic("52:54:00:aa:00:01", ResourceSubType="e1000")])
    assert rv == 0
    assert [p["InstanceID"] for p in paths] == [f"VIRT:defined:{GNOME_UUID}/vdb",
                                                f"VIRT:defined:{GNOME_UUID}/52:54:00:aa:00:01"]
    assert [p.classname for p in paths] == [SASD, EPASD]
    # the next read, and the Manager's own store
    parts = defined_devices(conn, GNOME_UUID)
    assert parts["vdb"]["HostResource"] == [images[0]]
    assert parts["52:54:00:aa:00:01"]["ResourceSubType"] == "e1000"
    for p in paths:
        assert conn.GetInstance(p)["InstanceID"] == p["InstanceID"]
    disks, nics = manager_devices(demo, GNOME_UUID)
    assert disks == {**before[0], "vdb": images[0]}
    assert nics == {**before[1], "52:54:00:aa:00:01": "default"}
    # and away again
    assert remove(conn, paths) == 0
    assert manager_devices(demo, GNOME_UUID) == before
    assert set(defined_devices(conn, GNOME_UUID)) == {"proc", "mem", "vda", GNOME_NIC}


def test_cdrom_media_on_a_passive_system(demo, conn, images):
    rv, (path,) = add(conn, "defined", GNOME_UUID, [disk("hdc", images[1], rt=16,
                                                         ResourceSubType="ide")])
    assert rv == 0
    try:
        changed = conn.GetInstance(path)
        changed["HostResource"] = [images[2]]
        rv, out = modify(conn, [changed])
        assert rv == 0 and [p["InstanceID"] for p in out] == [path["InstanceID"]]
        assert manager_devices(demo, GNOME_UUID)[0]["hdc"] == images[2]
        assert conn.GetInstance(path)["HostResource"] == [images[2]]
        changed["HostResource"] = CIMProperty("HostResource", None, type="string",
                                              is_array=True)      # NULL: eject
        assert modify(conn, [changed])[0] == 0
        assert manager_devices(demo, GNOME_UUID)[0]["hdc"] is None
        assert conn.GetInstance(path).get("HostResource") is None
    finally:
        assert remove(conn, [path]) == 0


def test_wbemcli_add_resource_settings(demo, conn, images):
    """wbemcli cm with an embedded RASD (MOF) adds the disk. wbemcli cannot parse an
    array of references in an output parameter (VALUE.REFARRAY, as DSP0201 writes
    ResultingResourceSettings; its parser knows VALUE, VALUE.ARRAY, VALUE.REFERENCE
    only), so it reports a parse exception after the call; -dx shows the answer."""
    proc = wbemcli("-dx", "cm", wbem_vsms(demo.url),
                   f'AddResourceSettings.AffectedConfiguration=root/virt:'
                   f'VIRT_VirtualSystemSettingData.InstanceID="VIRT:defined:{GNOME_UUID}",'
                   f'ResourceSettings="instance of VIRT_StorageAllocationSettingData '
                   f'{{ ResourceType = 17; Address = "vdd"; ResourceSubType = "virtio"; '
                   f'HostResource = {{"{images[0]}"}}; }};"', check=False)
    try:
        answer = proc.stderr[proc.stderr.index("<METHODRESPONSE"):]     # -dx: on stderr
        assert re.search(r'<RETURNVALUE PARAMTYPE="uint32"><VALUE>0</VALUE>', answer), answer
        assert f"VIRT:defined:{GNOME_UUID}/vdd" in answer
        assert "VALUE.REFARRAY" in answer and \
            "Bad attribute list for VALUE" in proc.stderr, proc.stderr     # wbemcli's limit
        assert manager_devices(demo, GNOME_UUID)[0]["vdd"] == images[0]
        assert conn.GetInstance(iid_path(SASD, f"VIRT:defined:{GNOME_UUID}/vdd"))[
            "HostResource"] == [images[0]]
    finally:
        assert remove(conn, [iid_path(SASD, f"VIRT:defined:{GNOME_UUID}/vdd")]) == 0


BAD_ADD = [
    ("unknown ResourceType", lambda img: [disk("vdx", img, rt=99)], "ResourceSettings[0].ResourceType"),
    ("processors are not added", lambda img: [CIMInstance(RASD, properties={
        "ResourceType": Uint16(3), "VirtualQuantity": pywbem.Uint64(2)})],
     "ResourceSettings[0].ResourceType"),
    ("a target already used", lambda img: [disk("vda", img)], "ResourceSettings[0].Address"),
    ("a target twice in one call", lambda img: [disk("vdy", img), disk("vdy", img)],
     "ResourceSettings[1].Address"),
    ("a MAC already present", lambda img: [nic(GNOME_NIC)], "ResourceSettings[0].Address"),
    ("a MAC of another system", lambda img: [nic(TEST_NIC)], "ResourceSettings[0].Address"),
    ("not a MAC", lambda img: [nic("52:54:00:zz:00:01")], "ResourceSettings[0].Address"),
    ("a source that does not exist", lambda img: [disk("vdz", "/no/such/image.qcow2")],
     "ResourceSettings[0].HostResource"),
    ("a disk without source", lambda img: [disk("vdz")], "ResourceSettings[0].HostResource"),
    ("a disk without target", lambda img: [CIMInstance(SASD, properties={
        "ResourceType": Uint16(17), "HostResource": [img]})], "ResourceSettings[0].Address"),
    ("a network libvirt does not have", lambda img: [nic("52:54:00:aa:00:09", "nowhere")],
     "ResourceSettings[0].Connection"),
    ("a RASD of another system", lambda img: [disk(
        "vdw", img, InstanceID=f"VIRT:state:{TEST_UUID}/vdw")], "ResourceSettings[0].InstanceID"),
    ("good then bad: nothing applied", lambda img: [disk("vdv", img), nic(GNOME_NIC)],
     "ResourceSettings[1].Address"),
]


@pytest.mark.parametrize("desc,rasds,field", BAD_ADD, ids=[b[0] for b in BAD_ADD])
def test_bad_input_is_refused_naming_the_field(demo, conn, images, desc, rasds, field):
    before = manager_devices(demo, GNOME_UUID)
    err = cim_error(lambda: add(conn, "defined", GNOME_UUID, rasds(images[0])))
    assert err.status_code == pywbem.CIM_ERR_INVALID_PARAMETER, err
    assert field in err.status_description, err.status_description
    assert manager_devices(demo, GNOME_UUID) == before        # nothing half-applied


def test_bad_targets_and_references(demo, conn, images):
    err = cim_error(lambda: conn.InvokeMethod("AddResourceSettings", vsms_path(),
                                              ResourceSettings=[disk("vdq", images[0])]))
    assert err.status_code == pywbem.CIM_ERR_INVALID_PARAMETER
    assert "AffectedConfiguration" in err.status_description
    err = cim_error(lambda: add(conn, "state", GNOME_UUID, [disk("vdq", images[0])]))
    assert err.status_code == pywbem.CIM_ERR_INVALID_PARAMETER      # not running
    for bad in ([iid_path(RASD, f"VIRT:defined:{GNOME_UUID}/proc")],
                [iid_path(SASD, f"VIRT:defined:{GNOME_UUID}/vdq")],
                [iid_path(SASD, "VIRT:nothing")]):
        err = cim_error(lambda: remove(conn, bad))
        assert err.status_code == pywbem.CIM_ERR_INVALID_PARAMETER, bad
        assert "ResourceSettings[0]" in err.status_description
    # a NIC's link state belongs to a running system, not to a definition
    epasd = conn.GetInstance(iid_path(EPASD, f"VIRT:defined:{GNOME_UUID}/{GNOME_NIC}"))
    epasd["LinkState"] = Uint16(3)
    err = cim_error(lambda: modify(conn, [epasd]))
    assert err.status_code == pywbem.CIM_ERR_INVALID_PARAMETER
    assert "LinkState" in err.status_description
    sasd = conn.GetInstance(iid_path(SASD, f"VIRT:defined:{GNOME_UUID}/vda"))
    sasd["HostResource"] = ["/no/such/file"]
    err = cim_error(lambda: modify(conn, [sasd]))
    assert err.status_code == pywbem.CIM_ERR_INVALID_PARAMETER
    assert "ResourceSettings[0].HostResource" in err.status_description


def test_a_driver_that_cannot_hot_plug(demo, conn, images):
    """libvirt's test driver has no device hot-plug: return code 1, nothing changed,
    neither the live domain nor its persistent definition."""
    dom = demo.libvirt.lookupByUUIDString(TEST_UUID)
    live, config = dom.XMLDesc(0), dom.XMLDesc(2)        # 2: VIR_DOMAIN_XML_INACTIVE
    rv, out = add(conn, "state", TEST_UUID, [disk("vdb", images[0]),
                                             nic("52:54:00:aa:00:02")])
    assert (rv, out) == (1, None)
    assert (dom.XMLDesc(0), dom.XMLDesc(2)) == (live, config)
    assert remove(conn, [iid_path(SASD, f"VIRT:state:{TEST_UUID}/vda")]) == 1
    assert ET.fromstring(dom.XMLDesc(0)).find("devices/disk/target").get("dev") == "vda"


def test_a_libvirt_store_definition_stays_modifiable(demo, conn):
    """What only a running domain's XML shows (source types, link states, consoles) is
    read for the devices, never into a definition: the reference Manager's libvirt
    store still sees an unchanged definition equal to its D-Bus round trip."""
    vssd = CIMInstance("VIRT_VirtualSystemSettingData", properties={
        "InstanceID": f"VIRT:defined:{TEST_UUID}", "AutomaticStartupAction": Uint16(4)})
    try:
        rv, _ = conn.InvokeMethod("ModifySystemSettings", vsms_path(), SystemSettings=vssd)
        assert int(rv) == 0
        assert manager_view(demo, TEST_UUID)["Autostart"] is True
    finally:
        vssd["AutomaticStartupAction"] = Uint16(2)
        conn.InvokeMethod("ModifySystemSettings", vsms_path(), SystemSettings=vssd)
