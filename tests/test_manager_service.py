"""The reference Manager (`cim-provider manager`) on a private bus with libvirt's
test driver: StartDomain and its policy, every optional member, signals, Generation,
both stores, and SQLite durability (including kill -9 in the middle of defines)."""
import asyncio
import logging
import sqlite3
import subprocess
import uuid as uuidlib

import libvirt
import pytest

from cim_provider.contract import (BUS_NAME, CHANGE_SIGNALS, INTERFACE, OBJECT_PATH,
                                   values_to_dbus)
from cim_provider.contract.bus import (DBUS_INTERFACE, DBUS_NAME, DBUS_PATH, Message,
                                       MessageType, Variant, connect)
from cim_provider.manager.service import serve_manager
from cim_provider.manager.store import LibvirtConnection, LibvirtStore, SqliteStore
from cim_provider.sources.manager import ManagerClient, ManagerError, ManagerNotSupported

try:
    from tests.support import (eventually, manager_command, reset_test_driver, run,
                               wait_for_owner)
    from tests.support.dbus_daemon import dbus_address, subprocess_env  # noqa: F401 (fixture)
except ImportError:          # tests/ itself is on sys.path (rootdir-less layout)
    from support import (eventually, manager_command, reset_test_driver, run,  # type: ignore
                         wait_for_owner)
    from support.dbus_daemon import dbus_address, subprocess_env  # noqa: F401 (fixture)

pytestmark = pytest.mark.dbus

TEST_UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"     # "test": running, persistent
ERR = "org.example.virt.Error."


def _pristine(conn):
    """test:///default with only "test" running, before and after each test."""
    reset_test_driver(conn)


@pytest.fixture
def conn():
    """test:///default, pristine (host 3 GiB; "test" runs with 2 GiB: 1 GiB free)."""
    c = libvirt.open("test:///default")
    _pristine(c)
    yield c
    _pristine(c)
    c.close()


class Recorder:
    """Another bus client that records the Manager's signals (and reads Generation)."""

    async def start(self, address):
        self.signals = []
        self.bus = await connect(address)
        self.bus.add_message_handler(self._on_message)
        await self.bus.call(Message(
            destination=DBUS_NAME, path=DBUS_PATH, interface=DBUS_INTERFACE,
            member="AddMatch", signature="s",
            body=[f"type='signal',interface='{INTERFACE}',path='{OBJECT_PATH}'"]))
        return self

    def _on_message(self, msg):
        if msg.message_type == MessageType.SIGNAL and msg.member in CHANGE_SIGNALS:
            self.signals.append((msg.member, msg.body[0]))

    async def generation(self):
        reply = await self.bus.call(Message(
            destination=BUS_NAME, path=OBJECT_PATH, interface="org.freedesktop.DBus.Properties",
            member="Get", signature="ss", body=[INTERFACE, "Generation"]))
        assert reply.message_type == MessageType.METHOD_RETURN, reply.body
        assert reply.body[0].signature == "t"
        return reply.body[0].value

    async def call(self, member, signature="", body=()):
        """A raw contract call, for what the typed client would refuse to send."""
        return await self.bus.call(Message(destination=BUS_NAME, path=OBJECT_PATH,
                                           interface=INTERFACE, member=member,
                                           signature=signature, body=list(body)))

    def stop(self):
        self.bus.disconnect()


async def _setup(address, conn, tmp_path, *, libvirt_store=True, poll=0.1):
    stores = [SqliteStore(tmp_path / "m.db")]
    if libvirt_store:
        stores.append(LibvirtStore(LibvirtConnection(None, conn)))
    handle = await serve_manager(address, stores, conn, poll_interval=poll)
    client = ManagerClient(address, call_timeout=10)
    await client.start()
    recorder = await Recorder().start(address)
    return handle, client, recorder


async def _teardown(handle, client, recorder):
    recorder.stop()
    await client.stop()
    await handle.stop()
    for store in handle.service.stores:
        store.close()


async def _error(coro):
    with pytest.raises(ManagerError) as err:
        await coro
    return err.value


def test_start_domain_policy_success_and_already_running(dbus_address, conn, tmp_path):
    async def scenario():
        handle, client, rec = await _setup(dbus_address, conn, tmp_path)
        try:
            assert client.knows_twins and TEST_UUID in client.active
            assert client.definitions[TEST_UUID].name == "test"

            big = await client.define_domain({"Name": "kde-dev", "MemoryKiB": 4 * 1024 * 1024})
            small = await client.define_domain({"Name": "gnome-test", "MemoryKiB": 512 * 1024,
                                                "VCPUs": 2})

            err = await _error(client.start_domain(big))
            assert err.name == ERR + "Refused"
            assert "needs 4.0 GiB (4194304 KiB)" in err.message
            assert "only 1.0 GiB (1048576 KiB) is free" in err.message
            assert big not in [d.UUIDString() for d in conn.listAllDomains()]

            assert await client.start_domain(small) == small
            dom = conn.lookupByUUIDString(small)
            assert dom.isActive() and not dom.isPersistent() and dom.name() == "gnome-test"
            await eventually(lambda: small in client.active, what="Active after StartDomain")
            assert ("DomainChanged", small) in rec.signals

            err = await _error(client.start_domain(small))
            assert err.name == ERR + "AlreadyRunning" and "gnome-test" in err.message
            err = await _error(client.start_domain(TEST_UUID))
            assert err.name == ERR + "AlreadyRunning"
            err = await _error(client.start_domain("00000000-0000-0000-0000-000000000001"))
            assert err.name == ERR + "NotFound"
            reply = await rec.call("StartDomain", "s", ["garbage"])
            assert reply.error_name == ERR + "InvalidArgument"

            # Only the free memory counts: with 512 MiB used, 512 MiB more is refused.
            third = await client.define_domain({"Name": "third", "MemoryKiB": 600 * 1024})
            err = await _error(client.start_domain(third))
            assert err.name == ERR + "Refused" and "(524288 KiB) is free" in err.message

            # A libvirt-store definition starts with a plain create, staying persistent.
            conn.lookupByUUIDString(TEST_UUID).destroy()
            await eventually(lambda: TEST_UUID not in client.active, what="stop noticed")
            assert ("DomainChanged", TEST_UUID) in rec.signals
            assert await client.start_domain(TEST_UUID) == TEST_UUID
            dom = conn.lookupByUUIDString(TEST_UUID)
            assert dom.isActive() and dom.isPersistent()
            await eventually(lambda: TEST_UUID in client.active, what="start noticed")
        finally:
            await _teardown(handle, client, rec)
    run(scenario())


def test_define_get_update_undefine_signals_and_generation(dbus_address, conn, tmp_path):
    async def scenario():
        handle, client, rec = await _setup(dbus_address, conn, tmp_path, libvirt_store=False)
        try:
            g0 = await rec.generation()
            uuid = await client.define_domain({
                "Name": "web", "Title": "Web server", "Type": "KVM", "VCPUs": 2,
                "MemoryKiB": 1 << 20, "Autostart": True,
                "Disks": [{"Target": "vda", "Source": "/img/web.qcow2", "Bus": "virtio",
                           "CapacityBytes": 10 << 30}],
                "NICs": [{"MAC": "52:54:00:AA:BB:CC", "Type": "network", "Source": "default"}]})
            g1 = await rec.generation()
            assert g1 > g0
            await eventually(lambda: ("DomainDefined", uuid) in rec.signals, what="DomainDefined")
            cfg = await client.get_domain(uuid)
            assert (cfg.name, cfg.title, cfg.vcpus, cfg.autostart) == ("web", "Web server", 2, True)
            assert cfg.disks[0].capacity_bytes == 10 << 30
            assert cfg.nics[0].mac == "52:54:00:aa:bb:cc"

            await client.update_domain(uuid, {"VCPUs": 4, "Title": ""})
            cfg = await client.get_domain(uuid)
            assert cfg.vcpus == 4 and cfg.title is None and cfg.disks   # the rest kept
            assert await rec.generation() > g1
            await eventually(lambda: ("DomainChanged", uuid) in rec.signals, what="DomainChanged")

            for changes, name in (({"VCPUs": 0}, "InvalidArgument"),
                                  ({"UUID": "00000000-0000-0000-0000-000000000001"},
                                   "InvalidArgument")):
                err = await _error(client.update_domain(uuid, changes))
                assert err.name == ERR + name, changes
            # The typed client refuses wrong Python types; a raw wrong D-Bus type is
            # refused by the Manager.
            reply = await rec.call("UpdateDomain", "sa{sv}", [uuid, {"VCPUs": Variant("s", "8")}])
            assert reply.error_name == ERR + "InvalidArgument"

            err = await _error(client.define_domain({"UUID": uuid, "Name": "again"}))
            assert err.name == ERR + "InvalidArgument" and "already defined" in err.message
            err = await _error(client.define_domain({"Name": "web"}))
            assert err.name == ERR + "InvalidArgument" and "name" in err.message
            reply = await rec.call("DefineDomain", "a{sv}", [{"Title": Variant("s", "x")}])
            assert reply.error_name == ERR + "InvalidArgument"

            await client.undefine_domain(uuid)
            await eventually(lambda: ("DomainUndefined", uuid) in rec.signals,
                             what="DomainUndefined")
            assert (await _error(client.get_domain(uuid))).name == ERR + "NotFound"
            assert (await _error(client.undefine_domain(uuid))).name == ERR + "NotFound"
            await eventually(lambda: uuid not in client.definitions, what="client follows")
        finally:
            await _teardown(handle, client, rec)
    run(scenario())


def test_libvirt_store(dbus_address, conn, tmp_path):
    """libvirt's persistent domains as definitions; DefineDomain goes to the first store."""
    async def scenario():
        handle = await serve_manager(dbus_address, [LibvirtStore(LibvirtConnection(None, conn)),
                                                   SqliteStore(tmp_path / "m.db")],
                                     conn, poll_interval=0.1)
        client = ManagerClient(dbus_address)
        await client.start()
        rec = await Recorder().start(dbus_address)
        try:
            uuid = await client.define_domain({"Name": "persisted", "MemoryKiB": 65536})
            dom = conn.lookupByUUIDString(uuid)
            assert dom.isPersistent() and not dom.isActive()
            await client.update_domain(uuid, {"Title": "now titled", "VCPUs": 3,
                                              "Autostart": True})
            cfg = await client.get_domain(uuid)
            assert (cfg.title, cfg.vcpus, cfg.autostart) == ("now titled", 3, True)
            err = await _error(client.update_domain(uuid, {"Disks": [{"Target": "vdz"}]}))
            assert err.name == ERR + "NotSupported" and isinstance(err, ManagerNotSupported)

            # Defined behind the Manager's back (virsh define): announced by the poll.
            xml = ("<domain type='test'><name>outside</name>"
                   "<uuid>0e7b4ad0-4a1b-4bb8-9b8d-1e2c7a3e0001</uuid>"
                   "<memory>65536</memory><os><type>hvm</type></os></domain>")
            conn.defineXML(xml)
            outside = "0e7b4ad0-4a1b-4bb8-9b8d-1e2c7a3e0001"
            await eventually(lambda: ("DomainDefined", outside) in rec.signals,
                             what="external define announced")
            await eventually(lambda: outside in (client.definitions or {}), what="client follows")

            await client.undefine_domain(uuid)
            assert uuid not in [d.UUIDString() for d in conn.listAllDomains()]
        finally:
            await _teardown(handle, client, rec)
    run(scenario())


def test_uuids_and_names_are_unique_across_stores(dbus_address, conn, tmp_path):
    async def scenario():
        handle, client, rec = await _setup(dbus_address, conn, tmp_path)
        try:
            err = await _error(client.define_domain({"UUID": TEST_UUID, "Name": "twin"}))
            assert err.name == ERR + "InvalidArgument"
            err = await _error(client.define_domain({"Name": "test"}))
            assert err.name == ERR + "InvalidArgument"
            assert (await rec.call("ListDomains")).body[0][0]["Name"].value == "test"
        finally:
            await _teardown(handle, client, rec)
    run(scenario())


def test_concurrent_defines_are_all_kept(dbus_address, conn, tmp_path):
    async def scenario():
        handle, client, rec = await _setup(dbus_address, conn, tmp_path, libvirt_store=False)
        try:
            uuids = await asyncio.gather(*(client.define_domain({"Name": f"vm{i:02d}"})
                                           for i in range(30)))
            assert len(set(uuids)) == 30
            reply = await rec.call("ListInactiveDomains")
            assert sorted(e["Name"].value for e in reply.body[0]) == \
                [f"vm{i:02d}" for i in range(30)]
        finally:
            await _teardown(handle, client, rec)
    run(scenario())


def test_sqlite_definitions_survive_a_restart(dbus_address, conn, tmp_path):
    async def scenario():
        handle, client, rec = await _setup(dbus_address, conn, tmp_path, libvirt_store=False)
        uuids = [await client.define_domain({"Name": n, "VCPUs": 2}) for n in ("a", "b")]
        await _teardown(handle, client, rec)

        handle = await serve_manager(dbus_address, [SqliteStore(tmp_path / "m.db")], conn)
        client = ManagerClient(dbus_address)
        await client.start()
        try:
            assert set(client.definitions) == set(uuids)
            assert {c.name for c in client.definitions.values()} == {"a", "b"}
            assert all(c.vcpus == 2 for c in client.definitions.values())
        finally:
            await client.stop()
            await handle.stop()
    run(scenario())


def test_kill_9_during_defines_loses_no_acknowledged_definition(dbus_address, tmp_path):
    db = tmp_path / "kill.db"

    def spawn():
        return subprocess.Popen(
            manager_command("--bus", dbus_address, "--store", f"sqlite:{db}",
                            "--libvirt-uri", "test:///default", "--log-level", "ERROR"),
            env=subprocess_env(dbus_address), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)

    async def scenario():
        proc = spawn()
        client = ManagerClient(dbus_address, call_timeout=5)
        await client.start()
        acked = []
        killed = []

        async def writer(w):
            for i in range(10_000):
                try:
                    acked.append(await client.define_domain({"Name": f"w{w}-{i}"}))
                except ManagerError:
                    if killed:
                        return
                    raise                 # before the kill, every define must work

        try:
            await wait_for_owner(dbus_address)
            await eventually(lambda: client.present, within=1.0, what="Manager seen")
            writers = [asyncio.create_task(writer(w)) for w in range(4)]
            await eventually(lambda: len(acked) >= 20, within=20.0, what="some defines")
            killed.append(True)
            proc.kill()
            await asyncio.gather(*writers)
            proc.wait()
            assert len(acked) >= 20

            proc = spawn()
            await wait_for_owner(dbus_address)
            await eventually(lambda: client.definitions is not None, within=1.0,
                             what="list after restart")
            missing = set(acked) - set(client.definitions)
            assert not missing, f"{len(missing)} acknowledged definitions lost"
        finally:
            await client.stop()
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    run(scenario())


def test_second_manager_on_the_same_bus_is_refused(dbus_address, conn, tmp_path):
    async def scenario():
        first = await serve_manager(dbus_address, [SqliteStore(tmp_path / "a.db")], conn)
        try:
            with pytest.raises(RuntimeError, match="already owned"):
                await serve_manager(dbus_address, [SqliteStore(tmp_path / "b.db")], conn)
        finally:
            await first.stop()
    run(scenario())


def test_cli_rejects_an_unknown_store(tmp_path):
    proc = subprocess.run(manager_command("--bus", "unix:path=/nonexistent",
                                          "--store", "floppy:/dev/fd0"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "unknown store" in proc.stderr


def test_values_typed_by_contract_reach_the_manager(dbus_address, conn, tmp_path):
    """A raw DefineDomain built with values_to_dbus is what the service stores."""
    async def scenario():
        handle, client, rec = await _setup(dbus_address, conn, tmp_path, libvirt_store=False)
        try:
            reply = await rec.call("DefineDomain", "a{sv}", [values_to_dbus(
                {"Name": "raw", "MaxMemoryKiB": 2 ** 40, "Arch": "aarch64"})])
            assert reply.message_type == MessageType.METHOD_RETURN, reply.body
            cfg = await client.get_domain(reply.body[0])
            assert (cfg.max_memory_kib, cfg.arch) == (2 ** 40, "aarch64")
        finally:
            await _teardown(handle, client, rec)
    run(scenario())


def test_manager_without_libvirt_still_lists_and_fails_starts_cleanly(dbus_address, tmp_path,
                                                                      caplog):
    """libvirt unreachable: definitions are still served (as not running); StartDomain
    fails with Error.Failed saying why; the problem is logged once, not per poll."""
    async def scenario():
        broken = LibvirtConnection("test:///nonexistent/path/to/driver.xml")
        handle = await serve_manager(dbus_address, [SqliteStore(tmp_path / "m.db")], broken,
                                     poll_interval=0.05)
        client = ManagerClient(dbus_address)
        await client.start()
        try:
            uuid = await client.define_domain({"Name": "lonely"})
            await client.refresh()
            assert uuid in client.definitions and client.active == set()
            err = await _error(client.start_domain(uuid))
            assert err.name == ERR + "Failed" and "libvirt" in err.message
            await asyncio.sleep(0.3)                      # several polls
            complaints = [r for r in caplog.records if "which domains run" in r.getMessage()]
            assert len(complaints) == 1
        finally:
            await client.stop()
            await handle.stop()
    with caplog.at_level(logging.WARNING, logger="cim_provider.manager.service"):
        run(scenario())


def test_libvirt_unreachable_keeps_what_runs_running(dbus_address, conn, tmp_path, caplog):
    """When libvirt stops answering which domains run, the SQLite definitions keep the
    Active they had: no DomainChanged storm, and a running domain is not offered by
    ListInactiveDomains."""
    async def scenario():
        own = libvirt.open("test:///default")    # the Manager's connection, closed below
        handle = await serve_manager(dbus_address, [SqliteStore(tmp_path / "m.db")], own,
                                     poll_interval=0.05)
        client = ManagerClient(dbus_address)
        await client.start()
        rec = await Recorder().start(dbus_address)
        try:
            started = await client.define_domain({"Name": "runs", "MemoryKiB": 65536})
            idle = await client.define_domain({"Name": "idle", "MemoryKiB": 65536})
            assert await client.start_domain(started) == started
            await eventually(lambda: ("DomainChanged", started) in rec.signals,
                             what="start announced")
            rec.signals.clear()

            own.close()                            # every libvirt call now fails
            await eventually(lambda: any("which domains run" in r.getMessage()
                                         for r in caplog.records),
                             what="libvirt failure noticed")
            await asyncio.sleep(0.3)               # several more polls
            assert rec.signals == []
            listed = await rec.call("ListDomains")
            assert {e["UUID"].value: e["Active"].value for e in listed.body[0]} == \
                {started: True, idle: False}
            inactive = await rec.call("ListInactiveDomains")
            assert [e["UUID"].value for e in inactive.body[0]] == [idle]
        finally:
            await _teardown(handle, client, rec)
    with caplog.at_level(logging.WARNING, logger="cim_provider.manager.service"):
        run(scenario())


def _cfg(name, uuid):
    from cim_provider.contract import config_from_dbus
    return config_from_dbus(values_to_dbus({"UUID": uuid, "Name": name}))


def test_sqlite_store_transactions_and_errors(tmp_path):
    """define_many is one transaction (all or nothing); every SQLite failure is a
    StoreError with a contract name, and the store stays usable after one."""
    from cim_provider.manager.store import StoreError
    db = tmp_path / "m.db"
    store = SqliteStore(db)
    a, b, c = (_cfg(n, f"0000000{i}-0000-4000-8000-000000000000")
               for i, n in enumerate("abc", 1))
    try:
        store.define_many([a, b])
        with pytest.raises(StoreError) as err:
            store.define_many([c, a])                 # a again: nothing of it is kept
        assert err.value.name == ERR + "InvalidArgument"
        assert [s.config.name for s in store.list()] == ["a", "b"]
        with pytest.raises(StoreError) as err:
            store.define(a)
        assert err.value.name == ERR + "InvalidArgument" and "already defined" in str(err.value)
        store.define(c)
        assert [s.config.name for s in store.list()] == ["a", "b", "c"]

        with sqlite3.connect(db) as other:            # the table vanishes under the store
            other.execute("ALTER TABLE domains RENAME TO elsewhere")
        for call in (store.list, lambda: store.define(_cfg("d", str(uuidlib.uuid4()))),
                     lambda: store.define_many([_cfg("e", str(uuidlib.uuid4()))]),
                     lambda: store.undefine(a.uuid), lambda: store.update(a, b)):
            with pytest.raises(StoreError) as err:
                call()
            assert err.value.name == ERR + "Failed" and "no such table" in str(err.value)
        with sqlite3.connect(db) as other:            # back: the store works again
            other.execute("ALTER TABLE elsewhere RENAME TO domains")
        store.undefine(a.uuid)
        assert [s.config.name for s in store.list()] == ["b", "c"]
    finally:
        store.close()
    with pytest.raises(StoreError) as err:
        store.list()
    assert err.value.name == ERR + "Failed"


def test_sqlite_failure_does_not_fail_the_other_stores(dbus_address, conn, tmp_path, caplog):
    """An SQLite store that fails (its table gone) keeps its last known definitions;
    the libvirt store is still listed, writes to SQLite fail with Error.Failed, the
    failure is logged once, and everything is back when SQLite is."""
    async def scenario():
        db = tmp_path / "m.db"
        handle, client, rec = await _setup(dbus_address, conn, tmp_path, poll=0.05)
        try:
            kept = await client.define_domain({"Name": "kept"})
            with sqlite3.connect(db) as other:
                other.execute("ALTER TABLE domains RENAME TO elsewhere")
            await eventually(lambda: any("cannot list" in r.getMessage()
                                         for r in caplog.records), what="failure noticed")
            await asyncio.sleep(0.3)                       # several polls
            reply = await rec.call("ListDomains")
            assert reply.message_type == MessageType.METHOD_RETURN, reply.body
            assert {e["UUID"].value for e in reply.body[0]} == {kept, TEST_UUID}
            err = await _error(client.define_domain({"Name": "lost"}))
            assert err.name == ERR + "Failed" and "no such table" in err.message
            assert len([r for r in caplog.records if "cannot list" in r.getMessage()]) == 1
            assert not [r for r in caplog.records            # no "failed" traceback
                        if r.levelno >= logging.ERROR and r.name.startswith("cim_provider")]
            assert rec.signals == [("DomainDefined", kept)]

            with sqlite3.connect(db) as other:
                other.execute("ALTER TABLE elsewhere RENAME TO domains")
            await eventually(lambda: any("works again" in r.getMessage()
                                         for r in caplog.records), what="recovery logged")
            assert await client.define_domain({"Name": "stored"})
        finally:
            await _teardown(handle, client, rec)
    with caplog.at_level(logging.INFO, logger="cim_provider.manager.service"):
        run(scenario())


def test_poll_failures_are_logged_once(dbus_address, conn, tmp_path, caplog):
    """A poll that fails as a whole (storage not answering within the deadline) is a
    warning when it starts and a note when it ends, not a line per poll."""
    async def scenario():
        handle = await serve_manager(dbus_address, [SqliteStore(tmp_path / "m.db")], conn,
                                     poll_interval=0.02)
        service = handle.service
        try:
            service.call_timeout = 0                   # no store call can finish in time
            await eventually(lambda: any("cannot re-read" in r.getMessage()
                                         for r in caplog.records), what="poll failure logged")
            await asyncio.sleep(0.3)                   # many more failing polls
            service.call_timeout = 30
            await eventually(lambda: any("polling works again" in r.getMessage()
                                         for r in caplog.records), what="recovery logged")
            failures = [r for r in caplog.records if "cannot re-read" in r.getMessage()]
            assert len(failures) == 1 and failures[0].levelno == logging.WARNING
        finally:
            await handle.stop()
    with caplog.at_level(logging.INFO, logger="cim_provider.manager.service"):
        run(scenario())


def test_libvirt_store_vcpus_never_lower_the_maximum(dbus_address, conn, tmp_path):
    """UpdateDomain(VCPUs) sets the current count; the maximum someone set with virsh
    stays, and is raised only when the new count needs it."""
    async def scenario():
        handle = await serve_manager(dbus_address, [LibvirtStore(LibvirtConnection(None, conn))],
                                     conn, poll_interval=0.1)
        client = ManagerClient(dbus_address)
        await client.start()
        config = libvirt.VIR_DOMAIN_AFFECT_CONFIG
        maximum = config | libvirt.VIR_DOMAIN_VCPU_MAXIMUM
        try:
            uuid = await client.define_domain({"Name": "cpus", "VCPUs": 2, "MemoryKiB": 65536})
            dom = conn.lookupByUUIDString(uuid)
            dom.setVcpusFlags(8, maximum)               # virsh setvcpus --maximum --config
            for vcpus, expected in ((4, (8, 4)), (1, (8, 1)), (12, (12, 12)), (3, (12, 3))):
                await client.update_domain(uuid, {"VCPUs": vcpus})
                assert (dom.vcpusFlags(maximum), dom.vcpusFlags(config)) == expected, vcpus
                assert (await client.get_domain(uuid)).vcpus == vcpus
        finally:
            await client.stop()
            await handle.stop()
    run(scenario())


def test_stop_leaves_the_bus_before_closing_the_stores(dbus_address, conn, tmp_path):
    """stop() releases the name first; a DefineDomain still running then completes
    (acknowledged and stored) instead of meeting a closed database."""
    async def scenario():
        db = tmp_path / "m.db"
        handle = await serve_manager(dbus_address, [SqliteStore(db)], conn, poll_interval=0.05)
        client = ManagerClient(dbus_address, call_timeout=20)
        await client.start()
        blocker = sqlite3.connect(db, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")       # another writer: the define must wait
            define = asyncio.create_task(client.define_domain({"Name": "in-flight"}))
            await eventually(lambda: handle.service._change_lock.locked(), within=5.0,
                             what="DefineDomain running")
            stop = asyncio.create_task(handle.stop())
            await wait_for_owner(dbus_address, present=False)   # the name goes first
            assert not define.done() and not stop.done()
            blocker.execute("COMMIT")                 # now the define can write
            uuid = await define
            await stop
        finally:
            blocker.close()
            await client.stop()
            await handle.stop()
        reopened = SqliteStore(db)
        try:
            assert [s.config.uuid for s in reopened.list()] == [uuid]
        finally:
            reopened.close()
    run(scenario())


def test_stop_closes_the_libvirt_connections_it_opened(dbus_address, conn, tmp_path,
                                                       monkeypatch):
    """A `libvirt:URI` store spec makes serve_manager open a connection: stop() closes
    it, and the default one it opens when given none. A connection handed in (and
    `libvirt:` meaning that one) stays open."""
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", "test:///default")
    def closed(virconn):
        try:
            virconn.isAlive()
        except libvirt.libvirtError:
            return True
        return False

    async def scenario():
        handle = await serve_manager(dbus_address, ["libvirt:test:///default",
                                                    f"sqlite:{tmp_path / 'm.db'}"], None,
                                     poll_interval=0.05)
        lv_store = handle.service.stores[0]
        assert isinstance(lv_store, LibvirtStore)
        opened = lv_store.connection.get()
        service_conn = handle.service.libvirt.get()      # libvirt's default: test driver
        assert TEST_UUID in {d.UUIDString() for d in opened.listAllDomains()}
        await handle.stop()
        assert closed(opened) and closed(service_conn)

        handle = await serve_manager(dbus_address, ["libvirt:"], conn, poll_interval=0.05)
        assert handle.service.stores[0].connection.get() is conn
        await handle.stop()
        assert not closed(conn) and conn.isAlive()
    run(scenario())
