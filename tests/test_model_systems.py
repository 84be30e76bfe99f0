"""Acceptance (issue 4): the virtual systems as a client sees them.

The in-process demo (reference Manager with SQLite + libvirt stores, one shared
test:///default, the real server on a free loopback port) serves all three kinds of
system from the start: "test" (running, with its libvirt definition as passive twin),
"transient-demo" (running, no twin) and the seeded passive "gnome-test"/"kde-dev".
Clients: pywbem and sblim wbemcli.
"""
import pytest
import pywbem

try:
    from tests.support.model import (demo, CS, EPASD, GNOME_UUID, HOST, KDE_UUID, RASD, SASD,
                                      TEST_UUID, VIRT, VSSD, cim_error, cs_path,
                                      domain_config, iid_path, keys, poll_until, vssd_path,
                                      wbem_cs, wbem_url, wbemcli)
except ImportError:
    from support.model import (demo, CS, EPASD, GNOME_UUID, HOST, KDE_UUID, RASD, SASD,  # type: ignore  # noqa: F401 (demo: a fixture)
                               TEST_UUID, VIRT, VSSD, cim_error, cs_path,
                               domain_config, iid_path, keys, poll_until, vssd_path,
                               wbem_cs, wbem_url, wbemcli)

pytestmark = pytest.mark.dbus


@pytest.fixture(scope="module")
def transient_uuid(demo):
    """The demo's transient domain (its UUID is made up at start)."""
    recs = [r for r in demo.inventory.records() if r.name == "transient-demo"]
    assert len(recs) == 1
    return recs[0].uuid


@pytest.fixture
def conn(demo):
    c = demo.conn()
    yield c
    c.close()


def kind_seen_by_client(conn, uuid):
    """Tell the kind of a system apart the way the issue says a client does:
    through ElementSettingData and SettingsDefineState only."""
    esd = conn.AssociatorNames(cs_path(uuid), AssocClass="VIRT_ElementSettingData")
    sds = conn.AssociatorNames(cs_path(uuid), AssocClass="VIRT_SettingsDefineState")
    assert len(sds) == 1, f"exactly one SettingsDefineState per system, got {sds}"
    sds_iid = sds[0]["InstanceID"]
    if not esd:
        assert sds_iid == f"VIRT:state:{uuid}"
        return "running-only"
    assert [p["InstanceID"] for p in esd] == [f"VIRT:defined:{uuid}"]
    if sds_iid == f"VIRT:defined:{uuid}":
        return "passive-only"
    assert sds_iid == f"VIRT:state:{uuid}"
    return "both"


# (desc, which system, expected kind, EnabledState)
SITUATIONS = [
    ("running with passive twin", "test", "both", 2),
    ("running only (transient)", "transient", "running-only", 2),
    ("passive only (Manager definition)", "gnome", "passive-only", 3),
    ("passive only, too large to start", "kde", "passive-only", 3),
]


def _uuid(which, transient_uuid):
    return {"test": TEST_UUID, "transient": transient_uuid, "gnome": GNOME_UUID,
            "kde": KDE_UUID}[which]


@pytest.mark.parametrize("desc,which,kind,enabled", SITUATIONS, ids=[s[0] for s in SITUATIONS])
def test_three_situations_told_apart(conn, transient_uuid, desc, which, kind, enabled):
    uuid = _uuid(which, transient_uuid)
    names = {p["Name"] for p in conn.EnumerateInstanceNames(CS)}
    assert uuid in names
    assert kind_seen_by_client(conn, uuid) == kind
    inst = conn.GetInstance(cs_path(uuid))
    assert inst["EnabledState"] == enabled
    # The configurations that exist match the kind: no defined VSSD for a transient
    # system, no state VSSD for a passive-only one.
    has_state = kind in ("running-only", "both")
    has_defined = kind in ("passive-only", "both")
    for which_cfg, present in (("state", has_state), ("defined", has_defined)):
        if present:
            assert conn.GetInstance(vssd_path(which_cfg, uuid))["InstanceID"] == \
                f"VIRT:{which_cfg}:{uuid}"
        else:
            assert cim_error(lambda: conn.GetInstance(vssd_path(which_cfg, uuid))).status_code \
                == pywbem.CIM_ERR_NOT_FOUND
    # ...and the VSSD enumeration agrees.
    vssd_ids = {p["InstanceID"] for p in conn.EnumerateInstanceNames(VSSD)}
    assert (f"VIRT:state:{uuid}" in vssd_ids) == has_state
    assert (f"VIRT:defined:{uuid}" in vssd_ids) == has_defined


def test_enumeration_covers_every_system_once(conn, demo, transient_uuid):
    insts = conn.EnumerateInstances(CS)
    names = [i["Name"] for i in insts]
    assert sorted(names) == sorted({TEST_UUID, transient_uuid, GNOME_UUID, KDE_UUID})
    assert {i["ElementName"] for i in insts} == {"test", "transient-demo", "gnome-test",
                                                 "kde-dev"}
    # a superclass enumeration returns the guests and the host
    paths = conn.EnumerateInstanceNames("CIM_ComputerSystem")
    assert keys(paths) == keys([cs_path(u) for u in names] + [
        pywbem.CIMInstanceName("VIRT_HostSystem", {"CreationClassName": "VIRT_HostSystem",
                                                   "Name": HOST}, namespace=VIRT)])


def test_domain_started_behind_our_back_appears_as_transient(demo, conn):
    """A domain created straight in libvirt (as with virsh create) shows up by itself,
    running-only, and vanishes when destroyed."""
    from cim_provider.domain.domxml import config_to_domain_xml
    cfg = domain_config("virsh-made", memory_kib=32768)
    dom = demo.libvirt.createXML(config_to_domain_xml(cfg), 0)
    try:
        poll_until(lambda: cfg.uuid in {p["Name"] for p in conn.EnumerateInstanceNames(CS)},
                   what="the new domain in EnumerateInstanceNames")
        assert kind_seen_by_client(conn, cfg.uuid) == "running-only"
        assert conn.GetInstance(cs_path(cfg.uuid))["ElementName"] == "virsh-made"
    finally:
        dom.destroy()
    poll_until(lambda: cfg.uuid not in {p["Name"] for p in conn.EnumerateInstanceNames(CS)},
               what="the destroyed domain gone")


# ---------------------------------------------------------------- console properties

# (desc, which, expected properties)
SYSTEM_PROPERTIES = [
    ("passive gnome-test", "gnome", {
        "ElementName": "gnome-test", "Caption": "GNOME test machine",
        "EnabledState": 3, "RequestedState": 12, "EnabledDefault": 3,
        "OperationalStatus": [2], "HealthState": 5,
        "OtherIdentifyingInfo": [GNOME_UUID], "IdentifyingDescriptions": ["UUID"],
        "CreationClassName": CS, "Name": GNOME_UUID}),
    ("running test", "test", {
        "ElementName": "test", "Caption": "test",
        "EnabledState": 2, "RequestedState": 12,
        "OperationalStatus": [2], "HealthState": 5,
        "OtherIdentifyingInfo": [TEST_UUID], "IdentifyingDescriptions": ["UUID"]}),
    ("transient", "transient", {
        "ElementName": "transient-demo",
        "Caption": "A running domain no tool has a definition for",
        "EnabledState": 2, "RequestedState": 12, "OperationalStatus": [2], "HealthState": 5,
        "IdentifyingDescriptions": ["UUID"]}),
]


@pytest.mark.parametrize("desc,which,expected", SYSTEM_PROPERTIES,
                         ids=[s[0] for s in SYSTEM_PROPERTIES])
def test_system_properties(conn, transient_uuid, desc, which, expected):
    uuid = _uuid(which, transient_uuid)
    for inst in (conn.GetInstance(cs_path(uuid)),
                 next(i for i in conn.EnumerateInstances(CS) if i["Name"] == uuid)):
        got = {k: inst[k] for k in expected}
        assert got == expected
        assert inst["OtherIdentifyingInfo"] == [uuid]
        assert inst["Description"]


def _settings(conn, uuid, which):
    """The VSSD and its RASDs (by device id), found through the association."""
    vssd = conn.GetInstance(vssd_path(which, uuid))
    parts = conn.Associators(vssd.path, AssocClass="VIRT_VirtualSystemSettingDataComponent",
                             ResultRole="PartComponent")
    prefix = f"VIRT:{which}:{uuid}/"
    by_dev = {}
    for p in parts:
        assert p["InstanceID"].startswith(prefix)
        by_dev[p["InstanceID"][len(prefix):]] = p
    return vssd, by_dev


def test_defined_settings_of_gnome_test(conn):
    vssd, dev = _settings(conn, GNOME_UUID, "defined")
    assert {k: vssd[k] for k in ("ElementName", "VirtualSystemIdentifier",
                                 "VirtualSystemType", "AutomaticStartupAction")} == {
        "ElementName": "gnome-test", "VirtualSystemIdentifier": "gnome-test",
        "VirtualSystemType": "Test", "AutomaticStartupAction": 2}
    assert set(dev) == {"proc", "mem", "vda", "52:54:00:6a:10:01"}
    proc, mem, disk, nic = dev["proc"], dev["mem"], dev["vda"], dev["52:54:00:6a:10:01"]
    assert proc.classname == RASD and mem.classname == RASD
    assert disk.classname == SASD and nic.classname == EPASD
    assert {k: proc[k] for k in ("ResourceType", "VirtualQuantity", "AllocationUnits",
                                 "Reservation", "Limit")} == {
        "ResourceType": 3, "VirtualQuantity": 2, "AllocationUnits": "count",
        "Reservation": 2, "Limit": 2}
    assert {k: mem[k] for k in ("ResourceType", "VirtualQuantity", "AllocationUnits",
                                "Reservation", "Limit")} == {
        "ResourceType": 4, "VirtualQuantity": 524288, "AllocationUnits": "byte*2^10",
        "Reservation": 524288, "Limit": 524288}
    assert disk["ResourceType"] == 17
    assert disk["HostResource"] == ["/var/lib/images/gnome-test.qcow2"]
    assert disk["Address"] == "vda"
    assert disk["VirtualQuantity"] == 10 * 1024 ** 3 and disk["AllocationUnits"] == "byte"
    assert nic["ResourceType"] == 10
    assert nic["Address"] == "52:54:00:6a:10:01"
    assert nic["HostResource"] == ["default"] or nic["Connection"] == ["default"]


def test_state_settings_of_running_test(conn):
    """The live configuration of libvirt's "test" domain (test driver: 2 vCPUs,
    2 GiB current / 8 GiB max memory, disk /guest/diskimage1, NIC aa:bb:cc:dd:ee:ff)."""
    vssd, dev = _settings(conn, TEST_UUID, "state")
    assert vssd["VirtualSystemIdentifier"] == "test" and vssd["VirtualSystemType"] == "Test"
    assert vssd["ElementName"] == "test"
    assert dev["proc"]["VirtualQuantity"] == 2 and dev["proc"]["AllocationUnits"] == "count"
    assert dev["mem"]["VirtualQuantity"] == 2097152
    assert dev["mem"]["AllocationUnits"] == "byte*2^10"
    assert dev["mem"]["Limit"] == 8388608
    assert dev["vda"]["HostResource"] == ["/guest/diskimage1"]
    assert dev["aa:bb:cc:dd:ee:ff"]["Address"] == "aa:bb:cc:dd:ee:ff"


def test_capabilities_per_system(conn, transient_uuid):
    """RequestedStatesSupported: start for a passive system, stop/pause/... for a running one."""
    for uuid, expected in ((GNOME_UUID, {2}), (TEST_UUID, {3, 4, 9, 10, 11}),
                           (transient_uuid, {3, 4, 9, 10, 11})):
        caps = conn.Associators(cs_path(uuid), AssocClass="VIRT_ElementCapabilities",
                                ResultClass="CIM_EnabledLogicalElementCapabilities")
        assert len(caps) == 1
        assert set(caps[0]["RequestedStatesSupported"]) == expected


# ---------------------------------------------------------------- errors

MALFORMED = [
    ("not a UUID", {"CreationClassName": CS, "Name": "not-a-uuid"}),
    ("empty Name", {"CreationClassName": CS, "Name": ""}),
    ("UUID one digit short", {"CreationClassName": CS, "Name": GNOME_UUID[:-1]}),
    ("UUID in braces", {"CreationClassName": CS, "Name": "{" + GNOME_UUID + "}"}),
    ("UUID without dashes", {"CreationClassName": CS, "Name": GNOME_UUID.replace("-", "")}),
    ("urn:uuid: form", {"CreationClassName": CS, "Name": "urn:uuid:" + GNOME_UUID}),
    ("upper-case UUID (not the key value)", {"CreationClassName": CS,
                                             "Name": GNOME_UUID.upper()}),
    ("unknown UUID", {"CreationClassName": CS, "Name": "00000000-0000-4000-8000-000000000000"}),
    ("wrong CreationClassName", {"CreationClassName": "CIM_ComputerSystem", "Name": GNOME_UUID}),
    ("host's CreationClassName", {"CreationClassName": "VIRT_HostSystem", "Name": GNOME_UUID}),
    ("missing Name", {"CreationClassName": CS}),
    ("missing CreationClassName", {"Name": GNOME_UUID}),
    ("extra key", {"CreationClassName": CS, "Name": GNOME_UUID, "Other": "x"}),
]


@pytest.mark.parametrize("desc,kb", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_get_instance_bad_keys_not_found(conn, desc, kb):
    path = pywbem.CIMInstanceName(CS, kb, namespace=VIRT)
    err = cim_error(lambda: conn.GetInstance(path))
    assert err.status_code == pywbem.CIM_ERR_NOT_FOUND, err


BAD_SETTINGS = [
    ("state VSSD of a passive system", VSSD, f"VIRT:state:{GNOME_UUID}"),
    ("unknown prefix", VSSD, f"VIRT:other:{GNOME_UUID}"),
    ("malformed UUID", VSSD, "VIRT:defined:not-a-uuid"),
    ("upper-case UUID", VSSD, f"VIRT:defined:{GNOME_UUID.upper()}"),
    ("unknown UUID", VSSD, "VIRT:defined:00000000-0000-4000-8000-000000000000"),
    ("VSSD id under RASD class", RASD, f"VIRT:defined:{GNOME_UUID}"),
    ("unknown device", RASD, f"VIRT:defined:{GNOME_UUID}/gpu"),
    ("disk under RASD class", RASD, f"VIRT:defined:{GNOME_UUID}/vda"),
    ("memory under SASD class", SASD, f"VIRT:defined:{GNOME_UUID}/mem"),
    ("empty InstanceID", EPASD, ""),
]


@pytest.mark.parametrize("desc,cls,iid", BAD_SETTINGS, ids=[b[0] for b in BAD_SETTINGS])
def test_get_setting_bad_keys_not_found(conn, desc, cls, iid):
    err = cim_error(lambda: conn.GetInstance(iid_path(cls, iid)))
    assert err.status_code == pywbem.CIM_ERR_NOT_FOUND, err


def test_get_instance_every_enumerated_path(conn):
    """Every path an enumeration hands out works for GetInstance (and gives the same)."""
    for cls in (CS, VSSD, RASD, SASD, EPASD, "VIRT_EnabledLogicalElementCapabilities"):
        for inst in conn.EnumerateInstances(cls):
            got = conn.GetInstance(inst.path)
            assert dict(got.items()) == dict(inst.items()), inst.path


# ---------------------------------------------------------------- wbemcli

def test_wbemcli_ein_ei_gi(demo, transient_uuid):
    out = wbemcli("ein", wbem_url(demo.url, VIRT, CS)).stdout
    for uuid in (TEST_UUID, transient_uuid, GNOME_UUID, KDE_UUID):
        assert f'Name="{uuid}"' in out
    assert len(out.strip().splitlines()) == 4
    lines = wbemcli("ei", wbem_url(demo.url, VIRT, CS)).stdout.strip().splitlines()
    assert len(lines) == 4
    gnome = next(line for line in lines if f'Name="{GNOME_UUID}"' in line)
    assert 'ElementName="gnome-test"' in gnome and "EnabledState=3" in gnome
    assert "RequestedState=12" in gnome and "HealthState=5" in gnome
    gi = wbemcli("-nl", "gi", wbem_cs(demo.url, TEST_UUID)).stdout
    assert "-EnabledState=2" in gi and '-ElementName="test"' in gi
    assert '-OtherIdentifyingInfo="6695eb01-f6a4-8304-79aa-97f2502e193f"' in gi


def test_wbemcli_gi_unknown_is_not_found(demo):
    proc = wbemcli("gi", wbem_cs(demo.url, "00000000-0000-4000-8000-000000000000"),
                   check=False)
    assert "CIM_ERR_NOT_FOUND" in proc.stderr, proc.stderr


# ---------------------------------------------------------------- the States table

# libvirt's test driver cannot crash, suspend to RAM or be caught shutting down, so
# these records are fed to the server's inventory exactly as the libvirt source feeds
# a domain event (Inventory.update_running); everything after that is the real server.
# (desc, RunState name, EnabledState, OperationalStatus, HealthState, states offered)
STATES = [
    ("running", "RUNNING", 2, [2], 5, {3, 4, 9, 10, 11}),
    ("blocked", "BLOCKED", 2, [2], 5, {3, 4, 9, 10, 11}),
    ("paused", "PAUSED", 9, [2], 5, {2, 3, 10, 11}),
    ("shutting down", "SHUTDOWN", 4, [2], 5, {3}),
    ("crashed", "CRASHED", 3, [6], 20, {3}),
    ("pmsuspended", "PMSUSPENDED", 6, [2], 5, {3}),
]


@pytest.mark.parametrize("desc,state,enabled,opstatus,health,offered", STATES,
                         ids=[s[0] for s in STATES])
def test_states_table(demo, conn, desc, state, enabled, opstatus, health, offered):
    from cim_provider.domain.records import RunningDomain, RunState
    cfg = domain_config(f"state-{state.lower()}")

    async def feed(dom):
        demo.inventory.update_running(cfg.uuid, dom)
    demo.lt.run(feed(RunningDomain(cfg, RunState[state])))
    try:
        inst = conn.GetInstance(cs_path(cfg.uuid))
        assert (inst["EnabledState"], list(inst["OperationalStatus"]), inst["HealthState"]) \
            == (enabled, opstatus, health)
        caps = conn.Associators(cs_path(cfg.uuid), AssocClass="VIRT_ElementCapabilities")
        assert set(caps[0]["RequestedStatesSupported"]) == offered
        # a valid request that makes no sense from here changes nothing
        for requested in {2, 3, 4, 9, 10, 11} - offered:
            assert rsc_rv(conn, cfg.uuid, requested) == 4097, requested
        assert conn.GetInstance(cs_path(cfg.uuid))["RequestedState"] == 12
    finally:
        demo.lt.run(feed(None))


def rsc_rv(conn, uuid, state):
    rv, _ = conn.InvokeMethod("RequestStateChange", cs_path(uuid),
                              RequestedState=pywbem.Uint16(state))
    return int(rv)


def test_pull_and_property_list(conn):
    """What a console does for a large host: pull in small chunks, ask for a few
    properties only."""
    full = conn.EnumerateInstances(CS)
    pulled = list(conn.IterEnumerateInstances(CS, MaxObjectCount=1))
    assert keys(pulled) == keys(full)
    some = conn.EnumerateInstances(CS, PropertyList=["ElementName", "EnabledState"])
    assert keys(some) == keys(full)
    for inst in some:
        assert set(inst.keys()) == {"ElementName", "EnabledState"}
    one = conn.GetInstance(cs_path(GNOME_UUID), PropertyList=["RequestedState"])
    assert dict(one.items()) == {"RequestedState": 12}
