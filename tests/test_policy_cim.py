"""The make-room policy seen through CIM (issue 15): the in-process demo with the
reference Manager in `--overcommit make-room` on a small host (1 GiB beside the test
driver's "test" and the demo's "transient-demo", which are not the Manager's), a pause
budget of 256 MiB.

RequestStateChange(2) of a passive system is the Manager's StartDomain: the domains
it pauses or saves show up as the usual lifecycle indications (they are libvirt state
changes), the server logs the displacement (DomainsDisplaced) at INFO, and a start
that cannot fit is CIM_ERR_FAILED with the Manager's reason, nothing touched.
"""
import time
import uuid as uuidlib

import pytest
import pywbem

from cim_provider.domain.records import DomainConfig
from cim_provider.manager.policy import MAKE_ROOM, PolicyOptions

try:
    from tests.support.indications import ALL_CS, Console, Listener, quiet_pywbem_logs
    from tests.support.model import (HOST, LoopThread, cim_error, connect_wbem, cs_path,
                                     reset_test_default, rsc)
except ImportError:          # tests/ itself is on sys.path
    from support.indications import ALL_CS, Console, Listener, quiet_pywbem_logs  # type: ignore
    from support.model import (HOST, LoopThread, cim_error, connect_wbem,  # type: ignore
                               cs_path, reset_test_default, rsc)

pytestmark = pytest.mark.dbus
MiB, GiB = 1024, 1024 * 1024


@pytest.fixture(scope="module")
def demo():
    from cim_provider.demo import start_demo
    reset_test_default()
    lt = LoopThread()
    # "test" (2 GiB) and "transient-demo" (128 MiB) run: 1 GiB is left
    options = PolicyOptions(MAKE_ROOM, host_memory_kib=3 * GiB + 128 * MiB,
                            pause_budget_kib=256 * MiB)
    d = lt.run(start_demo([("127.0.0.1", 0)], host=HOST, policy=options))
    d.url = f"http://127.0.0.1:{d.server.addresses[0][1]}"
    yield d
    try:
        for dom in d.conn.listAllDomains():
            if not dom.isActive() and dom.hasManagedSaveImage(0):
                dom.managedSaveRemove(0)
        reset_test_default()
        lt.run(d.close(), 30)
    finally:
        lt.stop()


def wait(predicate, within=10.0, what="condition"):
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {within} s")
        time.sleep(0.05)


def state(conn, uuid):
    return conn.GetInstance(cs_path(uuid))["EnabledState"]


def test_make_room_through_cim(demo, caplog):
    caplog.set_level("INFO", logger="cim_provider.sources.manager")
    quiet_pywbem_logs()
    sqlite = demo.stores[0]
    defs = {}
    for name, mib, priority in (("low", 256, 1), ("low2", 512, 1), ("high", 512, 5),
                                ("top", 256, 9), ("huge", 4096, 10)):
        cfg = DomainConfig(uuid=str(uuidlib.uuid4()), name=name, type="Test",
                           memory_kib=mib * MiB, priority=priority)
        sqlite.define(cfg)
        defs[name] = cfg.uuid
    conn = connect_wbem(demo.url)
    listener = Listener()
    console = Console(demo.url)
    try:
        wait(lambda: all(demo.server.sources.inventory.get(u) for u in defs.values()), 10,
             "the definitions in the inventory")
        console.subscribe(listener.url, ALL_CS)

        def seen(name, new_state):
            return [r for r in listener.received
                    if r.name == name and r.kind == "modified" and r.state == new_state]

        for name in ("low", "low2"):
            assert rsc(conn, defs[name], 2) == 0
        assert (state(conn, defs["low"]), state(conn, defs["low2"])) == (2, 2)

        # one pause: low2 (the largest lower-priority one) becomes Quiesce
        assert rsc(conn, defs["high"], 2) == 0
        assert state(conn, defs["high"]) == 2
        wait(lambda: state(conn, defs["low2"]) == 9, 5, "low2 paused")
        wait(lambda: seen("low2", 9), 5, "the indication of low2's pause")
        wait(lambda: "the Manager made room to start high" in caplog.text, 5, "the INFO line")
        assert "paused low2" in caplog.text

        # one managed save: high goes back to passive (its definition stays)
        assert rsc(conn, defs["top"], 2) == 0
        wait(lambda: state(conn, defs["high"]) == 3, 5, "high saved")
        wait(lambda: seen("high", 3), 5, "the indication of high's save")
        assert "saved high" in caplog.text
        assert (state(conn, defs["low"]), state(conn, defs["low2"]),
                state(conn, defs["top"])) == (2, 9, 2)

        # cannot fit: CIM_ERR_FAILED with the reason, nothing touched
        before = {n: state(conn, u) for n, u in defs.items()}
        err = cim_error(lambda: rsc(conn, defs["huge"], 2))
        assert err.status_code == pywbem.CIM_ERR_FAILED
        text = err.status_description
        assert "starting huge needs 4.0 GiB" in text and "could free at most" in text
        assert "nothing was touched" in text
        assert {n: state(conn, u) for n, u in defs.items()} == before

        # back: top stops, high is restored from its managed save, low2 resumes
        assert rsc(conn, defs["top"], 3) == 0
        wait(lambda: state(conn, defs["top"]) == 3, 5, "top stopped")
        assert rsc(conn, defs["high"], 2) == 0
        assert state(conn, defs["high"]) == 2
        assert rsc(conn, defs["low2"], 2) == 0
        assert state(conn, defs["low2"]) == 2
    finally:
        console.close()
        listener.stop()
        conn.close()
