"""Indication delivery and persistence: a server fed by libvirt's test driver alone,
pywbem as console and listener. A dead listener (closed port) and a stalled one (a
socket that accepts and never answers) must not delay a healthy one; subscriptions
survive a restart with the same state directory."""
from __future__ import annotations

import json
import logging
import os
import stat
import time

import pytest
import pywbem

try:
    from tests.support.indications import (ALL_CS, Console, LibvirtServer, Listener,
                                           StallingListener, dead_url, poll,
                                           quiet_pywbem_logs)
    from tests.support.model import TEST_UUID, connect_wbem
except ImportError:  # tests/ itself on sys.path
    from support.indications import (ALL_CS, Console, LibvirtServer, Listener,
                                     StallingListener, dead_url, poll, quiet_pywbem_logs)
    from support.model import TEST_UUID, connect_wbem


@pytest.fixture
def listener():
    lst = Listener()
    yield lst
    lst.stop()


def test_dead_and_stalled_listeners_do_not_delay_a_healthy_one(tmp_path, listener, caplog):
    quiet_pywbem_logs()
    caplog.set_level(logging.INFO, logger="cim_provider.indications")
    stall = StallingListener()
    # Short retries and a small queue so the misbehaving destinations hit every policy
    # (retry, give up, overflow) within the test; the healthy one is unaffected.
    srv = LibvirtServer(tmp_path / "state", {"attempts": 2, "base_delay": 0.05,
                                             "max_delay": 0.5, "timeout": 1.0,
                                             "queue_size": 3}).start()
    console = Console(srv.url)
    try:
        console.subscribe(listener.url, name="healthy", dest="healthy")
        console.subscribe(dead_url(), name="dead", dest="dead")
        console.subscribe(stall.url, name="stalled", dest="stalled")
        dom = srv.conn.lookupByUUIDString(TEST_UUID)
        for i in range(6):
            t0 = time.monotonic()
            (dom.suspend if i % 2 == 0 else dom.resume)()
            got = listener.expect(1, since=t0, quiet=0)
            assert got[0].state == (9 if i % 2 == 0 else 2)
            assert got[0].filter == "pywbemfilter:test:healthy"
            # SequenceNumber counts per destination, from 0, in order (DSP1054)
            assert got[0].indication["SequenceNumber"] == i
        # the server still answers while two workers are stuck
        assert len(connect_wbem(srv.url).EnumerateInstances("VIRT_ComputerSystem")) >= 1
        workers = {w.name.split(":")[-1]: w for w in srv.service.workers.values()}
        # (the listener hands an indication over before it answers the export request)
        poll(lambda: workers["healthy"].stats.delivered == 6, 5, "six delivered")
        assert workers["healthy"].stats.dropped == 0
        poll(lambda: "dead" in caplog.text and "unreachable" in caplog.text, 10,
             "a log line for the dead listener")
        poll(lambda: "queue full" in caplog.text, 10, "a log line for a full queue")
        poll(lambda: workers["stalled"].stats.dropped >= 1, 10, "the stalled listener gave up")
        assert workers["dead"].stats.delivered == 0
        assert listener.take() == []
    finally:
        console.close()
        srv.close()
        stall.stop()


def test_subscriptions_survive_a_restart(tmp_path, listener):
    quiet_pywbem_logs()
    state = tmp_path / "state"
    srv = LibvirtServer(state).start()
    try:
        console = Console(srv.url, "keeper")
        flt, dest, subs = console.subscribe(listener.url)
        console.close(remove=False)
        saved = state / "subscriptions.json"
        assert stat.S_IMODE(os.stat(saved).st_mode) == 0o600
        data = json.loads(saved.read_text())
        assert [len(data[k]) for k in ("filters", "destinations", "subscriptions")] == [1, 1, 1]

        srv.stop_server()
        srv.start()                     # a new server, new port, same state directory
        conn = connect_wbem(srv.url, "interop")
        assert [i.path for i in conn.EnumerateInstances("CIM_IndicationSubscription")] == \
            [s.path for s in subs]
        assert conn.GetInstance(flt.path)["Query"] == flt["Query"]
        # the abstract superclass enumerates the CIM-XML destinations
        assert [i["Destination"] for i in conn.EnumerateInstances("CIM_ListenerDestination")] \
            == [listener.url]

        # pywbem finds what it owns again, and indications flow without re-subscribing
        console = Console(srv.url, "keeper")
        assert len(console.sm.get_owned_subscriptions(console.sid)) == 1
        t0 = time.monotonic()
        srv.conn.lookupByUUIDString(TEST_UUID).suspend()
        assert listener.expect(1, since=t0)[0].state == 9
        srv.conn.lookupByUUIDString(TEST_UUID).resume()
        listener.expect(1, since=time.monotonic() - 0.5)

        console.close()                 # removes what it owns ...
        srv.stop_server()
        srv.start()                     # ... and that is remembered too
        conn = connect_wbem(srv.url, "interop")
        for cls in ("CIM_IndicationSubscription", "CIM_IndicationFilter",
                    "CIM_ListenerDestinationCIMXML"):
            assert conn.EnumerateInstances(cls) == []
    finally:
        srv.close()


def test_unreadable_state_file_is_kept_aside(tmp_path, caplog):
    state = tmp_path / "state"
    state.mkdir()
    (state / "subscriptions.json").write_text("{not json")
    srv = LibvirtServer(state).start()
    try:
        assert connect_wbem(srv.url, "interop").EnumerateInstances("CIM_IndicationFilter") == []
        assert [p.name.startswith("subscriptions.json.unreadable-")
                for p in state.iterdir()] == [True]
        assert "cannot read" in caplog.text
    finally:
        srv.close()


def test_disabled_subscription_delivers_nothing(tmp_path, listener):
    """A disabled subscription (SubscriptionState 4) next to an enabled one, both with the
    same filter query and the same destination: each event reaches the listener once,
    through the enabled one.

    No waiting for nothing to happen: the two subscriptions share one destination, whose
    indications are delivered in queueing order and numbered per destination (DSP1054
    SequenceNumber, from 0). So once the enabled subscription's indication of the second
    event (resume) has arrived, anything the disabled one had queued for the first event
    (suspend) has arrived before it and shows, and would have taken a SequenceNumber."""
    quiet_pywbem_logs()
    srv = LibvirtServer(tmp_path / "state").start()
    try:
        console = Console(srv.url)
        d = console.sm.add_destination(console.sid, listener.url, destination_id="d")
        off = console.sm.add_filter(console.sid, ["root/virt"], ALL_CS, filter_id="off")
        on = console.sm.add_filter(console.sid, ["root/virt"], ALL_CS, filter_id="on")
        sub = pywbem.CIMInstance("CIM_IndicationSubscription", properties={
            "Filter": off.path, "Handler": d.path,
            "SubscriptionState": pywbem.Uint16(4)})
        path = console.conn.CreateInstance(sub)
        assert console.conn.GetInstance(path)["SubscriptionState"] == 4
        console.sm.add_subscriptions(console.sid, on.path, d.path)

        dom = srv.conn.lookupByUUIDString(TEST_UUID)
        for action, state in ((dom.suspend, 9), (dom.resume, 2)):
            action()    # one at a time: the server re-reads the domain on each event
            poll(lambda: any(r.state == state for r in list(listener.received)), 30,
                 f"the enabled subscription's indication of EnabledState {state}")
        got = [(r.filter, r.state, int(r.indication["SequenceNumber"]))
               for r in listener.take()]
        assert got == [("pywbemfilter:test:on", 9, 0), ("pywbemfilter:test:on", 2, 1)]
        console.conn.DeleteInstance(path)
        console.close()
    finally:
        srv.close()


@pytest.mark.filterwarnings("ignore:ssl.PROTOCOL_TLS is deprecated:DeprecationWarning")
def test_delivery_over_https(tmp_path):
    """A listener on HTTPS with a self-signed certificate (what consoles usually have:
    the server does not verify listener certificates by default)."""
    from cim_provider.server.tls import ensure_self_signed
    quiet_pywbem_logs()
    tls_listener = Listener(tls=ensure_self_signed(tmp_path / "tls", "localhost"))
    srv = LibvirtServer(tmp_path / "state").start()
    try:
        console = Console(srv.url)
        console.subscribe(tls_listener.url)
        t0 = time.monotonic()
        srv.conn.lookupByUUIDString(TEST_UUID).suspend()
        got = tls_listener.expect(1, since=t0)
        assert got[0].state == 9 and got[0].previous_state == 2
        console.close()
    finally:
        srv.close()
        tls_listener.stop()


def _credentialed(name: str, url: str) -> pywbem.CIMInstance:
    return pywbem.CIMInstance("CIM_ListenerDestinationCIMXML", properties={
        "Name": name, "Destination": url, "username": "console", "password": "s3cret"})


def _subscribe_raw(conn, dest: pywbem.CIMInstance, name: str) -> None:
    dpath = conn.CreateInstance(dest)
    fpath = conn.CreateInstance(pywbem.CIMInstance("CIM_IndicationFilter", properties={
        "Name": name, "Query": ALL_CS, "QueryLanguage": "WQL",
        "SourceNamespaces": ["root/virt"]}))
    conn.CreateInstance(pywbem.CIMInstance("CIM_IndicationSubscription", properties={
        "Filter": fpath, "Handler": dpath}))


@pytest.mark.filterwarnings("ignore:ssl.PROTOCOL_TLS is deprecated:DeprecationWarning")
def test_credentials_go_only_to_a_verified_https_listener(tmp_path, caplog, monkeypatch):
    """A destination with a username / password over HTTPS: its listener's certificate
    is verified (a self-signed one fails, nothing is sent to it), while a destination
    without credentials on the same listener still gets its indication unverified.
    Trusting the certificate (SSL_CERT_FILE) makes the credentialed one work."""
    from cim_provider.server.tls import ensure_self_signed
    quiet_pywbem_logs()
    caplog.set_level(logging.INFO, logger="cim_provider.indications")
    cert, key = ensure_self_signed(tmp_path / "tls", "localhost")
    tls_listener = Listener(tls=(cert, key))
    srv = LibvirtServer(tmp_path / "state", {"attempts": 1, "timeout": 2.0}).start()
    try:
        conn = connect_wbem(srv.url, "interop")
        _subscribe_raw(conn, _credentialed("secret", tls_listener.url), "secret")
        _subscribe_raw(conn, pywbem.CIMInstance("CIM_ListenerDestinationCIMXML", properties={
            "Name": "open", "Destination": tls_listener.url}), "open")
        dom = srv.conn.lookupByUUIDString(TEST_UUID)
        t0 = time.monotonic()
        dom.suspend()
        got = tls_listener.expect(1, since=t0)
        assert got[0].filter == "open"
        workers = {w.name: w for w in srv.service.workers.values()}
        poll(lambda: workers["secret"].stats.dropped == 1, 10, "the unverified one dropped")
        assert workers["secret"].stats.delivered == 0
        assert "certificate" in caplog.text and "has credentials" in caplog.text

        # the operator trusts the listener's certificate: credentials are sent
        srv.stop_server()
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        srv.start()
        t0 = time.monotonic()
        dom.resume()
        got = tls_listener.expect(2, since=t0)
        assert sorted(r.filter for r in got) == ["open", "secret"]
    finally:
        srv.close()
        tls_listener.stop()


@pytest.mark.filterwarnings("ignore:ssl.PROTOCOL_TLS is deprecated:DeprecationWarning")
def test_insecure_listeners_option_sends_credentials_unverified(tmp_path, caplog):
    """--insecure-listeners (indication option insecure_listeners): the old behaviour,
    with a warning once per destination (not per indication)."""
    from cim_provider.server.tls import ensure_self_signed
    quiet_pywbem_logs()
    caplog.set_level(logging.INFO, logger="cim_provider.indications")
    tls_listener = Listener(tls=ensure_self_signed(tmp_path / "tls", "localhost"))
    srv = LibvirtServer(tmp_path / "state", {"insecure_listeners": True}).start()
    try:
        _subscribe_raw(connect_wbem(srv.url, "interop"),
                       _credentialed("secret", tls_listener.url), "secret")
        dom = srv.conn.lookupByUUIDString(TEST_UUID)
        for i in range(2):
            t0 = time.monotonic()
            (dom.suspend if i == 0 else dom.resume)()
            assert tls_listener.expect(1, since=t0, quiet=0)[0].filter == "secret"
        assert caplog.text.count("without verifying its certificate") == 1
    finally:
        srv.close()
        tls_listener.stop()
