"""Acceptance (issue 4): VIRT_ComputerSystem.RequestStateChange, the whole table of
docs/architecture.md, against the in-process demo (reference Manager, shared test:///default).

Every case gets its own domain, prepared up front in the state it starts from:
"passive" (a persistent libvirt definition that is not running: the Manager's libvirt
store offers it), "running" / "paused" (the same, started / paused: a system with a
passive twin), "transient" (created without a definition), and "gnome" (the demo's
seeded SQLite definition). After a 0 return the very next read, by another client
connection, must show the new state: no polling there.
"""
import datetime

import libvirt
import pytest
import pywbem

try:
    from tests.support.model import (demo, CS, GNOME_UUID, KDE_UUID, TEST_UUID,
                                      cim_error, cs_path, domain_config, poll_until, rsc,
                                      wbem_cs, wbemcli)
except ImportError:
    from support.model import (demo, CS, GNOME_UUID, KDE_UUID, TEST_UUID,  # type: ignore  # noqa: F401 (demo: a fixture)
                               cim_error, cs_path, domain_config, poll_until, rsc,
                               wbem_cs, wbemcli)

from cim_provider.domain.domxml import config_to_domain_xml

pytestmark = pytest.mark.dbus

GONE = "gone"

# (desc, from, RequestedState, return value, EnabledState after or GONE)
TRANSITIONS = [
    ("passive -> 2 Enabled: Manager.StartDomain", "passive", 2, 0, 2),
    ("passive SQLite definition -> 2 Enabled", "gnome", 2, 0, 2),
    ("passive -> 3 Disabled", "passive", 3, 4097, 3),
    ("passive -> 4 Shut Down", "passive", 4, 4097, 3),
    ("passive -> 9 Quiesce", "passive", 9, 4097, 3),
    ("passive -> 10 Reboot", "passive", 10, 4097, 3),
    ("passive -> 11 Reset", "passive", 11, 4097, 3),
    ("running -> 2 Enabled", "running", 2, 4097, 2),
    ("running -> 3 Disabled: destroy", "running", 3, 0, 3),
    ("running -> 4 Shut Down: shutdown", "running", 4, 0, 3),
    ("running -> 9 Quiesce: suspend", "running", 9, 0, 9),
    ("running -> 10 Reboot", "running", 10, 0, 2),
    ("running -> 11 Reset", "running", 11, 0, 2),
    ("paused -> 2 Enabled: resume", "paused", 2, 0, 2),
    ("paused -> 3 Disabled: destroy", "paused", 3, 0, 3),
    ("paused -> 4 Shut Down", "paused", 4, 4097, 9),
    ("paused -> 9 Quiesce", "paused", 9, 4097, 9),
    ("paused -> 10 Reboot", "paused", 10, 0, 2),
    ("paused -> 11 Reset (libvirt keeps it paused)", "paused", 11, 0, 9),
    ("transient -> 9 Quiesce", "transient", 9, 0, 9),
    ("transient -> 3 Disabled: the system is gone", "transient", 3, 0, GONE),
]

# RequestStateChange values whose ValueMap entry exists but that we do not offer
NOT_SUPPORTED = [6, 7, 8, 32768, 40000, 65535]
# not values of the parameter's ValueMap at all
OUT_OF_RANGE = [0, 1, 5, 12, 13, 4096, 32767]

ENABLED_STATE = {"passive": 3, "gnome": 3, "running": 2, "paused": 9, "transient": 2}
LIBVIRT_STATE = {2: libvirt.VIR_DOMAIN_RUNNING, 9: libvirt.VIR_DOMAIN_PAUSED}


@pytest.fixture(scope="module")
def domains(demo):
    """One domain per TRANSITIONS case (plus spares), in its starting state."""
    conn = demo.libvirt
    made = {}
    for i, (desc, start, *_rest) in enumerate(TRANSITIONS):
        if start == "gnome":
            made[desc] = GNOME_UUID
            continue
        cfg = domain_config(f"rsc-{i}", memory_kib=16384)
        xml = config_to_domain_xml(cfg)
        if start == "transient":
            conn.createXML(xml, 0)
        else:
            dom = conn.defineXML(xml)
            if start in ("running", "paused"):
                dom.create()
            if start == "paused":
                dom.suspend()
        made[desc] = cfg.uuid
    client = demo.conn()
    want = {made[d]: ENABLED_STATE[s] for d, s, *_ in TRANSITIONS}
    twins = {made[d] for d, s, *_ in TRANSITIONS if s != "transient"}

    def ready():
        got = {i["Name"]: i["EnabledState"] for i in client.EnumerateInstances(CS)}
        with_twin = {a["ManagedElement"]["Name"]
                     for a in client.EnumerateInstances("VIRT_ElementSettingData")}
        return all(got.get(u) == e for u, e in want.items()) and twins <= with_twin
    poll_until(ready, within=15, what="every prepared domain visible in its state")
    client.close()
    return made


@pytest.fixture
def conn(demo):
    c = demo.conn()
    yield c
    c.close()


@pytest.mark.parametrize("desc,start,requested,rc,after", TRANSITIONS,
                         ids=[t[0] for t in TRANSITIONS])
def test_transition_table(demo, domains, conn, desc, start, requested, rc, after):
    uuid = domains[desc]
    before = conn.GetInstance(cs_path(uuid))
    assert before["EnabledState"] == ENABLED_STATE[start]
    assert before["RequestedState"] == 12          # nothing requested yet
    # The capabilities announce exactly what will work from here.
    caps = conn.Associators(cs_path(uuid), AssocClass="VIRT_ElementCapabilities")
    assert (requested in caps[0]["RequestedStatesSupported"]) == (rc == 0)

    assert rsc(conn, uuid, requested) == rc

    other = demo.conn()          # "the next read by any client"
    try:
        if after == GONE:
            err = cim_error(lambda: other.GetInstance(cs_path(uuid)))
            assert err.status_code == pywbem.CIM_ERR_NOT_FOUND
            assert uuid not in {p["Name"] for p in other.EnumerateInstanceNames(CS)}
            return
        inst = other.GetInstance(cs_path(uuid))
        assert inst["EnabledState"] == after
        assert inst["RequestedState"] == (requested if rc == 0 else 12)
        listed = next(i for i in other.EnumerateInstances(CS) if i["Name"] == uuid)
        assert (listed["EnabledState"], listed["RequestedState"]) == \
            (inst["EnabledState"], inst["RequestedState"])
    finally:
        other.close()
    if rc == 0 and after in LIBVIRT_STATE:       # libvirt itself agrees
        assert demo.libvirt.lookupByUUIDString(uuid).state()[0] == LIBVIRT_STATE[after]


@pytest.mark.parametrize("state", NOT_SUPPORTED)
@pytest.mark.parametrize("which", ["running", "passive"])
def test_not_supported_values_return_1(conn, which, state):
    uuid = TEST_UUID if which == "running" else KDE_UUID
    before = conn.GetInstance(cs_path(uuid))
    assert rsc(conn, uuid, state) == 1
    after = conn.GetInstance(cs_path(uuid))
    assert (after["EnabledState"], after["RequestedState"]) == \
        (before["EnabledState"], before["RequestedState"])


@pytest.mark.parametrize("state", OUT_OF_RANGE + [None],
                         ids=[str(s) for s in OUT_OF_RANGE] + ["missing"])
def test_out_of_range_or_missing_is_invalid_parameter(conn, state):
    before = conn.GetInstance(cs_path(TEST_UUID))
    err = cim_error(lambda: rsc(conn, TEST_UUID, state))
    assert err.status_code == pywbem.CIM_ERR_INVALID_PARAMETER, err
    assert "RequestedState" in err.status_description
    after = conn.GetInstance(cs_path(TEST_UUID))
    assert after["EnabledState"] == before["EnabledState"] == 2


def test_invalid_parameter_on_unknown_system_is_not_found(conn):
    err = cim_error(lambda: rsc(conn, "00000000-0000-4000-8000-000000000000", 2))
    assert err.status_code == pywbem.CIM_ERR_NOT_FOUND


def test_manager_refusal_is_failed_with_reason(conn):
    """kde-dev needs 64 GiB: the reference Manager's policy refuses, and the client
    reads the Manager's own words; nothing changed."""
    err = cim_error(lambda: rsc(conn, KDE_UUID, 2))
    assert err.status_code == pywbem.CIM_ERR_FAILED
    assert "starting kde-dev needs 64.0 GiB" in err.status_description, err
    assert "free" in err.status_description
    inst = conn.GetInstance(cs_path(KDE_UUID))
    assert (inst["EnabledState"], inst["RequestedState"]) == (3, 12)


def test_requested_state_records_last_successful_request(demo, conn):
    cfg = domain_config("rsc-history", memory_kib=16384)
    demo.libvirt.defineXML(config_to_domain_xml(cfg)).create()
    # running, with its libvirt definition known to the Manager as passive twin
    poll_until(lambda: cfg.uuid in {p["Name"] for p in conn.EnumerateInstanceNames(CS)}
               and conn.AssociatorNames(cs_path(cfg.uuid), AssocClass="VIRT_ElementSettingData"),
               what="rsc-history visible with its twin")
    steps = [(9, 0, 9, 9), (9, 4097, 9, 9), (4, 4097, 9, 9), (2, 0, 2, 2),
             (6, 1, 2, 2), (10, 0, 2, 10), (3, 0, 3, 3), (3, 4097, 3, 3), (2, 0, 2, 2)]
    for requested, rc, enabled, req_after in steps:
        assert rsc(conn, cfg.uuid, requested) == rc, requested
        inst = conn.GetInstance(cs_path(cfg.uuid))
        assert (inst["EnabledState"], inst["RequestedState"]) == (enabled, req_after), requested


def test_wbemcli_pause_and_resume(demo, conn):
    cfg = domain_config("rsc-wbemcli", memory_kib=16384)
    demo.libvirt.createXML(config_to_domain_xml(cfg), 0)
    poll_until(lambda: cfg.uuid in {p["Name"] for p in conn.EnumerateInstanceNames(CS)},
               what="rsc-wbemcli visible")
    path = wbem_cs(demo.url, cfg.uuid)
    for requested, enabled in ((9, 9), (2, 2)):
        out = wbemcli("cm", path, f"RequestStateChange.RequestedState={requested}").stdout
        assert "RequestStateChange: 0" in out, out
        gi = wbemcli("-nl", "gi", path).stdout
        assert f"-EnabledState={enabled}\n" in gi and f"-RequestedState={requested}\n" in gi
    proc = wbemcli("cm", path, "RequestStateChange.RequestedState=5", check=False)
    assert "CIM_ERR_INVALID_PARAMETER" in proc.stderr, proc.stderr


# (desc, what wbemcli sends as RequestedState)
WBEMCLI_BAD = [("above uint16", "70000"), ("negative", "-1"), ("not a number", "abc"),
               ("empty", ""), ("fraction", "2.5"), ("DMTF reserved", "12")]


@pytest.mark.parametrize("desc,value", WBEMCLI_BAD, ids=[w[0] for w in WBEMCLI_BAD])
def test_wbemcli_bad_requested_state(demo, desc, value):
    proc = wbemcli("cm", wbem_cs(demo.url, TEST_UUID),
                   f"RequestStateChange.RequestedState={value}", check=False)
    assert proc.returncode != 0
    assert "CIM_ERR_INVALID_PARAMETER" in proc.stderr and "RequestedState" in proc.stderr


def test_wbemcli_missing_requested_state(demo):
    proc = wbemcli("cm", wbem_cs(demo.url, TEST_UUID), "RequestStateChange", check=False)
    assert "CIM_ERR_INVALID_PARAMETER" in proc.stderr and "RequestedState" in proc.stderr


TIMEOUTS = [
    # (desc, TimeoutPeriod, expected return, pauses)
    ("NULL timeout acts", None, 0, True),
    ("zero interval acts", pywbem.CIMDateTime(datetime.timedelta(0)), 0, True),
    ("5 s interval is not supported", pywbem.CIMDateTime(datetime.timedelta(seconds=5)), 4098, False),
    ("a point in time is not supported", pywbem.CIMDateTime("20261127120000.000000+000"), 4098, False),
]


@pytest.mark.parametrize("desc,timeout,rc,pauses", TIMEOUTS, ids=[t[0] for t in TIMEOUTS])
def test_timeout_period(demo, conn, desc, timeout, rc, pauses):
    """CIM_EnabledLogicalElement: a non-zero TimeoutPeriod the implementation does not
    support answers 4098 and changes nothing."""
    cfg = domain_config("rsc-timeout-" + desc.split()[0], memory_kib=16384)
    demo.libvirt.createXML(config_to_domain_xml(cfg), 0)
    try:
        poll_until(lambda: cfg.uuid in {p["Name"] for p in conn.EnumerateInstanceNames(CS)},
                   what="domain visible")
        params = {"RequestedState": pywbem.Uint16(9)}
        if timeout is not None:
            params["TimeoutPeriod"] = timeout
        rv, _ = conn.InvokeMethod("RequestStateChange", cs_path(cfg.uuid), **params)
        assert int(rv) == rc
        inst = conn.GetInstance(cs_path(cfg.uuid))
        assert inst["EnabledState"] == (9 if pauses else 2)
        assert inst["RequestedState"] == (9 if pauses else 12)
    finally:
        demo.libvirt.lookupByUUIDString(cfg.uuid).destroy()


def test_requested_state_forgotten_with_the_system(demo, conn):
    """A transient system that goes away and comes back with the same UUID is a new
    system: RequestedState starts at 12 again."""
    cfg = domain_config("rsc-reborn", memory_kib=16384)
    xml = config_to_domain_xml(cfg)
    demo.libvirt.createXML(xml, 0)
    poll_until(lambda: cfg.uuid in {p["Name"] for p in conn.EnumerateInstanceNames(CS)},
               what="domain visible")
    assert rsc(conn, cfg.uuid, 9) == 0
    assert conn.GetInstance(cs_path(cfg.uuid))["RequestedState"] == 9
    assert rsc(conn, cfg.uuid, 3) == 0                   # destroyed: transient, so gone
    assert cfg.uuid not in {p["Name"] for p in conn.EnumerateInstanceNames(CS)}
    demo.libvirt.createXML(xml, 0)
    try:
        poll_until(lambda: cfg.uuid in {p["Name"] for p in conn.EnumerateInstanceNames(CS)},
                   what="domain back")
        inst = conn.GetInstance(cs_path(cfg.uuid))
        assert (inst["EnabledState"], inst["RequestedState"]) == (2, 12)
    finally:
        demo.libvirt.lookupByUUIDString(cfg.uuid).destroy()
