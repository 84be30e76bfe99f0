"""Subscriptions as hand-built clients create them, and subscriptions that cannot be
served: a server fed by libvirt's test driver alone, raw CreateInstance (pywbem's
WBEMConnection) or pywbem's WBEMSubscriptionManager as console, pywbem's WBEMListener
receiving. Nothing is mocked."""
from __future__ import annotations

import logging
import time

import pytest
import pywbem
from pywbem import CIMInstance, CIMInstanceName

try:
    from tests.support.indications import (ALL_CS, Console, LibvirtServer, Listener,
                                           quiet_pywbem_logs)
    from tests.support.model import TEST_UUID, connect_wbem
except ImportError:  # tests/ itself on sys.path
    from support.indications import (ALL_CS, Console, LibvirtServer, Listener,
                                     quiet_pywbem_logs)
    from support.model import TEST_UUID, connect_wbem

SEVERE = "cannot queue indications"


@pytest.fixture
def listener():
    lst = Listener()
    yield lst
    lst.stop()


@pytest.fixture
def server(tmp_path):
    quiet_pywbem_logs()
    srv = LibvirtServer(tmp_path / "state").start()
    yield srv
    srv.close()


def destination(name: str, url: str, **extra) -> CIMInstance:
    return CIMInstance("CIM_ListenerDestinationCIMXML",
                       properties={"Name": name, "Destination": url, **extra})


def indication_filter(name: str, query: str = ALL_CS) -> CIMInstance:
    return CIMInstance("CIM_IndicationFilter", properties={
        "Name": name, "Query": query, "QueryLanguage": "WQL",
        "SourceNamespaces": ["root/virt"]})


def subscription(flt: CIMInstanceName, handler: CIMInstanceName) -> CIMInstance:
    return CIMInstance("CIM_IndicationSubscription",
                       properties={"Filter": flt, "Handler": handler})


def toggle(srv: LibvirtServer, listener: Listener, times: int) -> None:
    """Suspend / resume the test domain `times` times; each must reach `listener`."""
    dom = srv.conn.lookupByUUIDString(TEST_UUID)
    for i in range(times):
        t0 = time.monotonic()
        (dom.suspend if i % 2 == 0 else dom.resume)()
        got = listener.expect(1, since=t0, quiet=0)
        assert got[0].state == (9 if i % 2 == 0 else 2)
    if times % 2:
        dom.resume()


def test_username_with_a_colon_is_refused(server):
    """RFC 7617: the Basic user-id cannot contain ':'; such a destination could never
    be sent to, so CreateInstance refuses it instead of accepting it silently."""
    conn = connect_wbem(server.url, "interop")
    with pytest.raises(pywbem.CIMError) as err:
        conn.CreateInstance(destination("d", "http://127.0.0.1:5990",
                                        username="DOMAIN:alice", password="pw"))
    assert err.value.status_code == pywbem.CIM_ERR_INVALID_PARAMETER
    assert "username" in err.value.status_description
    assert conn.EnumerateInstances("CIM_ListenerDestinationCIMXML") == []
    # a user name without ':' (and a password with one) is fine
    path = conn.CreateInstance(destination("d", "http://127.0.0.1:5990",
                                           username="DOMAIN\\alice", password="a:b"))
    assert conn.GetInstance(path)["username"] == "DOMAIN\\alice"


def test_a_failing_subscription_does_not_starve_the_others(server, listener, caplog):
    """A destination whose worker cannot be built (here a ':' user name that predates
    the check at creation, put straight into the running server's table) comes first
    in the subscription order; the healthy subscription after it still gets every
    indication, and the failure is logged once, not once per indication."""
    caplog.set_level(logging.INFO, logger="cim_provider.indications")
    conn = connect_wbem(server.url, "interop")
    bad_dest = conn.CreateInstance(destination("bad", "http://127.0.0.1:5990",
                                               username="alice", password="pw"))
    bad_flt = conn.CreateInstance(indication_filter("bad"))
    conn.CreateInstance(subscription(bad_flt, bad_dest))

    async def legacy_username():
        subs = server.service.subs
        stored = next(d for d in subs.destinations.values() if d["Name"] == "bad")
        stored["username"] = "DOMAIN:alice"
    server.lt.run(legacy_username())

    console = Console(server.url)
    try:
        console.subscribe(listener.url, name="good", dest="good")
        toggle(server, listener, 4)
        assert caplog.text.count(SEVERE) == 1
        assert "listener bad" in caplog.text
        good = [w for w in server.service.workers.values() if w.name.endswith(":good")]
        assert len(good) == 1
    finally:
        console.close()
