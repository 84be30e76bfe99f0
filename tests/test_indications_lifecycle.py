"""Lifecycle indications end to end (issue 7): the in-process demo (private
dbus-daemon, reference Manager with SQLite + libvirt stores, libvirt test:///default,
the server), pywbem's WBEMSubscriptionManager as the console and pywbem's
WBEMListener receiving. Each indication must arrive within one second of its cause,
exactly the expected ones, in order."""
from __future__ import annotations

import time
import uuid as uuidlib

import pytest
import pywbem

try:
    from tests.support.indications import (ALL_CS, Console, Listener, quiet_pywbem_logs,
                                           restore_libvirt)
    from tests.support.model import (GNOME_UUID, HOST, KDE_UUID, TEST_UUID, LoopThread,
                                     connect_wbem, cs_path, domain_config)
except ImportError:  # tests/ itself on sys.path
    from support.indications import (ALL_CS, Console, Listener, quiet_pywbem_logs,
                                     restore_libvirt)
    from support.model import (GNOME_UUID, HOST, KDE_UUID, TEST_UUID, LoopThread,
                               connect_wbem, cs_path, domain_config)

pytestmark = pytest.mark.dbus

DISABLED, ENABLED, QUIESCE = 3, 2, 9


class Demo:
    """start_demo on a LoopThread, with a Manager that can be killed and restarted."""

    def __init__(self, state_dir) -> None:
        from cim_provider.demo import start_demo
        quiet_pywbem_logs()
        self.lt = LoopThread()
        try:
            self.demo = self.lt.run(start_demo([("127.0.0.1", 0)], host=HOST,
                                               state_dir=state_dir))
        except BaseException:
            self.lt.stop()
            raise
        self.url = f"http://127.0.0.1:{self.demo.server.addresses[0][1]}"
        self.libvirt = self.demo.conn

    @property
    def client(self):
        return self.demo.server.sources.manager

    def kill_manager(self) -> None:
        self.lt.run(self.demo.manager.stop())
        self.demo.manager = None

    def restart_manager(self) -> None:
        from cim_provider.manager.service import serve_manager
        from cim_provider.manager.store import LibvirtConnection, LibvirtStore, SqliteStore

        async def start():
            shared = LibvirtConnection("test:///default", conn=self.libvirt)
            stores = [SqliteStore(self.demo.workdir / "definitions.db"), LibvirtStore(shared)]
            self.demo.stores = stores
            self.demo.manager = await serve_manager(self.demo.bus.address, stores, shared)
        self.lt.run(start())

    def close(self) -> None:
        try:
            self.lt.run(self.demo.server.close(), 30)
            restore_libvirt(self.libvirt)
            self.demo.server = None
            self.lt.run(self.demo.close(), 30)
        finally:
            self.lt.stop()


@pytest.fixture
def demo(tmp_path):
    d = Demo(tmp_path / "state")
    yield d
    d.close()


@pytest.fixture
def listener():
    lst = Listener()
    yield lst
    lst.stop()


def transient_xml(name: str, uuid: str) -> str:
    from cim_provider.domain.domxml import config_to_domain_xml
    return config_to_domain_xml(domain_config(name, uuid=uuid))


def check(got, expected) -> None:
    """`expected`: (kind, uuid, EnabledState, previous EnabledState or None)."""
    actual = [(r.kind, r.uuid, r.state, r.previous_state) for r in got]
    assert actual == expected


def test_lifecycle_through_libvirt_methods_and_manager(demo, listener):
    console = Console(demo.url)
    console.subscribe(listener.url)
    virt = connect_wbem(demo.url, "root/virt")
    test_dom = demo.libvirt.lookupByUUIDString(TEST_UUID)

    def step(action, expected, quiet=0.3):
        t0 = time.monotonic()
        action()
        got = listener.expect(len(expected), since=t0, quiet=quiet)
        check(got, expected)
        return got

    # --- through libvirt (virsh would do the same)
    got = step(test_dom.suspend, [("modified", TEST_UUID, QUIESCE, ENABLED)])
    ind = got[0].indication
    assert ind.classname == "VIRT_ComputerSystemModifiedIndication"
    assert ind["SourceInstance"].classname == "VIRT_ComputerSystem"
    assert ind["SourceInstance"]["ElementName"] == "test"
    assert "EnabledState" in ind["ChangedPropertyNames"]
    assert ind["SourceInstanceHost"] == HOST
    assert ind["IndicationFilterName"] == "pywbemfilter:test:f"
    assert TEST_UUID in ind["SourceInstanceModelPath"]
    # SourceInstance is what a client reads now
    now = virt.GetInstance(cs_path(TEST_UUID))
    for name in ("EnabledState", "RequestedState", "Description", "OperationalStatus"):
        assert ind["SourceInstance"][name] == now[name], name

    step(test_dom.resume, [("modified", TEST_UUID, ENABLED, QUIESCE)])

    flash = str(uuidlib.uuid4())
    got = step(lambda: demo.libvirt.createXML(transient_xml("flash", flash), 0),
               [("created", flash, ENABLED, None)])
    assert got[0].indication.classname == "VIRT_ComputerSystemCreatedIndication"
    assert got[0].indication.get("PreviousInstance") is None
    # a transient domain stopping is a deletion
    got = step(lambda: demo.libvirt.lookupByUUIDString(flash).destroy(),
               [("deleted", flash, ENABLED, None)])
    assert got[0].indication.classname == "VIRT_ComputerSystemDeletedIndication"

    # --- through RequestStateChange (pywbem InvokeMethod)
    def rsc(uuid, state):
        rv, _ = virt.InvokeMethod("RequestStateChange", cs_path(uuid),
                                  RequestedState=pywbem.Uint16(state))
        assert rv == 0

    got = step(lambda: rsc(TEST_UUID, QUIESCE), [("modified", TEST_UUID, QUIESCE, ENABLED)])
    # the indication already carries the new RequestedState, like the next GetInstance
    assert got[0].indication["SourceInstance"]["RequestedState"] == QUIESCE
    assert got[0].indication["PreviousInstance"]["RequestedState"] == 12
    step(lambda: rsc(TEST_UUID, ENABLED), [("modified", TEST_UUID, ENABLED, QUIESCE)])
    # a passive domain starting (through the Manager) is a modification
    got = step(lambda: rsc(GNOME_UUID, ENABLED), [("modified", GNOME_UUID, ENABLED, DISABLED)])
    assert got[0].indication["SourceInstance"]["ElementName"] == "gnome-test"
    step(lambda: rsc(GNOME_UUID, DISABLED), [("modified", GNOME_UUID, DISABLED, ENABLED)])

    # --- a persistent libvirt domain stopped and started with libvirt
    step(test_dom.destroy, [("modified", TEST_UUID, DISABLED, ENABLED)])
    step(test_dom.create, [("modified", TEST_UUID, ENABLED, DISABLED)])

    console.close()


def test_define_undefine_and_manager_restart(demo, listener):
    console = Console(demo.url)
    console.subscribe(listener.url)

    t0 = time.monotonic()
    uuid = demo.lt.run(demo.client.define_domain({"Name": "console-made",
                                                  "MemoryKiB": 65536}))
    check(listener.expect(1, since=t0), [("created", uuid, DISABLED, None)])

    t0 = time.monotonic()
    demo.lt.run(demo.client.undefine_domain(uuid))
    check(listener.expect(1, since=t0), [("deleted", uuid, DISABLED, None)])

    # The Manager goes away: passive-only systems vanish; "test" (running, with its
    # libvirt definition as twin) stays, as running-only.
    t0 = time.monotonic()
    demo.kill_manager()
    got = listener.expect(3, since=t0)
    assert sorted((r.kind, r.uuid) for r in got) == sorted(
        [("deleted", GNOME_UUID), ("deleted", KDE_UUID), ("modified", TEST_UUID)])
    test_mod = next(r for r in got if r.uuid == TEST_UUID)
    assert (test_mod.state, test_mod.previous_state) == (ENABLED, ENABLED)
    # issue 12: its definition is libvirt's, not gone ("transient" would be untrue)
    assert "definition held by libvirt; the Manager is not on the bus" in \
        test_mod.indication["SourceInstance"]["Description"]
    assert "Description" in test_mod.indication["ChangedPropertyNames"]

    # It comes back: the passive systems reappear and "test" has its twin again.
    t0 = time.monotonic()
    demo.restart_manager()
    got = listener.expect(3, since=t0)
    assert sorted((r.kind, r.uuid) for r in got) == sorted(
        [("created", GNOME_UUID), ("created", KDE_UUID), ("modified", TEST_UUID)])
    assert all(r.state == DISABLED for r in got if r.kind == "created")
    console.close()


def test_filters_that_match_and_filters_that_do_not(demo, listener):
    console = Console(demo.url)
    filters = {
        "suspended": "SELECT * FROM CIM_InstModification WHERE SourceInstance ISA "
                     "VIRT_ComputerSystem AND SourceInstance.EnabledState = 9",
        "woke": "SELECT * FROM CIM_InstModification WHERE PreviousInstance.EnabledState = 9 "
                "AND NOT SourceInstance.EnabledState = 9",
        "created": "SELECT * FROM VIRT_ComputerSystemCreatedIndication",
        "gone-or-named": "select * from CIM_InstIndication where "
                         "(SourceInstance ISA CIM_InstDeletion) OR "
                         "SourceInstance.ElementName = 'no-such-domain'",
        "hosts": "SELECT * FROM CIM_InstIndication WHERE SourceInstance ISA VIRT_HostSystem",
    }
    dest = console.sm.add_destination(console.sid, listener.url, destination_id="all")
    for name, query in filters.items():
        f = console.sm.add_filter(console.sid, ["root/virt"], query, filter_id=name)
        console.sm.add_subscriptions(console.sid, f.path, dest.path)
    # No indication comes from interop: a filter on it selects from no class there.
    with pytest.raises(pywbem.CIMError) as err:
        console.sm.add_filter(console.sid, ["interop"], ALL_CS, filter_id="interop-only")
    assert err.value.status_code == pywbem.CIM_ERR_INVALID_PARAMETER

    test_dom = demo.libvirt.lookupByUUIDString(TEST_UUID)

    def step(action, expected):
        t0 = time.monotonic()
        action()
        got = listener.expect(len(expected), since=t0)
        assert [(r.filter.split(":")[-1], r.kind, r.uuid) for r in got] == expected

    step(test_dom.suspend, [("suspended", "modified", TEST_UUID)])
    step(test_dom.resume, [("woke", "modified", TEST_UUID)])
    flash = str(uuidlib.uuid4())
    step(lambda: demo.libvirt.createXML(transient_xml("flash", flash), 0),
         [("created", "created", flash)])
    # ISA on a class the SourceInstance is not (CIM_InstDeletion is an indication class,
    # not a system), an unknown name, the host: none match a deletion of a system.
    step(lambda: demo.libvirt.lookupByUUIDString(flash).destroy(), [])
    console.close()
