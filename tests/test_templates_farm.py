"""Templated definitions in the farm store (issue 15): PostgreSQL keeps the row (UUID,
name, template, variables, start policy) and nothing rendered; a database at schema 1
is migrated to 2 with its definitions kept; each Manager renders the rows with its own
templates, re-renders them when a template changes, and starts the rendered XML.
"""
import asyncio
import json

import libvirt
import pytest

from cim_provider.manager import pgstore
from cim_provider.manager.pgstore import FarmStore
from cim_provider.manager.service import serve_manager
from cim_provider.manager.store import LibvirtConnection
from cim_provider.manager.templates import TemplateLibrary
from cim_provider.sources.manager import ManagerClient

try:
    from tests.support import eventually, reset_test_driver, run
    from tests.support.dbus_daemon import dbus_address  # noqa: F401 (fixture)
    from tests.support.postgres import Postgres, pg_bindir
    from tests.support.templates import SERVER, write_templates
    from tests.test_templates import Signals
except ImportError:          # tests/ itself is on sys.path
    from support import eventually, reset_test_driver, run  # type: ignore
    from support.dbus_daemon import dbus_address  # type: ignore  # noqa: F401 (fixture)
    from support.postgres import Postgres, pg_bindir  # type: ignore
    from support.templates import SERVER, write_templates  # type: ignore
    from test_templates import Signals  # type: ignore

pytestmark = [pytest.mark.dbus, pytest.mark.skipif(pg_bindir() is None,
                                                   reason="PostgreSQL is not installed")]


@pytest.fixture
def pg(monkeypatch):
    server = Postgres(fsync=False)
    monkeypatch.setenv("PGPASSFILE", str(server.passfile))
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def conn():
    c = libvirt.open("test:///default")
    reset_test_driver(c)
    yield c
    reset_test_driver(c)
    c.close()


def test_schema_1_is_migrated_and_templated_rows_live_in_the_farm(pg, conn, dbus_address,
                                                                   tmp_path, monkeypatch):
    async def at_schema_1():
        """What a Manager from before templates left: migrations up to 1."""
        with monkeypatch.context() as m:
            m.setattr(pgstore, "MIGRATIONS", pgstore.MIGRATIONS[:1])
            store = FarmStore(pg.conninfo, host_id="old", host_name="old")
            work = await store._connect_one()
            try:
                await store._migrate(work)
            finally:
                await work.close()
    run(at_schema_1())
    assert pg.farm_sql("SELECT max(version) FROM farm_schema").strip() == "1"
    pg.farm_sql("INSERT INTO definitions (uuid, name, config) VALUES "
                "('00000000-0000-4000-8000-000000000001', 'plain', '{\"MemoryKiB\": 65536}')")

    folder = write_templates(tmp_path / "templates")

    async def scenario():
        store = FarmStore(pg.conninfo, host_id="h1", host_name="h1")
        handle = await serve_manager(dbus_address, [store], LibvirtConnection(None, conn),
                                     poll_interval=0.1, templates=TemplateLibrary(folder))
        client = ManagerClient(dbus_address, call_timeout=10)
        await client.start()
        sig = await Signals().start(dbus_address)
        try:
            assert await store.schema_version() == 2
            assert client.definitions["00000000-0000-4000-8000-000000000001"].name == "plain"
            uuid = await client.define_from_template("server", {
                "name": "farm-srv", "vcpus": 2, "disk": "/img/farm.qcow2", "Priority": 4})
            row = await asyncio.to_thread(
                pg.farm_sql, "SELECT template, variables::text, config::text FROM definitions "
                             f"WHERE uuid = '{uuid}'")
            template, variables, config = row.strip().split("|")
            assert template == "server"
            assert json.loads(variables) == {"vcpus": 2, "disk": "/img/farm.qcow2"}
            assert json.loads(config) == {"Priority": 4}          # nothing rendered
            await eventually(lambda: uuid in (client.definitions or {}), 5, "listed")
            cfg = client.definitions[uuid]
            assert (cfg.title, cfg.vcpus, cfg.disks[0].source, cfg.priority) == \
                ("Server farm-srv", 2, "/img/farm.qcow2", 4)

            # an edit of the template re-renders it, as the farm's own changes do
            sig.seen.clear()
            (folder / "server.xml.j2").write_text(SERVER.replace("<title>Server",
                                                                 "<title>Farm server"))
            await eventually(lambda: ("DomainChanged", [uuid]) in sig.seen, 5,
                             "DomainChanged after the template changed")
            await eventually(lambda: client.definitions[uuid].title == "Farm server farm-srv",
                             5, "re-rendered")
            # a change of the variables goes through the farm
            await client.update_domain(uuid, {"VCPUs": 3})
            await eventually(lambda: client.definitions[uuid].vcpus == 3, 5, "VCPUs 3")
            assert '"vcpus": 3' in await asyncio.to_thread(
                pg.farm_sql, f"SELECT variables::text FROM definitions WHERE uuid = '{uuid}'")
            # a start places it and runs the rendered XML
            assert await client.start_domain(uuid) == uuid
            xml = conn.lookupByUUIDString(uuid).XMLDesc(0)
            assert "<title>Farm server farm-srv</title>" in xml and "/img/farm.qcow2" in xml
            assert "h1" in await asyncio.to_thread(
                pg.farm_sql, f"SELECT host_id FROM placements WHERE uuid = '{uuid}'")
        finally:
            sig.stop()
            await client.stop()
            await handle.stop()
    run(scenario(), timeout=90)


def test_make_room_in_the_farm_pauses_and_never_saves(pg, conn, dbus_address):
    """A farm start that does not fit pauses a lower-priority farm domain (a saved one
    would be offered on every host, so farm domains are never saved)."""
    from cim_provider.manager.policy import MAKE_ROOM, PolicyOptions
    mib = 1024
    options = PolicyOptions(MAKE_ROOM, host_memory_kib=(2048 + 512) * mib,
                            pause_budget_kib=256 * mib)

    async def scenario():
        store = FarmStore(pg.conninfo, host_id="h1", host_name="h1")
        handle = await serve_manager(dbus_address, [store], LibvirtConnection(None, conn),
                                     poll_interval=0.1, policy=options)
        client = ManagerClient(dbus_address, call_timeout=10)
        await client.start()
        try:
            low = await client.define_domain({"Name": "low", "MemoryKiB": 384 * mib,
                                              "Priority": 1})
            high = await client.define_domain({"Name": "high", "MemoryKiB": 256 * mib,
                                               "Priority": 2})
            top = await client.define_domain({"Name": "top", "MemoryKiB": 384 * mib,
                                              "Priority": 3})
            assert await client.start_domain(low) == low
            assert await client.start_domain(high) == high       # pauses low
            dom = conn.lookupByUUIDString(low)
            assert dom.isActive() and dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
            # the budget is spent and nothing may be saved: refused, nothing touched
            with pytest.raises(Exception) as err:
                await client.start_domain(top)
            assert "Refused" in getattr(err.value, "name", "") and \
                "nothing was touched" in str(err.value)
            assert conn.lookupByUUIDString(high).state()[0] == libvirt.VIR_DOMAIN_RUNNING
            placed = await asyncio.to_thread(pg.farm_sql, "SELECT count(*) FROM placements")
            assert placed.strip() == "2"
        finally:
            await client.stop()
            await handle.stop()
    run(scenario(), timeout=90)
