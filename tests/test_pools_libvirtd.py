"""Resource pools and devices against a real private libvirtd (tests/support/libvirtd.py):
the daemon serves the test driver over its socket; the test changes pools and
networks through a connection of its own and the server learns them by event. (A
module of its own: one server per process at a time, libvirt's events follow one loop.)
"""
import xml.etree.ElementTree as ET

from pywbem import CIMInstanceName

try:
    from tests.support.libvirtd import Libvirtd
    from tests.support.lvserver import LibvirtServer
    from tests.support.model import CS, TEST_UUID, VIRT, pywbemcli, wbem_cs, wbem_url, wbemcli
    from tests.test_pools import check_against_libvirt, check_central_instances
except ImportError:
    from support.libvirtd import Libvirtd  # type: ignore
    from support.lvserver import LibvirtServer  # type: ignore
    from support.model import (CS, TEST_UUID, VIRT, pywbemcli, wbem_cs,  # type: ignore
                               wbem_url, wbemcli)
    from test_pools import check_against_libvirt, check_central_instances  # type: ignore


def test_against_a_real_libvirtd(tmp_path):
    """The same through libvirtd's socket: a private daemon serving the test driver; the
    test changes things through its own connection, the server learns them by event."""
    with Libvirtd() as daemon:
        srv = LibvirtServer(daemon.uri)
        try:
            c = srv.conn()
            check_against_libvirt(c, srv.libvirt)
            lv = srv.libvirt
            pool = lv.storagePoolCreateXML(f"<pool type='dir'><name>remote</name><target>"
                                           f"<path>{tmp_path}</path></target></pool>", 0)
            net = lv.networkCreateXML("<network><name>remote-net</name>"
                                      "<bridge name='virbr8'/></network>")
            srv.wait(lambda: "remote" in srv.resources.pools
                     and "remote-net" in srv.resources.networks, what="by event")
            check_against_libvirt(c, lv)
            pool.destroy()
            net.destroy()
            srv.wait(lambda: "remote" not in srv.resources.pools
                     and "remote-net" not in srv.resources.networks, what="gone by event")
            check_against_libvirt(c, lv)
            # devices of the daemon's "test" domain are its dumpxml's
            dom = lv.lookupByUUIDString(TEST_UUID)
            root = ET.fromstring(dom.XMLDesc(0))
            devs = c.AssociatorNames(CIMInstanceName(CS, {"CreationClassName": CS,
                                                          "Name": TEST_UUID}, namespace=VIRT),
                                     AssocClass="VIRT_SystemDevice")
            assert sorted(d["DeviceID"] for d in devs if d.classname == "VIRT_LogicalDisk") == \
                sorted(t.get("dev") for t in root.findall("devices/disk/target"))
            assert sorted(d["DeviceID"] for d in devs if d.classname == "VIRT_NetworkPort") == \
                sorted(m.get("address") for m in root.findall("devices/interface/mac"))
            assert len([d for d in devs if d.classname == "VIRT_Processor"]) == \
                int(root.findtext("vcpu"))
            # wbemcli and pywbemcli: system -> devices, NIC -> its network's pool
            out = wbemcli("ain", "-ac", "VIRT_SystemDevice", wbem_cs(srv.url, TEST_UUID)).stdout
            assert out.count("VIRT_LogicalDisk.") == len(root.findall("devices/disk"))
            mac = root.find("devices/interface/mac").get("address")
            nic = wbem_url(srv.url, VIRT, "VIRT_NetworkPort",
                           f'CreationClassName="VIRT_NetworkPort",DeviceID="{mac}",'
                           f'SystemCreationClassName="{CS}",SystemName="{TEST_UUID}"')
            out = wbemcli("ai", "-ac", "VIRT_ElementAllocatedFromPool", nic).stdout
            network = root.find("devices/interface/source").get("network")
            assert f'InstanceID="VIRT:pool:network:{network}"' in out
            proc = pywbemcli(srv.url, tmp_path, "-d", VIRT, "instance", "associators",
                             f'VIRT_NetworkPort.CreationClassName="VIRT_NetworkPort",'
                             f'DeviceID="{mac}",SystemCreationClassName="{CS}",'
                             f'SystemName="{TEST_UUID}"', "--assoc-class",
                             "VIRT_ElementAllocatedFromPool", "--names-only")
            assert proc.returncode == 0, proc.stderr
            assert f"VIRT:pool:network:{network}" in proc.stdout
            c.close()
        finally:
            srv.close()


def test_central_instances_against_a_real_libvirtd(tmp_path):
    with Libvirtd() as daemon:
        srv = LibvirtServer(daemon.uri, metrics_interval=0.5)
        try:
            srv.wait(lambda: srv.resources.samples >= 1, what="a usage sample")
            names = check_central_instances(srv.url, tmp_path)
            assert len(names) == 10 and "Base Metrics" in names
        finally:
            srv.close()
