"""The reference org.example.virt.Manager: stores, a memory policy, StartDomain.

The exported interface is checked against the contract XML at start-up, so this
service cannot drift from what clients load. Every change, whether made through the
bus or behind our back (virsh define, a domain that stopped), is found by comparing
snapshots and announced with DomainDefined / DomainUndefined / DomainChanged and a new
Generation.

The snapshot is kept incrementally: the local stores (SQLite, libvirt) are small and
re-read on every poll, the farm store (PostgreSQL, pgstore.py) says which UUIDs
changed. A journal of (generation, UUID) answers ListChangesSince; a sorted index of
the listed UUIDs answers ListDomainsPage. With a farm store, StartDomain places the
definition in the database first (exactly one host wins), and this service releases
and adopts its host's placements as libvirt starts and stops domains (lifecycle
events when libvirt can deliver them, else the poll).

The module is longer than most (about 800 lines) because the snapshot, the journal,
the paging index and the farm's placements change together under one sync lock, and
their invariants are easier to check in one place.

(No `from __future__ import annotations` here: the D-Bus decorators read the
annotations, which are D-Bus type strings, not Python types.)
"""
import asyncio
import bisect
import collections
import contextlib
import functools
import logging
import time
import uuid as uuidlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import libvirt

from ..contract import (BUS_NAME, ERROR_ALREADY_RUNNING, ERROR_FAILED,
                        ERROR_GENERATION_UNKNOWN, ERROR_INVALID_ARGUMENT, ERROR_NOT_FOUND,
                        ERROR_REFUSED, INTERFACE, MAX_PAGE, OBJECT_PATH, InvalidEntry,
                        compare_members, config_from_dbus, config_to_dbus, interface_members)
from ..contract.bus import (DBusError, MessageBus, NameFlag, PropertyAccess, RequestNameReply,
                            ServiceInterface, Variant, connect, dbus_property, method, signal)
from ..domain.records import DomainConfig
from ..domain.defaults import DEFAULT_MEMORY_KIB
from ..domain.domxml import config_to_domain_xml
from ..domain.records import canonical_uuid
from .store import (LibvirtConnection, LibvirtStore, Store, Stored, StoreError,
                    libvirt_type_for, open_store)

log = logging.getLogger(__name__)

# ListChangesSince answers from a journal of this many (generation, UUID) pairs; a
# client further behind lists again (with a farm store, the database's change log
# reaches further back).
JOURNAL_MAX = 200_000
DEFAULT_PAGE = 1000
# More changes than this in one sync are announced with one signal of each kind.
SIGNAL_BURST = 1000


def _is_farm(store: Store) -> bool:
    return bool(getattr(store, "farm", False))


@dataclass(frozen=True, slots=True)
class Entry:
    """One definition as the service sees it: which store holds it, is it running.

    Farm definitions: `active` means placed on this host, `host` names the host it
    is placed on, `elsewhere` means placed on another (live) host: not offered here."""
    config: DomainConfig
    active: bool
    store: Store
    host: Optional[str] = None
    elsewhere: bool = False


def _size(kib: int) -> str:
    """Memory in a form a person reads at a glance, with the exact KiB beside it."""
    for unit, factor in (("TiB", 1024 ** 3), ("GiB", 1024 ** 2), ("MiB", 1024)):
        if kib >= factor:
            return f"{kib / factor:.1f} {unit} ({kib} KiB)"
    return f"{kib} KiB"


def _contract_errors(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Turn every failure of a handler into one of the contract's D-Bus errors."""
    @functools.wraps(fn)
    async def wrapper(self: "ManagerService", *args: Any) -> Any:
        try:
            return await fn(self, *args)
        except DBusError:
            raise
        except StoreError as exc:
            raise DBusError(exc.name, exc.message) from None
        except InvalidEntry as exc:
            raise DBusError(ERROR_INVALID_ARGUMENT, str(exc)) from None
        except libvirt.libvirtError as exc:
            raise DBusError(ERROR_FAILED, f"libvirt: {exc.get_error_message() or exc}") from None
        except Exception as exc:
            log.exception("%s failed", fn.__name__)
            raise DBusError(ERROR_FAILED, f"{fn.__name__} failed: {exc}") from None
    return wrapper


class ManagerService(ServiceInterface):
    """org.example.virt.Manager over one or more stores and one libvirt connection.

    `libvirt_conn` is an open virConnect (shared with the rest of the process, e.g. by
    the demo) or a LibvirtConnection; SQLite definitions start there. DefineDomain
    writes to the first store.
    """

    def __init__(self, stores: Sequence[Store],
                 libvirt_conn: Union[libvirt.virConnect, LibvirtConnection, None] = None,
                 *, poll_interval: float = 1.0, call_timeout: float = 30.0) -> None:
        super().__init__(INTERFACE)
        self.call_timeout = call_timeout
        if not stores:
            raise ValueError("the Manager needs at least one store")
        self.stores = list(stores)
        if isinstance(libvirt_conn, LibvirtConnection):
            self.libvirt = libvirt_conn
        else:
            self.libvirt = LibvirtConnection(None, libvirt_conn)
        self.poll_interval = poll_interval
        farms = [s for s in self.stores if _is_farm(s)]
        if len(farms) > 1:
            raise ValueError("at most one postgresql store")
        self.farm: Any = farms[0] if farms else None
        # Only a farm store: Generation is the farm's (so it survives our restarts);
        # otherwise it starts from the clock so a restart never repeats an old value.
        self._farm_only = self.farm is not None and len(self.stores) == 1
        self._generation = 0 if self._farm_only else time.time_ns() // 1000
        self._snapshot: dict[str, Entry] = {}
        self._local: dict[str, Entry] = {}          # what the local stores hold
        self._listed: list[str] = []                # sorted UUIDs the lists offer
        self._journal: collections.deque[tuple[int, str]] = collections.deque()
        self._journal_floor: Optional[int] = None   # complete for changes after this
        self._sync_wanted = asyncio.Event()
        self._starting: set[str] = set()            # farm starts in progress
        self._placed_at: dict[str, float] = {}      # monotonic time we (re)claimed a UUID
        self._place_lock = asyncio.Lock()           # policy + placement, one at a time
        self._start_locks: dict[str, asyncio.Lock] = {}   # one start per UUID at a time
        self._events_conn: Any = None               # the virConnect with our callback
        self._warned_twice: set[tuple[str, int]] = set()
        self._change_lock = asyncio.Lock()      # defines, undefines, updates, starts
        self._sync_lock = asyncio.Lock()        # snapshot comparison and signals
        self._poller: Optional[asyncio.Task] = None
        self._stopping = False
        self._warned_dupes: set[str] = set()
        self._troubles: dict[str, str] = {}

    # ------------------------------------------------------------ plumbing

    def verify_contract(self) -> None:
        """Refuse to run if what we export differs from the contract XML."""
        problems = compare_members(interface_members(self.introspect()))
        if problems:
            raise RuntimeError("the Manager service does not match "
                               "org.example.virt.Manager.xml: " + "; ".join(problems))

    async def start(self) -> None:
        self._stopping = False
        self._loop = asyncio.get_running_loop()
        if self.farm is not None:
            self.farm.on_change = self._want_sync
            await self.farm.open()
        await self._sync(emit=False)
        await self._blocking(self._watch_libvirt)
        self._poller = asyncio.create_task(self._poll(), name="manager-service-poll")

    def _want_sync(self) -> None:
        """Something changed (a farm notification, a libvirt lifecycle event): sync now."""
        self._sync_wanted.set()

    def _watch_libvirt(self) -> None:
        """Follow libvirt's lifecycle events on the service's connection, when this
        process has an event loop implementation registered (`cim-provider manager`
        with a farm store registers libvirtaio); otherwise the poll notices stops.
        Blocking; called again after every poll so a reopened connection is followed."""
        if self.farm is None:
            return
        try:
            conn = self.libvirt.get()
        except StoreError:
            return
        if conn is self._events_conn:
            return
        loop = self._loop

        def lifecycle(_conn: Any, dom: Any, event: int, _detail: int, _opaque: Any) -> None:
            loop.call_soon_threadsafe(self._want_sync)
        try:
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                        lifecycle, None)
            self._events_conn = conn
            log.info("following libvirt lifecycle events")
        except libvirt.libvirtError as exc:
            self._events_conn = conn       # do not ask again on this connection
            log.info("no libvirt lifecycle events (%s); noticing stopped domains every %g s",
                     exc.get_error_message() or exc, self.poll_interval)

    async def stop(self) -> None:
        """Stop polling. The flag as well as the cancel: asyncio.wait_for (in
        _blocking) may swallow a cancel that arrives as its call completes, and the
        poller must end anyway."""
        self._stopping = True
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.cancel()
            await asyncio.wait({poller})     # never swallows a cancel of our own
        if self.farm is not None:
            await self.farm.aclose()

    async def close(self) -> None:
        """Stop polling, let the calls already running finish (for at most
        call_timeout), then close the stores. Unexport the service first, so that no
        new call arrives."""
        await self.stop()
        held = []
        try:
            for lock in (self._change_lock, self._sync_lock):
                await asyncio.wait_for(lock.acquire(), self.call_timeout)
                held.append(lock)
        except asyncio.TimeoutError:
            log.warning("calls still running after %g s; closing the stores anyway",
                        self.call_timeout)
        try:
            self._close_stores()
        finally:
            for lock in held:
                lock.release()

    def _close_stores(self) -> None:
        for store in self.stores:
            try:
                store.close()
            except Exception as exc:
                log.warning("%s: cannot close: %s", store.spec, exc)

    async def _poll(self) -> None:
        """Notice changes made behind our back (virsh, a guest shutting down), at once
        when a farm notification or a libvirt event asks for it."""
        while not self._stopping:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._sync_wanted.wait(), self.poll_interval)
            self._sync_wanted.clear()
            if self._stopping:
                return
            try:
                await self._sync()
                if self.farm is not None:
                    await self._blocking(self._watch_libvirt)
                self._trouble("polling", None)
            except Exception as exc:
                # Once when it starts failing, once when it works again: not per poll.
                self._trouble("polling", f"cannot re-read the definitions: {exc}")

    async def _blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking store or libvirt call off the loop, with a deadline: a hung
        libvirtd must not leave our own callers without an answer."""
        future = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        try:
            return await asyncio.wait_for(future, self.call_timeout)
        except asyncio.TimeoutError:
            raise DBusError(ERROR_FAILED, f"{getattr(fn, '__name__', 'a call')} did not "
                            f"finish within {self.call_timeout:g} s (libvirt or storage "
                            "not answering)") from None

    def _running_uuids(self) -> set[str]:
        """UUIDs libvirt runs on the service's connection (blocking)."""
        conn = self.libvirt.get()
        return {d.UUIDString() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)}

    def _collect(self) -> tuple[dict[str, Entry], Optional[set[str]]]:
        """Every definition in every local store (blocking), and the UUIDs libvirt runs
        (None: libvirt did not answer). A UUID held twice: first store wins. The farm
        store is merged on the loop (`_merged`)."""
        try:
            running: Optional[set[str]] = self._running_uuids()
            self._trouble("libvirt", None)
        except (StoreError, libvirt.libvirtError) as exc:
            self._trouble("libvirt", f"cannot ask libvirt which domains run: {exc}")
            running = None
        out: dict[str, Entry] = {}
        for store in self.stores:
            if _is_farm(store):
                continue
            try:
                listed = store.list()
                self._trouble(store.spec, None)
            except (StoreError, libvirt.libvirtError) as exc:
                self._trouble(store.spec, f"{store.spec}: cannot list: {exc}")
                # Keep what we knew rather than announcing every definition undefined.
                listed = [_stored_from(e) for e in self._snapshot.values() if e.store is store]
            for item in listed:
                uuid = item.config.uuid
                if uuid in out:
                    if uuid not in self._warned_dupes:
                        self._warned_dupes.add(uuid)
                        log.warning("UUID %s is defined in %s and in %s; using the first",
                                    uuid, out[uuid].store.spec, store.spec)
                    continue
                active = item.active
                if active is None:
                    if running is not None:
                        active = uuid in running
                    else:
                        # libvirt did not answer: nothing is known to have started or
                        # stopped, so keep what we knew (announcing every definition
                        # stopped would offer running domains to be started).
                        known = self._snapshot.get(uuid)
                        active = known.active if known is not None else False
                out[uuid] = Entry(item.config, active, store)
        return out, running

    def _trouble(self, key: str, problem: Optional[str]) -> None:
        """Log a failing dependency once when it starts failing and once when it
        recovers, not on every poll."""
        before = self._troubles.get(key)
        if problem is None:
            if before is not None:
                del self._troubles[key]
                log.info("%s works again", key)
        elif before is None:
            self._troubles[key] = problem
            log.warning("%s", problem)

    def _merged(self, uuid: str) -> Optional[Entry]:
        """The entry for `uuid` across the stores, first store first."""
        for store in self.stores:
            if _is_farm(store):
                fe = self.farm.entries.get(uuid)
                if fe is None:
                    continue
                p = fe.placement
                here = p is not None and p.host_id == self.farm.host_id
                return Entry(fe.config, here, store,
                             self.farm.host_name_of(p.host_id) if p is not None else None,
                             p is not None and not here)
            e = self._local.get(uuid)
            if e is not None and e.store is store:
                return e
        return None

    async def _sync(self, emit: bool = True) -> dict[str, Entry]:
        """Re-read the local stores, take the farm's changes; announce what changed."""
        async with self._sync_lock:
            t_running = time.monotonic()
            local, running = await self._blocking(self._collect)
            if self.farm is not None and running is not None:
                await self._reconcile(running, t_running)
            dirty = self.farm.take_dirty() if self.farm is not None else set()
            touched = {u for u in local.keys() | self._local.keys()
                       if local.get(u) != self._local.get(u)}
            if dirty is None:
                touched |= set(self.farm.entries) | set(self._snapshot)
            else:
                touched |= dirty
            self._local = local
            defined: list[str] = []
            undefined: list[str] = []
            changed: list[str] = []
            snap = self._snapshot
            bulk = len(touched) > 1000        # then sort once rather than insert each
            for u in touched:
                old = snap.get(u)
                new = self._merged(u)
                if new == old:
                    continue
                if new is None:
                    del snap[u]
                    undefined.append(u)
                else:
                    snap[u] = new
                    (defined if old is None else changed).append(u)
                if not bulk:
                    self._index(u, old, new)
            if bulk:
                self._listed = sorted(u for u, e in snap.items() if not e.elsewhere)
            before = self._generation
            if self._farm_only:
                self._generation = max(self._generation, self.farm.generation or 0)
            elif defined or undefined or changed:
                self._generation += 1
            for u in (*defined, *undefined, *changed):
                self._journal.append((self._generation, u))
            while len(self._journal) > JOURNAL_MAX:
                self._journal_floor = self._journal.popleft()[0]
            if self._journal_floor is None:
                self._journal_floor = self._generation
            if not emit:
                return snap
            await self._signal(defined, undefined, changed)
            if self._generation != before:
                self.emit_properties_changed({"Generation": self._generation})
            if defined or undefined or changed:
                log.info("generation %d: %d defined, %d undefined, %d changed",
                         self._generation, len(defined), len(undefined), len(changed))
            return snap

    async def _signal(self, defined: list[str], undefined: list[str],
                      changed: list[str]) -> None:
        """One signal per change, letting the bus connection drain every hundred; a
        bulk change (over SIGNAL_BURST, e.g. thousands of rows written at once into the
        farm) is announced with one signal of each kind instead: clients re-read on any
        signal, and a burst of thousands would only flood the bus."""
        kinds = ((self.DomainDefined, defined), (self.DomainUndefined, undefined),
                 (self.DomainChanged, changed))
        if len(defined) + len(undefined) + len(changed) > SIGNAL_BURST:
            for emit, uuids in kinds:
                if uuids:
                    emit(uuids[0])
            return
        sent = 0
        for emit, uuids in kinds:
            for u in uuids:
                emit(u)
                sent += 1
                if sent % 100 == 0:
                    await asyncio.sleep(0)

    def _index(self, uuid: str, old: Optional[Entry], new: Optional[Entry]) -> None:
        """Keep `_listed` (sorted UUIDs the lists offer) in step with the snapshot."""
        was = old is not None and not old.elsewhere
        now = new is not None and not new.elsewhere
        if was == now:
            return
        i = bisect.bisect_left(self._listed, uuid)
        if now:
            self._listed.insert(i, uuid)
        elif i < len(self._listed) and self._listed[i] == uuid:
            del self._listed[i]

    async def _reconcile(self, running: set[str], t_running: float) -> None:
        """Make this host's placements match what libvirt runs: release the placement
        of a domain that stopped (or never started), adopt a running farm definition
        nobody holds. `running` was read at `t_running`: a placement made since is
        left alone, its domain may not have shown up in that read."""
        farm = self.farm
        if not farm.connected or farm.generation is None:
            return
        try:
            for u, token in list(farm.mine.items()):
                if u in running or u in self._starting or self._placed_at.get(u, 0) > t_running:
                    continue
                if await farm.release(u, token):
                    log.info("%s stopped on this host: released its placement", u)
                self._placed_at.pop(u, None)
            for u in running:
                fe = farm.entries.get(u)
                if fe is None or u in self._starting or u in farm.mine:
                    continue
                if fe.placement is not None:
                    key = (u, fe.placement.token)
                    if key not in self._warned_twice:
                        self._warned_twice.add(key)
                        log.error("%s (%s) runs on this host, but the farm has it placed on %s: "
                                  "it runs twice (this host's lease had expired); stop one",
                                  fe.config.name, u, farm.host_name_of(fe.placement.host_id))
                    continue
                if not farm.lease_ok:
                    continue
                self._placed_at[u] = time.monotonic()
                token, other = await farm.adopt(u)
                if token is not None:
                    log.info("%s (%s) runs on this host: adopted its placement",
                             fe.config.name, u)
        except StoreError as exc:
            self._trouble("reconcile", f"cannot reconcile this host's placements: {exc.message}")
        else:
            self._trouble("reconcile", None)

    async def _store_call(self, store: Store, name: str, *args: Any) -> Any:
        """A store's define/undefine/update: awaited for the farm, off the loop otherwise."""
        if _is_farm(store):
            return await getattr(store, name)(*args)
        return await self._blocking(getattr(store, name), *args)

    async def _entry(self, uuid: str) -> Entry:
        canonical = canonical_uuid(uuid)
        if canonical is None:
            raise DBusError(ERROR_INVALID_ARGUMENT, f"{uuid[:80]!r} is not a UUID")
        entry = (await self._sync()).get(canonical)
        if entry is None:
            raise DBusError(ERROR_NOT_FOUND, f"no definition with UUID {canonical}")
        return entry

    def _check_name(self, cfg: DomainConfig) -> None:
        """Names are unique across stores, as libvirt wants them."""
        for other in self._snapshot.values():
            if other.config.name == cfg.name and other.config.uuid != cfg.uuid:
                raise DBusError(ERROR_INVALID_ARGUMENT,
                                f"the name {cfg.name!r} is already used by {other.config.uuid}")

    # ------------------------------------------------------------ starting

    def _free_memory_kib(self, conn: libvirt.virConnect) -> tuple[int, int, int]:
        """(host, used, free) KiB: host memory from getInfo() minus the current memory
        of every running domain. getFreeMemory() is not used: it counts page cache
        and the host's own processes, and the test driver returns a fixed number."""
        host = int(conn.getInfo()[1]) * 1024
        used = 0
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            with contextlib.suppress(libvirt.libvirtError):   # stopped meanwhile
                used += int(dom.info()[2])
        return host, used, max(host - used, 0)

    def _start_blocking(self, entry: Entry) -> str:
        cfg = entry.config
        if isinstance(entry.store, LibvirtStore):
            conn = entry.store.connection.get()
        else:
            conn = self.libvirt.get()
        # A scan, not lookupByUUIDString: a miss is normal here, and libvirt's default
        # error handler would print every miss on stderr.
        dom = next((d for d in conn.listAllDomains() if d.UUIDString() == cfg.uuid), None)
        if dom is not None and dom.isActive():
            raise DBusError(ERROR_ALREADY_RUNNING, f"{cfg.name} ({cfg.uuid}) is already running")
        needed = cfg.memory_kib or cfg.max_memory_kib or DEFAULT_MEMORY_KIB
        host, used, free = self._free_memory_kib(conn)
        if needed > free:
            raise DBusError(ERROR_REFUSED,
                            f"starting {cfg.name} needs {_size(needed)} of memory but only "
                            f"{_size(free)} is free (host {_size(host)}, running domains use "
                            f"{_size(used)})")
        if isinstance(entry.store, LibvirtStore):
            if dom is None:
                raise DBusError(ERROR_NOT_FOUND, f"libvirt no longer has {cfg.name}")
            dom.create()
            log.info("started %s (%s) from %s", cfg.name, cfg.uuid, entry.store.spec)
            return dom.UUIDString()
        xml = config_to_domain_xml(cfg, libvirt_type_for(conn, cfg))
        dom = conn.createXML(xml, 0)
        log.info("started %s (%s) as a transient domain", cfg.name, cfg.uuid)
        return dom.UUIDString()

    # ------------------------------------------------------------ the contract

    def _warn_stale(self) -> None:
        """Lists answered while the farm database is away are the last state read."""
        if self.farm is not None and not self.farm.connected and self.farm.generation is not None:
            log.warning("answering from the farm as last read (generation %s): %s",
                        self.farm.generation, self.farm.down_reason)

    async def _current(self) -> dict[str, Entry]:
        """The snapshot, re-read first unless the farm makes a full re-read costly
        (then it is kept current by notifications and the poll)."""
        if self.farm is not None:
            self._warn_stale()
            return self._snapshot
        return await self._sync()

    @staticmethod
    def _dbus_entry(e: Entry) -> dict[str, Variant]:
        return config_to_dbus(e.config, active=e.active, host=e.host)

    @method()
    @_contract_errors
    async def ListInactiveDomains(self) -> "aa{sv}":  # type: ignore[valid-type]  # reason: D-Bus signature annotation
        snap = await self._current()
        return [config_to_dbus(e.config) for e in snap.values()
                if not e.active and not e.elsewhere]

    @method()
    @_contract_errors
    async def ListDomains(self) -> "aa{sv}":  # type: ignore[valid-type]  # reason: D-Bus signature annotation
        snap = await self._current()
        return [self._dbus_entry(e) for e in snap.values() if not e.elsewhere]

    @method()
    @_contract_errors
    async def ListDomainsPage(self, cursor: "s", limit: "u") -> "aa{sv}s":  # type: ignore[name-defined,valid-type]  # reason: D-Bus signature annotation
        """ListDomains in UUID order, from just after `cursor` ("" = the start)."""
        snap = await self._current()
        limit = min(limit or DEFAULT_PAGE, MAX_PAGE)
        start = bisect.bisect_right(self._listed, cursor) if cursor else 0
        page = self._listed[start:start + limit]
        more = start + limit < len(self._listed)
        return [[self._dbus_entry(snap[u]) for u in page], page[-1] if more and page else ""]

    @method()
    @_contract_errors
    async def ListChangesSince(self, generation: "t") -> "taa{sv}as":  # type: ignore[name-defined,valid-type]  # reason: D-Bus signature annotation
        """What the lists would show differently now than at `generation`."""
        snap = await self._current()
        current = self._generation
        if generation == current:
            return [current, [], []]
        uuids: Optional[set[str]] = None
        if generation < current and self._journal_floor is not None \
                and generation >= self._journal_floor:
            uuids = set()
            for gen, u in reversed(self._journal):
                if gen <= generation:
                    break
                uuids.add(u)
                if len(uuids) > MAX_PAGE:
                    uuids = None
                    break
        elif generation < current and self._farm_only and self.farm.connected:
            uuids = await self.farm.changed_since(generation, MAX_PAGE)
        if uuids is None:
            raise DBusError(ERROR_GENERATION_UNKNOWN,
                            f"cannot say what changed since generation {generation} (now "
                            f"{current}; known since {self._journal_floor}): list again")
        changed = []
        removed = []
        for u in sorted(uuids):
            e = snap.get(u)
            if e is None or e.elsewhere:
                removed.append(u)
            else:
                changed.append(self._dbus_entry(e))
        return [current, changed, removed]

    @method()
    @_contract_errors
    async def StartDomain(self, uuid: "s") -> "s":  # type: ignore[name-defined]  # reason: D-Bus signature annotation
        canonical = canonical_uuid(uuid)
        if self.farm is not None and canonical is not None:
            entry = self._snapshot.get(canonical)
            if entry is not None and _is_farm(entry.store):
                return await self._start_farm(entry)
        async with self._change_lock:
            entry = await self._entry(uuid)
            if _is_farm(entry.store):
                return await self._start_farm(entry)
            if entry.active:
                raise DBusError(ERROR_ALREADY_RUNNING,
                                f"{entry.config.name} ({entry.config.uuid}) is already running")
            running = await self._blocking(self._start_blocking, entry)
            await self._sync()
            return canonical_uuid(running) or running

    async def _start_farm(self, entry: Entry) -> str:
        """Place the definition on this host (one transaction: exactly one host wins),
        then start it in libvirt; if libvirt fails, remove the placement again.
        Concurrent starts of one definition here wait for each other, so each loser
        hears from the database which host won."""
        lock = self._start_locks.setdefault(entry.config.uuid, asyncio.Lock())
        try:
            async with lock:
                current = self._snapshot.get(entry.config.uuid, entry)
                return await self._start_farm_locked(current)
        finally:
            if not lock.locked() and self._start_locks.get(entry.config.uuid) is lock:
                del self._start_locks[entry.config.uuid]

    async def _start_farm_locked(self, entry: Entry) -> str:
        farm = self.farm
        cfg = entry.config
        if entry.active:
            raise DBusError(ERROR_ALREADY_RUNNING, f"{cfg.name} ({cfg.uuid}) is already "
                            f"running on this host {farm.host_name}")
        farm.require_lease(f"starting {cfg.name}")
        needed = cfg.memory_kib or cfg.max_memory_kib or DEFAULT_MEMORY_KIB
        async with self._place_lock:
            host, used, free = await self._blocking(self._farm_memory_kib)

            def policy() -> None:
                if needed > free:
                    raise DBusError(ERROR_REFUSED,
                                    f"starting {cfg.name} needs {_size(needed)} of memory but "
                                    f"only {_size(free)} is free on {farm.host_name} (host "
                                    f"{_size(host)}, running domains use {_size(used)})")
            self._placed_at[cfg.uuid] = time.monotonic()
            self._starting.add(cfg.uuid)
            try:
                token = await farm.place(cfg.uuid, policy)
            except BaseException:
                self._starting.discard(cfg.uuid)
                raise
        try:
            running = await self._blocking(self._create_transient, cfg)
        except BaseException as exc:
            log.warning("starting %s (%s) failed, releasing its placement: %s", cfg.name,
                        cfg.uuid, exc)
            with contextlib.suppress(StoreError):
                await farm.release(cfg.uuid, token)
            raise
        finally:
            # A sync whose libvirt read began before this moment may not show the new
            # domain: _reconcile leaves the placement alone for such a sync.
            self._placed_at[cfg.uuid] = time.monotonic()
            self._starting.discard(cfg.uuid)
        log.info("started %s (%s) on %s, placement token %d", cfg.name, cfg.uuid,
                 farm.host_name, token)
        self._want_sync()
        return canonical_uuid(running) or running

    def _farm_memory_kib(self) -> tuple[int, int, int]:
        """(host, used, free) KiB for a farm start: the host's memory minus what runs
        (a farm domain counts its definition's memory, without asking libvirt) and
        what is being started (blocking)."""
        conn = self.libvirt.get()
        host = int(conn.getInfo()[1]) * 1024
        mine = self.farm.mine
        counted = set(mine) | self._starting
        used = 0
        for u in counted:
            fe = self.farm.entries.get(u)
            if fe is not None:
                c = fe.config
                used += c.memory_kib or c.max_memory_kib or DEFAULT_MEMORY_KIB
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            with contextlib.suppress(libvirt.libvirtError):   # stopped meanwhile
                if dom.UUIDString() not in counted:
                    used += int(dom.info()[2])
        return host, used, max(host - used, 0)

    def _create_transient(self, cfg: DomainConfig) -> str:
        conn = self.libvirt.get()
        dom = conn.createXML(config_to_domain_xml(cfg, libvirt_type_for(conn, cfg)), 0)
        return str(dom.UUIDString())

    @method()
    @_contract_errors
    async def DefineDomain(self, properties: "a{sv}") -> "s":  # type: ignore[valid-type,name-defined]  # reason: D-Bus signature annotation
        props = dict(properties)
        if "UUID" not in props:
            props["UUID"] = Variant("s", str(uuidlib.uuid4()))
        cfg = config_from_dbus(props)
        async with self._change_lock:
            snap = await self._sync()
            if cfg.uuid in snap:
                raise DBusError(ERROR_INVALID_ARGUMENT, f"UUID {cfg.uuid} is already defined "
                                f"(as {snap[cfg.uuid].config.name})")
            self._check_name(cfg)
            await self._store_call(self.stores[0], "define", cfg)
            await self._sync()
        log.info("defined %s (%s) in %s", cfg.name, cfg.uuid, self.stores[0].spec)
        return cfg.uuid

    @method()
    @_contract_errors
    async def UndefineDomain(self, uuid: "s"):  # type: ignore[name-defined]  # reason: D-Bus signature annotation
        async with self._change_lock:
            entry = await self._entry(uuid)
            await self._store_call(entry.store, "undefine", entry.config.uuid)
            await self._sync()
        log.info("undefined %s (%s)", entry.config.name, entry.config.uuid)

    @method()
    @_contract_errors
    async def GetDomain(self, uuid: "s") -> "a{sv}":  # type: ignore[name-defined,valid-type]  # reason: D-Bus signature annotation
        entry = await self._entry(uuid)
        # A farm definition placed on another host runs (there): Active, and Host says where.
        return config_to_dbus(entry.config, active=entry.active or entry.elsewhere,
                              host=entry.host)

    @method()
    @_contract_errors
    async def UpdateDomain(self, uuid: "s", changes: "a{sv}"):  # type: ignore[name-defined,valid-type]  # reason: D-Bus signature annotation
        async with self._change_lock:
            entry = await self._entry(uuid)
            old = entry.config
            given = changes.get("UUID")
            if given is not None and canonical_uuid(getattr(given, "value", None)) != old.uuid:
                raise DBusError(ERROR_INVALID_ARGUMENT, "UpdateDomain cannot change the UUID")
            merged = config_to_dbus(old)
            merged.update({k: v for k, v in changes.items() if k not in ("UUID", "Active")})
            new = config_from_dbus(merged)
            if new == old:
                return
            self._check_name(new)
            await self._store_call(entry.store, "update", old, new)
            await self._sync()

    @signal()
    def DomainDefined(self, uuid) -> "s":  # type: ignore[name-defined]  # reason: D-Bus signature annotation
        return uuid

    @signal()
    def DomainUndefined(self, uuid) -> "s":  # type: ignore[name-defined]  # reason: D-Bus signature annotation
        return uuid

    @signal()
    def DomainChanged(self, uuid) -> "s":  # type: ignore[name-defined]  # reason: D-Bus signature annotation
        return uuid

    @dbus_property(access=PropertyAccess.READ)
    def Generation(self) -> "t":  # type: ignore[name-defined]  # reason: D-Bus signature annotation
        return self._generation


def _stored_from(entry: Entry) -> Stored:
    return Stored(entry.config, entry.active)


class ManagerHandle:
    """A running Manager: the bus it is on, the service object, and how to stop it."""

    def __init__(self, bus: MessageBus, service: ManagerService, own_bus: bool,
                 connections: Sequence[LibvirtConnection] = ()) -> None:
        self.bus = bus
        self.service = service
        self._own_bus = own_bus
        # The libvirt connections serve_manager made itself (for `libvirt:URI` specs);
        # closed by stop(). Those handed in belong to the caller.
        self._connections = list(connections)

    async def stop(self) -> None:
        """Leave the bus (the name first, so clients see the Manager go, then the
        object, so no new call reaches it), let the calls in progress finish, and close
        the stores (a libvirt connection handed in stays open)."""
        if self.bus.connected:
            with contextlib.suppress(Exception):
                await self.bus.release_name(BUS_NAME)
            with contextlib.suppress(Exception):
                self.bus.unexport(OBJECT_PATH, self.service)
        await self.service.close()
        for conn in self._connections:
            conn.close()          # only closes what it opened itself
        if self._own_bus and self.bus.connected:
            self.bus.disconnect()
            with contextlib.suppress(Exception):
                await self.bus.wait_for_disconnect()

    async def wait_closed(self) -> None:
        """Until the bus connection ends (the daemon went away)."""
        # Shielded: cancelling this wait must not cancel the bus's own future.
        with contextlib.suppress(Exception):
            await asyncio.shield(self.bus.wait_for_disconnect())


async def serve_manager(bus: Union[str, MessageBus], stores: Sequence[Union[Store, str]],
                        libvirt_conn: Union[libvirt.virConnect, LibvirtConnection, None] = None,
                        *, poll_interval: float = 1.0) -> ManagerHandle:
    """Export the reference Manager on `bus` (system, session, an address, or a
    connected MessageBus) and own org.example.virt. For in-process use (the demo).

    `stores` holds Store objects or specs (`sqlite:PATH`, `libvirt:URI`; `libvirt:`
    with no URI means `libvirt_conn` itself). `libvirt_conn` may be an open
    virConnect shared with the rest of the process; it is never closed here. What is
    opened here (the stores named by spec, their libvirt connections) is closed by
    the handle's stop(), or at once if serving fails.
    """
    made: list[LibvirtConnection] = []       # ours to close; a handed-in one is not
    if not isinstance(libvirt_conn, LibvirtConnection):
        libvirt_conn = LibvirtConnection(None, libvirt_conn)
        made.append(libvirt_conn)
    connections: dict[str | None, LibvirtConnection] = {None: libvirt_conn}
    specs = list(stores)
    resolved = [open_store(s, connections) if isinstance(s, str) else s for s in specs]
    opened = [s for s, spec in zip(resolved, specs) if isinstance(spec, str)]
    made += [c for uri, c in connections.items() if uri is not None]
    service = ManagerService(resolved, libvirt_conn, poll_interval=poll_interval)
    service.verify_contract()
    own_bus = isinstance(bus, str)
    mb = await connect(bus) if isinstance(bus, str) else bus
    try:
        await service.start()
        mb.export(OBJECT_PATH, service)
        reply = await mb.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            raise RuntimeError(f"{BUS_NAME} is already owned by another Manager")
    except BaseException:
        await service.stop()
        with contextlib.suppress(Exception):
            mb.unexport(OBJECT_PATH, service)
        if own_bus:
            mb.disconnect()
        for store in opened:
            store.close()
        for conn in made:
            conn.close()
        raise
    log.info("serving %s on %s with %s", BUS_NAME, mb.unique_name,
             ", ".join(s.spec for s in resolved))
    return ManagerHandle(mb, service, own_bus, made)
