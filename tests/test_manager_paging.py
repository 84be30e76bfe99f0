"""The paged and incremental listing (ListDomainsPage, ListChangesSince): the
reference service answers them, the client uses them when offered (a first sync in
pages, then only the changes, a full re-list only when the generations do not follow)
and keeps the old path with a Manager that lacks them. At 100,000 definitions (a real
PostgreSQL farm store; marked slow) the first sync is in pages and a later change
costs one ListChangesSince.
"""
from __future__ import annotations

import asyncio
import time

import pytest

from cim_provider.contract import (BUS_NAME, ERROR_GENERATION_UNKNOWN, INTERFACE,
                                   OBJECT_PATH, values_to_dbus)
from cim_provider.contract.bus import DBusError, Message, MessageType, Variant, connect, plain
from cim_provider.manager.service import serve_manager
from cim_provider.manager.store import LibvirtConnection, SqliteStore
from cim_provider.sources.manager import ManagerClient

try:
    from tests.support import eventually, run
    from tests.support.bus_monitor import BusMonitor
    from tests.support.dbus_daemon import dbus_address  # noqa: F401 (a fixture)
    from tests.support.minimal_manager import SignalingManager, serve_minimal
    from tests.support.postgres import Postgres, pg_bindir
except ImportError:
    from support import eventually, run  # type: ignore
    from support.bus_monitor import BusMonitor  # type: ignore
    from support.dbus_daemon import dbus_address  # type: ignore  # noqa: F401
    from support.minimal_manager import SignalingManager, serve_minimal  # type: ignore
    from support.postgres import Postgres, pg_bindir  # type: ignore

pytestmark = pytest.mark.dbus


async def call(bus, member, signature="", body=()):
    reply = await bus.call(Message(destination=BUS_NAME, path=OBJECT_PATH, interface=INTERFACE,
                                   member=member, signature=signature, body=list(body)))
    if reply.message_type == MessageType.ERROR:
        raise DBusError(reply.error_name, reply.body[0] if reply.body else "")
    return list(reply.body)


async def generation(bus) -> int:
    reply = await bus.call(Message(destination=BUS_NAME, path=OBJECT_PATH,
                                   interface="org.freedesktop.DBus.Properties", member="Get",
                                   signature="ss", body=[INTERFACE, "Generation"]))
    return reply.body[0].value


def calls_in(seen) -> list[str]:
    """The members of the calls in `seen`, without the monitor's own catch-up Pings."""
    return [c.member for c in seen if c.kind == "call" and c.member != "Ping"]


def props(name: str) -> dict:
    return values_to_dbus({"Name": name, "MemoryKiB": 1024})


def test_pages_and_changes_from_the_reference_service(dbus_address, tmp_path):
    async def scenario():
        handle = await serve_manager(dbus_address, [SqliteStore(tmp_path / "m.db")],
                                     LibvirtConnection("test:///default"), poll_interval=0.2)
        bus = await connect(dbus_address)
        try:
            uuids = [(await call(bus, "DefineDomain", "a{sv}", [props(f"p{i:02d}")]))[0]
                     for i in range(25)]
            got, cursor, pages = [], "", 0
            while True:
                page, cursor = await call(bus, "ListDomainsPage", "su", [cursor, 10])
                pages += 1
                assert len(page) <= 10
                got += [plain(e)["UUID"] for e in page]
                if not cursor:
                    break
            assert pages == 3 and got == sorted(uuids)
            assert all("Active" in e for e in page)
            g0 = await generation(bus)
            assert await call(bus, "ListChangesSince", "t", [g0]) == [g0, [], []]
            new = (await call(bus, "DefineDomain", "a{sv}", [props("later")]))[0]
            await call(bus, "UndefineDomain", "s", [uuids[0]])
            g1, changed, removed = await call(bus, "ListChangesSince", "t", [g0])
            assert g1 > g0
            assert [plain(e)["UUID"] for e in changed] == [new] and removed == [uuids[0]]
            assert await call(bus, "ListChangesSince", "t", [g1]) == [g1, [], []]
            for bad in (g1 + 1000, 0):
                with pytest.raises(DBusError) as info:
                    await call(bus, "ListChangesSince", "t", [bad])
                assert info.value.type == ERROR_GENERATION_UNKNOWN
        finally:
            bus.disconnect()
            await handle.stop()
    run(scenario())


def test_client_pages_then_asks_only_for_changes(dbus_address, tmp_path):
    """Watched with a bus monitor: the first sync walks the pages, every later change
    is one ListChangesSince; a generation the Manager cannot answer from (here: made
    up) makes the client list in pages again, and the result is the same."""
    async def scenario():
        handle = await serve_manager(dbus_address, [SqliteStore(tmp_path / "m.db")],
                                     LibvirtConnection("test:///default"), poll_interval=0.2)
        bus = await connect(dbus_address)
        monitor = BusMonitor(dbus_address, [f"type='method_call',destination='{BUS_NAME}'"])
        monitor.start()
        client = ManagerClient(dbus_address, relist_interval=0.2)
        try:
            for i in range(5):
                await call(bus, "DefineDomain", "a{sv}", [props(f"c{i}")])
            await client.start()
            await eventually(lambda: client.definitions and len(client.definitions) == 5,
                             within=10.0, what="first sync")
            # The monitor sees each call a moment after the daemon routed it: every
            # mark and read is taken once it has caught up with what was answered.
            await monitor.caught_up(bus, BUS_NAME)
            members = calls_in(monitor.seen())
            assert "ListDomainsPage" in members and "ListDomains" not in members
            mark = len(monitor.seen())
            new = (await call(bus, "DefineDomain", "a{sv}", [props("c-new")]))[0]
            await eventually(lambda: new in (client.definitions or {}), within=5.0,
                             what="the new definition")
            await monitor.caught_up(bus, BUS_NAME)
            later = calls_in(monitor.seen()[mark:])
            assert "ListChangesSince" in later and "ListDomainsPage" not in later, later
            client.generation = 12345      # a generation this Manager never reported
            await monitor.caught_up(bus, BUS_NAME)
            mark = len(monitor.seen())
            await client.refresh()
            await monitor.caught_up(bus, BUS_NAME)
            later = calls_in(monitor.seen()[mark:])
            assert later[0] == "ListChangesSince" and "ListDomainsPage" in later, later
            assert len(client.definitions) == 6 and client.generation == await generation(bus)
        finally:
            await client.stop()
            monitor.stop()
            bus.disconnect()
            await handle.stop()
    run(scenario())


def test_changes_reach_the_inventory_one_by_one(dbus_address, tmp_path):
    """Wired like `serve` (on_change: full lists, on_delta: changes): after the first
    sync, a define, an update and an undefine each reach the inventory as exactly
    that record created, modified or deleted, through update_defined, never a full
    replace; after a generation gap the client lists again and the inventory is
    still what the Manager lists."""
    from cim_provider.inventory import Inventory

    async def scenario():
        handle = await serve_manager(dbus_address, [SqliteStore(tmp_path / "m.db")],
                                     LibvirtConnection("test:///default"), poll_interval=0.2)
        bus = await connect(dbus_address)
        inv = Inventory()
        fulls: list[int] = []
        deltas: list[tuple[set, set]] = []

        def on_change(defs):
            fulls.append(len(defs or {}))
            inv.set_defined(defs)

        def on_delta(changed, removed):
            deltas.append((set(changed), set(removed)))
            inv.update_defined(changed, removed)
        client = ManagerClient(dbus_address, relist_interval=0.2, on_change=on_change,
                               on_delta=on_delta)
        changes = []
        inv.subscribe(lambda c: changes.append((c.kind, c.uuid)))
        try:
            uuids = [(await call(bus, "DefineDomain", "a{sv}", [props(f"i{i}")]))[0]
                     for i in range(6)]
            await client.start()
            await eventually(lambda: len(inv) == 6, within=10.0, what="first sync")
            assert fulls == [6] and deltas == []
            changes.clear()
            steps = [
                ("created", lambda: call(bus, "DefineDomain", "a{sv}", [props("i-new")])),
                ("modified", lambda: call(bus, "UpdateDomain", "sa{sv}",
                                          [uuids[1], values_to_dbus({"VCPUs": 3})])),
                ("deleted", lambda: call(bus, "UndefineDomain", "s", [uuids[2]])),
            ]
            for kind, act in steps:
                reply = await act()
                uuid = reply[0] if kind == "created" else uuids[1 if kind == "modified" else 2]
                await eventually(lambda: changes, within=5.0, what=kind)
                await asyncio.sleep(0.3)          # anything else would show by now
                assert changes == [(kind, uuid)], (kind, changes)
                assert deltas[-1] == (({uuid}, set()) if kind != "deleted"
                                      else (set(), {uuid}))
                changes.clear()
            assert fulls == [6]
            assert inv.get(uuids[1]).defined.vcpus == 3
            # A generation gap: the client lists again (a full replace), and the
            # inventory still equals what the Manager lists.
            client.generation = 12345       # a generation this Manager never reported
            await call(bus, "UpdateDomain", "sa{sv}", [uuids[3], values_to_dbus({"VCPUs": 2})])
            await eventually(lambda: inv.get(uuids[3]).defined.vcpus == 2, within=5.0,
                             what="the change after the gap")
            assert fulls == [6, 6] and changes == [("modified", uuids[3])], (fulls, changes)
            listed = {plain(e)["UUID"] for e in (await call(bus, "ListDomains"))[0]}
            assert set(inv.defined) == listed and len(listed) == 6
        finally:
            await client.stop()
            bus.disconnect()
            await handle.stop()
    run(scenario())


def test_client_keeps_the_old_path_without_paging(dbus_address):
    """A Manager with ListDomains and the signals but no paging: ListDomains, as
    before; not a single call of a member it does not offer."""
    async def scenario():
        entries = [{"UUID": Variant("s", f"00000000-0000-4000-8000-{i:012d}"),
                    "Name": Variant("s", f"m{i}")} for i in range(3)]
        mgr = await serve_minimal(dbus_address, manager=SignalingManager(entries))
        monitor = BusMonitor(dbus_address, [f"type='method_call',destination='{BUS_NAME}'"])
        monitor.start()
        client = ManagerClient(dbus_address, relist_interval=0.1)
        try:
            await client.start()
            await eventually(lambda: client.definitions and len(client.definitions) == 3,
                             within=10.0, what="listed")
            assert not client.offers("ListDomainsPage")
            mgr.manager.entries.append({"UUID": Variant("s", "00000000-0000-4000-8000-"
                                                              "000000000099"),
                                        "Name": Variant("s", "m99")})
            mgr.manager.DomainDefined("00000000-0000-4000-8000-000000000099")
            await eventually(lambda: len(client.definitions) == 4, within=5.0, what="relisted")
            members = {c.member for c in monitor.seen() if c.kind == "call"}
            assert "ListDomains" in members
            assert not members & {"ListDomainsPage", "ListChangesSince"}
        finally:
            await client.stop()
            monitor.stop()
            await mgr.stop()
    run(scenario())


N = 100_000


@pytest.mark.slow
@pytest.mark.skipif(pg_bindir() is None, reason="PostgreSQL is not installed")
def test_100000_definitions_paged_then_incremental(dbus_address, tmp_path):
    """A farm store with 100,000 definitions: more than one D-Bus message can carry as
    one ListDomains answer. The client's first sync is in pages; a change made later
    straight in the database reaches it as one ListChangesSince."""
    from cim_provider.manager.pgstore import FarmStore
    pg = Postgres(fsync=False)
    try:
        import os
        os.environ["PGPASSFILE"] = str(pg.passfile)
        t0 = time.monotonic()

        async def migrate():
            store = FarmStore(pg.conninfo, host_id="seed", host_name="seed")
            await store.open()
            await store.aclose()
        asyncio.run(migrate())
        pg.farm_sql("INSERT INTO definitions (uuid, name, config) SELECT gen_random_uuid(), "
                    "'big-' || i, jsonb_build_object('Type', 'Test', 'MemoryKiB', 65536, "
                    f"'VCPUs', 1) FROM generate_series(1, {N}) i")
        seeded = time.monotonic() - t0

        async def scenario():
            store = FarmStore(pg.conninfo, host_id="h1", host_name="h1", timeout=120)
            t1 = time.monotonic()
            handle = await serve_manager(dbus_address, [store],
                                         LibvirtConnection("test:///default"))
            manager_ready = time.monotonic() - t1
            monitor = BusMonitor(dbus_address,
                                 [f"type='method_call',destination='{BUS_NAME}'"]).start()
            client = ManagerClient(dbus_address, list_timeout=120)
            bus = await connect(dbus_address)
            try:
                t2 = time.monotonic()
                await client.start()
                await eventually(lambda: client.definitions is not None
                                 and len(client.definitions) == N, within=120.0,
                                 what="the first sync of 100,000")
                first_sync = time.monotonic() - t2
                await monitor.caught_up(bus, BUS_NAME)
                calls = calls_in(monitor.seen())
                assert calls.count("ListDomainsPage") >= N // 10_000
                assert "ListDomains" not in calls
                mark = len(monitor.seen())
                t3 = time.monotonic()
                await asyncio.to_thread(pg.farm_sql, "UPDATE definitions SET config = "
                                        "config || '{\"VCPUs\": 2}' WHERE name = 'big-7'")
                await eventually(lambda: any(c.vcpus == 2 for c in client.definitions.values()),
                                 within=10.0, what="the change")
                change = time.monotonic() - t3
                await monitor.caught_up(bus, BUS_NAME)
                later = calls_in(monitor.seen()[mark:])
                assert "ListChangesSince" in later and "ListDomainsPage" not in later, later
                print(f"\n[paging] seeded {N} in {seeded:.1f} s; Manager ready in "
                      f"{manager_ready:.1f} s; client's first sync {first_sync:.1f} s in "
                      f"{calls.count('ListDomainsPage')} pages; a change seen after "
                      f"{change * 1000:.0f} ms")
            finally:
                await client.stop()
                monitor.stop()
                bus.disconnect()
                await handle.stop()
        run(scenario(), timeout=400)
    finally:
        pg.cleanup()
