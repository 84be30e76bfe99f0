"""libvirt as the source of running domains: one connection, events, reconnects, actions.

What is running is read in full only when a connection is (re)established; after that
libvirt's lifecycle events, handed to the asyncio loop by libvirt's event thread
(libvirt_events.py), say which domain to read again. Blocking libvirt calls run in a
small pool of threads that belongs to the connection, each with a timeout, so a wedged
libvirtd can slow a CIM request down but never hang the server. A call that times out
keeps its thread until libvirt returns; when such calls hold every thread of the pool,
the connection is given up with its pool and a new connection gets a new pool. Opens and
closes run in threads of their own, so a hung call never holds up a reconnect.

The module is longer than most (about 900 lines) because the connection's life cycle
(open, register events, load, drop, give up, reconnect), the per-domain re-reads and
what the events leave behind (stop reasons, reboot counts) share one generation counter
and must be read together; the event thread
(libvirt_events.py), the blocking calls (libvirt_calls.py; libvirt_stopped.py for the
domains stopped on a failure) and the thread pools (libvirt_threads.py) live apart.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import threading
import time
import weakref
from typing import Any, Callable, TypeVar

import libvirt

from ..domain.domxml import disk_to_xml, nic_to_xml
from ..domain.records import Disk, DomainConfig, Nic, RunningDomain, canonical_uuid
from ..domain.sources import ResourceFeed, SourceStatus
from .libvirt_calls import (DomainNotFound, LibvirtError, LibvirtTimeout, LibvirtUnavailable,
                            change_device, guarded, quietly, read_all, read_one)
from .libvirt_events import close_opened, ensure_event_loop_impl
from .libvirt_host import HostWatch
from .libvirt_stopped import STOPPED_FAILURES, Stopped, read_definition, read_stopped
from .libvirt_threads import MAX_STRAY, POOL_SIZE, CallPool, Count, in_thread

_T = TypeVar("_T")

log = logging.getLogger(__name__)

BACKOFF_MIN = 0.2       # seconds before the first reconnect attempt
BACKOFF_MAX = 5.0       # and the cap of the doubling
KEEPALIVE = (5, 3)      # interval (s), count: a silent peer is dropped after ~20 s
READ_RETRIES = 8        # re-reads of one domain after a failed or timed-out read
# Seconds abort_job asks again while the monitor is OCCUPIED (libvirt's own job runs a
# monitor command; an ordinary call holding it stays OCCUPIED longer).
ABORT_WAIT = 2.0
MAX_STOP_REASONS = 10000   # stop reasons remembered (the oldest go first)

# Events, besides the lifecycle ones, after which a running domain's live XML may
# differ: all mean "read that domain again". Hot-plug changes disks and NICs; virsh
# desc/metadata changes the title; a balloon setmem the current memory; setvcpus and
# tuning (vcpu pins, shares, blkio) raise TUNABLE or nothing at all, depending on the
# driver; a finished job (migration, save, dump) may leave a changed definition.
# Autostart has no event at all: it is read with the domain at connect and whenever
# some other event makes us read the domain again.
_CHANGE_EVENTS = tuple(getattr(libvirt, name) for name in (
    "VIR_DOMAIN_EVENT_ID_DEVICE_ADDED", "VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED",
    "VIR_DOMAIN_EVENT_ID_METADATA_CHANGE", "VIR_DOMAIN_EVENT_ID_BALLOON_CHANGE",
    "VIR_DOMAIN_EVENT_ID_TUNABLE", "VIR_DOMAIN_EVENT_ID_JOB_COMPLETED",
) if hasattr(libvirt, name))


def _weakly(method: Callable[..., None]) -> Callable[..., None]:
    """`method`, holding its object only weakly. libvirt-python keeps a close callback
    alive until the driver frees it, and drivers without close callbacks (the test
    driver, in-process) never do: unregistering it does nothing. Handed the bound
    method itself, every such source stayed alive with its whole server (found as a
    test process growing by ~40,000 objects per server started, and second-long
    collections)."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any) -> None:
        bound = ref()
        if bound is not None:
            bound(*args)
    return call


class LibvirtSource:
    """The running domains of one libvirt URI, kept current by events.

    `running` holds the last known state; while the connection is down it keeps the
    last known domains (`connected` is False) and a fresh snapshot replaces it on
    reconnect, so a libvirtd restart does not make every domain vanish and reappear.
    """

    def __init__(self, uri: str | None = None, *, conn: libvirt.virConnect | None = None,
                 call_timeout: float = 10.0,
                 on_snapshot: Callable[[dict[str, RunningDomain]], None] | None = None,
                 on_domain: Callable[[str, RunningDomain | None], None] | None = None,
                 feed: ResourceFeed | None = None, metrics_interval: float = 0.0,
                 on_stop_reasons: Callable[[dict[str, str], dict[str, DomainConfig]], None]
                 | None = None,
                 opening: concurrent.futures.Future[libvirt.virConnect] | None = None) -> None:
        if uri is None and conn is None:
            uri = os.environ.get("LIBVIRT_DEFAULT_URI") or None
        self.uri = uri
        self.call_timeout = call_timeout
        self.load_timeout = max(call_timeout, 60.0)   # a full read of thousands of domains
        self.on_snapshot = on_snapshot
        self.on_domain = on_domain
        self.running: dict[str, RunningDomain] = {}
        # Why libvirt last stopped a domain on a failure (crash, hypervisor process
        # gone, start failed in the guest), per UUID, until it starts again: read from
        # the inactive domains' shut-off reasons at connect, then from lifecycle
        # events; a domain that stays known (persistent, or the Manager's twin) shows
        # it. Every change goes to `on_stop_reasons` as the whole map, with `held`.
        self.stop_reasons: dict[str, str] = {}
        # Of those, the persistent definitions libvirt still holds (the domain is shut
        # off): they keep a crashed persistent domain visible while the Manager does not
        # list it. Nothing else defined-but-shut-off is offered: passive definitions are
        # the Manager's (docs/architecture.md, "States" and "Sources").
        self.held: dict[str, DomainConfig] = {}
        self._reboots: dict[str, int] = {}     # reboot events per UUID (jobs wait on them)
        self.on_stop_reasons = on_stop_reasons
        self._connected = False
        self._status_since = time.time()      # when `connected` last changed
        self._last_error = "not connected yet"
        self._shared = conn
        # An open of `uri` already under way (libvirt_events.open_soon): the first
        # connection takes it rather than open another.
        self._opening = opening
        self._conn: libvirt.virConnect | None = None
        self._conn_uri: str | None = None
        self._owned = False
        self._close_cb = False
        self._event_ids: list[tuple[int, str]] = []     # (callback id, deregister method)
        # Registration runs on a pool thread and may outlive the timeout of its
        # call; under this lock it records what it registered only while its
        # connection is still the current one (`_gen`), and undoes the rest itself.
        self._reg_lock = threading.Lock()
        self._registering: set[int] = set()     # generations still registering
        self._close_after: set[int] = set()     # ... whose owned connection they close
        self._gen = 0                      # bumps per connection: stale callbacks are ignored
        self._loading = False
        self._dirty: set[str] = set()
        self._refreshers: dict[str, asyncio.Task[LibvirtError | None]] = {}
        self._retries: dict[str, int] = {}           # failed reads in a row, per domain
        self._retry_timers: dict[str, asyncio.TimerHandle] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool: CallPool | None = None       # the current connection's call threads
        self._strays = Count()                  # threads left in calls we gave up on
        # Reads of one domain applied to `running` (changed or not), e.g. after an
        # event: a test can wait for this to move rather than for time to pass.
        self.domain_reads = 0
        self._task: asyncio.Task[None] | None = None
        self._dropped: asyncio.Event | None = None
        self._up: asyncio.Event | None = None
        self._stopping = False
        self._host_cache: tuple[int, float, dict[str, Any]] | None = None
        # Storage pools, networks and usage samples (`feed`; sampled every
        # `metrics_interval` seconds, 0: never).
        self.host = HostWatch(self, feed, metrics_interval)

    @property
    def conn(self) -> libvirt.virConnect | None:
        return self._conn if self.connected else None

    @property
    def connected(self) -> bool:
        return self._connected

    @connected.setter
    def connected(self, value: bool) -> None:
        if value != self._connected:
            self._status_since = time.time()
        self._connected = value

    @property
    def status(self) -> SourceStatus:
        """Down while there is no connection: no running domain can be seen then."""
        if self.connected:
            return SourceStatus()
        return SourceStatus("down", f"libvirt {self._describe()} unreachable since "
                            f"{SourceStatus.stamp(self._status_since)}: {self._last_error}",
                            self._status_since)

    # ---- life cycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Connect (or keep trying in the background); returns after the first attempt."""
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        ensure_event_loop_impl()
        self._stopping = False
        self._up = asyncio.Event()
        first = asyncio.Event()
        self._task = asyncio.create_task(self._run(first), name="libvirt-source")
        try:
            await asyncio.wait_for(first.wait(), self.load_timeout)
        except asyncio.TimeoutError:
            log.warning("libvirt: first connection attempt still pending; continuing")

    async def stop(self) -> None:
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        opening, self._opening = self._opening, None
        if opening is not None:             # never taken: closed when it arrives
            opening.add_done_callback(close_opened)
        await self._disconnect()
        # Let the free callbacks that closing queued on the loop run before it ends.
        for _ in range(3):
            await asyncio.sleep(0)
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown()

    async def wait_connected(self, timeout: float) -> bool:
        """True once connected (and the first snapshot is in), False on timeout."""
        if self._up is None:
            return False
        try:
            await asyncio.wait_for(self._up.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def _run(self, first: asyncio.Event) -> None:
        backoff = BACKOFF_MIN
        failures = 0
        while not self._stopping:
            try:
                await self._connect()
            except LibvirtError as exc:
                failures += 1
                self._last_error = exc.message
                level = logging.WARNING if failures == 1 else logging.DEBUG
                log.log(level, "libvirt: cannot connect to %s: %s (retrying every <= %g s)",
                        self._describe(), exc.message, BACKOFF_MAX)
                await self._disconnect()
                first.set()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            if failures:
                log.info("libvirt: connected to %s after %d failed attempts",
                         self._describe(), failures)
            failures = 0
            backoff = BACKOFF_MIN
            first.set()
            assert self._dropped is not None
            await self._dropped.wait()
            await self._disconnect()
            await asyncio.sleep(BACKOFF_MIN)   # don't hammer a daemon that is restarting

    def _describe(self) -> str:
        return self._conn_uri or self.uri or "libvirt's default URI"

    async def _connect(self) -> None:
        strays = self._strays.value
        if strays >= MAX_STRAY:
            raise LibvirtUnavailable(f"{strays} earlier calls into libvirt have not returned; "
                                     "no new connection until some do")
        with self._reg_lock:
            self._gen += 1
            gen = self._gen
        self._dropped = asyncio.Event()
        if self._pool is not None:
            self._pool.shutdown()
        self._pool = CallPool(f"libvirt-{gen}", POOL_SIZE, self._strays)
        if self._shared is not None and self._shared_alive():
            conn = self._shared
        else:
            conn = await self._open(self.uri or self._conn_uri)
        self._conn = conn
        self._owned = conn is not self._shared
        self._conn_uri = await self._call(
            functools.partial(self._register, conn, gen), what="register events")
        self._loading = True
        try:
            snapshot = await self._call(functools.partial(read_all, conn),
                                        timeout=self.load_timeout, what="read domains")
        finally:
            self._loading = False
        if gen != self._gen:
            raise LibvirtUnavailable("connection lost while reading the domains")
        await self.host.load(conn)
        if gen != self._gen:
            raise LibvirtUnavailable("connection lost while reading pools and networks")
        try:
            stopped = await self._call(functools.partial(read_stopped, conn),
                                       timeout=self.load_timeout, what="read stop reasons")
        except LibvirtUnavailable:
            raise
        except LibvirtError as exc:
            log.warning("libvirt: cannot read why inactive domains stopped: %s", exc.message)
            stopped = Stopped({}, {}, frozenset())
        if gen != self._gen:
            raise LibvirtUnavailable("connection lost while reading stop reasons")
        # Events seen while disconnected are lost: the shut-off reasons say the rest. A
        # reason is kept only for a domain libvirt no longer has (a transient one that
        # crashed: the Manager's twin still shows it).
        self.stop_reasons = {u: r for u, r in self.stop_reasons.items()
                             if u not in snapshot and u not in stopped.inactive}
        self.stop_reasons.update(stopped.reasons)
        self.held = dict(stopped.held)
        self._notify_stop_reasons()
        self.running = snapshot
        self.connected = True
        self._host_cache = None
        log.info("libvirt: connected to %s, %d running domains", self._describe(), len(snapshot))
        self._notify_snapshot()
        self.host.start()
        if self._up is not None:
            self._up.set()
        for uuid in list(self._dirty):       # events that came in during the full read
            self._kick(uuid)

    async def _open(self, uri: str | None) -> libvirt.virConnect:
        """Open a connection, or take the open `serve` started early (`opening`): its
        thread then waits for that one. A connection that arrives after we gave up
        waiting is closed."""
        opening, self._opening = self._opening, None
        fn = functools.partial(libvirt.open, uri) if opening is None else opening.result
        return await self._alone(fn, self.call_timeout,
                                 what=f"open of {uri or 'the default URI'}",
                                 name="libvirt-open", late=close_opened)

    async def _alone(self, fn: Callable[[], _T], timeout: float, *, what: str, name: str,
                     late: Callable[[concurrent.futures.Future[_T]], None] | None = None) -> _T:
        """A blocking call in a thread of its own, not in the connection's pool.

        For opens and closes: they must neither wait behind the calls stuck in a pool
        nor add to them. If we stop waiting (timeout, cancellation) the thread is left
        to finish by itself, and `late`, if given, gets its future then.
        """
        fut = in_thread(functools.partial(guarded, fn), name)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), timeout)
        except asyncio.TimeoutError:
            self._stray(fut, late)
            raise LibvirtTimeout(f"libvirt {what} did not answer within {timeout:g} s") \
                from None
        except asyncio.CancelledError:      # e.g. stop() while an open is under way
            self._stray(fut, late)
            raise

    def _stray(self, fut: concurrent.futures.Future[_T],
               late: Callable[[concurrent.futures.Future[_T]], None] | None) -> None:
        self._strays.add(1)

        def done(f: concurrent.futures.Future[_T]) -> None:
            self._strays.add(-1)
            if late is not None:
                late(f)

        fut.add_done_callback(done)

    def _shared_alive(self) -> bool:
        """Use the caller's connection unless it has died (then we open our own)."""
        try:
            return bool(self._shared.isAlive())  # type: ignore[union-attr]  # reason: only called once _shared is not None
        except libvirt.libvirtError:
            return False

    def _register(self, conn: libvirt.virConnect, gen: int) -> str:
        """Blocking: event callbacks, close callback and keepalive for a new connection.

        Each callback goes into `_event_ids` (released by _disconnect) if `gen` is
        still current when it is made; one made after the call timed out and the
        connection was given up is deregistered here at once, and registering stops.
        """
        with self._reg_lock:
            if gen != self._gen:
                raise LibvirtUnavailable("connection given up before its events were registered")
            self._registering.add(gen)
        try:
            return self._register_all(conn, gen)
        finally:
            with self._reg_lock:
                self._registering.discard(gen)
                close = gen in self._close_after
                self._close_after.discard(gen)
            if close:
                quietly(conn.close)

    def _register_all(self, conn: libvirt.virConnect, gen: int) -> str:
        def keep(cb_id: int, deregister: str = "domainEventDeregisterAny") -> None:
            with self._reg_lock:
                if gen == self._gen:
                    self._event_ids.append((cb_id, deregister))
                    return
            quietly(getattr(conn, deregister), cb_id)
            raise LibvirtUnavailable("connection given up while its events were registered")

        conn_uri = conn.getURI()
        keep(conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, gen))
        keep(conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_REBOOT, self._on_reboot, gen))
        for event_id in _CHANGE_EVENTS:
            try:
                cb_id = conn.domainEventRegisterAny(None, event_id, self._on_change, gen)
            except libvirt.libvirtError as exc:
                log.debug("libvirt: event %d not available: %s", event_id, exc)
                continue
            keep(cb_id)
        self.host.register(conn, gen, keep)
        try:
            conn.registerCloseCallback(_weakly(self._on_close), gen)
        except libvirt.libvirtError as exc:   # e.g. the owner of a shared connection has one
            log.debug("libvirt: no close callback on %s: %s", conn_uri, exc)
        else:
            with self._reg_lock:
                current = gen == self._gen
                if current:
                    self._close_cb = True
            if not current:
                quietly(conn.unregisterCloseCallback)
                raise LibvirtUnavailable("connection given up while its events were registered")
        if self._owned:
            try:
                conn.setKeepAlive(*KEEPALIVE)
            except libvirt.libvirtError as exc:   # local drivers: nothing to keep alive
                log.debug("libvirt: no keepalive on %s: %s", conn_uri, exc)
        return conn_uri

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        was_connected, self.connected = self.connected, False
        owned = self._owned
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown()     # queued calls fail now; stuck ones end when libvirt returns
        with self._reg_lock:
            # What the registration recorded so far is released below; from now on it
            # undoes its own late registrations (see _register).
            if conn is not None and owned and self._gen in self._registering:
                self._close_after.add(self._gen)   # it still uses conn: it closes it
                owned = False
            self._gen += 1
            ids, self._event_ids = self._event_ids, []
            close_cb, self._close_cb = self._close_cb, False
        self._dirty.clear()
        self.host.stop()
        for task in list(self._refreshers.values()):
            task.cancel()
        self._refreshers.clear()
        for timer in self._retry_timers.values():
            timer.cancel()
        self._retry_timers.clear()
        self._retries.clear()
        if self._up is not None:
            self._up.clear()
        if conn is None:
            return

        def release() -> None:
            for cb_id, deregister in ids:
                quietly(getattr(conn, deregister), cb_id)
            if close_cb:
                quietly(conn.unregisterCloseCallback)
            if owned:
                # Not under a call still in flight on it (one that timed out, say): the
                # connection would outlive its close, a client of the daemon for good.
                if pool is not None:
                    pool.wait_idle()
                quietly(conn.close)

        try:
            # Not in the pool: it is shut down, and may be stuck in calls for good.
            await self._alone(release, min(self.call_timeout, 5.0), what="close",
                              name="libvirt-close")
        except LibvirtError as exc:
            log.debug("libvirt: releasing the old connection: %s", exc.message)
        if was_connected and not self._stopping:
            log.warning("libvirt: lost the connection to %s; reconnecting", self._describe())

    # ---- events ---------------------------------------------------------------------

    def _on_lifecycle(self, _conn: Any, dom: libvirt.virDomain, event: int, detail: int,
                      gen: int) -> None:
        reason = ""
        if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
            reason = STOPPED_FAILURES.get(detail, "")
        self._post(gen, dom.UUIDString(), event, reason)

    def _on_reboot(self, _conn: Any, dom: libvirt.virDomain, gen: int) -> None:
        self._post(gen, dom.UUIDString(), None, "reboot")

    def reboots(self, uuid: str) -> int:
        return self._reboots.get(canonical_uuid(uuid) or uuid, 0)

    def _on_change(self, _conn: Any, dom: libvirt.virDomain, *args: Any) -> None:
        """Any of _CHANGE_EVENTS: their payloads differ, the opaque (gen) comes last."""
        self._post(args[-1], dom.UUIDString(), None)

    def _post(self, gen: int, uuid: str, event: int | None, reason: str = "") -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._event, gen, uuid, event, reason)
        except RuntimeError:
            pass

    def _event(self, gen: int, uuid: str, event: int | None, reason: str = "") -> None:
        if gen != self._gen or self._stopping:
            return
        key = canonical_uuid(uuid) or uuid
        log.debug("libvirt: event %s on %s", event, key)
        if reason == "reboot":
            if len(self._reboots) >= MAX_STOP_REASONS and key not in self._reboots:
                del self._reboots[next(iter(self._reboots))]
            self._reboots[key] = self._reboots.get(key, 0) + 1
        elif event in (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STARTED):
            self._set_stop_reason(key, reason or None)
        self._dirty.add(key)
        if not self._loading:
            self._kick(key)

    def _on_close(self, _conn: Any, reason: int, gen: int) -> None:
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._drop, gen, f"closed, reason {reason}")
            except RuntimeError:
                pass

    def _drop(self, gen: int, why: str) -> None:
        if gen == self._gen and self._dropped is not None and not self._dropped.is_set():
            log.debug("libvirt: connection to %s dropped: %s", self._describe(), why)
            self._last_error = f"connection dropped: {why}"
            self._dropped.set()

    def _kick(self, uuid: str) -> asyncio.Task[LibvirtError | None]:
        task = self._refreshers.get(uuid)
        if task is None or task.done():
            task = asyncio.ensure_future(self._refresher(uuid))
            self._refreshers[uuid] = task
        return task

    async def _refresher(self, uuid: str) -> LibvirtError | None:
        """Re-read one domain until no event is pending for it: reads apply in order.

        Returns None once `running` shows what libvirt said, else why not. A read
        that fails or times out leaves the domain pending and is retried later.
        """
        try:
            while uuid in self._dirty and not self._stopping:
                self._dirty.discard(uuid)
                gen, conn = self._gen, self._conn
                if conn is None:
                    return LibvirtUnavailable(f"not connected to libvirt ({self._describe()})")
                held: DomainConfig | None = None
                try:
                    dom = await self._call(functools.partial(read_one, conn, uuid),
                                           what="read domain")
                    if dom is None and uuid in self.stop_reasons:
                        # Stopped on a failure: libvirt's definition keeps it visible.
                        held = await self._call(functools.partial(read_definition, conn, uuid),
                                                what="read definition")
                except LibvirtError as exc:
                    if gen == self._gen:
                        self._retry_later(uuid, exc)
                    return exc
                if gen != self._gen:
                    return LibvirtUnavailable("the connection to libvirt was lost while "
                                              "reading the domain")
                self._retries.pop(uuid, None)
                # The definition first: a crashed persistent domain never vanishes between
                # "not running" and "held" (no deletion, then a creation, for one crash).
                self._set_held(uuid, held)
                self._set_domain(uuid, dom)
                self.domain_reads += 1
            if self._stopping:
                return LibvirtUnavailable("the libvirt source is stopping")
            return None
        finally:
            if self._refreshers.get(uuid) is asyncio.current_task():
                del self._refreshers[uuid]

    def _retry_later(self, uuid: str, exc: LibvirtError) -> None:
        """Keep a domain whose read failed pending, and read it again after a back-off."""
        if isinstance(exc, LibvirtUnavailable) and not isinstance(exc, LibvirtTimeout):
            # The connection is being dropped (see _call): the reconnect reads all.
            log.warning("libvirt: cannot read domain %s: %s", uuid, exc.message)
            return
        tries = self._retries.get(uuid, 0)
        if tries >= READ_RETRIES:
            self._retries.pop(uuid, None)
            log.error("libvirt: giving up reading domain %s after %d attempts: %s; it is "
                      "read again on its next event", uuid, tries + 1, exc.message)
            return
        self._retries[uuid] = tries + 1
        delay = min(BACKOFF_MIN * 2 ** tries, BACKOFF_MAX)
        log.warning("libvirt: cannot read domain %s: %s (retrying in %g s)",
                    uuid, exc.message, delay)
        self._dirty.add(uuid)
        old = self._retry_timers.pop(uuid, None)
        if old is not None:
            old.cancel()
        assert self._loop is not None
        self._retry_timers[uuid] = self._loop.call_later(delay, self._retry, uuid, self._gen)

    def _retry(self, uuid: str, gen: int) -> None:
        self._retry_timers.pop(uuid, None)
        if gen == self._gen and not self._stopping and not self._loading \
                and uuid in self._dirty:
            self._kick(uuid)

    async def refresh(self, uuid: str) -> RunningDomain | None:
        """Read one domain again now (after an action), in order with its events.

        Raises LibvirtError (LibvirtTimeout, LibvirtUnavailable...) when `running`
        cannot be brought up to date: then it may not show the action's result yet.
        """
        key = canonical_uuid(uuid) or uuid
        if not self.connected:
            raise LibvirtUnavailable(f"not connected to libvirt ({self._describe()})")
        self._dirty.add(key)
        task = self._kick(key)
        try:
            error = await asyncio.wait_for(asyncio.shield(task), self.call_timeout)
        except asyncio.TimeoutError:
            raise LibvirtTimeout(f"libvirt read domain did not answer within "
                                 f"{self.call_timeout:g} s") from None
        except asyncio.CancelledError:
            # The refresher is cancelled when the connection drops; only our own
            # cancellation should travel on.
            me = asyncio.current_task()
            if me is not None and me.cancelling():
                raise
            raise LibvirtUnavailable("the connection to libvirt was lost while reading "
                                     "the domain") from None
        if error is not None:
            raise type(error)(error.message, error.code)
        return self.running.get(key)

    def _set_domain(self, uuid: str, dom: RunningDomain | None) -> None:
        old = self.running.get(uuid)
        if dom is None:
            if old is None:
                return
            del self.running[uuid]
        else:
            if old == dom:
                return
            self.running[uuid] = dom
        if self.on_domain is not None:
            try:
                self.on_domain(uuid, dom)
            except Exception:
                log.exception("libvirt: on_domain callback failed for %s", uuid)

    def _set_stop_reason(self, uuid: str, reason: str | None) -> None:
        """A stop on a failure records its reason; any other stop or a start clears it."""
        if self.stop_reasons.get(uuid) == reason:
            return
        self.stop_reasons.pop(uuid, None)
        self.held.pop(uuid, None)     # read again with the domain (_refresher)
        if reason is not None:
            if len(self.stop_reasons) >= MAX_STOP_REASONS:
                oldest = next(iter(self.stop_reasons))
                del self.stop_reasons[oldest]
                self.held.pop(oldest, None)
            self.stop_reasons[uuid] = reason
            log.info("libvirt: domain %s stopped: %s", uuid, reason)
        self._notify_stop_reasons()

    def _set_held(self, uuid: str, cfg: DomainConfig | None) -> None:
        """The persistent definition of a domain stopped on a failure (None: none)."""
        if cfg is not None and uuid not in self.stop_reasons:
            cfg = None
        if self.held.get(uuid) == cfg:
            return
        if cfg is None:
            del self.held[uuid]
        else:
            self.held[uuid] = cfg
        self._notify_stop_reasons()

    def _notify_stop_reasons(self) -> None:
        if self.on_stop_reasons is not None:
            try:
                self.on_stop_reasons(dict(self.stop_reasons), dict(self.held))
            except Exception:
                log.exception("libvirt: on_stop_reasons callback failed")

    def reread(self, uuid: str) -> None:
        """Read one domain again soon (something changed that raises no event)."""
        if self.connected and not self._loading and not self._stopping:
            self._dirty.add(uuid)
            self._kick(uuid)

    def _notify_snapshot(self) -> None:
        if self.on_snapshot is not None:
            try:
                self.on_snapshot(dict(self.running))
            except Exception:
                log.exception("libvirt: on_snapshot callback failed")

    # ---- calls into libvirt ---------------------------------------------------------

    async def _call(self, fn: Callable[[], _T], *, timeout: float | None = None,
                    what: str = "call") -> _T:
        """Run a blocking libvirt call in the connection's pool, with a timeout, errors
        translated. A call that times out keeps its thread until libvirt returns; once
        such calls hold every thread, the connection is given up (see _give_up)."""
        if self._loop is None:
            raise LibvirtUnavailable("the libvirt source is not started")
        pool = self._pool
        if pool is None:
            raise LibvirtUnavailable(f"not connected to libvirt ({self._describe()})")
        limit = self.call_timeout if timeout is None else timeout
        gen = self._gen
        try:
            fut = pool.submit(functools.partial(guarded, fn))
        except RuntimeError:
            raise LibvirtUnavailable(f"the connection to {self._describe()} was given up "
                                     f"(libvirt {what})") from None
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), limit)
        except asyncio.TimeoutError:
            pool.leave(fut)
            if pool.wedged:
                self._give_up(pool, gen)
            raise LibvirtTimeout(f"libvirt {what} did not answer within {limit:g} s") from None
        except asyncio.CancelledError:
            pool.leave(fut)
            me = asyncio.current_task()
            if fut.cancelled() and me is not None and not me.cancelling():
                # Not our cancellation: the pool was shut down while the call waited.
                raise LibvirtUnavailable(f"the connection to {self._describe()} was given "
                                         f"up before libvirt {what} ran") from None
            raise
        except LibvirtUnavailable as exc:
            self._drop(gen, exc.message)
            raise

    def _give_up(self, pool: CallPool, gen: int) -> None:
        """Every thread of the connection's pool is stuck in libvirt: drop the connection.

        Its pool goes with it (the calls queued behind the stuck ones fail now), and
        the reconnect opens a new connection with a new pool; the stuck threads end
        on their own whenever libvirt returns. Nothing waits for them.
        """
        if pool is not self._pool or pool.closed:
            return
        log.warning("libvirt: %d calls to %s have not returned after their timeout; giving "
                    "up this connection for a new one", pool.size, self._describe())
        pool.shutdown()
        self._drop(gen, f"{pool.size} calls stuck in libvirt")
        # Down from now on, not only once the reconnect loop gets round to it: later
        # calls fail at once as "not connected".
        self.connected = False
        if self._up is not None:
            self._up.clear()

    def _live_conn(self) -> libvirt.virConnect:
        conn = self._conn
        if conn is None or not self.connected:
            raise LibvirtUnavailable(f"not connected to libvirt ({self._describe()})")
        return conn

    async def _action(self, uuid: str, what: str, op: Callable[[libvirt.virDomain], Any]) -> None:
        key = canonical_uuid(uuid)
        if key is None:
            raise DomainNotFound(f"no domain with UUID {uuid!r}", libvirt.VIR_ERR_NO_DOMAIN)
        conn = self._live_conn()

        def work() -> None:
            op(conn.lookupByUUIDString(key))

        await self._call(work, what=what)
        # Read it back before returning, so whoever asked sees the result at once.
        try:
            await self.refresh(key)
        except LibvirtError as exc:
            # The action was carried out; the read is retried in the background, and
            # a caller that must show the result calls refresh() itself, which fails.
            log.warning("libvirt: %s of %s done, but reading it back failed: %s",
                        what, key, exc.message)

    async def resume(self, uuid: str) -> None:
        await self._action(uuid, "resume", lambda d: d.resume())

    async def suspend(self, uuid: str) -> None:
        await self._action(uuid, "suspend", lambda d: d.suspend())

    async def destroy(self, uuid: str) -> None:
        await self._action(uuid, "destroy", lambda d: d.destroy())

    async def shutdown(self, uuid: str) -> None:
        await self._action(uuid, "shutdown", lambda d: d.shutdown())

    async def reboot(self, uuid: str) -> None:
        await self._action(uuid, "reboot", lambda d: d.reboot(0))

    async def reset(self, uuid: str) -> None:
        await self._action(uuid, "reset", lambda d: d.reset(0))

    async def abort_job(self, uuid: str) -> bool:
        """Abort libvirt's own job on the domain (save, dump, migration: those
        virDomainGetJobInfo reports, not NONE) with virDomainAbortJob; False when
        there is none. A driver without jobs (the test driver) raises NotSupported.
        For a CIM job a client stops (providers/jobs.py)."""
        key = canonical_uuid(uuid)
        if key is None:
            raise DomainNotFound(f"no domain with UUID {uuid!r}", libvirt.VIR_ERR_NO_DOMAIN)
        shared = self._live_conn()            # not connected: LibvirtUnavailable now
        uri = self._conn_uri or self.uri
        limit = min(self.call_timeout, 5.0)
        wait = min(ABORT_WAIT, limit / 2)     # well inside the call's own limit

        def work() -> bool:
            # On a connection of its own, opened for this abort and closed after it.
            # The abort is asked for while a call on the shared connection waits in
            # libvirt (the job being stopped), and libvirt's client (9.0) can then keep
            # a second thread's call on that connection unsent until something next
            # arrives on its socket (a keepalive, up to 5 s later): measured, 1 abort in
            # 10 missed its limit that way (docs/architecture.md, "Jobs").
            conn = libvirt.open(uri)
            try:
                return aborted(conn)
            finally:
                quietly(conn.close)

        def aborted(conn: libvirt.virConnect) -> bool:
            dom = conn.lookupByUUIDString(key)
            # The control state first: it never waits for the domain's job lock.
            # OCCUPIED (or ERROR) means a call holds the monitor, which nothing aborts
            # and behind which virDomainGetJobInfo would wait. libvirt's own jobs (save,
            # dump, migration) show JOB ("can be monitored by virDomainGetJobInfo"), or
            # OK, between their monitor commands, and OCCUPIED for the moment each of
            # those commands takes: OCCUPIED is asked again for up to ABORT_WAIT
            # seconds (half the call's limit at most). An ordinary call that holds the
            # monitor (a suspend QEMU does not answer) stays OCCUPIED, and is not aborted.
            deadline = time.monotonic() + wait
            state = dom.controlInfo()[0]
            while state == libvirt.VIR_DOMAIN_CONTROL_OCCUPIED and time.monotonic() < deadline:
                time.sleep(0.02)
                state = dom.controlInfo()[0]
            if state not in (libvirt.VIR_DOMAIN_CONTROL_OK, libvirt.VIR_DOMAIN_CONTROL_JOB):
                return False
            if dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE:
                return False
            dom.abortJob()
            return True

        if (uri or "").partition(":")[0] == "test":
            # The test driver runs in this process (no client, nothing to be held up
            # behind), and a second open of a node file would be a new, separate node.
            return await self._call(functools.partial(aborted, shared), timeout=limit,
                                    what="abort of a job")
        return await self._alone(work, limit, what="abort of a job", name="libvirt-abort")

    async def _device(self, uuid: str, op: str, device: Disk | Nic, *, config: bool,
                      old: Disk | Nic | None = None) -> None:
        """attach / detach / update one device (libvirt_calls.change_device), then read
        the domain back so whoever asked sees the result at once."""
        key = canonical_uuid(uuid)
        if key is None:
            raise DomainNotFound(f"no domain with UUID {uuid!r}", libvirt.VIR_ERR_NO_DOMAIN)
        conn = self._live_conn()

        def xml(dev: Disk | Nic) -> str:
            return disk_to_xml(dev) if isinstance(dev, Disk) else nic_to_xml(dev)

        await self._call(functools.partial(change_device, conn, key, op, xml(device), live=True,
                                           config=config,
                                           undo=xml(old) if old is not None else None),
                         what=f"{op} of a device")
        try:
            await self.refresh(key)
        except LibvirtError as exc:
            log.warning("libvirt: %s of a device of %s done, but reading it back failed: %s",
                        op, key, exc.message)

    async def attach_device(self, uuid: str, device: Disk | Nic, *, config: bool) -> None:
        await self._device(uuid, "attach", device, config=config)

    async def detach_device(self, uuid: str, device: Disk | Nic, *, config: bool) -> None:
        await self._device(uuid, "detach", device, config=config)

    async def update_device(self, uuid: str, device: Disk | Nic, old: Disk | Nic, *,
                            config: bool) -> None:
        await self._device(uuid, "update", device, config=config, old=old)

    async def sample_usage(self) -> None:
        """Take one usage sample now (tests; the sampler does it every interval)."""
        await self.host.sample()

    async def host_info(self) -> dict[str, Any]:
        """Facts about the host for its CIM instance; cached for a few seconds."""
        cached = self._host_cache
        if cached is not None and cached[0] == self._gen and time.monotonic() - cached[1] < 5.0:
            return dict(cached[2])
        conn = self._live_conn()
        gen = self._gen

        def work() -> dict[str, Any]:
            model, mem_mib, cpus, mhz, nodes, sockets, cores, threads = conn.getInfo()[:8]
            try:
                free_kib: int | None = conn.getFreeMemory() // 1024
            except libvirt.libvirtError:
                free_kib = None
            return {"hostname": conn.getHostname(), "uri": conn.getURI(),
                    "hypervisor": conn.getType(), "hypervisor_version": conn.getVersion(),
                    "libvirt_version": conn.getLibVersion(), "model": model,
                    "memory_kib": mem_mib * 1024, "free_memory_kib": free_kib,
                    "cpus": cpus, "mhz": mhz, "nodes": nodes, "sockets": sockets,
                    "cores": cores, "threads": threads}

        info = await self._call(work, what="host info")
        self._host_cache = (gen, time.monotonic(), info)
        return dict(info)
