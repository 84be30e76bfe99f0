"""libvirt as the source of running domains: one connection, events, reconnects, actions.

What is running is read in full only when a connection is (re)established; after that
libvirt's lifecycle events, delivered on the asyncio loop through libvirtaio, say which
domain to read again. Blocking libvirt calls run in a small thread pool, each with a
timeout, so a wedged libvirtd can slow a CIM request down but never hang the server.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import threading
import time
from typing import Any, Callable, TypeVar

import libvirt
import libvirtaio

from ..inventory.records import RunningDomain, RunState
from .domxml import DomainXMLError, canonical_uuid, parse_domain_xml

log = logging.getLogger(__name__)

_T = TypeVar("_T")

BACKOFF_MIN = 0.2       # seconds before the first reconnect attempt
BACKOFF_MAX = 5.0       # and the cap of the doubling
KEEPALIVE = (5, 3)      # interval (s), count: a silent peer is dropped after ~20 s
READ_RETRIES = 8        # re-reads of one domain after a failed or timed-out read
_NO_DOMAIN = libvirt.VIR_ERR_NO_DOMAIN

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


class LibvirtError(Exception):
    """A libvirt call failed; `message` is libvirt's own text, `code` its virErrorNumber."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class DomainNotFound(LibvirtError):
    """No domain with that UUID (or the UUID is not a UUID)."""


class LibvirtUnavailable(LibvirtError):
    """There is no working connection to libvirt right now."""


class LibvirtTimeout(LibvirtUnavailable):
    """libvirt did not answer within the call timeout."""


# ---- the event loop glue -------------------------------------------------------------

class _Descriptor(libvirtaio.Descriptor):
    def _handle(self, event: int) -> None:
        # Another thread may remove a watch while the loop dispatches this fd: skip
        # callbacks that are gone rather than call libvirt back for a removed watch.
        for callback in list(self.callbacks.values()):
            if callback.event is not None and callback.event & event \
                    and callback.iden in self.callbacks:
                callback.cb(callback.iden, self.fd, event, callback.opaque)


class _Descriptors(libvirtaio.DescriptorDict):
    def __missing__(self, fd: int) -> _Descriptor:
        descriptor = _Descriptor(self.impl, fd)
        self[fd] = descriptor
        return descriptor


class _AsyncIOImpl(libvirtaio.virEventAsyncIOImpl):
    """libvirtaio's adapter, made safe for two things our use of libvirt needs.

    libvirt calls the add/update/remove hooks from whichever thread made the API
    call, and we make most calls from executor threads; asyncio objects may only be
    touched on the loop's thread. So the bookkeeping happens at once under a lock and
    the loop-side work (readers, timer tasks, free callbacks) is handed to the loop.
    Second, libvirt accepts one event implementation per process, while tests run
    one asyncio loop after another: `rebind` moves the live handles to a new loop.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self.descriptors = _Descriptors(self)
        self._lock = threading.RLock()
        self._thread = threading.get_ident()

    # -- dispatch to the loop's thread

    def _on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            if threading.get_ident() == self._thread:
                fn(*args)
            else:
                self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:        # the loop is closed: nothing is left to drive
            log.debug("libvirt event hook after its loop closed")

    def _free_later(self, opaque: Any) -> None:
        """libvirt forbids running a free callback from inside the remove hook."""
        try:
            self.loop.call_soon_threadsafe(self._free, opaque)
        except RuntimeError:
            log.debug("libvirt free callback dropped: loop closed")

    def _free(self, opaque: Any) -> None:
        libvirt.virEventInvokeFreeCallback(opaque)
        self._pending_dec()

    # libvirtaio counts handles and timers whose free callback has not run yet. The
    # count goes up on whichever thread called libvirt and down on the loop's thread:
    # both under the lock, or a read-modify-write on one thread loses the other's.

    def _pending_inc(self) -> None:
        with self._lock:
            super()._pending_inc()

    def _pending_dec(self) -> None:
        with self._lock:
            super()._pending_dec()

    # -- file handles

    def _add_handle(self, fd: int, event: int, cb: Any, opaque: Any) -> int:
        with self._lock:
            desc = self.descriptors[fd]
            callback = libvirtaio.FDCallback(self, cb, opaque, descriptor=desc, event=event)
            self.callbacks[callback.iden] = callback
            desc.callbacks[callback.iden] = callback
            self._pending_inc()
        self._on_loop(self._sync_fd, fd)
        return callback.iden

    def _update_handle(self, watch: int, event: int) -> None:
        with self._lock:
            callback = self.callbacks.get(watch)
            if not isinstance(callback, libvirtaio.FDCallback):
                return
            callback.event = event
            fd = callback.descriptor.fd
        self._on_loop(self._sync_fd, fd)

    def _remove_handle(self, watch: int) -> int:
        with self._lock:
            callback = self.callbacks.pop(watch, None)
            if not isinstance(callback, libvirtaio.FDCallback):
                return -1
            desc = callback.descriptor
            desc.callbacks.pop(watch, None)
            if not desc.callbacks and dict.get(self.descriptors, desc.fd) is desc:
                del self.descriptors[desc.fd]
        self._on_loop(self._sync_fd, desc.fd)
        self._free_later(callback.opaque)
        return 0

    def _sync_fd(self, fd: int) -> None:
        """Make the loop watch `fd` exactly as the current callbacks ask."""
        with self._lock:
            desc = dict.get(self.descriptors, fd)
            if desc is None:
                self.loop.remove_reader(fd)
                self.loop.remove_writer(fd)
                return
            try:
                desc.update()
            except OSError:
                # The fd was closed and its number reused before we saw the removal:
                # forget the stale registration and register the new socket afresh.
                self.loop.remove_reader(fd)
                self.loop.remove_writer(fd)
                desc.update()

    # -- timers

    def _add_timeout(self, timeout: int, cb: Any, opaque: Any) -> int:
        with self._lock:
            timer = libvirtaio.TimeoutCallback(self, cb, opaque)
            timer.timeout = timeout
            timer._armed = None
            self.callbacks[timer.iden] = timer
            self._pending_inc()
        self._on_loop(self._sync_timer, timer)
        return timer.iden

    def _update_timeout(self, timer_id: int, timeout: int) -> None:
        with self._lock:
            timer = self.callbacks.get(timer_id)
            if not isinstance(timer, libvirtaio.TimeoutCallback):
                return
            timer.timeout = timeout
        self._on_loop(self._sync_timer, timer)

    def _remove_timeout(self, timer_id: int) -> int:
        with self._lock:
            timer = self.callbacks.pop(timer_id, None)
            if not isinstance(timer, libvirtaio.TimeoutCallback):
                return -1
            timer.timeout = -1
        self._on_loop(self._sync_timer, timer)
        self._free_later(timer.opaque)
        return 0

    def _sync_timer(self, timer: libvirtaio.TimeoutCallback) -> None:
        """Run a timer task iff the timer is enabled; restart it when its period changed."""
        with self._lock:
            live = self.callbacks.get(timer.iden) is timer and timer.timeout >= 0
            task = timer._task
            if task is not None and not task.done() and live and timer._armed == timer.timeout:
                return
            if task is not None:
                task.cancel()
                timer._task = None
            if live:
                timer._armed = timer.timeout
                timer._task = self.loop.create_task(self._run_timer(timer))

    async def _run_timer(self, timer: libvirtaio.TimeoutCallback) -> None:
        period = timer._armed
        while True:
            await asyncio.sleep(period / 1000 if period > 0 else 0)
            # Re-check after the sleep: a disable from another thread may be in flight.
            if self.callbacks.get(timer.iden) is not timer or timer.timeout < 0:
                return
            timer.cb(timer.iden, timer.opaque)

    # -- moving between loops

    def rebind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve libvirt from `loop` from now on, carrying over the live handles."""
        with self._lock:
            old = self.loop
            if old is loop:
                return
            if not old.is_closed() and old.is_running():
                raise RuntimeError("libvirt events are bound to another running asyncio loop")
            if not old.is_closed():
                for fd in list(self.descriptors):
                    old.remove_reader(fd)
                    old.remove_writer(fd)
            self.loop = loop
            self._thread = threading.get_ident()
            for fd in list(self.descriptors):
                self._sync_fd(fd)
            for cb in list(self.callbacks.values()):
                if isinstance(cb, libvirtaio.TimeoutCallback):
                    cb._task = None
                    self._sync_timer(cb)


_impl_lock = threading.Lock()


def _quiet_error_handler(_ctx: object, err: object) -> None:
    """libvirt prints every error on stderr by default; we raise and log them instead."""
    log.debug("libvirt: %s", err)


def ensure_event_loop_impl(loop: asyncio.AbstractEventLoop | None = None
                           ) -> libvirtaio.virEventAsyncIOImpl:
    """Route libvirt's events through the running asyncio loop; call before any open.

    Idempotent; safe to call from every component that opens a connection. Called
    again from a later loop (one asyncio.run after another), it moves over to it.
    """
    if loop is None:
        loop = asyncio.get_running_loop()
    with _impl_lock:
        impl = libvirtaio.getCurrentImpl()
        if impl is None:
            libvirt.registerErrorHandler(_quiet_error_handler, None)
            impl = _AsyncIOImpl(loop).register()
            libvirtaio._current_impl = impl      # so libvirtaio.getCurrentImpl() sees it
            log.debug("libvirt event loop implementation registered")
        elif impl.loop is not loop:
            if not isinstance(impl, _AsyncIOImpl):
                raise RuntimeError("a libvirtaio implementation for another loop is registered")
            impl.rebind(loop)
        return impl


# ---- reading domains (blocking: run in the executor) -----------------------------------

def _run_state(value: int | None) -> RunState:
    try:
        return RunState(int(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return RunState.NOSTATE


def _read_domain(dom: libvirt.virDomain, state: int | None = None, *,
                 persistent: bool | None = None,
                 autostart: bool | None = None) -> RunningDomain | None:
    """The RunningDomain for `dom`, or None when it is not active (or gone).

    What the caller already knows from bulk listings is passed in and not asked again.
    """
    try:
        if state is None:
            state = dom.state()[0]
        if state == libvirt.VIR_DOMAIN_SHUTOFF:
            return None
        xml = dom.XMLDesc(0)
        if autostart is None:
            try:
                autostart = bool(dom.autostart())
            except libvirt.libvirtError:
                autostart = None
        if persistent is None:
            persistent = bool(dom.isPersistent())
        dom_id = dom.ID()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == _NO_DOMAIN:
            return None
        raise
    try:
        config = parse_domain_xml(xml, autostart)
    except DomainXMLError as exc:
        log.warning("skipping running domain %s: %s", dom.UUIDString(), exc)
        return None
    return RunningDomain(config=config, state=_run_state(state), persistent=persistent,
                         id=dom_id if dom_id is not None and dom_id >= 0 else None)


def _uuids(conn: libvirt.virConnect, flags: int) -> set[str]:
    return {d.UUIDString() for d in conn.listAllDomains(flags)}


def _read_all(conn: libvirt.virConnect) -> dict[str, RunningDomain]:
    """Every active domain: listings and one stats call in bulk, then one XML each."""
    active = libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE
    doms = conn.listAllDomains(active)
    # Bulk answers to what would otherwise be two more round trips per domain.
    persistent = _uuids(conn, active | libvirt.VIR_CONNECT_LIST_DOMAINS_PERSISTENT)
    autostart = _uuids(conn, active | libvirt.VIR_CONNECT_LIST_DOMAINS_AUTOSTART)
    states: dict[str, int] = {}
    try:
        for dom, stats in conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE,
                                                 libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE):
            if "state.state" in stats:
                states[dom.UUIDString()] = stats["state.state"]
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
            raise
        log.debug("getAllDomainStats unsupported here; asking each domain for its state")
    out: dict[str, RunningDomain] = {}
    for dom in doms:
        key = dom.UUIDString()
        running = _read_domain(dom, states.get(key), persistent=key in persistent,
                               autostart=key in autostart)
        if running is not None:
            out[running.uuid] = running
    return out


def _read_one(conn: libvirt.virConnect, uuid: str) -> RunningDomain | None:
    try:
        dom = conn.lookupByUUIDString(uuid)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == _NO_DOMAIN:
            return None
        raise
    return _read_domain(dom)


# ---- the source ------------------------------------------------------------------------

class LibvirtSource:
    """The running domains of one libvirt URI, kept current by events.

    `running` holds the last known state; while the connection is down it keeps the
    last known domains (`connected` is False) and a fresh snapshot replaces it on
    reconnect, so a libvirtd restart does not make every domain vanish and reappear.
    """

    def __init__(self, uri: str | None = None, *, conn: libvirt.virConnect | None = None,
                 call_timeout: float = 10.0,
                 on_snapshot: Callable[[dict[str, RunningDomain]], None] | None = None,
                 on_domain: Callable[[str, RunningDomain | None], None] | None = None) -> None:
        if uri is None and conn is None:
            uri = os.environ.get("LIBVIRT_DEFAULT_URI") or None
        self.uri = uri
        self.call_timeout = call_timeout
        self.load_timeout = max(call_timeout, 60.0)   # a full read of thousands of domains
        self.on_snapshot = on_snapshot
        self.on_domain = on_domain
        self.running: dict[str, RunningDomain] = {}
        self.connected = False
        self._shared = conn
        self._conn: libvirt.virConnect | None = None
        self._conn_uri: str | None = None
        self._owned = False
        self._close_cb = False
        self._event_ids: list[int] = []
        # Registration runs on an executor thread and may outlive the timeout of its
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
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._dropped: asyncio.Event | None = None
        self._up: asyncio.Event | None = None
        self._stopping = False
        self._host_cache: tuple[int, float, dict[str, Any]] | None = None

    @property
    def conn(self) -> libvirt.virConnect | None:
        return self._conn if self.connected else None

    # ---- life cycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Connect (or keep trying in the background); returns after the first attempt."""
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        ensure_event_loop_impl(self._loop)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=4, thread_name_prefix="libvirt")
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
        await self._disconnect()
        # Let the free callbacks that closing queued on the loop run before it ends.
        for _ in range(3):
            await asyncio.sleep(0)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

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
        with self._reg_lock:
            self._gen += 1
            gen = self._gen
        self._dropped = asyncio.Event()
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
            snapshot = await self._call(functools.partial(_read_all, conn),
                                        timeout=self.load_timeout, what="read domains")
        finally:
            self._loading = False
        if gen != self._gen:
            raise LibvirtUnavailable("connection lost while reading the domains")
        self.running = snapshot
        self.connected = True
        self._host_cache = None
        log.info("libvirt: connected to %s, %d running domains", self._describe(), len(snapshot))
        self._notify_snapshot()
        if self._up is not None:
            self._up.set()
        for uuid in list(self._dirty):       # events that came in during the full read
            self._kick(uuid)

    async def _open(self, uri: str | None) -> libvirt.virConnect:
        """Open a connection; one that arrives after we gave up waiting is closed."""
        assert self._loop is not None and self._executor is not None
        fut = self._loop.run_in_executor(self._executor, functools.partial(
            _guarded, functools.partial(libvirt.open, uri)))

        def close_late(f: asyncio.Future[libvirt.virConnect]) -> None:
            if not f.cancelled() and f.exception() is None:
                threading.Thread(target=_quietly, args=(f.result().close,),
                                 name="libvirt-close", daemon=True).start()

        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.call_timeout)
        except asyncio.TimeoutError:
            fut.add_done_callback(close_late)
            raise LibvirtTimeout(f"libvirt open of {uri or 'the default URI'} did not answer "
                                 f"within {self.call_timeout:g} s") from None
        except asyncio.CancelledError:      # stop() while the open is under way
            fut.add_done_callback(close_late)
            raise

    def _shared_alive(self) -> bool:
        """Use the caller's connection unless it has died (then we open our own)."""
        try:
            return bool(self._shared.isAlive())  # type: ignore[union-attr]
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
                _quietly(conn.close)

    def _register_all(self, conn: libvirt.virConnect, gen: int) -> str:
        def keep(cb_id: int) -> None:
            with self._reg_lock:
                if gen == self._gen:
                    self._event_ids.append(cb_id)
                    return
            _quietly(conn.domainEventDeregisterAny, cb_id)
            raise LibvirtUnavailable("connection given up while its events were registered")

        conn_uri = conn.getURI()
        keep(conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, gen))
        for event_id in _CHANGE_EVENTS:
            try:
                cb_id = conn.domainEventRegisterAny(None, event_id, self._on_change, gen)
            except libvirt.libvirtError as exc:
                log.debug("libvirt: event %d not available: %s", event_id, exc)
                continue
            keep(cb_id)
        try:
            conn.registerCloseCallback(self._on_close, gen)
        except libvirt.libvirtError as exc:   # e.g. the owner of a shared connection has one
            log.debug("libvirt: no close callback on %s: %s", conn_uri, exc)
        else:
            with self._reg_lock:
                current = gen == self._gen
                if current:
                    self._close_cb = True
            if not current:
                _quietly(conn.unregisterCloseCallback)
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
            for cb_id in ids:
                _quietly(conn.domainEventDeregisterAny, cb_id)
            if close_cb:
                _quietly(conn.unregisterCloseCallback)
            if owned:
                _quietly(conn.close)

        try:
            await self._call(release, timeout=min(self.call_timeout, 5.0), what="close")
        except LibvirtError as exc:
            log.debug("libvirt: releasing the old connection: %s", exc.message)
        if was_connected and not self._stopping:
            log.warning("libvirt: lost the connection to %s; reconnecting", self._describe())

    # ---- events ---------------------------------------------------------------------

    def _on_lifecycle(self, _conn: Any, dom: libvirt.virDomain, event: int, detail: int,
                      gen: int) -> None:
        self._post(gen, dom.UUIDString(), event)

    def _on_change(self, _conn: Any, dom: libvirt.virDomain, *args: Any) -> None:
        """Any of _CHANGE_EVENTS: their payloads differ, the opaque (gen) comes last."""
        self._post(args[-1], dom.UUIDString(), None)

    def _post(self, gen: int, uuid: str, event: int | None) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._event, gen, uuid, event)
        except RuntimeError:
            pass

    def _event(self, gen: int, uuid: str, event: int | None) -> None:
        if gen != self._gen or self._stopping:
            return
        key = canonical_uuid(uuid) or uuid
        log.debug("libvirt: event %s on %s", event, key)
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
                try:
                    dom = await self._call(functools.partial(_read_one, conn, uuid),
                                           what="read domain")
                except LibvirtError as exc:
                    if gen == self._gen:
                        self._retry_later(uuid, exc)
                    return exc
                if gen != self._gen:
                    return LibvirtUnavailable("the connection to libvirt was lost while "
                                              "reading the domain")
                self._retries.pop(uuid, None)
                self._set_domain(uuid, dom)
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

    def _notify_snapshot(self) -> None:
        if self.on_snapshot is not None:
            try:
                self.on_snapshot(dict(self.running))
            except Exception:
                log.exception("libvirt: on_snapshot callback failed")

    # ---- calls into libvirt ---------------------------------------------------------

    async def _call(self, fn: Callable[[], _T], *, timeout: float | None = None,
                    what: str = "call") -> _T:
        """Run a blocking libvirt call in the pool, with a timeout, errors translated."""
        if self._executor is None or self._loop is None:
            raise LibvirtUnavailable("the libvirt source is not started")
        limit = self.call_timeout if timeout is None else timeout
        gen = self._gen
        fut = self._loop.run_in_executor(self._executor, functools.partial(_guarded, fn))
        try:
            return await asyncio.wait_for(fut, limit)
        except asyncio.TimeoutError:
            raise LibvirtTimeout(f"libvirt {what} did not answer within {limit:g} s") from None
        except LibvirtUnavailable as exc:
            self._drop(gen, exc.message)
            raise

    def _live_conn(self) -> libvirt.virConnect:
        conn = self._conn
        if conn is None or not self.connected:
            raise LibvirtUnavailable(f"not connected to libvirt ({self._describe()})")
        return conn

    async def _action(self, uuid: str, what: str, op: Callable[[libvirt.virDomain], Any]) -> None:
        key = canonical_uuid(uuid)
        if key is None:
            raise DomainNotFound(f"no domain with UUID {uuid!r}", _NO_DOMAIN)
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


def _quietly(fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except libvirt.libvirtError as exc:
        log.debug("libvirt: %s: %s", getattr(fn, "__name__", fn), exc)


def _guarded(fn: Callable[[], _T]) -> _T:
    """Blocking side of `_call`: turn libvirt's exceptions into ours, message kept."""
    try:
        return fn()
    except libvirt.libvirtError as exc:
        code = exc.get_error_code()
        message = exc.get_error_message() or str(exc)
        if code == _NO_DOMAIN:
            raise DomainNotFound(message, code) from None
        if code in (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INVALID_CONN) \
                or exc.get_error_domain() == libvirt.VIR_FROM_RPC:
            raise LibvirtUnavailable(message, code) from None
        raise LibvirtError(message, code) from None
