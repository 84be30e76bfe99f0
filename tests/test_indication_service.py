"""Acceptance (DSP1054): the indication service in interop, found the standard way
(CIM_IndicationService, its capabilities, hosted by the object manager's system, the
central instance of the Indications profile), and subscriptions that expire
(SubscriptionDuration) or are modified (SubscriptionState, SubscriptionDuration)
with ModifyInstance. The server is fed by test:///default alone; the console is
pywbem (and pywbemcli); the listener is pywbem's WBEMListener. Nothing is mocked.
"""
import time

import pytest
import pywbem
from pywbem import CIMInstanceName, Uint16, Uint64

from cim_provider.indications import delivery

try:
    from tests.support.indications import (Console, LibvirtServer, Listener, poll,
                                           quiet_pywbem_logs)
    from tests.support.model import HOST, TEST_UUID, VIRT, connect_wbem, host_path, pywbemcli
except ImportError:
    from support.indications import (Console, LibvirtServer, Listener, poll,  # type: ignore
                                     quiet_pywbem_logs)
    from support.model import HOST, TEST_UUID, VIRT, connect_wbem, host_path, pywbemcli  # type: ignore

INTEROP = "interop"
SERVICE = CIMInstanceName("VIRT_IndicationService", {
    "SystemCreationClassName": "VIRT_HostSystem", "SystemName": HOST,
    "CreationClassName": "VIRT_IndicationService",
    "Name": "cim-provider:IndicationService"}, namespace=INTEROP)
MODIFIED = ("SELECT * FROM CIM_InstModification WHERE SourceInstance ISA VIRT_ComputerSystem")


@pytest.fixture
def server(tmp_path):
    quiet_pywbem_logs()
    s = LibvirtServer(tmp_path / "state").start()
    yield s
    s.close()


@pytest.fixture
def listener():
    lis = Listener()
    yield lis
    lis.stop()


def key(path):
    return (path.namespace or "", path.classname.lower(),
            tuple(sorted((k.lower(), str(v)) for k, v in path.keybindings.items())))


def toggle(server) -> float:
    """One state change of "test" (suspended if it runs, resumed if it is paused): one
    modification indication."""
    dom = server.conn.lookupByUUIDString(TEST_UUID)
    since = time.monotonic()
    if dom.state()[0] == 3:            # VIR_DOMAIN_PAUSED
        dom.resume()
    else:
        dom.suspend()
    return since


def test_the_service_is_found_the_standard_way(server, tmp_path):
    c = connect_wbem(server.url, INTEROP)
    services = c.EnumerateInstances("CIM_IndicationService")
    assert [key(s.path) for s in services] == [key(SERVICE)]
    svc = services[0]
    assert (svc["FilterCreationEnabled"], svc["DeliveryRetryAttempts"],
            svc["SubscriptionRemovalAction"], svc["EnabledState"]) == \
        (True, delivery.ATTEMPTS - 1, 4, 2)
    caps = c.Associators(SERVICE, AssocClass="CIM_ElementCapabilities")
    assert [x.classname for x in caps] == ["VIRT_IndicationServiceCapabilities"]
    assert caps[0]["SubscriptionsPersisted"] is True
    # hosted by the object manager's system: the host, in root/virt
    om = c.EnumerateInstanceNames("CIM_ObjectManager")[0]
    hosts = c.AssociatorNames(SERVICE, AssocClass="CIM_HostedService")
    assert [key(h) for h in hosts] == [key(host_path())]
    assert (om["SystemCreationClassName"], om["SystemName"]) == \
        (hosts[0]["CreationClassName"], hosts[0]["Name"])
    virt = connect_wbem(server.url, VIRT)
    assert key(SERVICE) in {key(p) for p in virt.AssociatorNames(
        host_path(), AssocClass="CIM_HostedService")}
    # the Indications profile, and its central instance (pywbem's own discovery)
    wbem = pywbem.WBEMServer(c)
    (profile,) = wbem.get_selected_profiles("DMTF", "Indications")
    assert [key(p) for p in wbem.get_central_instances(profile.path)] == [key(SERVICE)]
    # pywbemcli
    proc = pywbemcli(server.url, tmp_path, "-d", INTEROP, "instance", "enumerate",
                     "CIM_IndicationService")
    assert proc.returncode == 0, proc.stderr
    assert "instance of VIRT_IndicationService" in proc.stdout
    assert "DeliveryRetryAttempts = 3;" in proc.stdout


def _subscribe(server, listener, duration=None):
    console = Console(server.url)
    f, d, (sub,) = console.subscribe(listener.url, query=MODIFIED)
    if duration is not None:
        inst = console.conn.GetInstance(sub.path)
        inst["SubscriptionDuration"] = Uint64(duration)
        console.conn.ModifyInstance(inst, PropertyList=["SubscriptionDuration"])
    return console, sub.path


def test_a_subscription_expires(server, listener):
    console, path = _subscribe(server, listener, duration=2)
    c = console.conn
    got = c.GetInstance(path)
    assert got["SubscriptionDuration"] == 2
    assert 0 <= got["SubscriptionTimeRemaining"] <= 2
    listener.expect(1, toggle(server))              # delivered while it lives
    poll(lambda: not c.EnumerateInstanceNames("CIM_IndicationSubscription"), 5,
         "the subscription expired and deleted")
    with pytest.raises(pywbem.CIMError) as err:
        c.GetInstance(path)
    assert err.value.status_code == pywbem.CIM_ERR_NOT_FOUND
    listener.expect(0, toggle(server), quiet=0.5)   # nothing after it expired
    console.close(remove=False)


def test_modify_state_and_duration(server, listener):
    console, path = _subscribe(server, listener)
    c = console.conn
    before = c.GetInstance(path)
    assert before["SubscriptionState"] == 2 and before.get("SubscriptionDuration") is None
    inst = before.copy()
    inst["SubscriptionState"] = Uint16(4)                      # disabled
    c.ModifyInstance(inst, PropertyList=["SubscriptionState"])
    now = c.GetInstance(path)
    assert now["SubscriptionState"] == 4
    assert now["TimeOfLastStateChange"] != before["TimeOfLastStateChange"]
    listener.expect(0, toggle(server), quiet=0.5)
    inst["SubscriptionState"] = Uint16(2)                      # enabled again
    c.ModifyInstance(inst, PropertyList=["SubscriptionState"])
    listener.expect(1, toggle(server))
    # a duration, then none again: it does not expire
    inst = c.GetInstance(path)
    inst["SubscriptionDuration"] = Uint64(3600)
    c.ModifyInstance(inst, PropertyList=["SubscriptionDuration"])
    assert 3590 < c.GetInstance(path)["SubscriptionTimeRemaining"] <= 3600
    inst["SubscriptionDuration"] = pywbem.CIMProperty("SubscriptionDuration", None,
                                                      type="uint64")
    c.ModifyInstance(inst, PropertyList=["SubscriptionDuration"])
    got = c.GetInstance(path)
    assert got.get("SubscriptionDuration") is None and got.get("SubscriptionTimeRemaining") is None
    # a duration already past: it expires now
    inst["SubscriptionDuration"] = Uint64(1)
    c.ModifyInstance(inst, PropertyList=["SubscriptionDuration"])
    poll(lambda: not c.EnumerateInstanceNames("CIM_IndicationSubscription"), 5, "expired")
    console.close(remove=False)


@pytest.mark.parametrize("prop,value,code", [
    ("SubscriptionState", Uint16(3), pywbem.CIM_ERR_INVALID_PARAMETER),
    ("SubscriptionDuration", Uint64(0), pywbem.CIM_ERR_INVALID_PARAMETER),
    ("OnFatalErrorPolicy", Uint16(4), pywbem.CIM_ERR_NOT_SUPPORTED),
])
def test_bad_modifications(server, listener, prop, value, code):
    console, path = _subscribe(server, listener)
    inst = console.conn.GetInstance(path)
    inst[prop] = value
    with pytest.raises(pywbem.CIMError) as err:
        console.conn.ModifyInstance(inst, PropertyList=[prop])
    assert err.value.status_code == code
    assert prop in err.value.status_description
    assert console.conn.GetInstance(path)["SubscriptionState"] == 2       # unchanged
    console.close()


def test_duration_at_creation_and_after_a_restart(server, listener):
    c = connect_wbem(server.url, INTEROP)
    console = Console(server.url)
    f, d, _subs = console.subscribe(listener.url, query=MODIFIED, name="g", dest="e")
    sub = pywbem.CIMInstance("CIM_IndicationSubscription", properties={
        "Filter": f.path, "Handler": d.path, "SubscriptionDuration": Uint64(3600),
        "SubscriptionState": Uint16(4)})
    # pywbem's manager made one subscription for (f, d) already: drop it, make ours
    for p in c.EnumerateInstanceNames("CIM_IndicationSubscription"):
        c.DeleteInstance(p)
    path = c.CreateInstance(sub)
    assert c.GetInstance(path)["SubscriptionTimeRemaining"] <= 3600
    server.stop_server()                  # the same state directory, a new server
    server.start()
    c = connect_wbem(server.url, INTEROP)
    got = c.GetInstance(path)
    assert (got["SubscriptionDuration"], got["SubscriptionState"]) == (3600, 4)
    assert 3500 < got["SubscriptionTimeRemaining"] <= 3600
    console.close(remove=False)
