"""Acceptance (resource pools, DSP1041 and the resource virtualization profiles): pools
match libvirt's own answers (node info, pool info, net info, read here with a
connection of the test's), follow libvirt's storage-pool and network events, and
lead to what is allocated from them; allocation capabilities with their settings;
every registered profile has central instances (`pywbemcli profile centralinsts`).
In-process on test:///default; test_pools_libvirtd.py does the same against a real
private libvirtd.
"""
import os
import re
import uuid as uuidlib
import xml.etree.ElementTree as ET

import libvirt
import pytest
import pywbem
from pywbem import CIMInstanceName

try:
    from tests.support.lvserver import LibvirtServer
    from tests.support.model import (CS, HOST, INTEROP, VIRT, host_path, iid_path,
                                      keys, pywbemcli, wbem_url, wbemcli)
except ImportError:
    from support.lvserver import LibvirtServer  # type: ignore
    from support.model import (CS, HOST, INTEROP, VIRT, host_path,  # type: ignore
                               iid_path, keys, pywbemcli, wbem_url, wbemcli)

POOL_CLASS = {"processor": "VIRT_ProcessorPool", "memory": "VIRT_MemoryPool",
              "disk": "VIRT_DiskPool", "network": "VIRT_NetworkPool"}


def pool_path(iid):
    return iid_path(POOL_CLASS[iid.split(":")[2]], iid)


@pytest.fixture(scope="module")
def srv():
    s = LibvirtServer()
    yield s
    s.close()


@pytest.fixture
def conn(srv):
    c = srv.conn()
    yield c
    c.close()


def served_pools(conn):
    return {p["InstanceID"]: p for p in conn.EnumerateInstances("CIM_ResourcePool")}


def check_against_libvirt(conn, lv):
    """Every pool as libvirt (a connection of the test's) describes it right now."""
    pools = served_pools(conn)
    cpus, mem_mib = lv.getInfo()[2], lv.getInfo()[1]
    running = [d for d in lv.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)]
    vcpus = sum(d.info()[3] for d in running)
    memory = sum(d.info()[2] for d in running)
    proc, mem = pools["VIRT:pool:processor"], pools["VIRT:pool:memory"]
    assert (proc["Primordial"], proc["ResourceType"], proc["Capacity"], proc["Reserved"],
            proc["Available"]) == (True, 3, cpus, vcpus, max(0, cpus - vcpus))
    assert (mem["Primordial"], mem["ResourceType"], mem["Capacity"], mem["Reserved"],
            mem["Available"]) == (True, 4, mem_mib * 1024, memory,
                                  max(0, mem_mib * 1024 - memory))
    storage = {p.name(): p for p in lv.listAllStoragePools(0)}
    nets = {n.name(): n for n in lv.listAllNetworks(0)}
    assert {i for i in pools if i.startswith("VIRT:pool:disk:")} == \
        {f"VIRT:pool:disk:{n}" for n in storage}
    assert {i for i in pools if i.startswith("VIRT:pool:network:")} == \
        {f"VIRT:pool:network:{n}" for n in nets}
    for name, p in storage.items():
        inst = pools[f"VIRT:pool:disk:{name}"]
        state, capacity, allocation, available = p.info()
        path = ET.fromstring(p.XMLDesc(0)).findtext("target/path")
        assert (inst["ResourceType"], inst["Path"], inst["PoolID"]) == (17, path, name)
        if p.isActive():
            assert (inst["Capacity"], inst["Reserved"], inst["Available"]) == \
                (capacity, allocation, available)
            assert list(inst["OperationalStatus"]) == [2]
        else:
            assert list(inst["OperationalStatus"]) == [10]
    for name, n in nets.items():
        inst = pools[f"VIRT:pool:network:{name}"]
        assert (inst["ResourceType"], inst["Bridge"]) == (10, n.bridgeName())
        assert list(inst["OperationalStatus"]) == ([2] if n.isActive() else [10])
    return pools


def test_pools_match_libvirt(srv, conn):
    check_against_libvirt(conn, srv.libvirt)
    for inst in conn.EnumerateInstances("CIM_ResourcePool"):
        assert dict(conn.GetInstance(inst.path).items()) == dict(inst.items())


def test_reserved_follows_the_running_domains(srv, conn):
    uuid = str(uuidlib.uuid4())
    before = served_pools(conn)
    dom = srv.libvirt.createXML(
        f"<domain type='test'><name>pool-user</name><uuid>{uuid}</uuid>"
        "<memory>262144</memory><vcpu>3</vcpu><os><type>hvm</type></os>"
        "<devices><interface type='network'><mac address='52:54:00:77:00:01'/>"
        "<source network='default'/></interface></devices></domain>", 0)
    try:
        srv.wait(lambda: srv.inventory.get(uuid), what="the domain")
        after = check_against_libvirt(conn, srv.libvirt)
        assert after["VIRT:pool:processor"]["Reserved"] == \
            before["VIRT:pool:processor"]["Reserved"] + 3
        assert after["VIRT:pool:memory"]["Reserved"] == \
            before["VIRT:pool:memory"]["Reserved"] + 262144
        assert after["VIRT:pool:network:default"]["Reserved"] == \
            before["VIRT:pool:network:default"]["Reserved"] + 1
    finally:
        dom.destroy()
    srv.wait(lambda: srv.inventory.get(uuid) is None, what="the domain gone")
    assert served_pools(conn)["VIRT:pool:processor"]["Reserved"] == \
        before["VIRT:pool:processor"]["Reserved"]


def test_storage_pools_and_networks_follow_events(srv, conn, tmp_path):
    """Defined, started, stopped, undefined through libvirt: each shows at once, by
    event (the server never re-lists pools on a request)."""
    lv = srv.libvirt
    pool = lv.storagePoolDefineXML(f"<pool type='dir'><name>evpool</name><target><path>"
                                   f"{tmp_path}</path></target></pool>")
    net = None
    try:
        net = lv.networkDefineXML("<network><name>evnet</name><bridge name='virbr7'/>"
                                  "<forward mode='route'/><ip address='192.168.77.1' "
                                  "netmask='255.255.255.0'/></network>")
        srv.wait(lambda: "evpool" in srv.resources.pools and "evnet" in srv.resources.networks,
                 what="the new pool and network")
        pools = check_against_libvirt(conn, lv)
        assert list(pools["VIRT:pool:disk:evpool"]["OperationalStatus"]) == [10]
        assert pools["VIRT:pool:network:evnet"]["ForwardMode"] == "route"
        pool.create()
        net.create()
        srv.wait(lambda: srv.resources.pools["evpool"].active
                 and srv.resources.networks["evnet"].active, what="started")
        pools = check_against_libvirt(conn, lv)
        assert pools["VIRT:pool:disk:evpool"]["Capacity"] > 0
        pool.destroy()
        net.destroy()
        srv.wait(lambda: not srv.resources.pools["evpool"].active, what="stopped")
    finally:
        for obj in (pool, net):
            if obj is None:
                continue
            try:
                if obj.isActive():
                    obj.destroy()
                obj.undefine()
            except libvirt.libvirtError:
                pass
    srv.wait(lambda: "evpool" not in srv.resources.pools
             and "evnet" not in srv.resources.networks, what="gone")
    pools = check_against_libvirt(conn, lv)
    assert "VIRT:pool:disk:evpool" not in pools


def test_allocation_from_a_storage_pool(srv, conn, tmp_path):
    """A disk whose file lies in a pool's directory is allocated from that pool: its
    device (ElementAllocatedFromPool) and its RASD (ResourceAllocationFromPool)."""
    lv = srv.libvirt
    pool = lv.storagePoolCreateXML(f"<pool type='dir'><name>images</name><target><path>"
                                   f"{tmp_path}</path></target></pool>", 0)
    uuid = str(uuidlib.uuid4())
    image = tmp_path / "guest.img"
    image.write_bytes(b"")
    dom = lv.createXML(f"<domain type='test'><name>pooled</name><uuid>{uuid}</uuid>"
                       "<memory>65536</memory><vcpu>1</vcpu><os><type>hvm</type></os>"
                       f"<devices><disk type='file' device='disk'><source file='{image}'/>"
                       "<target dev='vdb' bus='virtio'/></disk></devices></domain>", 0)
    try:
        srv.wait(lambda: srv.inventory.get(uuid) and "images" in srv.resources.pools,
                 what="domain and pool")
        disk = CIMInstanceName("VIRT_LogicalDisk", {
            "SystemCreationClassName": CS, "SystemName": uuid,
            "CreationClassName": "VIRT_LogicalDisk", "DeviceID": "vdb"}, namespace=VIRT)
        rasd = iid_path("VIRT_StorageAllocationSettingData", f"VIRT:state:{uuid}/vdb")
        want = [pool_path("VIRT:pool:disk:images")]
        assert keys(conn.AssociatorNames(disk, AssocClass="VIRT_ElementAllocatedFromPool")) == \
            keys(want)
        assert keys(conn.AssociatorNames(rasd, AssocClass="CIM_ResourceAllocationFromPool")) == \
            keys(want)
        drawn = conn.AssociatorNames(want[0])
        assert keys([disk, rasd]) <= keys(drawn)
    finally:
        dom.destroy()
        pool.destroy()
    srv.wait(lambda: "images" not in srv.resources.pools, what="the transient pool gone")


def test_allocation_capabilities(srv, conn):
    cpus, mem_mib = srv.libvirt.getInfo()[2], srv.libvirt.getInfo()[1]
    for pool in conn.EnumerateInstanceNames("CIM_ResourcePool"):
        caps = conn.Associators(pool, AssocClass="VIRT_ElementCapabilities")
        assert [c["InstanceID"] for c in caps] == [f"VIRT:AC:{pool['InstanceID']}"]
    host_caps = conn.Associators(host_path(), AssocClass="VIRT_ElementCapabilities")
    assert sorted(c["ResourceType"] for c in host_caps) == [3, 4, 10, 17]
    proc = next(c for c in host_caps if c["ResourceType"] == 3)
    links = conn.References(proc.path, ResultClass="VIRT_SettingsDefineCapabilities")
    got = {}
    for link in links:
        setting = conn.GetInstance(link["PartComponent"])
        got[(link["ValueRole"], link["ValueRange"])] = setting["VirtualQuantity"]
    assert got == {(0, 0): 1, (3, 1): 1, (3, 2): cpus, (3, 3): 1}
    mem = next(c for c in host_caps if c["ResourceType"] == 4)
    maxima = [conn.GetInstance(link["PartComponent"])["VirtualQuantity"]
              for link in conn.References(mem.path, ResultClass="CIM_SettingsDefineCapabilities")
              if link["ValueRange"] == 2]
    assert maxima == [mem_mib * 1024]
    # the settings are settings like any other: enumerated, and gettable
    ids = {r["InstanceID"] for r in conn.EnumerateInstanceNames("VIRT_ResourceAllocationSettingData")}
    assert {"VIRT:caps:3/default", "VIRT:caps:4/max"} <= ids


def test_hosted_resource_pools(srv, conn):
    hosted = conn.AssociatorNames(host_path(), AssocClass="VIRT_HostedResourcePool")
    assert keys(hosted) == keys(p.path for p in conn.EnumerateInstances("CIM_ResourcePool"))


def centralinsts(url, home, name):
    """`pywbemcli profile centralinsts` of one DMTF profile: the instance paths it prints
    (class and keys, host and namespace left out)."""
    proc = pywbemcli(url, home, "-d", INTEROP, "--output-format", "plain", "profile",
                     "centralinsts", "-o", "DMTF", "-p", name)
    assert proc.returncode == 0, (name, proc.stderr)
    body = proc.stdout.split("Central Instance paths", 1)[1]
    text = "".join(line.strip() for line in body.splitlines()
                   if line.strip()).replace(f"DMTF:{name}:", "\n")
    return sorted(re.findall(r"//[^/]+/[^:]+:(\w+\.[^/]*?)(?=//|$|\n\S)", text, re.M))


def listed_profiles(url, home):
    proc = pywbemcli(url, home, "-d", INTEROP, "profile", "list")
    assert proc.returncode == 0, proc.stderr
    return [" ".join(line.split()[1:-1]) for line in proc.stdout.splitlines()
            if line.startswith("DMTF")]


def expected_central_instances(c):
    """Every profile's central instances as the server's own enumerations give them."""
    def names(cls, ns=VIRT):
        return [p for p in c.EnumerateInstanceNames(cls, namespace=ns)]
    pools = names("CIM_ResourcePool")
    return {
        "System Virtualization": [host_path()],
        "Virtual System": names(CS),
        "Resource Allocation": pools,
        "Processor Device Resource Virtualization": names("VIRT_ProcessorPool"),
        "Memory Resource Virtualization": names("VIRT_MemoryPool"),
        "Storage Resource Virtualization": names("VIRT_DiskPool"),
        "Ethernet Port Resource Virtualization": names("VIRT_NetworkPool"),
        "Base Metrics": names("VIRT_BaseMetricDefinition"),
        "Indications": names("CIM_IndicationService", INTEROP),
        "Profile Registration": names("CIM_ObjectManager", INTEROP)}


def check_central_instances(url, home):
    """profile list, then profile centralinsts for each profile listed: the paths are
    exactly the central instances (none missing, none extra, never empty)."""
    c = pywbem.WBEMConnection(url, default_namespace=VIRT, timeout=30)
    want = expected_central_instances(c)
    c.close()
    names = listed_profiles(url, home)
    for name in names:
        got = centralinsts(url, home, name)
        assert got, name
        for path in want[name]:
            assert any(all(f'{k}="{v}"' in g for k, v in path.keybindings.items()) and
                       g.startswith(path.classname + ".") for g in got), (name, path, got)
        assert len(got) == len(want[name]), (name, got)
    return names


def test_every_registered_profile_has_its_central_instances(srv, tmp_path):
    names = check_central_instances(srv.url, tmp_path)
    # metrics are off on this server: Base Metrics is not listed (test_metrics.py)
    assert len(names) == 9 and "Base Metrics" not in names, names


def test_wbemcli_pools(srv):
    out = wbemcli("ei", wbem_url(srv.url, VIRT, "VIRT_DiskPool")).stdout
    assert 'InstanceID="VIRT:pool:disk:default-pool"' in out and 'Path="/default-pool"' in out
    out = wbemcli("ain", "-ac", "VIRT_HostedResourcePool",
                  wbem_url(srv.url, VIRT, "VIRT_HostSystem",
                           f'CreationClassName="VIRT_HostSystem",Name="{HOST}"')).stdout
    assert len(out.strip().splitlines()) == 4


def test_pool_paths_that_name_nothing(conn):
    for iid in ("VIRT:pool:disk:nope", "VIRT:pool:cpu", "VIRT:pool:network:"):
        with pytest.raises(pywbem.CIMError) as err:
            conn.GetInstance(iid_path("VIRT_DiskPool", iid))
        assert err.value.status_code == pywbem.CIM_ERR_NOT_FOUND
    assert os.path.exists("/")          # (the paths above are not checked on the host)
