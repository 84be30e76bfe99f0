"""ManagerClient against real Managers on a private dbus-daemon: the minimal one
(required methods only), bad data, a slow one, and the reference Manager as a separate
process that is killed and restarted."""
import asyncio
import logging
import signal
import subprocess
import time

import pytest

from cim_provider.contract import (BUS_NAME, CHANGE_SIGNALS, ERROR_FAILED, ERROR_NOT_SUPPORTED,
                                   INTERFACE, OBJECT_PATH)
from cim_provider.contract.bus import (DBusError, NameFlag, PropertyAccess, Variant, connect,
                                       dbus_property, method)
from cim_provider.manager.service import serve_manager
from cim_provider.manager.store import SqliteStore
from cim_provider.sources.manager import (ManagerClient, ManagerError, ManagerNotSupported,
                                          ManagerTimeout, ManagerUnavailable)
try:
    from tests.support import eventually, manager_command, run, wait_for_owner
    from tests.support.bus_monitor import BusMonitor
    from tests.support.dbus_daemon import (DBusDaemon, dbus_address,  # noqa: F401 (fixture)
                                           subprocess_env)
    from tests.support.minimal_manager import MinimalManager, SignalingManager, serve_minimal
except ImportError:          # tests/ itself is on sys.path (rootdir-less layout)
    from support import eventually, manager_command, run, wait_for_owner
    from support.bus_monitor import BusMonitor
    from support.dbus_daemon import (DBusDaemon, dbus_address,  # noqa: F401 (fixture)
                                     subprocess_env)
    from support.minimal_manager import MinimalManager, SignalingManager, serve_minimal

pytestmark = pytest.mark.dbus

LOGGER = "cim_provider.sources.manager"
UUID_A = "11111111-2222-3333-4444-555555555555"
UUID_B = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
UUID_C = "12345678-1234-5678-1234-567812345678"
GOOD_A = {"UUID": Variant("s", UUID_A), "Name": Variant("s", "good-a")}
GOOD_B = {"UUID": Variant("s", UUID_B), "Name": Variant("s", "good-b"),
          "VCPUs": Variant("u", 2), "MemoryKiB": Variant("t", 1 << 20)}


def with_c(**extra):
    """An entry for UUID_C with the given raw variants (overriding the defaults)."""
    entry = {"UUID": Variant("s", UUID_C), "Name": Variant("s", "case")}
    entry.update(extra)
    return {k: v for k, v in entry.items() if v is not None}


def disks(n):
    return Variant("aa{sv}", [{"Target": Variant("s", f"vd{i}")} for i in range(n)])


def nics(n):
    return Variant("aa{sv}", [{"MAC": Variant("s", f"52:54:00:00:{i // 256:02x}:{i % 256:02x}")}
                              for i in range(n)])


# (description, entry, expected): expected is the kept name, or None for "skipped with
# one warning". GOOD_A and GOOD_B are listed around every case and must always survive.
TESTCASES = [
    ("valid entry", with_c(), "case"),
    ("unknown keys are ignored", with_c(Colour=Variant("s", "blue"), Extra=Variant("ai", [1])),
     "case"),
    ("upper-case UUID is canonicalised", with_c(UUID=Variant("s", UUID_C.upper())), "case"),
    ("256 disks is still sane", with_c(Disks=disks(256)), "case"),
    ("UUID missing", with_c(UUID=None), None),
    ("UUID malformed", with_c(UUID=Variant("s", "not-a-uuid")), None),
    ("UUID empty", with_c(UUID=Variant("s", "")), None),
    ("UUID of the wrong type", with_c(UUID=Variant("ay", b"\x11" * 16)), None),
    ("Name missing", with_c(Name=None), None),
    ("Name empty", with_c(Name=Variant("s", "   ")), None),
    ("Name of the wrong type", with_c(Name=Variant("i", 7)), None),
    ("VCPUs as a string", with_c(VCPUs=Variant("s", "4")), None),
    ("VCPUs absurd", with_c(VCPUs=Variant("u", 5000)), None),
    ("VCPUs zero", with_c(VCPUs=Variant("u", 0)), None),
    ("MemoryKiB signed and negative", with_c(MemoryKiB=Variant("x", -5)), None),
    ("MemoryKiB beyond 16 EiB", with_c(MemoryKiB=Variant("t", 2 ** 63)), None),
    ("MaxMemoryKiB beyond 16 EiB", with_c(MaxMemoryKiB=Variant("t", 2 ** 55)), None),
    ("Autostart as an integer", with_c(Autostart=Variant("u", 1)), None),
    ("Title too long", with_c(Title=Variant("s", "x" * 5000)), None),
    ("Disks not an array of dicts", with_c(Disks=Variant("as", ["vda"])), None),
    ("a disk without Target", with_c(Disks=Variant("aa{sv}", [{"Source": Variant("s", "/x")}])),
     None),
    ("CapacityBytes of the wrong type",
     with_c(Disks=Variant("aa{sv}", [{"Target": Variant("s", "vda"),
                                      "CapacityBytes": Variant("d", 1.5)}])), None),
    ("257 disks", with_c(Disks=disks(257)), None),
    ("257 NICs", with_c(NICs=nics(257)), None),
    ("a NIC with a malformed MAC",
     with_c(NICs=Variant("aa{sv}", [{"MAC": Variant("s", "52:54:00:zz:00:01")}])), None),
    ("two NICs with one MAC",
     with_c(NICs=Variant("aa{sv}", [{"MAC": Variant("s", "52:54:00:00:00:01")}] * 2)), None),
    ("a value wrapped twice", with_c(Name=Variant("v", Variant("s", "x"))), None),
    ("duplicate UUID (of good-a, other spelling)",
     {"UUID": Variant("s", UUID_A.upper()), "Name": Variant("s", "impostor")}, None),
]


def skip_warnings(caplog):
    return [r for r in caplog.records
            if r.name == LOGGER and r.levelno == logging.WARNING and "skipping" in r.getMessage()]


@pytest.mark.parametrize("desc, entry, expected", TESTCASES, ids=[c[0] for c in TESTCASES])
def test_bad_manager_data_is_skipped_with_one_warning(dbus_address, caplog, desc, entry,
                                                      expected):
    async def scenario():
        manager = await serve_minimal(dbus_address, [GOOD_A, entry, GOOD_B])
        client = ManagerClient(dbus_address, relist_interval=60)
        try:
            with caplog.at_level(logging.WARNING, logger=LOGGER):
                await client.start()
            defs = client.definitions
            assert defs is not None
            assert defs[UUID_A].name == "good-a"
            assert defs[UUID_B].name == "good-b" and defs[UUID_B].vcpus == 2
            warnings = skip_warnings(caplog)
            if expected is None:
                assert set(defs) == {UUID_A, UUID_B}, desc
                assert len(warnings) == 1, [w.getMessage() for w in warnings]
            else:
                assert defs[UUID_C].name == expected
                assert warnings == []
        finally:
            await client.stop()
            await manager.stop()
    run(scenario())


def test_warnings_are_not_repeated_on_every_relist(dbus_address, caplog):
    async def scenario():
        bad = with_c(VCPUs=Variant("u", 99999))
        manager = await serve_minimal(dbus_address, [GOOD_A, bad])
        client = ManagerClient(dbus_address, relist_interval=0.05)
        try:
            with caplog.at_level(logging.WARNING, logger=LOGGER):
                await client.start()
                # the Manager counts the lists it answered: four reads of the same bad entry
                await eventually(lambda: manager.manager.list_calls >= 4, within=30.0,
                                 what="four lists")
            assert len(skip_warnings(caplog)) == 1
        finally:
            await client.stop()
            await manager.stop()
    run(scenario())


def test_minimal_manager(dbus_address):
    """Only the two required methods: list, start (recorded), poll for changes."""
    async def scenario():
        manager = await serve_minimal(dbus_address, [GOOD_A, GOOD_B])
        changes = []
        client = ManagerClient(dbus_address, relist_interval=0.2, on_change=changes.append)
        try:
            await client.start()
            assert client.present
            assert set(client.definitions) == {UUID_A, UUID_B}
            assert changes == [client.definitions]
            assert not client.knows_twins and client.active == set()
            assert client.offers("ListInactiveDomains") and client.offers("StartDomain")
            for optional in ("ListDomains", "DefineDomain", "DomainChanged", "Generation"):
                assert not client.offers(optional)

            assert await client.start_domain(UUID_A.upper()) == UUID_A
            assert manager.manager.starts == [UUID_A]
            # No signals: the client notices by re-listing on its interval.
            await eventually(lambda: set(client.definitions) == {UUID_B}, within=1.0,
                             what="re-list after start")
            assert changes[-1] == client.definitions

            with pytest.raises(ManagerError) as err:
                await client.start_domain(UUID_C)
            assert err.value.name == "org.example.virt.Error.NotFound"
            with pytest.raises(ManagerError) as err:
                await client.start_domain("no-uuid")
            assert err.value.name == "org.example.virt.Error.InvalidArgument"
            assert manager.manager.starts == [UUID_A, UUID_C]
            with pytest.raises(ManagerNotSupported):
                await client.define_domain({"Name": "x"})
            with pytest.raises(ManagerNotSupported):
                await client.get_domain(UUID_B)
        finally:
            await client.stop()
            await manager.stop()
    run(scenario())


class GetDomainManager(MinimalManager):
    """The minimal Manager plus GetDomain, which introspection shows."""

    @method()
    async def GetDomain(self, uuid: "s") -> "a{sv}":
        for e in self.entries:
            if getattr(e.get("UUID"), "value", None) == uuid:
                return e
        raise DBusError("org.example.virt.Error.NotFound", f"no definition with UUID {uuid}")


def test_optional_method_called_anyway_maps_unknown_method(dbus_address):
    """A Manager that offered GetDomain when introspected, then lost it without leaving
    the bus (it exports another object at the same path, still owning the name): the
    client still believes the introspection, calls it, and the bus library's own
    UnknownMethod reply becomes ManagerNotSupported."""
    async def scenario():
        running = await serve_minimal(dbus_address, manager=GetDomainManager([GOOD_A]))
        client = ManagerClient(dbus_address, relist_interval=60)
        try:
            await client.start()
            assert client.offers("GetDomain")
            assert (await client.get_domain(UUID_A)).name == "good-a"
            running.bus.unexport(OBJECT_PATH, running.manager)
            running.bus.export(OBJECT_PATH, MinimalManager([GOOD_A]))
            assert client.offers("GetDomain")     # nothing told the client
            with pytest.raises(ManagerNotSupported) as err:
                await client.get_domain(UUID_A)
            assert err.value.name == "org.freedesktop.DBus.Error.UnknownMethod"
        finally:
            await client.stop()
            await running.stop()
    run(scenario())


def test_manager_absent_at_start_then_appears_then_vanishes(dbus_address):
    async def scenario():
        changes = []
        client = ManagerClient(dbus_address, relist_interval=60, on_change=changes.append)
        await client.start()
        manager = None
        try:
            assert not client.present and client.definitions is None
            with pytest.raises(ManagerUnavailable):
                await client.start_domain(UUID_A)
            assert changes == []

            manager = await serve_minimal(dbus_address, [GOOD_A])
            await eventually(lambda: client.definitions is not None, within=1.0,
                             what="definitions after the Manager appeared")
            assert set(client.definitions) == {UUID_A} and client.present

            await manager.stop()
            manager = None
            await eventually(lambda: not client.present, within=1.0, what="absence")
            assert client.definitions is None and changes[-1] is None
            with pytest.raises(ManagerUnavailable):
                await client.start_domain(UUID_A)

            manager = await serve_minimal(dbus_address, [GOOD_B])
            await eventually(lambda: client.definitions is not None, within=1.0,
                             what="definitions after the Manager came back")
            assert set(client.definitions) == {UUID_B}
            assert [None if c is None else set(c) for c in changes] == \
                [{UUID_A}, None, {UUID_B}]
        finally:
            await client.stop()
            if manager:
                await manager.stop()
    run(scenario())


def test_slow_manager_times_out_cleanly(dbus_address, caplog):
    async def scenario():
        manager = await serve_minimal(dbus_address, [GOOD_A], delay=1.5)
        client = ManagerClient(dbus_address, call_timeout=0.2, start_timeout=0.3,
                               relist_interval=60)
        try:
            with caplog.at_level(logging.WARNING, logger=LOGGER):
                await client.start()          # must not hang nor raise
            # start() waits for the first listing no longer than a call: it says so
            assert client.present and client.definitions is None
            assert any("passive domains not listed yet" in r.getMessage()
                       for r in caplog.records)
            assert client.status.state == "degraded"
            with pytest.raises(ManagerTimeout) as err:
                await client.start_domain(UUID_A)
            assert "StartDomain" in err.value.message and "0.3 s" in err.value.message
            assert isinstance(err.value, ManagerError)
        finally:
            await client.stop()
            await manager.stop()
    run(scenario())


def _generation_read(seen):
    return seen.property_read == "Generation" and seen.body[0] == INTERFACE


def test_signals_replace_polling(dbus_address, tmp_path):
    """With the signals offered, the client re-lists on change only (debounced), and
    otherwise reads only every safety_relist, never every relist_interval.

    Watched with a bus monitor: every call anyone makes to the reference Manager (the
    client is the only caller) and its change signals. No sleeping: the test waits for
    the client's first safety read, which cannot come sooner than safety_relist after
    its first listing (so after start() was called); polling would come one
    relist_interval (0.05 s) after it."""
    safety = 1.0

    async def scenario():
        handle = await serve_manager(dbus_address, [SqliteStore(tmp_path / "m.db")], None,
                                     poll_interval=60)
        monitor = BusMonitor(dbus_address, [f"type='method_call',destination='{BUS_NAME}'",
                                            f"type='signal',interface='{INTERFACE}'"]).start()
        client = ManagerClient(dbus_address, relist_interval=0.05, safety_relist=safety)
        try:
            called = time.monotonic()
            await client.start()
            await eventually(lambda: client.definitions is not None, within=30.0,
                             what="the first listing")
            assert client.knows_twins and client.offers("DomainChanged")
            assert client.offers("Generation") and client.definitions == {}

            def calls(seen, member=None):
                return [s for s in seen if s.kind == "call" and member in (None, s.member)]
            # The reference Manager offers the paged listing: the first sync is a walk in
            # pages (Generation read first, the changes made meanwhile after), and the
            # safety read is then ListChangesSince instead of a Generation read.
            paged = client.offers("ListDomainsPage") and client.offers("ListChangesSince")
            first_sync = (["Introspect", "Get", "ListDomainsPage", "ListChangesSince"] if paged
                          else ["Introspect", "ListDomains"])
            if client.offers("ListTemplates"):      # read once, then on TemplatesChanged
                first_sync.insert(1, "ListTemplates")

            def safety_reads(seen):
                later = calls(seen)[len(first_sync):]
                return [c for c in later if _generation_read(c) or c.member == "ListChangesSince"]
            reads = await monitor.until(safety_reads, within=30.0, what="the safety read")
            before = [c.member for c in calls(monitor.seen()) if c.at < reads[0].at]
            assert before == first_sync, before
            assert reads[0].at - called >= safety, \
                f"safety read {reads[0].at - called:.3f} s after start(), not after {safety}"

            mark = len(monitor.seen())
            uuids = await asyncio.gather(*(client.define_domain({"Name": f"d{i}"})
                                           for i in range(5)))
            await eventually(lambda: set(client.definitions or {}) == set(uuids), within=30.0,
                             what="definitions after DefineDomain")

            def listed_after_defines(seen):
                defines = [i for i, s in enumerate(seen) if s.member == "DefineDomain"]
                return len(defines) == 5 and listings(seen[defines[-1]:]) and seen

            def listings(seen):
                return [c for c in calls(seen)
                        if c.member in ("ListDomains", "ListDomainsPage", "ListChangesSince")]
            after = (await monitor.until(lambda seen: listed_after_defines(seen[mark:]),
                                         within=30.0, what="a listing after the five defines"))
            lists = listings(after)
            signals = [s for s in after if s.kind == "signal" and s.member in CHANGE_SIGNALS]
            reads = [c for c in after if _generation_read(c)]
            # Each listing has a cause the monitor saw before it: a change signal, or a
            # safety read (paged: itself a ListChangesSince, at most one in this window).
            # So at least one listing, and never more than one per cause (a burst of
            # signals may share one: debounced).
            assert signals and 1 <= len(lists) <= len(signals) + len(reads) + int(paged), \
                (len(lists), len(signals), len(reads))
        finally:
            await client.stop()
            monitor.stop()
            await handle.stop()
    run(scenario())


def _spawn(address, db):
    return subprocess.Popen(
        manager_command("--bus", address, "--store", f"sqlite:{db}",
                        "--libvirt-uri", "test:///default", "--poll-interval", "0.2",
                        "--log-level", "WARNING"),
        env=subprocess_env(address), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_reference_manager_killed_and_restarted(dbus_address, tmp_path):
    """A separate `cim-provider manager` process: the client follows it within 1 s."""
    db = tmp_path / "manager.db"

    async def scenario():
        changes = []
        client = ManagerClient(dbus_address, relist_interval=60, on_change=changes.append)
        await client.start()
        procs = []
        try:
            assert not client.present
            procs.append(_spawn(dbus_address, db))
            await wait_for_owner(dbus_address)
            await eventually(lambda: client.definitions is not None, within=1.0,
                             what="first list")
            assert client.knows_twins and client.definitions == {}
            uuid = await client.define_domain({"Name": "durable", "MemoryKiB": 65536,
                                               "Disks": [{"Target": "vda", "Source": "/d.img"}]})
            await eventually(lambda: uuid in client.definitions, within=1.0, what="define seen")
            before = dict(client.definitions)

            procs[0].kill()                   # SIGKILL: no goodbye on the bus
            procs[0].wait()
            await eventually(lambda: not client.present, within=1.0, what="absence after kill")
            assert client.definitions is None and changes[-1] is None

            procs.append(_spawn(dbus_address, db))
            await wait_for_owner(dbus_address)
            await eventually(lambda: client.definitions is not None, within=1.0,
                             what="list after restart")
            assert client.definitions == before        # durable across kill -9

            procs[1].send_signal(signal.SIGTERM)
            assert await asyncio.get_running_loop().run_in_executor(None, procs[1].wait, 10) == 0
            await eventually(lambda: not client.present, within=1.0, what="absence after stop")
        finally:
            await client.stop()
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
                p.stderr.close()
    run(scenario())


def test_bus_absent_at_start_then_up_then_down(tmp_path):
    """start() does not fail without a bus; the client connects when it comes, and
    treats the bus going away as the Manager going away."""
    socket = tmp_path / "bus"
    address = f"unix:path={socket}"

    async def scenario():
        changes = []
        client = ManagerClient(address, relist_interval=60, on_change=changes.append)
        await client.start()
        daemon = manager = None
        try:
            assert not client.present and client.definitions is None
            daemon = DBusDaemon(socket)
            manager = await serve_minimal(address, [GOOD_A])
            await eventually(lambda: client.definitions is not None, within=5.0,
                             what="reconnect (with back-off) and list")
            daemon.stop()
            daemon = None
            await eventually(lambda: not client.present, within=1.0, what="bus loss noticed")
            assert client.definitions is None and changes[-1] is None
        finally:
            await client.stop()
            if manager:
                await manager.stop()
            if daemon:
                daemon.stop()
    run(scenario())


class PollingManager(MinimalManager):
    """ListDomains and Generation but no signals: the client polls Generation and
    re-lists only when it moved."""

    def __init__(self, entries):
        super().__init__(entries)
        self.generation = 1
        self.list_calls = 0
        self.generation_failures = []    # error names the next Generation reads reply with
        self.calls = []                  # "list", "generation" or "generation failed"

    @method()
    async def ListDomains(self) -> "aa{sv}":
        self.list_calls += 1
        self.calls.append("list")
        return [dict(e, Active=Variant("b", i == 0)) for i, e in enumerate(self.entries)]

    @dbus_property(access=PropertyAccess.READ)
    def Generation(self) -> "t":
        if self.generation_failures:
            self.calls.append("generation failed")
            name = self.generation_failures.pop(0)
            raise DBusError(name, f"Generation fails this once with {name} (a test)")
        self.calls.append("generation")
        return self.generation


def test_generation_spares_relists_without_signals(dbus_address):
    async def scenario():
        bus = await connect(dbus_address)
        manager = PollingManager([GOOD_A, GOOD_B])
        bus.export(OBJECT_PATH, manager)
        await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
        client = ManagerClient(dbus_address, relist_interval=0.05)
        try:
            await client.start()
            assert client.knows_twins and client.offers("Generation")
            assert not client.offers("DomainChanged")
            assert set(client.definitions) == {UUID_A, UUID_B} and client.active == {UUID_A}
            # six polls of an unchanged Generation (counted by the Manager), and no list
            mark = len(manager.calls)
            await eventually(lambda: manager.calls[mark:].count("generation") >= 6,
                             within=30.0, what="six polls of Generation")
            assert "list" not in manager.calls[mark:], manager.calls[mark:]
            manager.entries = [GOOD_B]
            manager.generation += 1
            await eventually(lambda: set(client.definitions) == {UUID_B}, within=30.0,
                             what="re-list after Generation moved")
            assert client.active == {UUID_B}
            # refresh() re-lists now, even when Generation did not move.
            manager.entries = [GOOD_A]
            await client.refresh()
            assert set(client.definitions) == {UUID_A}
        finally:
            await client.stop()
            bus.disconnect()
    run(scenario())


class TimedSignalingManager(SignalingManager):
    """Also notes when each list call arrived (time.monotonic())."""

    def __init__(self, entries):
        super().__init__(entries)
        self.list_started = []

    async def _listing(self) -> None:
        self.list_started.append(time.monotonic())
        await super()._listing()


@pytest.mark.parametrize("failure", [ERROR_FAILED, 1.0], ids=["Error.Failed", "timeout"])
def test_failed_relist_after_a_signal_is_retried(dbus_address, caplog, failure):
    """With signals, a re-list that fails is retried every relist_interval until one
    works: the change the signal announced is not lost until the next signal."""
    safety = 1.0

    async def scenario():
        running = await serve_minimal(dbus_address, manager=TimedSignalingManager([GOOD_A]))
        manager = running.manager
        client = ManagerClient(dbus_address, call_timeout=0.2, list_timeout=0.2,
                               relist_interval=0.05, safety_relist=safety)
        try:
            await client.start()
            assert client.offers("DomainDefined") and client.knows_twins
            assert set(client.definitions) == {UUID_A}
            manager.failures.append(failure)
            manager.entries.append(GOOD_B)
            manager.active.add(UUID_B)
            with caplog.at_level(logging.WARNING, logger=LOGGER):
                manager.DomainDefined(UUID_B)
                await eventually(lambda: set(client.definitions) == {UUID_A, UUID_B},
                                 within=30.0, what="the failed re-list retried")
            assert manager.failures == [] and client.active == {UUID_B}
            assert any("cannot read" in r.getMessage() for r in caplog.records)
            # Once a read worked, signals alone drive the re-lists again: the next list
            # is the safety re-list, which cannot start sooner than safety_relist after
            # the read that worked (the last list started so far) did; polling would
            # have come one relist_interval (0.05 s) after it.
            worked = len(manager.list_started)
            await eventually(lambda: len(manager.list_started) > worked, within=30.0,
                             what="the safety re-list")
            gap = manager.list_started[worked] - manager.list_started[worked - 1]
            assert gap >= safety, f"listed again after {gap:.3f} s: polling"
        finally:
            await client.stop()
            await running.stop()
    run(scenario())


def test_safety_relist_finds_a_change_whose_signal_was_lost(dbus_address):
    async def scenario():
        running = await serve_minimal(dbus_address, manager=SignalingManager([GOOD_A]))
        client = ManagerClient(dbus_address, relist_interval=60, safety_relist=0.1)
        try:
            await client.start()
            assert client.offers("DomainChanged") and set(client.definitions) == {UUID_A}
            running.manager.entries.append(GOOD_B)        # and no signal
            await eventually(lambda: set(client.definitions) == {UUID_A, UUID_B},
                             within=2.0, what="safety re-list")
        finally:
            await client.stop()
            await running.stop()
    run(scenario())


def test_contract_not_supported_does_not_demote_list_domains(dbus_address):
    """Error.NotSupported from ListDomains fails that read only; UnknownMethod is what
    says the Manager does not have it."""
    async def scenario():
        running = await serve_minimal(dbus_address, manager=SignalingManager([GOOD_A]))
        manager = running.manager
        manager.active.add(UUID_A)
        manager.failures.append(ERROR_NOT_SUPPORTED)
        client = ManagerClient(dbus_address, relist_interval=0.05)
        try:
            await client.start()              # the first read fails, and is retried
            await eventually(lambda: client.definitions is not None, within=2.0,
                             what="list after Error.NotSupported")
            assert client.knows_twins and client.offers("ListDomains")
            assert set(client.definitions) == {UUID_A} and client.active == {UUID_A}

            manager.failures.append("org.freedesktop.DBus.Error.UnknownMethod")
            manager.active.clear()
            manager.DomainChanged(UUID_A)
            await eventually(lambda: not client.knows_twins, within=2.0,
                             what="demoted after UnknownMethod")
            assert client.offers("ListInactiveDomains") and set(client.definitions) == {UUID_A}
        finally:
            await client.stop()
            await running.stop()
    run(scenario())


def test_contract_not_supported_does_not_demote_generation(dbus_address):
    async def scenario():
        bus = await connect(dbus_address)
        manager = PollingManager([GOOD_A])
        bus.export(OBJECT_PATH, manager)
        await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
        client = ManagerClient(dbus_address, relist_interval=0.05)
        try:
            await client.start()
            assert client.offers("Generation")
            manager.generation_failures.append(ERROR_NOT_SUPPORTED)
            await eventually(lambda: not manager.generation_failures, within=30.0,
                             what="Generation read failing")
            failed = manager.calls.index("generation failed")
            # Still used: once a re-list has replaced the failed shortcut, unchanged
            # Generation reads spare the re-lists again. Wait for eight polls after the
            # failure, then the last five must be Generation reads alone.
            await eventually(lambda: manager.calls[failed + 1:].count("generation") >= 8,
                             within=30.0, what="eight polls after the failed Generation read")
            after = manager.calls[failed + 1:]
            assert after[0] == "list", after          # a re-list instead of the shortcut
            assert after[-5:] == ["generation"] * 5, after
            assert client.offers("Generation")

            manager.generation_failures.append("org.freedesktop.DBus.Error.UnknownProperty")
            await eventually(lambda: not client.offers("Generation"), within=30.0,
                             what="demoted after UnknownProperty")
        finally:
            await client.stop()
            bus.disconnect()
    run(scenario())


def test_start_domain_gets_its_own_longer_timeout(dbus_address):
    """A guest start may take far longer than a list: StartDomain waits start_timeout
    (60 s by default), not call_timeout."""
    async def scenario():
        running = await serve_minimal(dbus_address, [GOOD_A, GOOD_B])
        running.manager.start_delay = 0.5                # longer than call_timeout
        client = ManagerClient(dbus_address, call_timeout=0.1, relist_interval=60)
        try:
            assert client.start_timeout == 60
            await client.start()
            assert set(client.definitions) == {UUID_A, UUID_B}
            assert await client.start_domain(UUID_A) == UUID_A
            assert running.manager.starts == [UUID_A]
        finally:
            await client.stop()
            await running.stop()
    run(scenario())


def test_the_manager_is_followed_while_libvirts_first_attempt_waits(dbus_address, tmp_path):
    """start_sources starts the Manager client beside libvirt's first attempt, not after
    it (issue 16, start-up): with a libvirt endpoint that takes the connection and never
    answers, the Manager is listed while libvirt's open still waits, and its definition
    is in the inventory once libvirt's attempt has failed."""
    import socket
    import threading
    from cim_provider.server.main import start_sources
    path = tmp_path / "silent.sock"
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(str(path))
    silent.listen(4)
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(silent.accept()[0]), daemon=True).start()

    def hang_up() -> None:
        for sock in held + [silent]:
            sock.close()

    async def scenario():
        manager = await serve_minimal(dbus_address, [GOOD_A])
        starting = asyncio.ensure_future(start_sources(
            libvirt_uri=f"qemu+unix:///system?socket={path}", manager_bus=dbus_address,
            call_timeout=60, relist_interval=60, metrics_interval=0))
        sources = None
        try:
            await eventually(lambda: held, within=30, what="libvirt's connection")
            await eventually(lambda: manager.manager.list_calls > 0, within=30,
                             what="the Manager listed while libvirt's open waits")
            assert not starting.done()
            hang_up()                     # libvirt's first attempt fails now
            sources = await asyncio.wait_for(starting, 30)
            assert not sources.libvirt.connected
            assert [r.uuid for r in sources.inventory.records()] == [UUID_A]
        finally:
            hang_up()
            if sources is None:
                starting.cancel()
                await asyncio.gather(starting, return_exceptions=True)
            else:
                await sources.close()
            await manager.stop()
    run(scenario(), timeout=120)


def test_serve_passes_manager_start_timeout(dbus_address):
    """`cim-provider serve --manager-start-timeout` reaches the ManagerClient."""
    import argparse
    from cim_provider.server.main import add_arguments, start_sources
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).manager_start_timeout == 60.0
    args = parser.parse_args(["--manager-start-timeout", "120", "--manager-timeout", "3"])
    assert (args.manager_start_timeout, args.manager_timeout) == (120.0, 3.0)

    async def scenario():
        sources = await start_sources(libvirt_uri="test:///default", manager_bus=dbus_address,
                                      manager_timeout=args.manager_timeout,
                                      manager_start_timeout=args.manager_start_timeout)
        try:
            assert sources.manager.start_timeout == 120.0
            assert sources.manager.call_timeout == 3.0
        finally:
            await sources.close()
    run(scenario())
