"""Acceptance (issue 4): the associations, walked both ways with every filter, and the
profile registration that crosses from interop to root/virt. Against the in-process
demo; clients pywbem, pywbemcli and sblim wbemcli.
"""
import re

import pytest
import pywbem
from pywbem import CIMInstanceName

try:
    from tests.support.model import (demo, CS, EPASD, GNOME_UUID, HOST, INTEROP, KDE_UUID, RASD,
                                      SASD, TEST_UUID, VIRT, VSSD, cim_error,
                                      cs_path, host_path, iid_path, key, keys, profile_path,
                                      pywbemcli, vsms_path, vssd_path, wbem_cs, wbem_url,
                                      wbemcli)
except ImportError:
    from support.model import (demo, CS, EPASD, GNOME_UUID, HOST, INTEROP, KDE_UUID,  # type: ignore  # noqa: F401 (demo: a fixture)
                               RASD, SASD, TEST_UUID, VIRT, VSSD, cim_error,
                               cs_path, host_path, iid_path, key, keys, profile_path,
                               pywbemcli, vsms_path, vssd_path, wbem_cs, wbem_url, wbemcli)

pytestmark = pytest.mark.dbus

TRANSIENT = "<transient>"      # replaced by the demo's transient UUID
GUESTS = [TEST_UUID, TRANSIENT, GNOME_UUID, KDE_UUID]
TEST_NIC = "aa:bb:cc:dd:ee:ff"
GNOME_NIC = "52:54:00:6a:10:01"


def vsmc():
    return iid_path("VIRT_VirtualSystemManagementCapabilities",
                    "VIRT:VirtualSystemManagementCapabilities")


def elec(uuid):
    return iid_path("VIRT_EnabledLogicalElementCapabilities", f"VIRT:ELEC:{uuid}")


def part(cls, which, uuid, dev):
    return iid_path(cls, f"VIRT:{which}:{uuid}/{dev}")


def state_parts(uuid=TEST_UUID, nic=TEST_NIC):
    return [part(RASD, "state", uuid, "proc"), part(RASD, "state", uuid, "mem"),
            part(SASD, "state", uuid, "vda"), part(EPASD, "state", uuid, nic)]


def object_manager():
    return CIMInstanceName("CIM_ObjectManager", {
        "SystemCreationClassName": "VIRT_HostSystem", "SystemName": HOST,
        "CreationClassName": "CIM_ObjectManager", "Name": "cim-provider"}, namespace=INTEROP)


def guests():
    return [cs_path(u) for u in GUESTS]


# What the model grew (devices, pools, allocation, metrics, the indication service).

def device(cls, uuid, dev):
    return CIMInstanceName(cls, {"SystemCreationClassName": CS, "SystemName": uuid,
                                 "CreationClassName": cls, "DeviceID": dev}, namespace=VIRT)


def guest_devices():
    return [device("VIRT_Processor", TEST_UUID, "0"), device("VIRT_Processor", TEST_UUID, "1"),
            device("VIRT_Memory", TEST_UUID, "mem"), device("VIRT_LogicalDisk", TEST_UUID, "vda"),
            device("VIRT_NetworkPort", TEST_UUID, TEST_NIC)]


def pool(iid):
    cls = {"processor": "VIRT_ProcessorPool", "memory": "VIRT_MemoryPool",
           "disk": "VIRT_DiskPool", "network": "VIRT_NetworkPool"}[iid.split(":")[2]]
    return iid_path(cls, iid)


def pools():
    return [pool(i) for i in ("VIRT:pool:processor", "VIRT:pool:memory",
                              "VIRT:pool:disk:default-pool", "VIRT:pool:network:default")]


def type_capabilities():
    return [iid_path("VIRT_AllocationCapabilities", f"VIRT:AC:type:{rt}") for rt in (3, 4, 10, 17)]


def indication_service():
    return CIMInstanceName("VIRT_IndicationService", {
        "SystemCreationClassName": "VIRT_HostSystem", "SystemName": HOST,
        "CreationClassName": "VIRT_IndicationService",
        "Name": "cim-provider:IndicationService"}, namespace=INTEROP)


METRICS = ("cpu", "memory", "disk-read", "disk-write", "net-rx", "net-tx")


def metric_defs():
    return [CIMInstanceName("VIRT_BaseMetricDefinition", {"Id": f"VIRT:metric:{m}"},
                            namespace=VIRT) for m in METRICS]


def metric_values(uuid, names=METRICS):
    return [iid_path("VIRT_BaseMetricValue", f"VIRT:metric:{uuid}:{m}") for m in names]


TRANSIENT_METRICS = ("cpu", "memory")        # no disk, no NIC


# (desc, source, filters, expected targets)
ASSOCIATORS = [
    ("host: everything", host_path(), {},
     guests() + [vsms_path(), profile_path("DSP1042"), indication_service()] + pools()
     + type_capabilities()),
    ("host: HostedDependency", host_path(), {"AssocClass": "VIRT_HostedDependency"}, guests()),
    ("host: CIM_HostedDependency and its subclass HostedService",
     host_path(), {"AssocClass": "CIM_HostedDependency"},
     guests() + [vsms_path(), indication_service()]),
    ("host: HostedService", host_path(), {"AssocClass": "VIRT_HostedService"},
     [vsms_path(), indication_service()]),
    ("host: ResultClass guests", host_path(), {"ResultClass": "VIRT_ComputerSystem"}, guests()),
    ("host: ResultClass CIM_Service", host_path(), {"ResultClass": "CIM_Service"},
     [vsms_path(), indication_service()]),
    ("host: ResultClass profile (other namespace)", host_path(),
     {"ResultClass": "CIM_RegisteredProfile"}, [profile_path("DSP1042")]),
    ("host: Role Antecedent", host_path(), {"Role": "Antecedent"},
     guests() + [vsms_path(), indication_service()]),
    ("host: Role Dependent", host_path(), {"Role": "Dependent"}, []),
    ("host: ResultRole Dependent", host_path(), {"ResultRole": "Dependent"},
     guests() + [vsms_path(), indication_service()]),
    ("host: ResultRole ConformantStandard", host_path(), {"ResultRole": "ConformantStandard"},
     [profile_path("DSP1042")]),
    ("host: all four filters", host_path(),
     {"AssocClass": "VIRT_HostedDependency", "ResultClass": "CIM_System",
      "Role": "Antecedent", "ResultRole": "Dependent"}, guests()),
    ("host: filters that exclude each other", host_path(),
     {"AssocClass": "VIRT_HostedService", "ResultClass": "VIRT_ComputerSystem"}, []),

    ("both: everything", cs_path(TEST_UUID), {},
     [host_path(), vssd_path("state", TEST_UUID), vssd_path("defined", TEST_UUID),
      elec(TEST_UUID), profile_path("DSP1057")] + guest_devices() + metric_defs()
     + metric_values(TEST_UUID)),
    ("both: SettingsDefineState -> state VSSD", cs_path(TEST_UUID),
     {"AssocClass": "VIRT_SettingsDefineState"}, [vssd_path("state", TEST_UUID)]),
    ("both: ElementSettingData -> defined VSSD", cs_path(TEST_UUID),
     {"AssocClass": "CIM_ElementSettingData"}, [vssd_path("defined", TEST_UUID)]),
    ("both: ResultClass VSSD", cs_path(TEST_UUID), {"ResultClass": "CIM_SettingData"},
     [vssd_path("state", TEST_UUID), vssd_path("defined", TEST_UUID)]),
    ("both: ResultRole SettingData", cs_path(TEST_UUID), {"ResultRole": "SettingData"},
     [vssd_path("state", TEST_UUID), vssd_path("defined", TEST_UUID)]),
    ("both: Role Dependent -> host", cs_path(TEST_UUID), {"Role": "Dependent"}, [host_path()]),
    ("both: ResultRole Antecedent -> host", cs_path(TEST_UUID), {"ResultRole": "Antecedent"},
     [host_path()]),
    ("both: Role Antecedent (its metrics)", cs_path(TEST_UUID), {"Role": "Antecedent"},
     metric_defs() + metric_values(TEST_UUID)),
    ("both: ResultClass CIM_ComputerSystem -> host", cs_path(TEST_UUID),
     {"ResultClass": "CIM_ComputerSystem"}, [host_path()]),
    ("both: ResultClass sibling class", cs_path(TEST_UUID),
     {"AssocClass": "VIRT_HostedDependency", "ResultClass": "VIRT_ComputerSystem"}, []),
    ("both: capabilities", cs_path(TEST_UUID), {"ResultRole": "Capabilities"},
     [elec(TEST_UUID)]),
    ("both: its profile", cs_path(TEST_UUID), {"AssocClass": "CIM_ElementConformsToProfile"},
     [profile_path("DSP1057")]),

    ("passive: everything", cs_path(GNOME_UUID), {},
     [host_path(), vssd_path("defined", GNOME_UUID), elec(GNOME_UUID),
      profile_path("DSP1057")]),
    ("passive: SettingsDefineState -> defined VSSD", cs_path(GNOME_UUID),
     {"AssocClass": "VIRT_SettingsDefineState"}, [vssd_path("defined", GNOME_UUID)]),
    ("passive: ElementSettingData -> defined VSSD", cs_path(GNOME_UUID),
     {"AssocClass": "VIRT_ElementSettingData"}, [vssd_path("defined", GNOME_UUID)]),
    ("transient: no ElementSettingData", cs_path(TRANSIENT),
     {"AssocClass": "VIRT_ElementSettingData"}, []),
    ("transient: settings", cs_path(TRANSIENT), {"ResultClass": VSSD},
     [vssd_path("state", TRANSIENT)]),

    ("state VSSD: everything", vssd_path("state", TEST_UUID), {},
     [cs_path(TEST_UUID)] + state_parts()),
    ("state VSSD: Role GroupComponent", vssd_path("state", TEST_UUID),
     {"Role": "GroupComponent"}, state_parts()),
    ("state VSSD: ResultRole ManagedElement", vssd_path("state", TEST_UUID),
     {"ResultRole": "ManagedElement"}, [cs_path(TEST_UUID)]),
    ("state VSSD: ResultClass VIRT RASD (proc, mem)", vssd_path("state", TEST_UUID),
     {"ResultClass": RASD}, state_parts()[:2]),
    ("state VSSD: ResultClass CIM RASD (all four)", vssd_path("state", TEST_UUID),
     {"ResultClass": "CIM_ResourceAllocationSettingData"}, state_parts()),
    ("state VSSD: ResultClass SASD", vssd_path("state", TEST_UUID),
     {"ResultClass": "CIM_StorageAllocationSettingData"}, state_parts()[2:3]),
    ("state VSSD: AssocClass ElementSettingData", vssd_path("state", TEST_UUID),
     {"AssocClass": "VIRT_ElementSettingData"}, []),
    ("defined VSSD of both: its system through ElementSettingData only",
     vssd_path("defined", TEST_UUID), {"ResultClass": CS}, [cs_path(TEST_UUID)]),
    ("defined VSSD of passive: system and parts", vssd_path("defined", GNOME_UUID), {},
     [cs_path(GNOME_UUID), part(RASD, "defined", GNOME_UUID, "proc"),
      part(RASD, "defined", GNOME_UUID, "mem"), part(SASD, "defined", GNOME_UUID, "vda"),
      part(EPASD, "defined", GNOME_UUID, GNOME_NIC)]),
    ("memory RASD: its VSSD and pool", part(RASD, "defined", GNOME_UUID, "mem"), {},
     [vssd_path("defined", GNOME_UUID), pool("VIRT:pool:memory")]),
    ("memory RASD: Role PartComponent", part(RASD, "defined", GNOME_UUID, "mem"),
     {"Role": "PartComponent"}, [vssd_path("defined", GNOME_UUID)]),
    ("memory RASD: Role GroupComponent", part(RASD, "defined", GNOME_UUID, "mem"),
     {"Role": "GroupComponent"}, []),
    ("NIC EPASD: its VSSD", part(EPASD, "state", TEST_UUID, TEST_NIC),
     {"AssocClass": "CIM_VirtualSystemSettingDataComponent"}, [vssd_path("state", TEST_UUID)]),

    ("service: everything", vsms_path(), {}, [host_path(), vsmc()]),
    ("service: ElementCapabilities", vsms_path(), {"AssocClass": "VIRT_ElementCapabilities"},
     [vsmc()]),
    ("service: Role Dependent", vsms_path(), {"Role": "Dependent"}, [host_path()]),
    ("service capabilities: the service", vsmc(), {}, [vsms_path()]),
    ("system capabilities: the system", elec(GNOME_UUID), {}, [cs_path(GNOME_UUID)]),
    ("system capabilities: ResultRole ManagedElement", elec(GNOME_UUID),
     {"ResultRole": "ManagedElement"}, [cs_path(GNOME_UUID)]),

    ("DSP1057: every guest and the profiles it relates to", profile_path("DSP1057"), {},
     guests() + [profile_path("DSP1042"), profile_path("DSP1041")]),
    ("DSP1057: ElementConformsToProfile", profile_path("DSP1057"),
     {"AssocClass": "CIM_ElementConformsToProfile"}, guests()),
    ("DSP1057: ResultClass profiles", profile_path("DSP1057"),
     {"ResultClass": "CIM_RegisteredProfile"}, [profile_path("DSP1042"), profile_path("DSP1041")]),
    ("DSP1057: ResultRole ManagedElement", profile_path("DSP1057"),
     {"ResultRole": "ManagedElement"}, guests()),
    ("DSP1057: referenced by DSP1042", profile_path("DSP1057"),
     {"AssocClass": "CIM_ReferencedProfile", "Role": "Antecedent"}, [profile_path("DSP1042")]),
    ("DSP1057: references DSP1041", profile_path("DSP1057"),
     {"AssocClass": "CIM_ReferencedProfile", "ResultRole": "Antecedent"},
     [profile_path("DSP1041")]),
    ("DSP1042: the host and referenced profiles", profile_path("DSP1042"), {},
     [host_path()] + [profile_path(p) for p in ("DSP1057", "DSP1041", "DSP1044", "DSP1045",
                                                "DSP1047", "DSP1050")]),
    ("DSP1042: ResultRole ManagedElement -> host", profile_path("DSP1042"),
     {"ResultRole": "ManagedElement"}, [host_path()]),
    ("DSP1041: referenced by the others, its pools", profile_path("DSP1041"), {},
     [profile_path(p) for p in ("DSP1042", "DSP1057", "DSP1044", "DSP1045", "DSP1047",
                                "DSP1050")] + pools()),
    ("DSP1033: the object manager", profile_path("DSP1033"), {}, [object_manager()]),
    ("object manager: DSP1033", object_manager(), {}, [profile_path("DSP1033")]),
]


@pytest.fixture(scope="module")
def transient(demo):
    # Two usage samples now, so every running system has all its metric values (the
    # set of them stays the same from then on; only their figures move).
    for _ in range(2):
        demo.lt.run(demo.demo.sources.libvirt.sample_usage())
    return next(r.uuid for r in demo.inventory.records() if r.name == "transient-demo")


def fix(path, transient):
    """Put the demo's transient UUID into a path built before it was known."""
    kb = {}
    for k, v in path.keybindings.items():
        if isinstance(v, str):
            v = v.replace(TRANSIENT, transient)
        kb[k] = v
    return CIMInstanceName(path.classname, kb, namespace=path.namespace)


@pytest.fixture
def conn(demo):
    c = demo.conn()
    yield c
    c.close()


@pytest.mark.parametrize("desc,source,filters,expected", ASSOCIATORS,
                         ids=[a[0] for a in ASSOCIATORS])
def test_associators_with_filters(demo, transient, desc, source, filters, expected):
    source = fix(source, transient)
    expected = keys(fix(p, transient) for p in expected)
    c = demo.conn(source.namespace)
    try:
        names = c.AssociatorNames(source, **filters)
        assert keys(names) == expected
        assert len(names) == len(expected), "no duplicates"
        insts = c.Associators(source, **filters)
        assert keys(insts) == expected
        for inst in insts:           # the instances are what GetInstance gives
            if inst.classname == "VIRT_BaseMetricValue":
                continue             # volatile: the next sample may land in between
            other = demo.conn(inst.path.namespace)
            assert dict(other.GetInstance(inst.path).items()) == dict(inst.items())
            other.close()
    finally:
        c.close()


WALK_BACK = [(d, s) for d, s, f, _e in ASSOCIATORS if not f]


@pytest.mark.parametrize("desc,source", WALK_BACK, ids=[w[0] for w in WALK_BACK])
def test_walked_both_ways(demo, transient, desc, source):
    """Every object an association leads to leads back to where we came from."""
    source = fix(source, transient)
    c = demo.conn(source.namespace)
    try:
        targets = c.AssociatorNames(source)
        assert targets
        for t in targets:
            back = demo.conn(t.namespace)
            assert key(source) in keys(back.AssociatorNames(t)), t
            # and the association instances name both ends
            refs = back.References(t)
            assert any(key(source) in {key(v) for v in r.values()
                                       if isinstance(v, CIMInstanceName)} for r in refs), t
            back.close()
    finally:
        c.close()


# (desc, source, filters, expected association classes)
REFERENCES = [
    ("both: every reference", cs_path(TEST_UUID), {},
     ["VIRT_HostedDependency", "VIRT_SettingsDefineState", "VIRT_ElementSettingData",
      "VIRT_ElementCapabilities", "VIRT_ElementConformsToProfile"]
     + ["VIRT_SystemDevice"] * 5 + ["VIRT_MetricDefForME"] * 6 + ["VIRT_MetricForME"] * 6),
    ("both: ResultClass CIM_SettingsDefineState", cs_path(TEST_UUID),
     {"ResultClass": "CIM_SettingsDefineState"}, ["VIRT_SettingsDefineState"]),
    ("both: Role ManagedElement", cs_path(TEST_UUID), {"Role": "ManagedElement"},
     ["VIRT_SettingsDefineState", "VIRT_ElementSettingData", "VIRT_ElementCapabilities",
      "VIRT_ElementConformsToProfile"]),
    ("both: Role Dependent", cs_path(TEST_UUID), {"Role": "Dependent"},
     ["VIRT_HostedDependency"]),
    ("transient: no ElementSettingData", cs_path(TRANSIENT), {},
     ["VIRT_HostedDependency", "VIRT_SettingsDefineState", "VIRT_ElementCapabilities",
      "VIRT_ElementConformsToProfile"] + ["VIRT_SystemDevice"] * 2
     + ["VIRT_MetricDefForME"] * 6 + ["VIRT_MetricForME"] * len(TRANSIENT_METRICS)),
    ("host: Role Antecedent", host_path(), {"Role": "Antecedent"},
     ["VIRT_HostedDependency"] * 4 + ["VIRT_HostedService"] * 2),
    ("host: ResultClass HostedService", host_path(), {"ResultClass": "CIM_HostedService"},
     ["VIRT_HostedService"] * 2),
]


@pytest.mark.parametrize("desc,source,filters,expected", REFERENCES,
                         ids=[r[0] for r in REFERENCES])
def test_references_with_filters(conn, transient, desc, source, filters, expected):
    source = fix(source, transient)
    names = conn.ReferenceNames(source, **filters)
    assert sorted(p.classname for p in names) == sorted(expected)
    insts = conn.References(source, **filters)
    assert keys(insts) == keys(names)
    for inst in insts:
        refs = [v for v in inst.values() if isinstance(v, CIMInstanceName)]
        assert key(source) in {key(r) for r in refs}


def test_element_setting_data_properties(conn):
    esd = conn.References(cs_path(TEST_UUID), ResultClass="VIRT_ElementSettingData")
    assert len(esd) == 1
    assert esd[0]["IsDefault"] == 1 and esd[0]["IsCurrent"] == 2     # running: not current
    esd = conn.References(cs_path(GNOME_UUID), ResultClass="VIRT_ElementSettingData")
    assert esd[0]["IsCurrent"] == 1                                    # passive: current


def test_associators_from_host_return_all_guests(conn):
    guests_now = conn.EnumerateInstances(CS)
    assert len(guests_now) == 4
    got = conn.Associators(host_path(), AssocClass="VIRT_HostedDependency",
                           ResultClass="VIRT_ComputerSystem")
    assert keys(got) == keys(guests_now)
    by_name = {i["Name"]: i for i in guests_now}
    for inst in got:
        assert dict(inst.items()) == dict(by_name[inst["Name"]].items())
    # the pull operations agree
    pulled = list(conn.IterAssociatorInstancePaths(host_path(), AssocClass="VIRT_HostedDependency",
                                                   MaxObjectCount=1))
    assert keys(pulled) == keys(guests_now)


def test_conforms_to_profile_crosses_namespaces(demo):
    interop = demo.conn(INTEROP)
    virt = demo.conn(VIRT)
    try:
        systems = interop.Associators(profile_path("DSP1057"),
                                      AssocClass="CIM_ElementConformsToProfile")
        assert {i.path.namespace for i in systems} == {VIRT}
        assert keys(systems) == keys(virt.EnumerateInstanceNames(CS))
        assert {i["ElementName"] for i in systems} == {"test", "transient-demo", "gnome-test",
                                                       "kde-dev"}
        # and back, from root/virt to interop
        for sys_inst in systems:
            profiles = virt.Associators(sys_inst.path, AssocClass="CIM_ElementConformsToProfile")
            assert [(p.path.namespace, p["RegisteredName"], p["RegisteredVersion"])
                    for p in profiles] == [(INTEROP, "Virtual System", "1.0.0")]
        host_prof = virt.Associators(host_path(), ResultClass="CIM_RegisteredProfile")
        assert [(p.path.namespace, p["RegisteredName"]) for p in host_prof] == \
            [(INTEROP, "System Virtualization")]
        # the association itself, enumerated on either side, is the same set of links
        links_i = interop.EnumerateInstances("CIM_ElementConformsToProfile")
        links_v = virt.EnumerateInstances("VIRT_ElementConformsToProfile")
        def as_pairs(links):
            return {(key(a["ConformantStandard"]), key(a["ManagedElement"])) for a in links}
        assert as_pairs(links_i) == as_pairs(links_v)
        # 4 guests, the host, the object manager, 4 pools (DSP1041) and each in its
        # resource profile, 6 metric definitions, the indication service
        assert len(links_i) == 4 + 2 + 4 + 4 + 6 + 1
    finally:
        interop.close()
        virt.close()


ALL_PROFILES = [
    ("System Virtualization", "1.0.0"), ("Virtual System", "1.0.0"),
    ("Resource Allocation", "1.1.0"), ("Profile Registration", "1.0.0"),
    ("Processor Device Resource Virtualization", "1.0.0"),
    ("Memory Resource Virtualization", "1.0.0"), ("Storage Resource Virtualization", "1.0.0"),
    ("Ethernet Port Resource Virtualization", "1.0.0"), ("Base Metrics", "1.0.1"),
    ("Indications", "1.2.0")]


def test_registered_profiles(demo):
    c = demo.conn(INTEROP)
    profs = c.EnumerateInstances("CIM_RegisteredProfile")
    c.close()
    assert sorted((p["RegisteredOrganization"], p["RegisteredName"], p["RegisteredVersion"])
                  for p in profs) == sorted((2, n, v) for n, v in ALL_PROFILES)


def test_pywbemcli_profile_list(demo, tmp_path):
    proc = pywbemcli(demo.url, tmp_path, "-d", INTEROP, "profile", "list")
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("DMTF")]
    got = sorted((" ".join(r[1:-1]), r[-1]) for r in rows)
    assert got == sorted(ALL_PROFILES)


def test_pywbemcli_associators_from_host(demo, tmp_path):
    proc = pywbemcli(demo.url, tmp_path, "-d", VIRT, "instance", "associators",
                     f'VIRT_HostSystem.CreationClassName="VIRT_HostSystem",Name="{HOST}"',
                     "--assoc-class", "VIRT_HostedDependency", "--names-only")
    assert proc.returncode == 0, proc.stderr
    for uuid in (TEST_UUID, GNOME_UUID, KDE_UUID):
        assert uuid in proc.stdout
    assert proc.stdout.count(":VIRT_ComputerSystem.") == 4


def test_wbemcli_associations(demo, transient):
    host = wbem_url(demo.url, VIRT, "VIRT_HostSystem",
                    f'CreationClassName="VIRT_HostSystem",Name="{HOST}"')
    out = wbemcli("ain", "-ac", "VIRT_HostedDependency", host).stdout
    assert sorted(re.search(r',Name="([^"]+)"', line).group(1)
                  for line in out.strip().splitlines()) == \
        sorted([TEST_UUID, transient, GNOME_UUID, KDE_UUID])
    out = wbemcli("ai", "-ac", "VIRT_SettingsDefineState", wbem_cs(demo.url, GNOME_UUID)).stdout
    assert f'InstanceID="VIRT:defined:{GNOME_UUID}"' in out
    assert wbemcli("ain", "-ac", "VIRT_ElementSettingData",
                   wbem_cs(demo.url, transient)).stdout.strip() == ""
    out = wbemcli("rin", "-arc", "VIRT_ElementSettingData", wbem_cs(demo.url, TEST_UUID)).stdout
    assert out.count("VIRT_ElementSettingData") == 1
    out = wbemcli("ain", "-arc", "CIM_ResourceAllocationSettingData", "-ar", "GroupComponent",
                  wbem_url(demo.url, VIRT, VSSD, f'InstanceID="VIRT:state:{TEST_UUID}"')).stdout
    assert len(out.strip().splitlines()) == 4


def test_association_errors(conn):
    err = cim_error(lambda: conn.AssociatorNames(cs_path("00000000-0000-4000-8000-000000000000")))
    assert err.status_code == pywbem.CIM_ERR_NOT_FOUND
    err = cim_error(lambda: conn.AssociatorNames(cs_path(TEST_UUID), AssocClass="VIRT_NoSuch"))
    assert err.status_code == pywbem.CIM_ERR_INVALID_PARAMETER
    err = cim_error(lambda: conn.References(cs_path(TEST_UUID), ResultClass="VIRT_NoSuch"))
    assert err.status_code == pywbem.CIM_ERR_INVALID_PARAMETER


# (namespace, association class, how many instances in the demo)
ASSOC_CLASSES = [
    # SettingsDefineState: 4 systems, then the devices of test (5) and transient-demo (2)
    (VIRT, "VIRT_HostedDependency", 4), (VIRT, "VIRT_SettingsDefineState", 4 + 5 + 2),
    (VIRT, "VIRT_ElementSettingData", 3),
    (VIRT, "VIRT_VirtualSystemSettingDataComponent", 4 + 4 + 4 + 4 + 2),
    (VIRT, "VIRT_HostedService", 2), (VIRT, "VIRT_ElementCapabilities", 5 + 8),
    (VIRT, "VIRT_ElementConformsToProfile", 21), (INTEROP, "VIRT_ElementConformsToProfile", 21),
    (INTEROP, "VIRT_ReferencedProfile", 11), (INTEROP, "VIRT_HostedService", 1),
    (INTEROP, "VIRT_ElementCapabilities", 1), (VIRT, "VIRT_SystemDevice", 7),
    (VIRT, "VIRT_HostedResourcePool", 4),
]


@pytest.mark.parametrize("ns,cls,count", ASSOC_CLASSES, ids=[f"{a[0]}:{a[1]}" for a in ASSOC_CLASSES])
def test_association_instances_by_path(demo, ns, cls, count):
    """Enumerated association instances, their names, and GetInstance all agree."""
    c = demo.conn(ns)
    try:
        insts = c.EnumerateInstances(cls)
        assert len(insts) == count
        assert keys(c.EnumerateInstanceNames(cls)) == keys(insts)
        for inst in insts:
            assert dict(c.GetInstance(inst.path).items()) == dict(inst.items())
        # an association path with a reference to nothing names no instance
        for inst in insts:
            path = inst.path.copy()
            refs = [k for k, v in path.keybindings.items()
                    if isinstance(v, CIMInstanceName) and v.classname == CS]
            for ref in refs:
                path.keybindings[ref] = cs_path("00000000-0000-4000-8000-000000000000")
                assert cim_error(lambda: c.GetInstance(path)).status_code == \
                    pywbem.CIM_ERR_NOT_FOUND
            if refs:
                break
    finally:
        c.close()


@pytest.mark.parametrize("profile,expected", [
    ("Virtual System", GUESTS), ("System Virtualization", [HOST])])
def test_pywbemcli_central_instances(demo, transient, tmp_path, profile, expected):
    proc = pywbemcli(demo.url, tmp_path, "-d", INTEROP, "profile", "centralinsts",
                     "--organization", "DMTF", "--profile", profile)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.replace("\n", "").replace("|", "").replace(" ", "")
    for name in expected:
        assert name.replace(TRANSIENT, transient) in text
    if profile == "Virtual System":
        assert text.count("root/virt:VIRT_ComputerSystem.") == 4


CROSS_NAMESPACE_RESULT_CLASS = [
    # (desc, source namespace, source, ResultClass, expected targets)
    ("guest to its profile", "root/virt", lambda: cs_path(TEST_UUID), "VIRT_RegisteredProfile",
     lambda: {key(profile_path("DSP1057"))}),
    ("guest to a superclass of the profile", "root/virt", lambda: cs_path(TEST_UUID),
     "CIM_RegisteredProfile", lambda: {key(profile_path("DSP1057"))}),
    ("profile to guests by a root/virt superclass", INTEROP, lambda: profile_path("DSP1057"),
     "CIM_ComputerSystem", "every guest"),
    ("profile to guests, a class the guests are not", INTEROP, lambda: profile_path("DSP1057"),
     "VIRT_HostSystem", lambda: set()),
]


@pytest.mark.parametrize("desc,ns,source,result_class,expected", CROSS_NAMESPACE_RESULT_CLASS,
                         ids=[c[0] for c in CROSS_NAMESPACE_RESULT_CLASS])
def test_result_class_across_namespaces(conn, desc, ns, source, result_class, expected):
    """ResultClass names the class of the associated objects, which for
    ElementConformsToProfile live in the other namespace."""
    got = conn.AssociatorNames(source(), AssocClass="CIM_ElementConformsToProfile",
                               ResultClass=result_class)
    assert (source().namespace or "").lower() == ns.lower()
    if expected == "every guest":
        want = keys(conn.EnumerateInstanceNames(CS))
        assert want
    else:
        want = expected()
    assert keys(got) == want


def test_result_class_unknown_everywhere_is_invalid_parameter(conn):
    with pytest.raises(pywbem.CIMError) as exc:
        conn.AssociatorNames(cs_path(TEST_UUID), ResultClass="VIRT_NoSuchClass")
    assert exc.value.status_code == pywbem.CIM_ERR_INVALID_PARAMETER
