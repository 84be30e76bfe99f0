"""Acceptance (issue 4): VIRT_VirtualSystemManagementService against the in-process
demo (reference Manager: DefineDomain, UndefineDomain, UpdateDomain, GetDomain).

DefineSystem takes embedded instances as MOF text (what wbemcli users type) and as
CIM-XML (what pywbem sends); the new passive system is there at the next read;
DestroySystem removes it; ModifySystemSettings / ModifyResourceSettings change the
definition through the Manager (checked with the Manager's own GetDomain).
"""
import re

import pytest
import pywbem
from pywbem import CIMInstance, Uint16, Uint64

try:
    from tests.support.model import (demo, CS, EPASD, GNOME_UUID, RASD, SASD, TEST_UUID, VSSD,
                                      cim_error, cs_path, domain_config,
                                      iid_path, manager_get_domain, poll_until, rsc, vsms_path,
                                      vssd_path, wbem_cs, wbem_vsms, wbemcli)
except ImportError:
    from support.model import (demo, CS, EPASD, GNOME_UUID, RASD, SASD, TEST_UUID,  # type: ignore  # noqa: F401 (demo: a fixture)
                               VSSD, cim_error, cs_path, domain_config,
                               iid_path, manager_get_domain, poll_until, rsc, vsms_path, vssd_path,
                               wbem_cs, wbem_vsms, wbemcli)

pytestmark = pytest.mark.dbus


@pytest.fixture
def conn(demo):
    c = demo.conn()
    yield c
    c.close()


def manager_view(demo, uuid):
    return demo.lt.run(manager_get_domain(demo.bus, uuid))


def define(conn, vssd, rasds=()):
    rv, out = conn.InvokeMethod("DefineSystem", vsms_path(), SystemSettings=vssd,
                                ResourceSettings=list(rasds))
    return int(rv), out.get("ResultingSystem")


def defined_parts(conn, uuid):
    parts = conn.Associators(vssd_path("defined", uuid),
                             AssocClass="VIRT_VirtualSystemSettingDataComponent")
    prefix = f"VIRT:defined:{uuid}/"
    return {p["InstanceID"][len(prefix):]: p for p in parts}


def inst(classname, **props):
    return CIMInstance(classname, properties=props)


def full_settings(name):
    vssd = inst(VSSD, ElementName=name, VirtualSystemType="Test",
                AutomaticStartupAction=Uint16(4))
    rasds = [
        inst(RASD, ResourceType=Uint16(3), VirtualQuantity=Uint64(3)),
        inst(RASD, ResourceType=Uint16(4), VirtualQuantity=Uint64(393216),
             AllocationUnits="byte*2^10"),
        inst(SASD, ResourceType=Uint16(17), Address="vdb", ResourceSubType="virtio",
             HostResource=[f"/var/lib/images/{name}.qcow2"]),
        inst(EPASD, ResourceType=Uint16(10), Address="52:54:00:AB:CD:EF",
             Connection=["default"], ResourceSubType="e1000"),
    ]
    return vssd, rasds


def check_full_definition(demo, conn, uuid, name):
    cs = conn.GetInstance(cs_path(uuid))
    assert (cs["ElementName"], cs["EnabledState"], cs["RequestedState"]) == (name, 3, 12)
    assert cs["EnabledDefault"] == 2                       # autostart
    esd = conn.AssociatorNames(cs_path(uuid), AssocClass="VIRT_ElementSettingData")
    assert [p["InstanceID"] for p in esd] == [f"VIRT:defined:{uuid}"]
    vssd = conn.GetInstance(vssd_path("defined", uuid))
    assert vssd["AutomaticStartupAction"] == 4 and vssd["VirtualSystemType"] == "Test"
    parts = defined_parts(conn, uuid)
    assert set(parts) == {"proc", "mem", "vdb", "52:54:00:ab:cd:ef"}
    assert parts["proc"]["VirtualQuantity"] == 3
    assert parts["mem"]["VirtualQuantity"] == 393216
    assert parts["vdb"]["HostResource"] == [f"/var/lib/images/{name}.qcow2"]
    assert parts["52:54:00:ab:cd:ef"]["ResourceSubType"] == "e1000"
    mgr = manager_view(demo, uuid)
    assert (mgr["Name"], mgr["VCPUs"], mgr["MemoryKiB"], mgr["Autostart"]) == \
        (name, 3, 393216, True)


def test_define_with_cim_xml_embedded_instances(demo, conn):
    vssd, rasds = full_settings("def-xml")
    rv, system = define(conn, vssd, rasds)
    assert rv == 0 and system is not None
    assert system.classname == CS and system.keybindings["CreationClassName"] == CS
    check_full_definition(demo, conn, system["Name"], "def-xml")


def test_define_with_mof_strings(demo, conn):
    vssd, rasds = full_settings("def-mof")
    rv, system = define(conn, vssd.tomof(), [r.tomof() for r in rasds])
    assert rv == 0
    check_full_definition(demo, conn, system["Name"], "def-mof")


def test_define_with_cim_xml_strings(demo, conn):
    """Embedded instances as plain strings holding CIM-XML (what a client without
    EmbeddedObject support sends)."""
    vssd, rasds = full_settings("def-xmlstr")
    rv, system = define(conn, vssd.tocimxmlstr(), [r.tocimxmlstr() for r in rasds])
    assert rv == 0
    check_full_definition(demo, conn, system["Name"], "def-xmlstr")


def test_define_with_wbemcli_mof(demo, conn):
    """As a wbemcli user writes it (wbemcli passes an array element that contains '='
    only in first position, so one RASD here; MOF without the final ';' works too)."""
    out = wbemcli("cm", wbem_vsms(demo.url),
                  'DefineSystem.SystemSettings="instance of VIRT_VirtualSystemSettingData '
                  '{ ElementName = "def-wbemcli"; VirtualSystemType = "Test"; }",'
                  'ResourceSettings="instance of VIRT_ResourceAllocationSettingData '
                  '{ ResourceType = 4; VirtualQuantity = 262144; '
                  'AllocationUnits = "byte*2^10"; };"').stdout
    m = re.search(r'DefineSystem: 0, ResultingSystem \(reference\): root/virt:'
                  r'VIRT_ComputerSystem\.CreationClassName="VIRT_ComputerSystem",'
                  r'Name="([0-9a-f-]{36})"', out)
    assert m, out
    uuid = m.group(1)
    gi = wbemcli("-nl", "gi", wbem_cs(demo.url, uuid)).stdout
    assert '-ElementName="def-wbemcli"' in gi and "-EnabledState=3" in gi
    assert defined_parts(conn, uuid)["mem"]["VirtualQuantity"] == 262144
    assert manager_view(demo, uuid)["MemoryKiB"] == 262144
    # and it goes away with DestroySystem, from wbemcli too
    out = wbemcli("cm", wbem_vsms(demo.url),
                  f'DestroySystem.AffectedSystem=root/virt:VIRT_ComputerSystem.'
                  f'CreationClassName="VIRT_ComputerSystem",Name="{uuid}"').stdout
    assert "DestroySystem: 0" in out, out
    assert "CIM_ERR_NOT_FOUND" in wbemcli("gi", wbem_cs(demo.url, uuid), check=False).stderr


BAD_DEFINE = [
    ("MOF syntax error in SystemSettings", "instance of VIRT_VirtualSystemSettingData {",
     [], "SystemSettings"),
    ("not MOF nor XML", "hello", [], "SystemSettings"),
    ("unknown class", "instance of VIRT_NoSuchClass { ElementName = \"x\"; };", [],
     "SystemSettings"),
    ("broken CIM-XML", "<INSTANCE CLASSNAME=\"VIRT_VirtualSystemSettingData\"><PROPERTY",
     [], "SystemSettings"),
    ("CIM-XML that is not an instance", "<CLASSNAME NAME=\"VIRT_VirtualSystemSettingData\"/>",
     [], "SystemSettings"),
    ("second RASD unparseable",
     'instance of VIRT_VirtualSystemSettingData { ElementName = "bad-rasd"; };',
     ['instance of VIRT_ResourceAllocationSettingData { ResourceType = 3; VirtualQuantity = 1; };',
      "instance of VIRT_ResourceAllocationSettingData { ResourceType = ; };"],
     "ResourceSettings[1]"),
    ("no name", "instance of VIRT_VirtualSystemSettingData { VirtualSystemType = \"Test\"; };",
     [], "ElementName"),
    ("SystemSettings of the wrong class",
     'instance of VIRT_ResourceAllocationSettingData { ElementName = "wrong-class"; };', [],
     "SystemSettings"),
    ("a VSSD among the resource settings",
     'instance of VIRT_VirtualSystemSettingData { ElementName = "vssd-as-rasd"; };',
     ['instance of VIRT_VirtualSystemSettingData { ElementName = "vssd-as-rasd"; };'],
     "ResourceSettings[0]"),
    ("no processors",
     'instance of VIRT_VirtualSystemSettingData { ElementName = "zero-cpu"; };',
     ["instance of VIRT_ResourceAllocationSettingData { ResourceType = 3; VirtualQuantity = 0; };"],
     "ResourceSettings[0]"),
    ("no memory",
     'instance of VIRT_VirtualSystemSettingData { ElementName = "zero-mem"; };',
     ["instance of VIRT_ResourceAllocationSettingData { ResourceType = 3; VirtualQuantity = 1; };",
      "instance of VIRT_ResourceAllocationSettingData { ResourceType = 4; VirtualQuantity = 0; };"],
     "ResourceSettings[1]"),
    ("unsupported resource type",
     'instance of VIRT_VirtualSystemSettingData { ElementName = "bad-type"; };',
     ["instance of VIRT_ResourceAllocationSettingData { ResourceType = 21; };"],
     "ResourceType"),
    # MOF directives would let a client make the server open files by name.
    ("pragma include of a file",
     '#pragma include ("/etc/hostname")\n'
     'instance of VIRT_VirtualSystemSettingData { ElementName = "pragma"; };', [],
     "#pragma"),
    ("pragma hidden after an instance",
     'instance of VIRT_VirtualSystemSettingData { ElementName = "pragma2"; };\n'
     '#pragma include ("/etc/passwd")', [], "#pragma"),
    ("MOF over 64 KiB",
     'instance of VIRT_VirtualSystemSettingData { ElementName = "' + "x" * 70000 + '"; };',
     [], "larger than"),
    # Embedded CIM-XML is typed against the class, like CreateInstance's NewInstance.
    ("a string where the class has uint16",
     '<INSTANCE CLASSNAME="VIRT_VirtualSystemSettingData"><PROPERTY NAME="ElementName" '
     'TYPE="string"><VALUE>typed</VALUE></PROPERTY><PROPERTY NAME="AutomaticStartupAction" '
     'TYPE="string"><VALUE>abc</VALUE></PROPERTY></INSTANCE>', [], "AutomaticStartupAction"),
    ("a property the class does not have",
     '<INSTANCE CLASSNAME="VIRT_VirtualSystemSettingData"><PROPERTY NAME="ElementName" '
     'TYPE="string"><VALUE>bogus</VALUE></PROPERTY><PROPERTY NAME="Bogus" '
     'TYPE="string"><VALUE>x</VALUE></PROPERTY></INSTANCE>', [], "Bogus"),
]


@pytest.mark.parametrize("desc,system,resources,mentions", BAD_DEFINE,
                         ids=[b[0] for b in BAD_DEFINE])
def test_define_unparseable_is_invalid_parameter(conn, desc, system, resources, mentions):
    before = {p["Name"] for p in conn.EnumerateInstanceNames(CS)}
    err = cim_error(lambda: conn.InvokeMethod("DefineSystem", vsms_path(),
                                              SystemSettings=system,
                                              ResourceSettings=resources))
    assert err.status_code == pywbem.CIM_ERR_INVALID_PARAMETER, err
    assert mentions in err.status_description, err
    assert {p["Name"] for p in conn.EnumerateInstanceNames(CS)} == before


def test_define_without_system_settings(conn):
    err = cim_error(lambda: conn.InvokeMethod("DefineSystem", vsms_path()))
    assert err.status_code == pywbem.CIM_ERR_INVALID_PARAMETER
    assert "SystemSettings" in err.status_description


def test_define_refused_by_manager_is_failed(conn):
    """The name is taken: the Manager's InvalidArgument reaches the client."""
    err = cim_error(lambda: define(conn, inst(VSSD, ElementName="gnome-test")))
    assert err.status_code == pywbem.CIM_ERR_FAILED
    assert "gnome-test" in err.status_description and "already used" in err.status_description


def test_destroy_passive_system(demo, conn):
    rv, system = define(conn, inst(VSSD, ElementName="destroy-me", VirtualSystemType="Test"))
    assert rv == 0
    uuid = system["Name"]
    assert conn.GetInstance(cs_path(uuid))["EnabledState"] == 3
    rv, _ = conn.InvokeMethod("DestroySystem", vsms_path(), AffectedSystem=cs_path(uuid))
    assert rv == 0
    assert cim_error(lambda: conn.GetInstance(cs_path(uuid))).status_code == \
        pywbem.CIM_ERR_NOT_FOUND
    assert uuid not in {p["Name"] for p in conn.EnumerateInstanceNames(CS)}
    assert cim_error(lambda: conn.GetInstance(vssd_path("defined", uuid))).status_code == \
        pywbem.CIM_ERR_NOT_FOUND
    assert manager_view(demo, uuid) is None


def test_destroy_running_system_with_definition(demo, conn):
    """Defined, started through RequestStateChange, then destroyed: both gone."""
    rv, system = define(conn, inst(VSSD, ElementName="destroy-running",
                                   VirtualSystemType="Test"),
                        [inst(RASD, ResourceType=Uint16(4), VirtualQuantity=Uint64(32768))])
    uuid = system["Name"]
    assert rsc(conn, uuid, 2) == 0
    assert conn.GetInstance(cs_path(uuid))["EnabledState"] == 2
    poll_until(lambda: conn.AssociatorNames(cs_path(uuid), AssocClass="VIRT_ElementSettingData"),
               what="the running system's twin")
    rv, _ = conn.InvokeMethod("DestroySystem", vsms_path(), AffectedSystem=cs_path(uuid))
    assert rv == 0
    assert uuid not in {p["Name"] for p in conn.EnumerateInstanceNames(CS)}
    assert not any(d.UUIDString() == uuid for d in demo.libvirt.listAllDomains())
    assert manager_view(demo, uuid) is None


def test_destroy_unknown_system_is_not_found(conn):
    for path in (cs_path("00000000-0000-4000-8000-000000000000"), cs_path("junk"),
                 cs_path(GNOME_UUID, ccn="CIM_ComputerSystem")):
        err = cim_error(lambda: conn.InvokeMethod("DestroySystem", vsms_path(),
                                                  AffectedSystem=path))
        assert err.status_code == pywbem.CIM_ERR_NOT_FOUND, path


def test_modify_system_settings(demo, conn):
    rv, system = define(conn, inst(VSSD, ElementName="modify-sys", VirtualSystemType="Test",
                                   AutomaticStartupAction=Uint16(2)))
    uuid = system["Name"]
    assert conn.GetInstance(cs_path(uuid))["EnabledDefault"] == 3
    vssd = conn.GetInstance(vssd_path("defined", uuid))
    vssd["ElementName"] = "modify-sys-renamed"
    vssd["AutomaticStartupAction"] = Uint16(4)
    rv, _ = conn.InvokeMethod("ModifySystemSettings", vsms_path(), SystemSettings=vssd)
    assert rv == 0
    cs = conn.GetInstance(cs_path(uuid))
    assert (cs["ElementName"], cs["EnabledDefault"]) == ("modify-sys-renamed", 2)
    vssd = conn.GetInstance(vssd_path("defined", uuid))
    assert (vssd["ElementName"], vssd["AutomaticStartupAction"]) == ("modify-sys-renamed", 4)
    mgr = manager_view(demo, uuid)
    assert (mgr["Name"], mgr["Autostart"]) == ("modify-sys-renamed", True)
    # as MOF text, the way wbemcli would send it
    rv, _ = conn.InvokeMethod("ModifySystemSettings", vsms_path(), SystemSettings=(
        f'instance of VIRT_VirtualSystemSettingData {{ InstanceID = "VIRT:defined:{uuid}"; '
        f'AutomaticStartupAction = 2; }};'))
    assert rv == 0
    assert conn.GetInstance(vssd_path("defined", uuid))["AutomaticStartupAction"] == 2
    assert manager_view(demo, uuid)["Autostart"] is False


def test_modify_resource_settings(demo, conn):
    rv, system = define(conn, inst(VSSD, ElementName="modify-res", VirtualSystemType="Test"),
                        [inst(RASD, ResourceType=Uint16(3), VirtualQuantity=Uint64(1)),
                         inst(RASD, ResourceType=Uint16(4), VirtualQuantity=Uint64(65536),
                              AllocationUnits="byte*2^10")])
    uuid = system["Name"]
    parts = defined_parts(conn, uuid)
    proc, mem = parts["proc"], parts["mem"]
    proc["VirtualQuantity"] = Uint64(4)
    mem["VirtualQuantity"] = Uint64(131072)
    rv, out = conn.InvokeMethod("ModifyResourceSettings", vsms_path(),
                                ResourceSettings=[proc, mem])
    assert rv == 0
    assert sorted(p["InstanceID"] for p in out["ResultingResourceSettings"]) == \
        sorted([f"VIRT:defined:{uuid}/mem", f"VIRT:defined:{uuid}/proc"])
    parts = defined_parts(conn, uuid)
    assert (parts["proc"]["VirtualQuantity"], parts["mem"]["VirtualQuantity"]) == (4, 131072)
    mgr = manager_view(demo, uuid)
    assert (mgr["VCPUs"], mgr["MemoryKiB"]) == (4, 131072)
    # memory in other units, as MOF text
    rv, _ = conn.InvokeMethod("ModifyResourceSettings", vsms_path(), ResourceSettings=[
        f'instance of VIRT_ResourceAllocationSettingData {{ InstanceID = '
        f'"VIRT:defined:{uuid}/mem"; ResourceType = 4; VirtualQuantity = 256; '
        f'AllocationUnits = "byte * 2^20"; }};'])         # DSP0004 spelling, with blanks
    assert rv == 0
    assert defined_parts(conn, uuid)["mem"]["VirtualQuantity"] == 262144
    assert manager_view(demo, uuid)["MemoryKiB"] == 262144


BAD_MODIFY = [
    ("ModifySystemSettings", "SystemSettings",
     'instance of VIRT_VirtualSystemSettingData { InstanceID = "VIRT:defined:nope"; };',
     pywbem.CIM_ERR_INVALID_PARAMETER),
    ("ModifySystemSettings", "SystemSettings",
     'instance of VIRT_VirtualSystemSettingData { InstanceID = '
     '"VIRT:defined:00000000-0000-4000-8000-000000000000"; ElementName = "x"; };',
     pywbem.CIM_ERR_NOT_FOUND),
    ("ModifySystemSettings", "SystemSettings", "instance of {", pywbem.CIM_ERR_INVALID_PARAMETER),
    ("ModifyResourceSettings", "ResourceSettings",
     [f'instance of VIRT_StorageAllocationSettingData {{ InstanceID = '
      f'"VIRT:defined:{GNOME_UUID}/vda"; VirtualQuantity = 1; }};'],
     pywbem.CIM_ERR_INVALID_PARAMETER),
    ("ModifyResourceSettings", "ResourceSettings",
     [f'instance of VIRT_ResourceAllocationSettingData {{ InstanceID = '
      f'"VIRT:defined:{GNOME_UUID}/proc"; }};'],
     pywbem.CIM_ERR_INVALID_PARAMETER),
    ("ModifyResourceSettings", "ResourceSettings", ["garbage"], pywbem.CIM_ERR_INVALID_PARAMETER),
    ("ModifyResourceSettings", "ResourceSettings",
     [f'instance of VIRT_ResourceAllocationSettingData {{ InstanceID = '
      f'"VIRT:defined:{GNOME_UUID}/proc"; VirtualQuantity = 0; }};'],
     pywbem.CIM_ERR_INVALID_PARAMETER),
    ("ModifyResourceSettings", "ResourceSettings",
     [f'instance of VIRT_ResourceAllocationSettingData {{ InstanceID = '
      f'"VIRT:defined:{GNOME_UUID}/proc"; VirtualQuantity = 1; }};',
      f'instance of VIRT_ResourceAllocationSettingData {{ InstanceID = '
      f'"VIRT:defined:{GNOME_UUID}/mem"; VirtualQuantity = 0; }};'],
     pywbem.CIM_ERR_INVALID_PARAMETER),
    # the live configuration of a running system is not what these methods change
    ("ModifySystemSettings", "SystemSettings",
     f'instance of VIRT_VirtualSystemSettingData {{ InstanceID = "VIRT:state:{TEST_UUID}"; '
     f'ElementName = "renamed-live"; }};', pywbem.CIM_ERR_INVALID_PARAMETER),
    ("ModifyResourceSettings", "ResourceSettings",
     [f'instance of VIRT_ResourceAllocationSettingData {{ InstanceID = '
      f'"VIRT:state:{TEST_UUID}/proc"; ResourceType = 3; VirtualQuantity = 1; }};'],
     pywbem.CIM_ERR_INVALID_PARAMETER),
    ("ModifySystemSettings", "SystemSettings",
     f'instance of VIRT_ResourceAllocationSettingData {{ InstanceID = '
     f'"VIRT:defined:{GNOME_UUID}"; ElementName = "wrong-class"; }};',
     pywbem.CIM_ERR_INVALID_PARAMETER),
]


@pytest.mark.parametrize("method,param,value,status", BAD_MODIFY,
                         ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_MODIFY)])
def test_modify_errors(demo, conn, method, param, value, status):
    before = [manager_view(demo, u) for u in (GNOME_UUID, TEST_UUID)]
    err = cim_error(lambda: conn.InvokeMethod(method, vsms_path(), **{param: value}))
    assert err.status_code == status, err
    if status == pywbem.CIM_ERR_INVALID_PARAMETER:
        assert param in err.status_description, err
    assert [manager_view(demo, u) for u in (GNOME_UUID, TEST_UUID)] == before


def test_service_and_capabilities(conn):
    svc = conn.GetInstance(vsms_path())
    assert svc["EnabledState"] == 2 and svc["HealthState"] == 5
    caps = conn.Associators(vsms_path(), AssocClass="VIRT_ElementCapabilities")
    assert len(caps) == 1
    assert set(caps[0]["SynchronousMethodsSupported"]) >= {2, 3, 5, 6}


def test_destroy_transient_system(demo, conn):
    """A running system with no definition: DestroySystem destroys it in libvirt."""
    from cim_provider.domain.domxml import config_to_domain_xml
    cfg = domain_config("destroy-transient", memory_kib=16384)
    demo.libvirt.createXML(config_to_domain_xml(cfg), 0)
    poll_until(lambda: cfg.uuid in {p["Name"] for p in conn.EnumerateInstanceNames(CS)},
               what="the transient domain listed")
    rv, _ = conn.InvokeMethod("DestroySystem", vsms_path(), AffectedSystem=cs_path(cfg.uuid))
    assert rv == 0
    assert cim_error(lambda: conn.GetInstance(cs_path(cfg.uuid))).status_code == \
        pywbem.CIM_ERR_NOT_FOUND
    assert not any(d.UUIDString() == cfg.uuid for d in demo.libvirt.listAllDomains())


# (desc, store, new VirtualQuantity, Limit sent (None: left out), memory, maximum after)
MEMORY_CHANGES = [
    ("raise above the maximum, Limit as read", "sqlite", 131072, "as read", 131072, 131072),
    ("raise above the maximum, no Limit", "sqlite", 131072, None, 131072, 131072),
    ("lower, Limit as read", "sqlite", 32768, "as read", 32768, 65536),
    ("lower, no Limit", "sqlite", 32768, None, 32768, 65536),
    ("raise with a larger Limit", "sqlite", 131072, 262144, 131072, 262144),
    ("libvirt definition: raise above the maximum", "libvirt", 131072, "as read", 131072, 131072),
]


@pytest.mark.parametrize("desc,store,quantity,limit,memory,maximum", MEMORY_CHANGES,
                         ids=[m[0] for m in MEMORY_CHANGES])
def test_modify_memory_and_its_maximum(demo, conn, desc, store, quantity, limit, memory,
                                       maximum):
    """The definition's maximum memory follows a change of memory, so the change is
    accepted (libvirt refuses memory above the maximum) and a start really gets it."""
    from cim_provider.domain.domxml import config_to_domain_xml
    name = f"mem-{store}-{quantity}-{limit}".replace(" ", "")
    if store == "sqlite":
        rv, system = define(conn, inst(VSSD, ElementName=name, VirtualSystemType="Test"),
                            [inst(RASD, ResourceType=Uint16(4), VirtualQuantity=Uint64(65536))])
        uuid = system["Name"]
    else:
        cfg = domain_config(name, memory_kib=65536)
        demo.libvirt.defineXML(config_to_domain_xml(cfg))
        uuid = cfg.uuid
        poll_until(lambda: uuid in {p["Name"] for p in conn.EnumerateInstanceNames(CS)},
                   what="the libvirt definition offered by the Manager")
    mem = defined_parts(conn, uuid)["mem"]
    assert (mem["VirtualQuantity"], mem["Limit"]) == (65536, 65536)
    mem["VirtualQuantity"] = Uint64(quantity)
    if limit is None:
        del mem["Limit"]
    elif limit != "as read":
        mem["Limit"] = Uint64(limit)
    rv, _ = conn.InvokeMethod("ModifyResourceSettings", vsms_path(), ResourceSettings=[mem])
    assert rv == 0
    mem = defined_parts(conn, uuid)["mem"]
    assert (mem["VirtualQuantity"], mem["Limit"]) == (memory, maximum)
    mgr = manager_view(demo, uuid)
    assert (mgr["MemoryKiB"], mgr["MaxMemoryKiB"]) == (memory, maximum)
    # started, it has the memory it was given
    assert rsc(conn, uuid, 2) == 0
    live = conn.GetInstance(iid_path(RASD, f"VIRT:state:{uuid}/mem"))
    assert live["VirtualQuantity"] == memory
    assert rsc(conn, uuid, 3) == 0


def test_scalar_for_an_array_property_is_one_element(demo, conn):
    """HostResource is an array: a plain string given for it (as hand-written
    CIM-XML does) is one disk source, not a string cut into characters."""
    system = ('instance of VIRT_VirtualSystemSettingData { ElementName = "scalar-array"; '
              'VirtualSystemType = "Test"; };')
    disk = ('<INSTANCE CLASSNAME="VIRT_StorageAllocationSettingData">'
            '<PROPERTY NAME="ResourceType" TYPE="uint16"><VALUE>17</VALUE></PROPERTY>'
            '<PROPERTY NAME="Address" TYPE="string"><VALUE>vda</VALUE></PROPERTY>'
            '<PROPERTY NAME="HostResource" TYPE="string"><VALUE>/var/lib/images/x.img</VALUE>'
            '</PROPERTY></INSTANCE>')
    rv, out = conn.InvokeMethod("DefineSystem", vsms_path(), SystemSettings=system,
                                ResourceSettings=[disk])
    assert rv == 0
    uuid = out["ResultingSystem"]["Name"]
    try:
        sasd = conn.GetInstance(pywbem.CIMInstanceName(
            "VIRT_StorageAllocationSettingData",
            {"InstanceID": f"VIRT:defined:{uuid}/vda"}, namespace="root/virt"))
        assert sasd["HostResource"] == ["/var/lib/images/x.img"]
    finally:
        conn.InvokeMethod("DestroySystem", vsms_path(), AffectedSystem=out["ResultingSystem"])
