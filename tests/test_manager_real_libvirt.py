"""The reference Manager against a real libvirtd (a private daemon serving the test
driver over its socket, tests/support/libvirtd.py): NICs on a network or a bridge,
autostart once per host boot, names unique across the host (running transient
domains too) and renames of running domains, UndefineDomain refused while libvirt
holds snapshots or a managed save, storage volumes as disks, and libvirt's lifecycle
events followed instead of a fast poll."""
import json
import logging
import uuid as uuidlib
import xml.etree.ElementTree as ET

import libvirt
import pytest

from cim_provider.manager.policy import PolicyOptions
from cim_provider.manager.service import serve_manager
from cim_provider.manager.store import LibvirtConnection, LibvirtStore, SqliteStore
from cim_provider.sources.libvirt_events import ensure_event_loop_impl
from cim_provider.sources.manager import ManagerClient, ManagerError

try:
    from tests.support import eventually, run
    from tests.support.dbus_daemon import dbus_address  # noqa: F401 (fixture)
    from tests.support.libvirtd import Libvirtd
except ImportError:          # tests/ itself is on sys.path (rootdir-less layout)
    from support import eventually, run  # type: ignore
    from support.dbus_daemon import dbus_address  # type: ignore # noqa: F401 (fixture)
    from support.libvirtd import Libvirtd  # type: ignore

pytestmark = pytest.mark.dbus

TEST_UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"     # "test": running, persistent


@pytest.fixture
def libvirtd(tmp_path):
    try:
        daemon = Libvirtd()
        daemon.start()
    except (FileNotFoundError, RuntimeError, TimeoutError) as exc:
        pytest.skip(f"no private libvirtd here: {exc}")
    yield daemon
    daemon.cleanup()


class Setup:
    """A Manager on the private daemon: stores as asked, a client, a side connection."""

    async def start(self, address, daemon, tmp_path, *, libvirt_first=False, sqlite=True,
                    libvirt_store=True, **kw):
        ensure_event_loop_impl()          # libvirt events on this test's loop
        self.conn = LibvirtConnection(daemon.uri)
        stores = []
        if sqlite:
            stores.append(SqliteStore(tmp_path / "m.db"))
        if libvirt_store:
            stores.insert(0 if libvirt_first else len(stores), LibvirtStore(self.conn))
        kw.setdefault("poll_interval", 0.2)
        self.handle = await serve_manager(address, stores, self.conn, **kw)
        self.service = self.handle.service
        self.client = ManagerClient(address, call_timeout=30)
        await self.client.start()
        self.side = libvirt.open(daemon.uri)       # what virsh would do
        return self

    async def stop(self):
        await self.client.stop()
        await self.handle.stop()
        for store in self.service.stores:
            store.close()
        self.conn.close()
        self.side.close()

    def dom(self, uuid):
        return self.side.lookupByUUIDString(uuid)


def _props(name, **extra):
    return {"UUID": str(uuidlib.uuid4()), "Name": name, "Type": "Test", "MemoryKiB": 65536,
            **extra}


async def _error(coro):
    with pytest.raises(ManagerError) as err:
        await coro
    return err.value


# ---------------------------------------------------------------- NICs (Connection)

def _interfaces(xml):
    out = {}
    for n in ET.fromstring(xml).findall("devices/interface"):
        src = n.find("source")
        out[n.find("mac").get("address")] = (n.get("type"), dict(src.attrib) if src is not None
                                             else {})
    return out


def test_nics_on_a_network_or_a_bridge(dbus_address, libvirtd, tmp_path):
    async def scenario():
        s = await Setup().start(dbus_address, libvirtd, tmp_path, libvirt_first=True)
        try:
            nics = [{"MAC": "52:54:00:00:00:01", "Source": "default"},
                    {"MAC": "52:54:00:00:00:02", "Source": "bridge:br0"},
                    {"MAC": "52:54:00:00:00:03", "Type": "bridge", "Source": "br1"},
                    {"MAC": "52:54:00:00:00:04"}]
            # a libvirt-store definition: libvirt's own XML
            uuid = await s.client.define_domain(_props("nets", NICs=nics))
            got = _interfaces(s.dom(uuid).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            assert got["52:54:00:00:00:01"] == ("network", {"network": "default"})
            assert got["52:54:00:00:00:02"] == ("bridge", {"bridge": "br0"})
            assert got["52:54:00:00:00:03"] == ("bridge", {"bridge": "br1"})
            assert got["52:54:00:00:00:04"][0] == "user"
            listed = {n.mac: (n.type, n.source) for n in (await s.client.get_domain(uuid)).nics}
            assert listed["52:54:00:00:00:02"] == ("bridge", "br0")
            assert listed["52:54:00:00:00:01"] == ("network", "default")
        finally:
            await s.stop()
    run(scenario())


def test_an_sqlite_definition_starts_on_its_bridge(dbus_address, libvirtd, tmp_path):
    async def scenario():
        s = await Setup().start(dbus_address, libvirtd, tmp_path)
        try:
            uuid = await s.client.define_domain(_props("bridged", NICs=[
                {"MAC": "52:54:00:00:01:01", "Source": "bridge:br0", "Model": "virtio"}]))
            assert (await s.client.get_domain(uuid)).nics[0].type == "bridge"
            await s.client.start_domain(uuid)
            got = _interfaces(s.dom(uuid).XMLDesc(0))
            assert got["52:54:00:00:01:01"] == ("bridge", {"bridge": "br0"})
        finally:
            await s.stop()
    run(scenario())


# ---------------------------------------------------------------- autostart

def test_autostart_once_per_boot_through_the_policy(dbus_address, libvirtd, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cim_provider.manager")
    state = tmp_path / "m.db.autostart"
    db = SqliteStore(tmp_path / "m.db")
    from cim_provider.contract import config_from_values
    auto = config_from_values(_props("auto-on", Autostart=True))
    manual = config_from_values(_props("auto-off", Autostart=False))
    big = config_from_values(_props("auto-big", Autostart=True, MemoryKiB=64 << 20))
    for cfg in (auto, manual, big):
        db.define(cfg)
    db.close()
    # the host as the policy sees it: 1 GiB, of which "test" holds some
    policy = PolicyOptions(host_memory_kib=8 << 20)

    async def once():
        s = await Setup().start(dbus_address, libvirtd, tmp_path, libvirt_store=False,
                                state_file=state, policy=policy)
        try:
            await s.service._autostarter
            running = {d.name() for d in s.side.listAllDomains(
                libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)}
            for d in s.side.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_TRANSIENT):
                d.destroy()
            return running
        finally:
            await s.stop()

    running = run(once())
    assert "auto-on" in running and "auto-off" not in running and "auto-big" not in running
    assert "autostart: auto-big" in caplog.text and "needs" in caplog.text
    boot = open("/proc/sys/kernel/random/boot_id").read().strip()
    assert json.loads(state.read_text())["autostarted_boot"] == boot
    # the Manager restarts within the same boot: nothing is started again
    caplog.clear()
    assert "auto-on" not in run(once())
    assert "already done for this boot" in caplog.text
    # another boot (as the state file says): started again
    state.write_text(json.dumps({"autostarted_boot": "an-earlier-boot"}))
    assert "auto-on" in run(once())


# ---------------------------------------------------------------- names

def test_names_are_unique_on_the_host_including_transient_domains(dbus_address, libvirtd,
                                                                  tmp_path):
    async def scenario():
        s = await Setup().start(dbus_address, libvirtd, tmp_path, libvirt_store=False)
        try:
            other = str(uuidlib.uuid4())
            s.side.createXML(f"<domain type='test'><name>transient-x</name><uuid>{other}</uuid>"
                             "<memory>65536</memory><os><type>hvm</type></os></domain>", 0)
            err = await _error(s.client.define_domain(_props("transient-x")))
            assert err.name.endswith(".InvalidArgument")
            assert "transient-x" in str(err) and other in str(err)
            # "test" is a persistent libvirt domain, not in any store here
            err = await _error(s.client.define_domain(_props("test")))
            assert err.name.endswith(".InvalidArgument") and TEST_UUID in str(err)
            uuid = await s.client.define_domain(_props("mine"))
            err = await _error(s.client.update_domain(uuid, {"Name": "transient-x"}))
            assert err.name.endswith(".InvalidArgument") and other in str(err)
            assert (await s.client.get_domain(uuid)).name == "mine"
        finally:
            await s.stop()
    run(scenario())


def test_renaming_a_running_domain_applies_at_its_next_start(dbus_address, libvirtd, tmp_path,
                                                             caplog):
    caplog.set_level(logging.INFO, logger="cim_provider.manager")

    async def scenario():
        s = await Setup().start(dbus_address, libvirtd, tmp_path)
        try:
            # libvirt store: "test" runs
            await s.client.update_domain(TEST_UUID, {"Name": "test-renamed"})
            assert (await s.client.get_domain(TEST_UUID)).name == "test-renamed"
            assert s.dom(TEST_UUID).name() == "test"          # still running as "test"
            assert "new name applies from its next start" in caplog.text
            s.dom(TEST_UUID).destroy()
            await eventually(lambda: s.dom(TEST_UUID).name() == "test-renamed", within=10,
                             what="the rename in libvirt")
            await s.client.start_domain(TEST_UUID)
            assert s.dom(TEST_UUID).name() == "test-renamed"
            # SQLite store: the same rule
            uuid = await s.client.define_domain(_props("sq"))
            await s.client.start_domain(uuid)
            await s.client.update_domain(uuid, {"Name": "sq-renamed"})
            assert (await s.client.get_domain(uuid)).name == "sq-renamed"
            assert s.dom(uuid).name() == "sq"
            s.dom(uuid).destroy()
            await eventually(lambda: not s.service._snapshot[uuid].active, within=10)
            await s.client.start_domain(uuid)
            assert s.dom(uuid).name() == "sq-renamed"
        finally:
            await s.stop()
    run(scenario())


# ---------------------------------------------------------------- undefine

def test_undefine_is_refused_while_libvirt_holds_snapshots_or_a_managed_save(
        dbus_address, libvirtd, tmp_path):
    async def scenario():
        s = await Setup().start(dbus_address, libvirtd, tmp_path, libvirt_first=True)
        try:
            uuid = await s.client.define_domain(_props("snappy"))
            dom = s.dom(uuid)
            dom.snapshotCreateXML("<domainsnapshot><name>before</name></domainsnapshot>", 0)
            err = await _error(s.client.undefine_domain(uuid))
            assert err.name.endswith(".Refused")
            assert "1 snapshot" in str(err) and "nothing was changed" in str(err)
            assert s.dom(uuid).isPersistent()
            dom.snapshotLookupByName("before").delete(0)
            # a managed save (the test driver keeps it in memory)
            dom.create()
            dom.managedSave(0)
            assert dom.hasManagedSaveImage(0)
            err = await _error(s.client.undefine_domain(uuid))
            assert err.name.endswith(".Refused") and "managed-save" in str(err)
            assert s.dom(uuid).isPersistent() and s.dom(uuid).hasManagedSaveImage(0)
            dom.managedSaveRemove(0)
            await s.client.undefine_domain(uuid)
            await eventually(lambda: uuid not in s.service._snapshot)
        finally:
            await s.stop()
    run(scenario())


# ---------------------------------------------------------------- storage volumes

def test_a_storage_volume_is_a_volume_disk_with_its_format(dbus_address, libvirtd, tmp_path):
    async def scenario():
        s = await Setup().start(dbus_address, libvirtd, tmp_path)
        try:
            pool = s.side.storagePoolLookupByName("default-pool")
            pool.createXML("<volume><name>guest.qcow2</name><capacity unit='M'>16</capacity>"
                           "<target><format type='qcow2'/></target></volume>", 0)
            uuid = await s.client.define_domain(_props("vol", Disks=[
                {"Target": "vda", "Source": "default-pool/guest.qcow2", "Bus": "virtio"}]))
            disk = (await s.client.get_domain(uuid)).disks[0]
            assert (disk.source_type, disk.source) == ("volume", "default-pool/guest.qcow2")
            await s.client.start_domain(uuid)
            d = ET.fromstring(s.dom(uuid).XMLDesc(0)).find("devices/disk")
            assert d.get("type") == "volume"
            assert d.find("source").attrib == {"pool": "default-pool", "volume": "guest.qcow2"}
            missing = await s.client.define_domain(_props("novol", Disks=[
                {"Target": "vda", "Source": "default-pool/absent.img"}]))
            err = await _error(s.client.start_domain(missing))
            assert err.name.endswith(".Failed") and "absent.img" in str(err)
        finally:
            await s.stop()
    run(scenario())


# ---------------------------------------------------------------- events, not polling

def test_libvirt_changes_arrive_by_events_with_only_a_slow_safety_poll(dbus_address, libvirtd,
                                                                       tmp_path, capfd):
    async def scenario():
        s = await Setup().start(dbus_address, libvirtd, tmp_path, libvirt_first=True,
                                poll_interval=0.2)
        try:
            await eventually(lambda: s.service._events_all, within=5,
                             what="libvirt events followed")
            assert s.service._poll_every() == 60.0
            uuid = str(uuidlib.uuid4())
            s.side.defineXML(f"<domain type='test'><name>behind</name><uuid>{uuid}</uuid>"
                             "<memory>65536</memory><os><type>hvm</type></os></domain>")
            await eventually(lambda: uuid in s.service._snapshot, within=5,
                             what="the definition made behind the Manager's back")
            s.dom(uuid).create()
            await eventually(lambda: s.service._snapshot[uuid].active, within=5)
            s.dom(uuid).destroy()
            await eventually(lambda: not s.service._snapshot[uuid].active, within=5)
            s.dom(uuid).undefine()
            await eventually(lambda: uuid not in s.service._snapshot, within=5)
            # libvirt's own error printing goes to the log, not to stderr
            capfd.readouterr()
            with pytest.raises(libvirt.libvirtError):
                s.side.lookupByName("no-such-domain")
            assert "libvirt:" not in capfd.readouterr().err
        finally:
            await s.stop()
    run(scenario())


def test_events_are_followed_again_after_libvirtd_restarts(dbus_address, libvirtd, tmp_path):
    async def scenario():
        s = await Setup().start(dbus_address, libvirtd, tmp_path, libvirt_first=True,
                                poll_interval=0.2)
        try:
            await eventually(lambda: s.service._events_all, within=5)
            s.side.close()
            libvirtd.restart()
            s.side = libvirt.open(libvirtd.uri)
            uuid = str(uuidlib.uuid4())
            s.side.defineXML(f"<domain type='test'><name>after</name><uuid>{uuid}</uuid>"
                             "<memory>65536</memory><os><type>hvm</type></os></domain>")
            # well before the 60 s safety poll
            await eventually(lambda: uuid in s.service._snapshot, within=10,
                             what="a definition made after libvirtd restarted")
            await eventually(lambda: s.service._events_all, within=5)
            s.dom(uuid).undefine()
            await eventually(lambda: uuid not in s.service._snapshot, within=5)
        finally:
            await s.stop()
    run(scenario())


def test_a_waiting_rename_survives_a_manager_restart(dbus_address, libvirtd, tmp_path):
    # the test driver forgets its state when its last connection closes: keep one
    keeper = libvirt.open(libvirtd.uri)

    async def scenario():
        s = await Setup().start(dbus_address, libvirtd, tmp_path, libvirt_first=True)
        try:
            await s.client.update_domain(TEST_UUID, {"Name": "later"})
            assert s.dom(TEST_UUID).name() == "test"
        finally:
            await s.stop()
        side = libvirt.open(libvirtd.uri)
        try:
            side.lookupByUUIDString(TEST_UUID).destroy()      # no Manager is running
        finally:
            side.close()
        s = await Setup().start(dbus_address, libvirtd, tmp_path, libvirt_first=True)
        try:
            assert (await s.client.get_domain(TEST_UUID)).name == "later"
            assert s.dom(TEST_UUID).name() == "later"
            assert "rename" not in s.dom(TEST_UUID).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        finally:
            await s.stop()
    try:
        run(scenario())
    finally:
        keeper.close()
