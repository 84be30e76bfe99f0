"""The start policy (issue 15): `--overcommit make-room` on the reference Manager with
libvirt's test driver and a small host (--host-memory-kib), on a private bus.

The test driver's "test" domain runs with 2 GiB and was not started by the Manager, so
it is never touched; the host is given 2 GiB + 1 GiB, leaving 1 GiB for the scenarios,
and 256 MiB of pause budget (what paused domains may give up). The planning itself is a
pure function, tested first.
"""
import re

import libvirt
import pytest

from cim_provider.manager.policy import (MAKE_ROOM, PAUSED, SAVED, SHRUNK, PolicyOptions,
                                         Refusal, Running, plan_start, with_current_memory)
from cim_provider.manager.service import serve_manager
from cim_provider.manager.store import SqliteStore
from cim_provider.sources.manager import ManagerClient, ManagerError

try:
    from tests.support import eventually, reset_test_driver, run
    from tests.support.dbus_daemon import dbus_address  # noqa: F401 (fixture)
    from tests.test_templates import Signals
except ImportError:          # tests/ itself is on sys.path
    from support import eventually, reset_test_driver, run  # type: ignore
    from support.dbus_daemon import dbus_address  # type: ignore  # noqa: F401 (fixture)
    from test_templates import Signals  # type: ignore

pytestmark = pytest.mark.dbus
MiB = 1024
GiB = 1024 * 1024
ERR = "org.example.virt.Error."
TEST_UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"
ROOM = PolicyOptions(MAKE_ROOM, host_memory_kib=3 * GiB, pause_budget_kib=256 * MiB)


# ---------------------------------------------------------------- the plan

def plan(needed, running, *, minimum=None, priority=5, options=ROOM, host=3 * GiB):
    return plan_start(name="new", uuid="n", needed=needed, minimum=minimum, priority=priority,
                      host_kib=host, running=running, options=options)


def vm(name, mib, priority=0, paused=False, movable=True, savable=True):
    return Running(name, name, mib * MiB, paused, priority, movable, savable)


def test_refuse_is_todays_rule():
    with pytest.raises(Refusal) as err:
        plan(1536 * MiB, [vm("a", 2048)], options=PolicyOptions(host_memory_kib=3 * GiB))
    assert str(err.value) == ("starting new needs 1.5 GiB (1572864 KiB) of memory but only "
                              "1.0 GiB (1048576 KiB) is free (host 3.0 GiB (3145728 KiB), "
                              "running domains use 2.0 GiB (2097152 KiB))")
    # a paused domain counts in full when refusing
    with pytest.raises(Refusal):
        plan(1536 * MiB, [vm("a", 2048, paused=True)], options=PolicyOptions())


def test_shrink_first_then_pause_then_save_fewest_largest():
    base = [vm("host-os", 2048, priority=99, movable=False)]
    p = plan(1536 * MiB, base, minimum=768 * MiB)
    assert p.memory_kib == 1024 * MiB and [a.action for a in p.actions] == [SHRUNK]
    # pausing: the one largest lower-priority domain, as far as the budget goes
    p = plan(512 * MiB, base + [vm("l1", 256, 1), vm("l2", 512, 1), vm("l3", 512, 4)],
             host=3 * GiB + 512 * MiB)                  # 256 MiB free
    assert [(a.action, a.uuid) for a in p.actions] == [(PAUSED, "l2")]
    assert p.memory_kib == 512 * MiB
    # the budget is spent: save instead, the fewest
    running = base + [vm("l1", 256, 1), vm("l2", 512, 1, paused=True), vm("l3", 512, 4)]
    p = plan(256 * MiB, running, host=3 * GiB + 128 * MiB)   # 128 MiB free
    assert [(a.action, a.uuid) for a in p.actions] == [(SAVED, "l3")]
    # not enough even with everything: nothing, and the reason
    with pytest.raises(Refusal) as err:
        plan(4 * GiB, running, host=3 * GiB + 128 * MiB)
    text = str(err.value)
    assert "needs 4.0 GiB" in text and "could free at most 768.0 MiB" in text
    assert "nothing was touched" in text and "(l3, l1)" in text
    # equal priorities are never displaced; other people's domains only when allowed
    with pytest.raises(Refusal):
        plan(1024 * MiB, base + [vm("peer", 1024, 5)], host=3 * GiB)
    with pytest.raises(Refusal):
        plan(1024 * MiB, base + [vm("other", 1024, 0, movable=False)], host=3 * GiB)
    # a domain that cannot be saved (a farm one, a transient one not ours) is paused
    p = plan(256 * MiB, base + [vm("farm", 1024, 0, savable=False)], host=2 * GiB)
    assert [(a.action, a.uuid) for a in p.actions] == [(PAUSED, "farm")]


def test_with_current_memory():
    xml = "<domain><memory unit='KiB'>4</memory><currentMemory unit='KiB'>4</currentMemory>"
    assert "<currentMemory unit='KiB'>2</currentMemory>" in with_current_memory(xml, 2)
    assert with_current_memory("<memory>4</memory><vcpu>", 2) == \
        "<memory>4</memory><currentMemory unit='KiB'>2</currentMemory><vcpu>"


# ---------------------------------------------------------------- the Manager

@pytest.fixture
def conn():
    c = libvirt.open("test:///default")
    reset_test_driver(c)
    yield c
    for dom in c.listAllDomains():          # managed saves first: undefine refuses them
        try:
            if dom.hasManagedSaveImage(0):
                dom.managedSaveRemove(0)
        except libvirt.libvirtError:
            pass
    reset_test_driver(c)
    c.close()


async def _manager(address, conn, tmp_path, options=ROOM):
    store = SqliteStore(tmp_path / "m.db")
    handle = await serve_manager(address, [store], conn, poll_interval=0.1, policy=options)
    client = ManagerClient(address, call_timeout=10)
    await client.start()
    signals = await Signals().start(address)
    return handle, client, signals, store


async def _stop(handle, client, signals, store):
    signals.stop()
    await client.stop()
    await handle.stop()
    store.close()


def _state(conn, uuid):
    dom = next((d for d in conn.listAllDomains() if d.UUIDString() == uuid), None)
    if dom is None:
        return "gone"
    if not dom.isActive():
        return "saved" if dom.hasManagedSaveImage(0) else "off"
    return {libvirt.VIR_DOMAIN_PAUSED: "paused"}.get(dom.state()[0], "running")


def _no_id(xml):
    """Domain XML without the run-time id (a new one at every start)."""
    return re.sub(r" id='\d+'", "", xml, count=1)


def _displaced(signals, started):
    return [a for member, body in signals.seen if member == "DomainsDisplaced"
            and body[0] == started for a in body[1]]


def test_make_room_shrinks_pauses_saves_and_refuses(dbus_address, conn, tmp_path, caplog):
    caplog.set_level("INFO")

    async def scenario():
        handle, client, sig, store = await _manager(dbus_address, conn, tmp_path)
        try:
            async def define(name, mib, priority=None, minimum=None):
                props = {"Name": name, "MemoryKiB": mib * MiB}
                if priority is not None:
                    props["Priority"] = priority
                if minimum is not None:
                    props["MinMemoryKiB"] = minimum * MiB
                return await client.define_domain(props)

            # (1) shrinking: 1.5 GiB asked, 768 MiB allowed, 1 GiB free
            shrink = await define("shrinky", 1536, minimum=768)
            assert await client.start_domain(shrink) == shrink
            dom = conn.lookupByUUIDString(shrink)
            assert dom.info()[2] == 1024 * MiB and dom.info()[1] == 1536 * MiB
            await eventually(lambda: _displaced(sig, shrink), 5, "DomainsDisplaced")
            assert _displaced(sig, shrink) == [{
                "UUID": shrink, "Name": "shrinky", "Action": SHRUNK, "MemoryKiB": 1024 * MiB,
                "Priority": 0, "RequestedMemoryKiB": 1536 * MiB}]
            dom.destroy()

            # two low-priority domains of ours, and a high-priority one that needs room
            low = await define("low", 256, priority=1)
            low2 = await define("low2", 512, priority=1)
            await client.start_domain(low)
            await client.start_domain(low2)
            assert (_state(conn, low), _state(conn, low2)) == ("running", "running")
            # (2) one pause: 256 MiB free, 512 MiB asked; the budget covers 256 MiB
            high = await define("high", 512, priority=5)
            assert await client.start_domain(high) == high
            assert (_state(conn, high), _state(conn, low2), _state(conn, low)) == \
                ("running", "paused", "running")
            await eventually(lambda: _displaced(sig, high), 5, "DomainsDisplaced")
            assert [(a["Action"], a["Name"]) for a in _displaced(sig, high)] == \
                [(PAUSED, "low2")]

            # (3) a managed save: the budget is spent (512 MiB paused, 256 allowed)
            top = await define("top", 256, priority=9)
            before = conn.lookupByUUIDString(high).XMLDesc(0)
            assert await client.start_domain(top) == top
            assert (_state(conn, top), _state(conn, high)) == ("running", "saved")
            assert (_state(conn, low), _state(conn, low2)) == ("running", "paused")
            await eventually(lambda: _displaced(sig, top), 5, "DomainsDisplaced")
            assert [(a["Action"], a["Name"]) for a in _displaced(sig, top)] == [(SAVED, "high")]
            assert "made room to start top" in caplog.text and "saved high" in caplog.text
            # the saved one is offered again (passive), without a duplicate warning
            await eventually(lambda: high not in client.active, 5, "high is passive")
            assert "defined in" not in caplog.text

            # (4) cannot fit: nothing touched, and the reason
            states = {u: _state(conn, u) for u in (low, low2, top, high, TEST_UUID)}
            huge = await define("huge", 4096, priority=10)
            with pytest.raises(ManagerError) as err:
                await client.start_domain(huge)
            assert err.value.name == ERR + "Refused"
            text = err.value.message
            assert "starting huge needs 4.0 GiB" in text and "is free" in text
            assert "could free at most" in text and "nothing was touched" in text
            assert {u: _state(conn, u) for u in states} == states
            assert _state(conn, huge) == "gone"

            # (5) equal priorities are never displaced
            peer = await define("peer", 512, priority=1)
            with pytest.raises(ManagerError) as err:
                await client.start_domain(peer)
            assert err.value.name == ERR + "Refused"
            assert {u: _state(conn, u) for u in states} == states

            # (6) back: stop top, restore high from its managed save, resume low2
            conn.lookupByUUIDString(top).destroy()
            await eventually(lambda: top not in client.active, 5, "top stopped")
            assert await client.start_domain(high) == high
            dom = conn.lookupByUUIDString(high)
            assert _state(conn, high) == "running" and not dom.isPersistent()
            assert _no_id(dom.XMLDesc(0)) == _no_id(before)       # intact
            conn.lookupByUUIDString(low2).resume()
            assert _state(conn, low2) == "running"
            await eventually(lambda: {low, low2, high} <= client.active, 5, "all running")
        finally:
            await _stop(handle, client, sig, store)
    run(scenario(), timeout=90)


def test_domains_the_manager_did_not_start(dbus_address, conn, tmp_path):
    """Without --overcommit-others a domain started elsewhere is never touched; with
    it, it is (the test driver's persistent "test" is saved, and comes back)."""
    async def scenario():
        for others, expect in ((False, "refused"), (True, "saved")):
            options = PolicyOptions(MAKE_ROOM, others=others, host_memory_kib=2 * GiB + 256 * MiB,
                                    pause_budget_kib=0)
            handle, client, sig, store = await _manager(dbus_address, conn, tmp_path, options)
            try:
                uuid = await client.define_domain({"Name": f"vip-{others}", "Priority": 1,
                                                   "MemoryKiB": 1024 * MiB})
                if expect == "refused":
                    with pytest.raises(ManagerError) as err:
                        await client.start_domain(uuid)
                    assert "from the 0 running domains" in err.value.message
                    assert _state(conn, TEST_UUID) == "running"
                else:
                    await client.start_domain(uuid)
                    assert _state(conn, TEST_UUID) == "saved"
                    dom = conn.lookupByUUIDString(TEST_UUID)
                    assert dom.isPersistent()
                    conn.lookupByUUIDString(uuid).destroy()
                    dom.create()                          # the owner restores it
                    assert _state(conn, TEST_UUID) == "running"
            finally:
                await _stop(handle, client, sig, store)
                (tmp_path / "m.db").unlink()
    run(scenario(), timeout=60)


def test_cli_options(tmp_path):
    from cim_provider.cli import parse_args
    args = parse_args(["manager", "--overcommit", "make-room", "--overcommit-others",
                       "--host-memory-kib", "4194304", "--pause-budget-kib", "0",
                       "--templates", str(tmp_path)])
    assert (args.overcommit, args.overcommit_others, args.host_memory_kib,
            args.pause_budget_kib, args.templates) == ("make-room", True, 4194304, 0,
                                                       str(tmp_path))
    with pytest.raises(SystemExit):
        parse_args(["manager", "--overcommit", "always"])


def test_cli_manager_with_templates_and_make_room(dbus_address, tmp_path):
    """`cim-provider manager --templates DIR --overcommit make-room --host-memory-kib
    --pause-budget-kib` as its own process (its own test:///default: "test" runs with
    2 GiB there too): a templated low-priority domain is paused for a higher one."""
    import subprocess

    try:
        from tests.support import manager_command, stop_process, wait_for_owner
        from tests.support.dbus_daemon import subprocess_env
        from tests.support.templates import write_templates
    except ImportError:
        from support import manager_command, stop_process, wait_for_owner  # type: ignore
        from support.dbus_daemon import subprocess_env  # type: ignore
        from support.templates import write_templates  # type: ignore
    folder = write_templates(tmp_path / "templates")
    log = tmp_path / "manager.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(manager_command(
            "--bus", dbus_address, "--store", f"sqlite:{tmp_path / 'm.db'}",
            "--libvirt-uri", "test:///default", "--templates", str(folder),
            "--overcommit", "make-room", "--host-memory-kib", str(2 * GiB + 512 * MiB),
            "--pause-budget-kib", str(512 * MiB), "--poll-interval", "0.2"),
            env=subprocess_env(dbus_address), stdout=out, stderr=subprocess.STDOUT)

    async def scenario():
        client = ManagerClient(dbus_address, call_timeout=10)
        try:
            await wait_for_owner(dbus_address)
            await client.start()
            await eventually(lambda: client.templates is not None, 10, "templates")
            assert {t["Name"] for t in client.templates} == {"server", "desktop", "named"}
            low = await client.define_from_template("server", {
                "name": "low", "memory_kib": 384 * MiB, "Priority": 1})
            high = await client.define_from_template("named", {
                "name": "high", "memory_kib": 256 * MiB, "Priority": 2})
            assert await client.start_domain(low) == low
            assert await client.start_domain(high) == high
            await client.refresh()
            assert {low, high} <= client.active
        finally:
            await client.stop()
    try:
        run(scenario(), timeout=60)
        text = log.read_text()
        assert "made room to start high" in text and "paused low" in text, text
    finally:
        stop_process(proc)
