"""Latent bugs found in review, each shown on real parts (nothing mocked):

1. RequestStateChange: two requests on one system at once, the first failing, leave
   the second's (successful) value in RequestedState.
2. DestroySystem: a Manager that refuses UndefineDomain leaves the running domain
   running and defined (the Manager is asked first).
3. No task left behind: the indication service's worker closes, and VIRT_HostSystem's
   background refresh, are over once the service / the server is closed.
4. The users file, read from the loop and from the password-check threads: a re-read
   never brings back an older file, and one that is being rewritten never raises.
"""
import asyncio
import concurrent.futures
import signal
import sys
import threading
import time

import libvirt
import pytest
import pywbem

try:
    from tests.support.indications import (Console, LibvirtServer, Listener,
                                           quiet_pywbem_logs)
    from tests.support.libvirtd import Libvirtd
    from tests.support.model import (CS, HOST, TEST_UUID, LoopThread, MinimalModel,
                                      UndefiningManager, cim_error, connect_wbem, cs_path,
                                      domain_config, host_path, poll_until, rsc, vsms_path)
except ImportError:  # tests/ itself on sys.path
    from support.indications import (Console, LibvirtServer, Listener,  # type: ignore
                                     quiet_pywbem_logs)
    from support.libvirtd import Libvirtd  # type: ignore
    from support.model import (CS, HOST, TEST_UUID, LoopThread, MinimalModel,  # type: ignore
                               UndefiningManager, cim_error, connect_wbem, cs_path,
                               domain_config, host_path, poll_until, rsc, vsms_path)

from cim_provider.domain.domxml import config_to_domain_xml
from cim_provider.server import auth
from cim_provider.statefile import write_private

RACE = domain_config("review-race", memory_kib=16384)       # passive at the start
KEEP = domain_config("review-keep", memory_kib=16384)       # defined; started by the test


# ---------------------------------------------------------------- 1 and 2: a Manager

@pytest.fixture
def model():
    """Per test: its loop must be gone before the tests below bind libvirt to theirs."""
    m = MinimalModel([RACE, KEEP], relist=0.5, manager_timeout=5.0,
                     manager_start_timeout=30.0, manager_class=UndefiningManager)
    yield m
    m.close()


@pytest.fixture
def conn(model):
    c = model.conn()
    yield c
    c.close()


def _state(conn, uuid):
    inst = conn.GetInstance(cs_path(uuid))
    return int(inst["EnabledState"]), int(inst["RequestedState"])


@pytest.mark.dbus
def test_a_failed_state_change_keeps_a_concurrent_successful_one(model, conn):
    """Client 1 asks a passive system to start (2); the Manager is still at it when the
    domain starts underneath and client 2 pauses it (9, succeeds). Then the Manager's
    start fails (the domain runs already): client 1 gets CIM_ERR_FAILED, and
    RequestedState stays 9, client 2's request: not client 1's "previous" value (12)."""
    uuid = RACE.uuid
    assert _state(conn, uuid) == (3, 12)
    gate = threading.Event()
    model.manager.gate = gate
    first_conn = model.conn()
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(rsc, first_conn, uuid, 2)
            poll_until(lambda: uuid in model.manager.starts(), what="client 1 in StartDomain")
            assert _state(conn, uuid) == (3, 2)              # recorded before acting
            # the domain starts without the Manager, and the server sees it run
            model.libvirt.createXML(config_to_domain_xml(RACE), 0)
            poll_until(lambda: _state(conn, uuid)[0] == 2, what="the domain seen running")
            assert not first.done()
            assert rsc(conn, uuid, 9) == 0                   # client 2: pause, succeeds
            assert _state(conn, uuid) == (9, 9)
            gate.set()                                       # the Manager goes on, fails
            with pytest.raises(pywbem.CIMError) as failed:
                first.result(30)
        assert failed.value.status_code == pywbem.CIM_ERR_FAILED
        assert "Manager did not start" in failed.value.status_description
    finally:
        gate.set()
        model.manager.gate = None
        first_conn.close()
    assert _state(conn, uuid) == (9, 9)
    other = model.conn()              # any client reads the same
    try:
        assert _state(other, uuid) == (9, 9)
        listed = next(i for i in other.EnumerateInstances(CS) if i["Name"] == uuid)
        assert int(listed["RequestedState"]) == 9
    finally:
        other.close()


@pytest.mark.dbus
def test_destroy_refused_by_the_manager_leaves_the_system_untouched(model, conn):
    """DestroySystem on a running system with a definition: the Manager refuses
    UndefineDomain, the client gets CIM_ERR_FAILED with the Manager's reason, and the
    domain is still running and still defined: nothing was destroyed first."""
    uuid = KEEP.uuid
    reason = "review-keep has snapshots; delete them first (a test)"
    model.manager.refuse_undefine[uuid] = reason
    model.libvirt.createXML(config_to_domain_xml(KEEP), 0)
    poll_until(lambda: _state(conn, uuid)[0] == 2
               and conn.AssociatorNames(cs_path(uuid), AssocClass="VIRT_ElementSettingData"),
               what="review-keep running, with its definition")

    err = cim_error(lambda: conn.InvokeMethod("DestroySystem", vsms_path(),
                                              AffectedSystem=cs_path(uuid)))
    assert err.status_code == pywbem.CIM_ERR_FAILED
    assert reason in err.status_description, err.status_description
    assert ("UndefineDomain", uuid) in model.manager.calls

    # libvirt: still running; the Manager: still holds the definition
    assert model.libvirt.lookupByUUIDString(uuid).state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert uuid in model.manager.entries
    # and the next read by any client shows the same system, running, with its twin
    other = model.conn()
    try:
        assert _state(other, uuid) == (2, 12)
        esd = other.AssociatorNames(cs_path(uuid), AssocClass="VIRT_ElementSettingData")
        assert [p["InstanceID"] for p in esd] == [f"VIRT:defined:{uuid}"]
    finally:
        other.close()


# ---------------------------------------------------------------- 3: no task left behind

def _pending(qualnames):
    me = asyncio.current_task()
    return [t for t in asyncio.all_tasks()
            if t is not me and not t.done()
            and getattr(t.get_coro(), "__qualname__", "") in qualnames]


WORKER_TASKS = ("DestinationWorker.close", "DestinationWorker._run")


def test_indication_service_close_leaves_no_worker_task(tmp_path):
    """A destination deleted just before the service closes: the worker it had is
    closed by the time close() returns, and no task of it is left pending."""
    quiet_pywbem_logs()
    listener = Listener()
    srv = LibvirtServer(tmp_path / "state").start()
    console = None
    try:
        console = Console(srv.url)
        _f, dest, subs = console.subscribe(listener.url)
        dom = srv.conn.lookupByUUIDString(TEST_UUID)
        t0 = time.monotonic()
        dom.suspend()                               # one indication: the worker exists
        listener.expect(1, since=t0, quiet=0)
        dom.resume()
        listener.expect(1, since=time.monotonic(), quiet=0)
        assert len(srv.service.workers) == 1
        subscriptions = srv.service.subs

        async def delete_then_close():
            for path in [s.path for s in subs] + [dest.path]:
                await subscriptions.delete(path)   # the last one prunes the worker
            assert not srv.service.workers
            await srv.service.close()
            return [(t.get_coro().__qualname__, t.get_name())
                    for t in _pending(WORKER_TASKS)]
        left = srv.lt.run(delete_then_close())
        assert left == [], f"tasks left pending after close(): {left}"
    finally:
        if console is not None:
            console.close(remove=False)
        srv.close()
        listener.stop()


def test_server_close_cancels_the_host_refresh():
    """VIRT_HostSystem is served at once and its facts refreshed in the background.
    With libvirtd stopped (SIGSTOP) that refresh waits on libvirt; closing the server
    must not leave it pending."""
    from cim_provider.server.main import start_server, start_sources
    from cim_provider.sources.libvirt import ensure_event_loop_impl

    daemon = Libvirtd()
    daemon.start()
    lt = LoopThread()
    handle = None
    stopped = False
    try:
        async def start():
            ensure_event_loop_impl()
            sources = await start_sources(libvirt_uri=daemon.uri, manager_bus=None,
                                          call_timeout=60.0)
            assert await sources.libvirt.wait_connected(15)
            return await start_server([("127.0.0.1", 0)], sources=sources, host=HOST)
        handle = lt.run(start())
        conn = connect_wbem(f"http://127.0.0.1:{handle.addresses[0][1]}")
        try:
            assert conn.GetInstance(host_path())["Name"] == HOST   # facts read (waited for)
            time.sleep(5.2)                 # LibvirtSource keeps host facts for 5 s
            daemon.proc.send_signal(signal.SIGSTOP)
            stopped = True
            assert conn.GetInstance(host_path())["Name"] == HOST   # at once; refresh runs
        finally:
            conn.close()

        async def close_and_look(server):
            try:
                deadline = time.monotonic() + 5
                while not _pending(("HostSystemProvider._update",)):
                    assert time.monotonic() < deadline, "no background refresh was started"
                    await asyncio.sleep(0.02)
            finally:
                await server.close()
            return [t.get_name() for t in _pending(("HostSystemProvider._update",))]
        server, handle = handle, None
        left = lt.run(close_and_look(server), 60)
        assert left == [], f"host refresh still pending after the server closed: {left}"
    finally:
        if stopped:
            daemon.proc.send_signal(signal.SIGCONT)
        if handle is not None:
            lt.run(handle.close(), 60)
        lt.stop()
        daemon.cleanup()


# ---------------------------------------------------------------- 4: the users file

def _write_users(path, version, names=("alice", "bob")):
    """Every user's hash carries `version` (parse_users only checks the scheme)."""
    write_private(path, "".join(f"{n}:operator:scrypt${version}\n" for n in names).encode())


def _version(user):
    return int(user.hash.split("$")[1])


def test_users_file_re_read_never_brings_back_an_older_file(tmp_path, monkeypatch):
    """A re-read in one thread is slow (as if the disk were); meanwhile the file changes
    again and another thread looks a user up. Whatever the readers see, no lookup
    after one that saw the newer file may see the older one, and the newest file is
    what every lookup sees in the end."""
    path = tmp_path / "users"
    _write_users(path, 0)
    users = auth.UsersFile(path)
    real_load = auth.load_users
    stalled, go = threading.Event(), threading.Event()
    first = []

    def slow_first_load(p):
        got = real_load(p)
        if not first:                   # the first re-read stalls after reading
            first.append(threading.current_thread().name)
            stalled.set()
            go.wait(20)
        return got
    monkeypatch.setattr(auth, "load_users", slow_first_load)

    seen = []                            # versions, in the order the lookups returned
    lock = threading.Lock()

    def lookup():
        u = users.get("alice")
        with lock:
            seen.append(_version(u))

    _write_users(path, 1)
    time.sleep(1.05)                     # re-read at most once a second
    a = threading.Thread(target=lookup, name="re-reader-1")
    a.start()
    assert stalled.wait(10), "the first re-read did not start"
    _write_users(path, 2)
    time.sleep(1.05)
    b = threading.Thread(target=lookup, name="re-reader-2")
    b.start()
    b.join(2)                            # it may return now, or wait for re-reader-1
    go.set()
    a.join(10)
    b.join(10)
    assert not a.is_alive() and not b.is_alive()
    lookup()                             # right after both
    assert seen == sorted(seen), f"a lookup went back to an older file: {seen}"
    time.sleep(1.05)
    assert _version(users.get("alice")) == 2
    assert _version(users.get("bob")) == 2


def test_users_file_half_written_in_place_never_raises(tmp_path):
    """An editor rewriting the file in place: a lookup may find it cut anywhere, even
    inside a multi-byte character. That keeps the previous users (logged), never
    raises; the complete file is read once it is there."""
    path = tmp_path / "users"
    _write_users(path, 1, names=("alice", "jürgen"))
    users = auth.UsersFile(path)
    full = "".join(f"{n}:reader:scrypt$2\n" for n in ("alice", "jürgen")).encode()
    cut = full.index("ü".encode()) + 1           # between the two bytes of "ü"
    with open(path, "r+b") as f:                 # in place, as far as the cut
        f.truncate(0)
        f.write(full[:cut])
    time.sleep(1.05)
    assert _version(users.get("alice")) == 1     # the previous users, no exception
    assert _version(users.get("jürgen")) == 1
    with open(path, "ab") as f:
        f.write(full[cut:])
    time.sleep(1.05)
    assert users.get("jürgen").role == "reader" and _version(users.get("jürgen")) == 2


def test_users_file_lookups_from_threads_while_it_is_rewritten(tmp_path):
    """Readers in threads (as the password checks run) while the file is replaced
    again and again: no lookup raises or misses a user, each thread sees versions
    only go forward, and the last file is what all see in the end."""
    path = tmp_path / "users"
    _write_users(path, 0)
    users = auth.UsersFile(path)
    stop = threading.Event()
    errors, per_thread = [], {}
    written = [0]

    def writer():
        while not stop.is_set():
            written[0] += 1
            _write_users(path, written[0])
            time.sleep(0.01)

    def reader(i):
        mine = per_thread.setdefault(i, [])
        try:
            while not stop.is_set():
                for name in ("alice", "bob"):
                    u = users.get(name)
                    if u is None:
                        raise AssertionError(f"{name} missing")
                    mine.append(_version(u))
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(repr(exc))

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)          # interleave the threads as much as possible
    try:
        threads = [threading.Thread(target=reader, args=(i,)) for i in range(6)]
        threads.append(threading.Thread(target=writer))
        for t in threads:
            t.start()
        time.sleep(3.5)                  # three or four re-reads
        stop.set()
        for t in threads:
            t.join(10)
    finally:
        sys.setswitchinterval(old)
    assert errors == []
    for i, versions in per_thread.items():
        assert versions == sorted(versions), f"thread {i} saw an older file again"
    assert max(max(v) for v in per_thread.values()) > 0, "no re-read happened"
    time.sleep(1.05)
    assert _version(users.get("alice")) == written[0] == _version(users.get("bob"))
