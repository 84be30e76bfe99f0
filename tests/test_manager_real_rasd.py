"""What a client sees of the reference Manager's disks and NICs (the in-process demo:
the server, the Manager, libvirt's test driver): a disk image made with qemu-img shows
its format and capacity in its StorageAllocationSettingData, and a NIC's Connection
`bridge:br0` is a NIC on the host bridge br0."""
import shutil
import subprocess

import pytest
from pywbem import CIMInstance, Uint16

try:
    from tests.support.model import EPASD, SASD, VSSD, demo, iid_path, vsms_path  # noqa: F401
except ImportError:          # tests/ itself is on sys.path (rootdir-less layout)
    from support.model import EPASD, SASD, VSSD, demo, iid_path, vsms_path  # type: ignore # noqa: F401,E501

QEMU_IMG = shutil.which("qemu-img")
pytestmark = [pytest.mark.dbus,
              pytest.mark.skipif(QEMU_IMG is None, reason="needs qemu-img (qemu-utils)")]


def test_disk_format_and_capacity_and_a_bridged_nic_reach_the_rasds(demo, tmp_path):
    image = str(tmp_path / "guest.qcow2")
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", image, "48M"], check=True)
    conn = demo.conn()
    try:
        rv, out = conn.InvokeMethod(
            "DefineSystem", vsms_path(),
            SystemSettings=CIMInstance(VSSD, properties={"ElementName": "rasd-formats",
                                                         "VirtualSystemType": "Test"}),
            ResourceSettings=[
                CIMInstance(SASD, properties={"ResourceType": Uint16(17), "Address": "vda",
                                              "HostResource": [image],
                                              "ResourceSubType": "virtio"}),
                CIMInstance(EPASD, properties={"ResourceType": Uint16(10),
                                               "Address": "52:54:00:00:aa:01",
                                               "Connection": ["bridge:br0"]})])
        assert int(rv) == 0
        uuid = out["ResultingSystem"]["Name"]
        try:
            sasd = conn.GetInstance(iid_path(SASD, f"VIRT:defined:{uuid}/vda"))
            assert sasd["Format"] == "qcow2"
            assert (sasd["VirtualQuantity"], sasd["AllocationUnits"]) == (48 << 20, "byte")
            assert sasd["HostResource"] == [image]
            nic = conn.GetInstance(iid_path(EPASD, f"VIRT:defined:{uuid}/52:54:00:00:aa:01"))
            assert nic["OtherResourceType"] == "bridge"
            assert nic["Connection"] == ["br0"]
        finally:
            conn.InvokeMethod("DestroySystem", vsms_path(),
                              AffectedSystem=out["ResultingSystem"])
    finally:
        conn.close()
