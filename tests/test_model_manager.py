"""Acceptance (issue 4): starting a passive system is the Manager's job.

A Manager with only the contract's required methods (ListInactiveDomains,
StartDomain; tests/support/model.py RecordingManager) records every call and starts
definitions in the server's own libvirt (one shared test:///default, in-process). So
the test sees that RequestStateChange(2) went through StartDomain, that a refusal
reaches the client with the Manager's reason and leaves libvirt untouched, that an
absent, vanishing or stuck Manager gives a clear CIM_ERR_FAILED and never a hang, and
that the optional members it lacks make the management service answer 1 (Not
Supported).
"""
import pytest
import pywbem

try:
    from tests.support.model import (CS, MinimalModel, cim_error, cs_path,
                                      domain_config, poll_until, rsc, sample_config,
                                      vsms_path)
except ImportError:
    from support.model import (CS, MinimalModel, cim_error, cs_path,  # type: ignore
                               domain_config, poll_until, rsc, sample_config, vsms_path)

pytestmark = pytest.mark.dbus

A = sample_config("mini-a", memory_kib=65536)
B = domain_config("mini-b", memory_kib=65536)
REFUSED = domain_config("mini-refused", memory_kib=65536)
STUCK = domain_config("mini-stuck", memory_kib=65536)
VANISH = domain_config("mini-vanish", memory_kib=65536)
ALL = [A, B, REFUSED, STUCK, VANISH]


@pytest.fixture(scope="module")
def model():
    m = MinimalModel(ALL, relist=0.5, manager_timeout=2.0, manager_start_timeout=3.0)
    yield m
    m.close()


@pytest.fixture
def conn(model):
    c = model.conn()
    yield c
    c.close()


def running_in_libvirt(model, uuid):
    return any(d.UUIDString() == uuid and d.isActive() for d in model.libvirt.listAllDomains())


def test_passive_systems_from_a_minimal_manager(model, conn):
    names = {i["Name"]: i for i in conn.EnumerateInstances(CS)}
    for cfg in ALL:
        assert names[cfg.uuid]["EnabledState"] == 3
        assert names[cfg.uuid]["ElementName"] == cfg.name
    # "test" runs in test:///default; nobody holds a definition for it here
    assert conn.AssociatorNames(cs_path("6695eb01-f6a4-8304-79aa-97f2502e193f"),
                                AssocClass="VIRT_ElementSettingData") == []


def test_start_is_routed_to_start_domain(model, conn):
    assert not running_in_libvirt(model, A.uuid)
    before = len(model.manager.starts())
    assert rsc(conn, A.uuid, 2) == 0
    assert model.manager.starts()[before:] == [A.uuid]
    # the Manager started it in the server's libvirt; the next read shows it
    assert running_in_libvirt(model, A.uuid)
    inst = conn.GetInstance(cs_path(A.uuid))
    assert (inst["EnabledState"], inst["RequestedState"]) == (2, 2)
    # This Manager has no ListDomains: once it no longer lists the definition as
    # inactive, its twin is unknown and the system shows as running-only.
    poll_until(lambda: conn.AssociatorNames(cs_path(A.uuid),
                                            AssocClass="VIRT_ElementSettingData") == [],
               what="A running-only")
    sds = conn.AssociatorNames(cs_path(A.uuid), AssocClass="VIRT_SettingsDefineState")
    assert [p["InstanceID"] for p in sds] == [f"VIRT:state:{A.uuid}"]
    # running now: a second start is an invalid transition and reaches no Manager
    assert rsc(conn, A.uuid, 2) == 4097
    assert model.manager.starts()[before:] == [A.uuid]


def test_refusal_reaches_the_client_and_libvirt_is_untouched(model, conn):
    reason = "policy: mini-refused may only run at night (needs 64 KiB, 0 free)"
    model.manager.refuse[REFUSED.uuid] = reason
    err = cim_error(lambda: rsc(conn, REFUSED.uuid, 2))
    assert err.status_code == pywbem.CIM_ERR_FAILED
    assert reason in err.status_description, err
    assert model.manager.starts()[-1] == REFUSED.uuid
    # the server did not go around the Manager
    assert not running_in_libvirt(model, REFUSED.uuid)
    inst = conn.GetInstance(cs_path(REFUSED.uuid))
    assert (inst["EnabledState"], inst["RequestedState"]) == (3, 12)


def test_stuck_manager_is_followed_by_a_job(model, conn):
    """Issue 12: a StartDomain that outlives its timeout is not reported as failed
    (the Manager may still start the guest, and here it does): 4096 and a job that
    follows the domain until it runs."""
    model.manager.hang = 4.0          # longer than the server's 3 s StartDomain timeout
    try:
        rv, out = conn.InvokeMethod("RequestStateChange", cs_path(STUCK.uuid),
                                    RequestedState=pywbem.Uint16(2))
        assert rv == 4096
        job = poll_until(lambda: (j := conn.GetInstance(out["Job"]))["JobState"] != 4 and j,
                         20, "the start job ended")
    finally:
        model.manager.hang = 0.0
    assert job["JobState"] == 7, job.get("ErrorDescription")
    inst = conn.GetInstance(cs_path(STUCK.uuid))
    assert (inst["EnabledState"], inst["RequestedState"]) == (2, 2)


def test_definitions_unsupported_by_a_minimal_manager_return_1(model, conn):
    vssd = pywbem.CIMInstance("VIRT_VirtualSystemSettingData",
                              properties={"ElementName": "mini-new",
                                          "VirtualSystemType": "Test"})
    rv, out = conn.InvokeMethod("DefineSystem", vsms_path(), SystemSettings=vssd,
                                ResourceSettings=[])
    assert rv == 1 and not out.get("ResultingSystem")
    assert "mini-new" not in {i["ElementName"] for i in conn.EnumerateInstances(CS)}

    mod = pywbem.CIMInstance("VIRT_VirtualSystemSettingData",
                             properties={"InstanceID": f"VIRT:defined:{B.uuid}",
                                         "ElementName": "mini-b-renamed"})
    rv, _ = conn.InvokeMethod("ModifySystemSettings", vsms_path(), SystemSettings=mod)
    assert rv == 1
    assert conn.GetInstance(cs_path(B.uuid))["ElementName"] == "mini-b"

    rv, _ = conn.InvokeMethod("DestroySystem", vsms_path(), AffectedSystem=cs_path(B.uuid))
    assert rv == 1
    assert conn.GetInstance(cs_path(B.uuid))["EnabledState"] == 3


def test_manager_leaving_during_start_is_failed(model, conn):
    model.manager.vanish = model.manager.vanish_now
    err = cim_error(lambda: rsc(conn, VANISH.uuid, 2))
    assert err.status_code == pywbem.CIM_ERR_FAILED
    assert "no Manager on the bus" in err.status_description, err
    assert not running_in_libvirt(model, VANISH.uuid)


def test_without_manager(model, conn):
    """With no Manager on the bus the passive systems are not offered, anything that
    needs the Manager fails with CIM_ERR_FAILED saying so, and running ones stay."""
    from cim_provider.domain.domxml import config_to_domain_xml
    running = domain_config("mini-running", memory_kib=32768)
    model.libvirt.createXML(config_to_domain_xml(running), 0)
    model.lt.run(model.stop_manager())
    model.wait(lambda: not model.client.present, what="the Manager gone")
    poll_until(lambda: running.uuid in {p["Name"] for p in conn.EnumerateInstanceNames(CS)},
               what="the running domain listed")
    names = {p["Name"] for p in conn.EnumerateInstanceNames(CS)}
    assert B.uuid not in names
    err = cim_error(lambda: rsc(conn, B.uuid, 2))
    assert err.status_code == pywbem.CIM_ERR_NOT_FOUND
    assert "no org.example.virt.Manager is on the bus" in err.status_description, err
    vssd = pywbem.CIMInstance("VIRT_VirtualSystemSettingData",
                              properties={"ElementName": "nobody-home"})
    err = cim_error(lambda: conn.InvokeMethod("DefineSystem", vsms_path(), SystemSettings=vssd))
    assert err.status_code == pywbem.CIM_ERR_FAILED
    assert "no org.example.virt.Manager is on the bus" in err.status_description, err
    # libvirt actions need no Manager
    assert rsc(conn, running.uuid, 9) == 0
    assert conn.GetInstance(cs_path(running.uuid))["EnabledState"] == 9

    # A Manager comes back: its definitions are offered again and can be started.
    model.lt.run(model.start_manager([B]))
    poll_until(lambda: B.uuid in {p["Name"] for p in conn.EnumerateInstanceNames(CS)},
               what="B offered again")
    assert rsc(conn, B.uuid, 2) == 0
    assert model.manager.starts() == [B.uuid]
    assert conn.GetInstance(cs_path(B.uuid))["EnabledState"] == 2
