"""Subscriptions as hand-built clients create them, and subscriptions that cannot be
served: a server fed by libvirt's test driver alone, raw CreateInstance (pywbem's
WBEMConnection) or pywbem's WBEMSubscriptionManager as console, pywbem's WBEMListener
receiving. Nothing is mocked."""
from __future__ import annotations

import json
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


def test_references_without_a_namespace(server, listener):
    """wbemcli and other hand-built clients send Filter / Handler as INSTANCENAME
    (no namespace at all): they name the interop instances all the same. The
    subscription is created, delivers, keeps its filter and destination from being
    deleted, and is deleted by a path without a namespace too. (Over the wire the
    dispatcher already completes the references; this guards the whole path.)"""
    conn = connect_wbem(server.url, "interop")
    dest = conn.CreateInstance(destination("local", listener.url))
    flt = conn.CreateInstance(indication_filter("local"))
    bare_flt, bare_dest = flt.copy(), dest.copy()
    for p in (bare_flt, bare_dest):
        p.namespace = None
        p.host = None
    sub = conn.CreateInstance(subscription(bare_flt, bare_dest))
    assert [i.path for i in conn.EnumerateInstances("CIM_IndicationSubscription")] == [sub]
    toggle(server, listener, 2)
    for path in (flt, dest):
        with pytest.raises(pywbem.CIMError) as err:
            conn.DeleteInstance(path)
        assert err.value.status_code == pywbem.CIM_ERR_FAILED
    # the same subscription with namespaced references is the same instance
    with pytest.raises(pywbem.CIMError) as err:
        conn.CreateInstance(subscription(flt, dest))
    assert err.value.status_code == pywbem.CIM_ERR_ALREADY_EXISTS
    full_sub = sub.copy()
    full_sub["Filter"], full_sub["Handler"] = flt, dest
    assert conn.GetInstance(full_sub)["Filter"].keybindings == flt.keybindings
    bare_sub = sub.copy()
    bare_sub.namespace = None
    bare_sub.host = None
    bare_sub["Filter"], bare_sub["Handler"] = bare_flt, bare_dest
    conn.DeleteInstance(bare_sub)
    conn.DeleteInstance(flt)
    conn.DeleteInstance(dest)
    for cls in ("CIM_IndicationSubscription", "CIM_IndicationFilter",
                "CIM_ListenerDestinationCIMXML"):
        assert conn.EnumerateInstances(cls) == []


def test_saved_references_without_a_namespace(tmp_path, listener):
    """The dispatcher completes the references a client sends, but a state file
    written by hand (or by another tool) may hold Filter / Handler references without
    a namespace: they name the interop filter and destination, so the subscription is
    loaded and delivers after a restart, instead of being skipped as dangling."""
    quiet_pywbem_logs()
    state = tmp_path / "state"
    srv = LibvirtServer(state).start()
    try:
        conn = connect_wbem(srv.url, "interop")
        dest = conn.CreateInstance(destination("saved", listener.url))
        flt = conn.CreateInstance(indication_filter("saved"))
        conn.CreateInstance(subscription(flt, dest))
        srv.stop_server()
        saved = state / "subscriptions.json"
        data = json.loads(saved.read_text())
        [sub] = data["subscriptions"]
        for role in ("Filter", "Handler"):
            assert sub["properties"][role]["namespace"] == "interop"
            del sub["properties"][role]["namespace"]
        saved.write_text(json.dumps(data))

        srv.start()
        conn = connect_wbem(srv.url, "interop")
        assert len(conn.EnumerateInstances("CIM_IndicationSubscription")) == 1
        toggle(srv, listener, 2)
        with pytest.raises(pywbem.CIMError) as err:      # still referenced
            conn.DeleteInstance(flt)
        assert err.value.status_code == pywbem.CIM_ERR_FAILED
    finally:
        srv.close()


def test_destination_without_a_scheme_is_http(server, listener):
    """DSP1054: a Destination without a scheme is http. Validation, the worker and the
    check whether the worker is still current agree on the URL, so one worker serves
    every indication (SequenceNumber counts on: it is not rebuilt each time)."""
    conn = connect_wbem(server.url, "interop")
    bare = listener.url.split("://", 1)[1]
    dest = conn.CreateInstance(destination("noscheme", bare))
    flt = conn.CreateInstance(indication_filter("noscheme"))
    conn.CreateInstance(subscription(flt, dest))
    dom = server.conn.lookupByUUIDString(TEST_UUID)
    for i in range(4):
        t0 = time.monotonic()
        (dom.suspend if i % 2 == 0 else dom.resume)()
        got = listener.expect(1, since=t0, quiet=0)
        assert got[0].indication["SequenceNumber"] == i
    [worker] = server.service.workers.values()
    assert worker.url == listener.url
    with pytest.raises(pywbem.CIMError) as err:
        conn.CreateInstance(destination("ftp", "ftp://127.0.0.1:21"))
    assert err.value.status_code == pywbem.CIM_ERR_INVALID_PARAMETER
