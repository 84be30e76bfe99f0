"""The farm under faults, every part real (tests/support/farm.py): PostgreSQL restarted
during defines and starts, a Manager killed -9 while it holds placements (its lease
expires, the definitions are offered again, it restarts and reconciles), the database
stopped for ten seconds (lists from the last state, starts refused with the reason,
then everything catches up), and malformed rows written straight into the database.
Leases are short here (3 s) so that expiry is quick.
"""
from __future__ import annotations

import concurrent.futures
import threading
import time

import pytest
import pywbem

try:
    from tests.support.farm import (DBusCallError, FarmHost, cs_path, dbus_call, listed,
                                    seed_sql, wait_until)
    from tests.support.postgres import Postgres, pg_bindir
except ImportError:
    from support.farm import (DBusCallError, FarmHost, cs_path, dbus_call,  # type: ignore
                              listed, seed_sql, wait_until)
    from support.postgres import Postgres, pg_bindir  # type: ignore

pytestmark = [pytest.mark.dbus, pytest.mark.skipif(pg_bindir() is None,
                                                   reason="PostgreSQL is not installed")]

LEASE = 3.0


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    work = tmp_path_factory.mktemp("farmfaults")
    pg = Postgres()
    hosts: list[FarmHost] = []
    try:
        hosts.append(FarmHost("fa", pg, work, lease=LEASE, serve=True))
        hosts.append(FarmHost("fb", pg, work, lease=LEASE, serve=False))
        # Managers reap others' expired leases only once connected for a lease period
        time.sleep(LEASE)
        yield pg, hosts
    finally:
        for h in hosts:
            h.stop()
        pg.cleanup()


def seed(pg: Postgres, n: int, prefix: str) -> list[str]:
    pg.farm_sql(seed_sql(n, prefix, memory_kib=4096))
    return pg.farm_sql(f"SELECT uuid FROM definitions WHERE name LIKE '{prefix}-%' "
                       "ORDER BY name").split()


def placements(pg: Postgres) -> dict[str, str]:
    rows = pg.farm_sql("SELECT uuid, host_id FROM placements").split()
    return dict(r.split("|") for r in rows)


def start(host: FarmHost, uuid: str) -> str:
    return dbus_call(host.bus.address, "StartDomain", "s", [uuid], timeout=60)[0]


def consistent(pg: Postgres, hosts: list[FarmHost], uuids: set[str]) -> bool:
    """Every placement has its domain running on its host, and every running farm
    domain has its placement."""
    placed = {u: h for u, h in placements(pg).items() if u in uuids}
    for h in hosts:
        running = h.running() & uuids
        mine = {u for u, hid in placed.items() if hid == f"id-{h.name}"}
        if running != mine:
            return False
    return True


def test_postgres_restarted_during_defines_and_starts(farm):
    pg, (a, b) = farm
    to_start = seed(pg, 12, "restart-start")
    wait_until(lambda: set(to_start) <= set(listed(b.bus.address)), 5.0, "seeded on B")
    acknowledged: list[str] = []
    started: list[str] = []
    stop = threading.Event()

    def define_loop():
        i = 0
        while not stop.is_set() and i < 60:
            try:
                uuid = dbus_call(a.bus.address, "DefineDomain", "a{sv}",
                                 [_props(f"restart-def-{i}")])[0]
                acknowledged.append(uuid)
            except DBusCallError as exc:
                assert exc.name == "org.example.virt.Error.Failed", exc
            i += 1
            time.sleep(0.05)

    def start_loop():
        for uuid in to_start:
            for _ in range(100):
                try:
                    start(b, uuid)
                    started.append(uuid)
                    break
                except DBusCallError as exc:
                    assert exc.name in ("org.example.virt.Error.Failed",
                                        "org.example.virt.Error.AlreadyRunning"), exc
                    if exc.name.endswith("AlreadyRunning"):
                        break
                    time.sleep(0.1)
            time.sleep(0.05)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(define_loop), pool.submit(start_loop)]
        time.sleep(0.4)
        pg.restart()
        time.sleep(0.6)
        pg.restart()
        stop.set()
        for j in jobs:
            j.result(120)
    assert acknowledged and started
    present = set(pg.farm_sql("SELECT uuid FROM definitions").split())
    assert set(acknowledged) <= present, set(acknowledged) - present
    farm_uuids = present
    wait_until(lambda: consistent(pg, [a, b], farm_uuids), 10.0,
               "placements and running domains agree")
    for uuid in started:
        assert uuid in b.running()
    assert set(started) <= set(placements(pg))


def _props(name: str) -> dict:
    from cim_provider.contract import values_to_dbus
    return values_to_dbus({"Name": name, "Type": "Test", "MemoryKiB": 4096,
                           "MaxMemoryKiB": 4096})


def test_manager_killed_lease_expires_then_restart_reconciles(farm):
    pg, (a, b) = farm
    uuids = seed(pg, 3, "killed")
    wait_until(lambda: set(uuids) <= set(listed(b.bus.address)), 5.0, "seeded on B")
    for u in uuids:
        start(b, u)
    wait_until(lambda: not set(uuids) & set(listed(a.bus.address)), 2.0,
               "running on B: not offered on A")
    b.kill_manager()
    killed = time.monotonic()
    # B's lease runs out; A releases B's placements and offers the definitions again
    wait_until(lambda: set(uuids) <= set(listed(a.bus.address)), LEASE + 3.0,
               "offered on A again after B's lease expired")
    waited = time.monotonic() - killed
    assert waited >= LEASE * 0.5, f"offered again after {waited:.1f} s, before the lease ran out"
    assert all(not e["Active"] for u, e in listed(a.bus.address).items() if u in uuids)
    assert set(uuids) <= b.running()           # the guests themselves never stopped
    assert not set(uuids) & set(placements(pg))
    # B's Manager comes back: it adopts what its libvirt runs
    b.start_manager()
    wait_until(lambda: all(placements(pg).get(u) == "id-fb" for u in uuids), 15.0,
               "B adopted its running domains")
    wait_until(lambda: not set(uuids) & set(listed(a.bus.address)), 2.0,
               "no longer offered on A")
    assert "adopted its placement" in b.log_text()
    for u in uuids:
        b.destroy(u)
    wait_until(lambda: not set(uuids) & set(placements(pg)), 3.0, "released after stop")


def test_database_stopped_for_ten_seconds(farm):
    pg, (a, b) = farm
    uuids = seed(pg, 2, "outage")
    conn = a.conn()
    try:
        wait_until(lambda: {u: 3 for u in uuids}.items() <= a.systems(conn).items(), 5.0,
                   "seeded through CIM on A")
        before = a.systems(conn)
        pg.stop()
        stopped = time.monotonic()
        refused = None
        while time.monotonic() - stopped < 10.0:
            now = a.systems(conn)
            assert {u: 3 for u in uuids}.items() <= now.items(), "lost the last state"
            if refused is None:
                try:
                    rv, _ = conn.InvokeMethod("RequestStateChange", cs_path(uuids[0]),
                                              RequestedState=pywbem.Uint16(2))
                    raise AssertionError(f"started while the database was down: {rv}")
                except pywbem.CIMError as exc:
                    refused = exc
            time.sleep(0.5)
        assert refused.status_code == pywbem.CIM_ERR_FAILED
        assert "unreachable" in refused.status_description, refused.status_description
        with pytest.raises(DBusCallError) as info:
            dbus_call(b.bus.address, "DefineDomain", "a{sv}", [_props("outage-refused")])
        assert info.value.name == "org.example.virt.Error.Failed"
        assert "unreachable" in info.value.text
        assert set(before) <= set(a.systems(conn))
        pg.start()
        # catches up: a definition made now on B is seen on A, and starts work again
        new = wait_until(lambda: _try_define(b, "outage-after"), 15.0, "B defines again")
        wait_until(lambda: a.systems(conn).get(new) == 3, 5.0, "seen on A after the outage")
        wait_until(lambda: _try_rsc(conn, uuids[0]) == 0, 15.0, "A starts again")
        assert uuids[0] in a.running()
        assert "unreachable" in a.log_text() or "lost the farm database" in a.log_text()
        a.destroy(uuids[0])
    finally:
        conn.close()


def _try_define(host: FarmHost, name: str) -> str | None:
    try:
        return dbus_call(host.bus.address, "DefineDomain", "a{sv}", [_props(name)])[0]
    except DBusCallError:
        return None


def _try_rsc(conn, uuid: str):
    try:
        rv, _ = conn.InvokeMethod("RequestStateChange", cs_path(uuid),
                                  RequestedState=pywbem.Uint16(2))
        return int(rv)
    except pywbem.CIMError:
        return None


def test_malformed_rows_are_skipped_with_one_warning(farm):
    pg, (a, b) = farm
    good = seed(pg, 1, "malformed-good")[0]
    bad = {
        "not-an-object": "'\"just a string\"'::jsonb",
        "vcpus-string": "'{\"VCPUs\": \"four\"}'::jsonb",
        "negative-memory": "'{\"MemoryKiB\": -5}'::jsonb",
        "disks-not-list": "'{\"Disks\": {\"Target\": \"vda\"}}'::jsonb",
        "bad-mac": "'{\"NICs\": [{\"MAC\": \"zz\"}]}'::jsonb",
        "huge-vcpus": "'{\"VCPUs\": 99999999999}'::jsonb",
    }
    for name, config in bad.items():
        pg.farm_sql(f"INSERT INTO definitions (uuid, name, config) "
                    f"VALUES (gen_random_uuid(), 'malformed-{name}', {config})")
    bad_uuids = pg.farm_sql("SELECT uuid FROM definitions WHERE name LIKE 'malformed-%' "
                            "AND name <> 'malformed-good-1'").split()
    wait_until(lambda: good in listed(a.bus.address), 5.0, "the good row listed")
    time.sleep(1.5)                           # several polls and syncs
    for host in (a, b):
        shown = listed(host.bus.address)
        assert not set(bad_uuids) & set(shown)
        assert host.manager is not None and host.manager.poll() is None
        log = host.log_text()
        for u in bad_uuids:
            assert log.count(f"skipping definition {u}") == 1, (host.name, u)
    conn = a.conn()
    try:
        assert a.systems(conn).get(good) == 3
        assert not set(bad_uuids) & set(a.systems(conn))
    finally:
        conn.close()
    pg.farm_sql("DELETE FROM definitions WHERE name LIKE 'malformed-%'")
