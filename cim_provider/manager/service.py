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

Templated definitions (templates.py) are rendered here, when listed (cached by row
and template version) and again at StartDomain; the start policy (refuse, or make room
by shrinking, pausing and managed-saving) is planned in policy.py and carried out here.

The module is longer than most (about 1500 lines) because the snapshot, the journal,
the paging index, the farm's placements, templated rows, the start policy (with starts
that outlast --start-timeout, and autostart) and the host-wide name and undefine checks
change together under one sync lock, and their invariants are easier to check in one
place. What a disk's source is (file, block device, volume; its image format) is
asked in disks.py.

(No `from __future__ import annotations` here: the D-Bus decorators read the
annotations, which are D-Bus type strings, not Python types.)
"""
import asyncio
import bisect
import collections
import contextlib
import functools
import json
import logging
import os
import time
import uuid as uuidlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Union

import libvirt

from ..contract import (ACTION_KEYS, BUS_NAME, ERROR_ALREADY_RUNNING, ERROR_FAILED,
                        ERROR_GENERATION_UNKNOWN, ERROR_INVALID_ARGUMENT, ERROR_NOT_FOUND,
                        ERROR_NOT_SUPPORTED, ERROR_REFUSED, INTERFACE, MAX_PAGE, MAX_STRING,
                        OBJECT_PATH, InvalidEntry, compare_members, config_from_dbus,
                        config_to_dbus, interface_members, template_to_dbus, values_to_dbus)
from ..contract.bus import (DBusError, MessageBus, NameFlag, PropertyAccess, RequestNameReply,
                            ServiceInterface, Variant, connect, dbus_property, method, signal,
                            plain)
from ..domain.records import DomainConfig
from ..domain.defaults import DEFAULT_MEMORY_KIB
from ..domain.domxml import DomainXMLError, config_to_domain_xml, parse_domain_xml
from ..domain.records import canonical_uuid
from .disks import DiskError, resolve_disks, resolve_domain_xml
from .policy import (MAKE_ROOM, Action, Done, Plan, PolicyOptions, Refusal, Running,
                     displace, plan_start, undo, with_current_memory)
from .policy import size_text as _size
from .store import (LibvirtConnection, LibvirtStore, Store, Stored, StoreError, Templated,
                    libvirt_error_to_log, libvirt_type_for, open_store)
from .templates import TemplateError, TemplateLibrary, UnknownTemplate, variables_json

log = logging.getLogger(__name__)

# ListChangesSince answers from a journal of this many (generation, UUID) pairs; a
# client further behind lists again (with a farm store, the database's change log
# reaches further back).
JOURNAL_MAX = 200_000
DEFAULT_PAGE = 1000
# How long StartDomain waits for libvirt (`cim-provider manager --start-timeout`).
DEFAULT_START_TIMEOUT = 300.0
# The poll while libvirt's lifecycle events are followed: only for a lost event.
SAFETY_POLL = 60.0
BOOT_ID = "/proc/sys/kernel/random/boot_id"
# More changes than this in one sync are announced with one signal of each kind.
SIGNAL_BURST = 1000


def _no_timeout(_timer: int, _opaque: object) -> None:
    """The callback of _events_deliverable's probe, a timer that never fires."""


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
    template: Optional[Templated] = None        # a templated definition's row


def _reason(exc: BaseException) -> str:
    if isinstance(exc, libvirt.libvirtError):
        return f"libvirt: {exc.get_error_message() or exc}"
    return getattr(exc, "message", None) or str(exc) or type(exc).__name__


def _needed(cfg: DomainConfig) -> int:
    """The memory a definition starts with (the policy's "needed")."""
    return cfg.memory_kib or cfg.max_memory_kib or DEFAULT_MEMORY_KIB


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
        except (InvalidEntry, TemplateError) as exc:
            raise DBusError(ERROR_INVALID_ARGUMENT, str(exc)) from None
        except UnknownTemplate as exc:
            raise DBusError(ERROR_NOT_FOUND, str(exc.args[0])) from None
        except Refusal as exc:
            raise DBusError(ERROR_REFUSED, str(exc)) from None
        except DiskError as exc:
            raise DBusError(ERROR_FAILED, str(exc)) from None
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
                 *, poll_interval: float = 1.0, call_timeout: float = 30.0,
                 templates: Optional[TemplateLibrary] = None,
                 policy: Optional[PolicyOptions] = None,
                 start_timeout: float = DEFAULT_START_TIMEOUT,
                 state_file: Union[str, "os.PathLike[str]", None] = None,
                 safety_poll: float = SAFETY_POLL) -> None:
        super().__init__(INTERFACE)
        # Autostart (once per host boot): the boot it was last done for is kept here.
        self.state_file = Path(state_file) if state_file is not None else None
        self._autostarter: Optional[asyncio.Task] = None
        # With libvirt's lifecycle events followed on every libvirt connection, the
        # poll is only a safety net against a lost event.
        self.safety_poll = max(safety_poll, poll_interval)
        self._events_on: dict[int, bool] = {}       # id(virConnect) -> events followed
        self._event_ids: list[tuple[Any, int]] = []  # (virConnect, callback id)

        self.call_timeout = call_timeout
        # StartDomain's libvirt work (`--start-timeout`): a start may first pause and
        # save other guests (managed save writes their memory to disk), and a guest
        # with many disks or much memory is slow to create. Past it the start goes on
        # in the background (`_pending_starts`); the caller is told it is in progress.
        if start_timeout <= 0:
            raise ValueError("--start-timeout must be positive")
        self.start_timeout = float(start_timeout)
        self._pending_starts: dict[str, asyncio.Future] = {}
        self.templates = templates if templates is not None else TemplateLibrary(None)
        # What the lists show of a templated definition has its disks resolved (type,
        # image format) as an ordinary definition's; StartDomain resolves them again.
        self.templates.resolver = self._resolve_listed
        self.policy = policy if policy is not None else PolicyOptions()
        self._hypervisor: Optional[str] = None      # the libvirt domain type, for templates
        self._templates_changed: set[str] = set()   # by the last _collect
        self._warned_render: set[tuple[str, str]] = set()
        self._started: set[str] = set()             # UUIDs this Manager started
        self._parked: set[str] = set()              # UUIDs it managed-saved to make room
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
        # name -> UUIDs of the snapshot using it, kept by _sync: a name check in O(1)
        # rather than a scan of 100,000 definitions per DefineDomain.
        self._names: dict[str, list[str]] = {}
        self._local: dict[str, Entry] = {}          # what the local stores hold
        self._listed: list[str] = []                # sorted UUIDs the lists offer
        self._journal: collections.deque[tuple[int, str]] = collections.deque()
        self._journal_floor: Optional[int] = None   # complete for changes after this
        self._sync_wanted = asyncio.Event()
        self._starting: set[str] = set()            # farm starts in progress
        self._placed_at: dict[str, float] = {}      # monotonic time we (re)claimed a UUID
        self._place_lock = asyncio.Lock()           # policy + placement, one at a time
        self._start_locks: dict[str, asyncio.Lock] = {}   # one start per UUID at a time
        self._events_all = False                    # events followed on every connection
        self._stores_seen: tuple[object, ...] = ()  # Store.version() at the last listing
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
        if self.state_file is not None:
            self._autostarter = asyncio.create_task(self._autostart(),
                                                    name="manager-service-autostart")

    async def _autostart(self) -> None:
        """Start every definition with Autostart true (SQLite and farm stores: libvirt
        autostarts its own), once per host boot: the boot id is kept in state_file.
        Each start goes through StartDomain's path (the policy, the farm's placement);
        a refusal or failure is logged and the others still start."""
        assert self.state_file is not None
        try:
            boot = Path(BOOT_ID).read_text(encoding="ascii").strip()
        except OSError as exc:
            log.warning("autostart skipped: cannot read the boot id (%s)", exc)
            return
        try:
            state = json.loads(self.state_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            state = {}
        if not isinstance(state, dict):
            state = {}
        if state.get("autostarted_boot") == boot:
            log.info("autostart: already done for this boot (%s)", boot)
            return
        # the farm's entries arrive with its first sync; local ones are in the snapshot
        wanted = [e for e in self._snapshot.values() if e.config.autostart
                  and not isinstance(e.store, LibvirtStore) and not e.active
                  and not e.elsewhere]
        for e in sorted(wanted, key=lambda e: (-(e.config.priority or 0), e.config.name)):
            try:
                await self._start_domain(e.config.uuid)
                log.info("autostart: started %s (%s)", e.config.name, e.config.uuid)
            except DBusError as exc:
                log.warning("autostart: %s (%s) not started: %s", e.config.name,
                            e.config.uuid, exc.text)
            except Exception as exc:
                log.warning("autostart: %s (%s) not started: %s", e.config.name,
                            e.config.uuid, _reason(exc))
        state["autostarted_boot"] = boot
        try:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.state_file.with_name(self.state_file.name + ".tmp")
            tmp.write_text(json.dumps(state), encoding="utf-8")
            os.replace(tmp, self.state_file)
        except OSError as exc:
            log.warning("cannot record the autostart of this boot in %s: %s",
                        self.state_file, exc)

    def _want_sync(self) -> None:
        """Something changed (a farm notification, a libvirt lifecycle event): sync now."""
        self._sync_wanted.set()

    def _libvirt_connections(self) -> list[LibvirtConnection]:
        """The service's libvirt connection and every libvirt store's, once each."""
        out = [self.libvirt]
        for store in self.stores:
            if isinstance(store, LibvirtStore) and all(store.connection is not c for c in out):
                out.append(store.connection)
        return out

    def _watch_libvirt(self) -> None:
        """Follow libvirt's domain events (lifecycle: defined, undefined, started,
        stopped; metadata: a title) on every libvirt connection, when this process has
        an event loop implementation registered (`cim-provider manager` registers
        libvirtaio; in-process, the server's event thread); then the poll is only a safety net
        (`safety_poll`), otherwise it runs every poll_interval. Blocking; called again
        after every poll so a reopened connection is followed."""
        loop = self._loop
        followed = {}
        if not self._events_deliverable():
            self._events_all = False
            return

        def changed(*_args: Any) -> None:
            # On libvirt's event thread (or the loop's, under libvirtaio).
            with contextlib.suppress(RuntimeError):         # that loop has closed
                loop.call_soon_threadsafe(self._want_sync)
        for lc in self._libvirt_connections():
            if not lc.owned and (self.farm is None or lc is not self.libvirt):
                # a connection handed in (shared with the rest of the process): its
                # owner follows its events, and libvirt-python takes one callback per
                # event and connection; this one is polled (the demo gives the Manager a
                # connection of its own, so it follows events)
                followed[id(lc)] = False
                continue
            try:
                conn = lc.get()
            except StoreError:
                followed[id(lc)] = False
                continue
            key = id(conn)
            if key not in self._events_on:
                try:
                    self._event_ids.append((conn, conn.domainEventRegisterAny(
                        None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, changed, None)))
                    with contextlib.suppress(libvirt.libvirtError, AttributeError):
                        self._event_ids.append((conn, conn.domainEventRegisterAny(
                            None, libvirt.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE, changed,
                            None)))
                    self._events_on[key] = True
                    log.info("following libvirt domain events on %s", lc.uri or "the "
                             "default URI")
                except libvirt.libvirtError as exc:
                    self._events_on[key] = False       # do not ask again on this one
                    log.info("no libvirt domain events on %s (%s); polling every %g s",
                             lc.uri or "the default URI", exc.get_error_message() or exc,
                             self.poll_interval)
            followed[id(lc)] = self._events_on[key]
        self._events_all = bool(followed) and all(followed.values())

    def _tick(self) -> tuple[set[str], bool]:
        """Between safety polls (blocking): the templates that changed, and whether to
        re-read: a libvirt connection was reopened (its events missed meanwhile), or a
        store was written behind our back (another process, or the demo's seeding, on
        the SQLite file: `Store.version`)."""
        changed = self.templates.refresh()
        before = set(self._events_on)
        self._watch_libvirt()
        written = self._store_versions() != self._stores_seen
        return changed, set(self._events_on) != before or not self._events_all or written

    def _store_versions(self) -> tuple[object, ...]:
        """What the local stores say of their own changes (blocking; None: nothing)."""
        return tuple(None if _is_farm(s) else s.version() for s in self.stores)

    def _unwatch_libvirt(self) -> None:
        """Take our event callbacks off libvirt (blocking): none may call a finished loop."""
        ids, self._event_ids = self._event_ids, []
        for conn, cb in ids:
            with contextlib.suppress(libvirt.libvirtError):
                conn.domainEventDeregisterAny(cb)
        self._events_on.clear()
        self._events_all = False

    def _poll_every(self) -> float:
        """poll_interval, or safety_poll while every libvirt connection has events
        (SQLite rows written behind our back show in Store.version, checked by _tick)."""
        if self._events_all and self.farm is None:
            return self.safety_poll
        return self.poll_interval

    def _events_deliverable(self) -> bool:
        """libvirt can deliver events here: a libvirtaio implementation runs on our loop
        (`cim-provider manager`; one registered on another, finished loop would take
        callbacks and never call them), or, with none, another implementation is
        registered (in the server's process: libvirt's own, driven by a thread of its
        own, sources/libvirt_events.py; probed with a disabled timer, which libvirt
        refuses when no implementation is registered)."""
        try:
            import libvirtaio
        except ImportError:
            return False
        impl = libvirtaio.getCurrentImpl()
        if impl is not None:
            return getattr(impl, "loop", None) is self._loop
        try:
            timer = libvirt.virEventAddTimeout(-1, _no_timeout, None)
        except libvirt.libvirtError:
            return False
        libvirt.virEventRemoveTimeout(timer)
        return True

    async def stop(self) -> None:
        """Stop polling. The flag as well as the cancel: asyncio.wait_for (in
        _blocking) may swallow a cancel that arrives as its call completes, and the
        poller must end anyway."""
        self._stopping = True
        autostarter, self._autostarter = self._autostarter, None
        if autostarter is not None and not autostarter.done():
            autostarter.cancel()
            await asyncio.wait({autostarter})
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.cancel()
            await asyncio.wait({poller})     # never swallows a cancel of our own
        if self._event_ids:
            with contextlib.suppress(Exception):
                await self._blocking(self._unwatch_libvirt)
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
        when a farm notification or a libvirt event asks for it. While libvirt's events
        are followed, libvirt is re-read only every safety_poll; the templates
        directory is still checked every poll_interval."""
        last_full = time.monotonic()
        while not self._stopping:
            wanted = False
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._sync_wanted.wait(), self.poll_interval)
                wanted = True
            self._sync_wanted.clear()
            if self._stopping:
                return
            try:
                if not wanted and time.monotonic() - last_full < self._poll_every():
                    changed, reconnected = await self._blocking(self._tick)
                    if not changed and not reconnected:
                        continue
                    self._templates_changed |= changed
                last_full = time.monotonic()
                await self._sync()
                await self._blocking(self._watch_libvirt)
                self._trouble("polling", None)
            except Exception as exc:
                # Once when it starts failing, once when it works again: not per poll.
                self._trouble("polling", f"cannot re-read the definitions: {exc}")

    async def _blocking(self, fn: Callable[..., Any], *args: Any,
                        timeout: Optional[float] = None) -> Any:
        """Run a blocking store or libvirt call off the loop, with a deadline: a hung
        libvirtd must not leave our own callers without an answer."""
        limit = self.call_timeout if timeout is None else timeout
        future = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        try:
            return await asyncio.wait_for(future, limit)
        except asyncio.TimeoutError:
            raise DBusError(ERROR_FAILED, f"{getattr(fn, '__name__', 'a call')} did not "
                            f"finish within {limit:g} s (libvirt or storage "
                            "not answering)") from None

    def _running_uuids(self) -> set[str]:
        """UUIDs libvirt runs on the service's connection (blocking)."""
        conn = self.libvirt.get()
        return {d.UUIDString() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)}

    def _collect(self) -> tuple[dict[str, Entry], Optional[set[str]]]:
        """Every definition in every local store (blocking), and the UUIDs libvirt runs
        (None: libvirt did not answer). A UUID held twice: first store wins. The farm
        store is merged on the loop (`_merged`)."""
        # Before listing: a write after this is seen by the next _tick.
        self._stores_seen = self._store_versions()
        try:
            running: Optional[set[str]] = self._running_uuids()
            self._trouble("libvirt", None)
            if self._hypervisor is None:
                self._hypervisor = libvirt_type_for(self.libvirt.get(),
                                                    DomainConfig(uuid="", name=""))
        except (StoreError, libvirt.libvirtError) as exc:
            self._trouble("libvirt", f"cannot ask libvirt which domains run: {exc}")
            running = None
        self._templates_changed |= self.templates.refresh()
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
                    # A guest saved to make room is a libvirt definition meanwhile: no news.
                    if uuid not in self._warned_dupes and uuid not in self._parked:
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
                cfg = item.config if item.template is None else self._rendered(item.template)
                out[uuid] = Entry(cfg, active, store, template=item.template)
        if self.templates.cached:
            self.templates.forget(set(out) | (set(self.farm.entries) if self.farm else set()))
        return out, running

    def _rendered(self, row: Templated) -> DomainConfig:
        """A templated definition as the lists show it: rendered (cached), or, when it
        cannot be, its UUID and name with the reason as its title (a StartDomain then
        says the same), so it can still be seen, fixed or undefined."""
        try:
            cfg = self.templates.config(row.uuid, row.name, row.template, row.variables,
                                        self._hypervisor or "kvm")
        except (TemplateError, UnknownTemplate) as exc:
            reason = str(exc.args[0] if exc.args else exc)
            if (row.uuid, reason) not in self._warned_render:
                self._warned_render.add((row.uuid, reason))
                log.warning("templated definition %s (%s) cannot be rendered: %s", row.name,
                            row.uuid, reason)
            return replace(row.placeholder(),
                           title=f"cannot be rendered: {reason}"[:MAX_STRING])
        return replace(cfg, priority=row.priority, min_memory_kib=row.min_memory_kib)

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
                cfg = fe.config if fe.template is None else self._rendered(fe.template)
                return Entry(cfg, here, store,
                             self.farm.host_name_of(p.host_id) if p is not None else None,
                             p is not None and not here, fe.template)
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
            templates_changed, self._templates_changed = self._templates_changed, set()
            if templates_changed and self.farm is not None:
                rerendered = {u for u, fe in self.farm.entries.items() if fe.template is not None
                              and fe.template.template in templates_changed}
                touched |= rerendered
                if rerendered and self._farm_only:
                    # Generation is the farm's: log the re-rendered definitions in the
                    # farm's change log under a new generation (ListChangesSince)
                    try:
                        await self.farm.touch(sorted(rerendered))
                    except StoreError as exc:
                        log.warning("cannot record the re-rendered definitions in the farm "
                                    "(clients see them at their next full listing): %s",
                                    exc.message)
            self._local = local
            defined: list[str] = []
            undefined: list[str] = []
            changed: list[str] = []
            snap = self._snapshot
            bulk = len(touched) > 1000        # then sort once rather than insert each
            rows = [fe.template for u in touched if self.farm is not None
                    and (fe := self.farm.entries.get(u)) is not None and fe.template is not None]
            if rows:
                # qemu-img may run for their disks: not on the loop (then cache hits)
                with contextlib.suppress(DBusError):
                    await self._blocking(self._render_rows, rows)
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
                self._name_index(u, old, new)
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
            if templates_changed:
                self.TemplatesChanged()
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

    def _resolve_listed(self, xml: str) -> str:
        """A rendered template's XML with its disks resolved for the lists (blocking;
        a source that cannot be read, a volume libvirt lacks, is left as written)."""
        try:
            conn: Optional[libvirt.virConnect] = self.libvirt.get()
        except StoreError:
            conn = None
        return resolve_domain_xml(conn, xml, strict=False)

    def _render_rows(self, rows: list[Templated]) -> None:
        """Render (and resolve the disks of) the farm's templated rows off the loop, so
        that `_merged`, on the loop, finds them in the templates' cache."""
        for row in rows:
            self._rendered(row)

    def _probe_disks(self, cfg: DomainConfig) -> DomainConfig:
        """A definition's disks with the Type, Format and CapacityBytes their sources
        show now (blocking; what the definition states is kept, a source that cannot
        be read is left as given)."""
        if not cfg.disks:
            return cfg
        try:
            conn: Optional[libvirt.virConnect] = self.libvirt.get()
        except StoreError:
            conn = None
        return resolve_disks(conn, cfg)

    async def _check_unique_name(self, cfg: DomainConfig) -> None:
        """Error.InvalidArgument when another domain on this host uses cfg's name: a
        definition of any store, or any libvirt domain (a running transient one too)."""
        self._check_name(cfg)
        other = await self._blocking(self._libvirt_name_user, cfg)
        if other is not None:
            raise DBusError(ERROR_INVALID_ARGUMENT,
                            f"the name {cfg.name!r} is already used by the libvirt domain "
                            f"{other}")

    def _libvirt_name_user(self, cfg: DomainConfig) -> Optional[str]:
        """The UUID of a libvirt domain other than cfg's named cfg.name (blocking)."""
        for lc in self._libvirt_connections():
            try:
                domains = lc.get().listAllDomains()
            except (StoreError, libvirt.libvirtError):
                continue                 # libvirt away: the definitions were checked
            for dom in domains:
                with contextlib.suppress(libvirt.libvirtError):
                    if dom.name() == cfg.name and dom.UUIDString() != cfg.uuid:
                        return f"{dom.UUIDString()}" + (" (running)" if dom.isActive()
                                                        else "")
        return None

    def _undefine_blocker(self, entry: Entry) -> Optional[str]:
        """Why libvirt would lose something if this definition went (blocking): its
        snapshots, its managed-save image. None: it may go."""
        cfg = entry.config
        try:
            conn = entry.store.connection.get() if isinstance(entry.store, LibvirtStore) \
                else self.libvirt.get()
        except StoreError:
            if isinstance(entry.store, LibvirtStore):
                raise
            return None                  # libvirt away: it holds nothing we could lose
        dom = next((d for d in conn.listAllDomains() if d.UUIDString() == cfg.uuid), None)
        if dom is None:
            return None
        reasons = []
        snapshots = int(dom.snapshotNum(0))
        if snapshots:
            reasons.append(f"libvirt holds {snapshots} snapshot{'s' if snapshots > 1 else ''} "
                           f"of it (virsh snapshot-list {cfg.name}; delete them first)")
        if dom.hasManagedSaveImage(0):
            reasons.append(f"it has a managed-save image, its saved running state (start it, "
                           f"or discard the state with virsh managedsave-remove {cfg.name}, "
                           "first)")
        if not reasons:
            return None
        return f"{cfg.name} ({cfg.uuid}) cannot be undefined: " + "; ".join(reasons) + \
            "; nothing was changed"

    def _check_name(self, cfg: DomainConfig) -> None:
        """Names are unique across stores, as libvirt wants them."""
        for uuid in self._names.get(cfg.name, ()):
            if uuid != cfg.uuid:
                raise DBusError(ERROR_INVALID_ARGUMENT,
                                f"the name {cfg.name!r} is already used by {uuid}")

    def _name_index(self, uuid: str, old: Optional[Entry], new: Optional[Entry]) -> None:
        """Keep `_names` in step with one snapshot change."""
        if old is not None and (new is None or new.config.name != old.config.name):
            users = self._names.get(old.config.name)
            if users is not None and uuid in users:
                users.remove(uuid)
                if not users:
                    del self._names[old.config.name]
        if new is not None and (old is None or new.config.name != old.config.name):
            self._names.setdefault(new.config.name, []).append(uuid)

    # ------------------------------------------------------------ starting

    def _host_kib(self, conn: libvirt.virConnect) -> int:
        """The host's memory: --host-memory-kib, else virNodeGetInfo. getFreeMemory()
        is not used: it counts page cache and the host's own processes, and the test
        driver returns a fixed number."""
        if self.policy.host_memory_kib is not None:
            return self.policy.host_memory_kib
        return int(conn.getInfo()[1]) * 1024

    def _policy_running(self, conn: libvirt.virConnect) -> list[Running]:
        """The running domains as the policy sees them (blocking): their current
        memory and, to make room, whether they are paused, their priority and whether
        the policy may pause or save them."""
        rich = self.policy.overcommit == MAKE_ROOM
        out = []
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            try:                               # each may stop meanwhile
                memory = int(dom.info()[2])
                if not rich:
                    out.append(Running("", "", memory))
                    continue
                uuid = dom.UUIDString()
                paused = dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
                name = dom.name()
                persistent = bool(dom.isPersistent())
            except libvirt.libvirtError:
                continue
            entry = self._snapshot.get(uuid)
            ours = uuid in self._started or (entry is not None
                                             and not isinstance(entry.store, LibvirtStore))
            movable = ours or self.policy.others
            farm = entry is not None and _is_farm(entry.store)
            priority = (entry.config.priority or 0) if entry is not None else 0
            out.append(Running(uuid, name, memory, paused, priority, movable,
                               movable and not farm and (persistent or ours)))
        return out

    def _plan(self, conn: libvirt.virConnect, cfg: DomainConfig, needed: int,
              shrinkable: bool, reserved: Sequence[Running] = ()) -> Plan:
        """The policy's plan for starting `cfg` (blocking), or Refusal."""
        return plan_start(name=cfg.name, uuid=cfg.uuid, needed=needed,
                          minimum=cfg.min_memory_kib if shrinkable else None,
                          priority=cfg.priority or 0, host_kib=self._host_kib(conn),
                          running=[*self._policy_running(conn), *reserved],
                          options=self.policy)

    def _start_xml(self, entry: Entry, conn: libvirt.virConnect) -> tuple[str, DomainConfig]:
        """The domain XML to start a (non-libvirt) definition with, and its config: a
        templated one rendered again now."""
        row = entry.template
        if row is None:
            # each disk as what its source is, with its image format (disks.py)
            cfg = resolve_disks(conn, entry.config, strict=True)
            return config_to_domain_xml(cfg, libvirt_type_for(conn, cfg)), cfg
        try:
            # its disks as what their sources are now, as an ordinary definition's
            xml, cfg = self.templates.render(row.template, row.uuid, row.name, row.values(),
                                             self._hypervisor or libvirt_type_for(
                                                 conn, entry.config),
                                             functools.partial(resolve_domain_xml, conn,
                                                               strict=True))
        except UnknownTemplate as exc:
            raise DBusError(ERROR_FAILED, f"cannot start {row.name}: {exc.args[0]}") from None
        except TemplateError as exc:
            raise DBusError(ERROR_INVALID_ARGUMENT, f"cannot start {row.name}: {exc}") from None
        except DiskError as exc:
            raise DiskError(f"{row.name}: {exc}") from None
        return xml, replace(cfg, priority=row.priority, min_memory_kib=row.min_memory_kib)

    @staticmethod
    def _shrunk_xml(xml: str, entry: Entry, cfg: DomainConfig, memory: int,
                    hv: str) -> str:
        """The start XML with `memory` KiB (less than the definition asks for)."""
        if entry.template is not None:
            return with_current_memory(xml, memory)
        return config_to_domain_xml(replace(cfg, memory_kib=memory,
                                            max_memory_kib=cfg.max_memory_kib or _needed(cfg)),
                                    hv)

    def _start_blocking(self, entry: Entry) -> tuple[str, tuple[Action, ...]]:
        """Start a local (SQLite or libvirt) definition, applying the policy; returns
        the running UUID and what was done to make room."""
        cfg = entry.config
        libvirt_store = isinstance(entry.store, LibvirtStore)
        conn = entry.store.connection.get() if isinstance(entry.store, LibvirtStore) \
            else self.libvirt.get()
        # A scan, not lookupByUUIDString: a miss is normal here, and libvirt's default
        # error handler would print every miss on stderr.
        dom = next((d for d in conn.listAllDomains() if d.UUIDString() == cfg.uuid), None)
        if dom is not None and dom.isActive():
            raise DBusError(ERROR_ALREADY_RUNNING, f"{cfg.name} ({cfg.uuid}) is already running")
        if libvirt_store and dom is None:
            raise DBusError(ERROR_NOT_FOUND, f"libvirt no longer has {cfg.name}")
        # A guest saved to make room comes back from its managed save, intact.
        restore = dom is not None and bool(dom.hasManagedSaveImage(0))
        xml = ""
        if restore:
            assert dom is not None
            try:
                saved = parse_domain_xml(dom.XMLDesc(0))
                cfg = replace(cfg, memory_kib=saved.memory_kib,
                              max_memory_kib=saved.max_memory_kib)
            except DomainXMLError:
                pass
        elif not libvirt_store:
            xml, cfg = self._start_xml(entry, conn)
        needed = _needed(cfg)
        plan = self._plan(conn, cfg, needed, shrinkable=not (restore or libvirt_store))
        done = displace(conn, plan)
        try:
            if restore or libvirt_store:
                assert dom is not None
                dom.create()
                if restore and not libvirt_store:
                    # it was given a libvirt definition only to be saved: transient again
                    with contextlib.suppress(libvirt.libvirtError):
                        dom.undefine()
                self._parked.discard(cfg.uuid)
                log.info("%s %s (%s) from %s", "restored" if restore else "started", cfg.name,
                         cfg.uuid, "its managed save" if restore else entry.store.spec)
                running = str(dom.UUIDString())
            else:
                if plan.memory_kib < needed:
                    xml = self._shrunk_xml(xml, entry, cfg, plan.memory_kib,
                                           libvirt_type_for(conn, cfg))
                running = str(conn.createXML(xml, 0).UUIDString())
                log.info("started %s (%s) as a transient domain%s", cfg.name, cfg.uuid,
                         f" from template {entry.template.template}" if entry.template else "")
        except BaseException:
            undo(conn, done)
            raise
        self._started.add(cfg.uuid)
        self._parked |= {d.action.uuid for d in done if d.action.action == "saved"}
        return running, plan.actions

    def _announce(self, started: str, name: str, actions: Sequence[Action]) -> None:
        """Log what a start did to make room, and emit DomainsDisplaced."""
        if not actions:
            return
        log.info("made room to start %s (%s): %s", name, started,
                 "; ".join(a.text() for a in actions))
        try:
            self.DomainsDisplaced(started, [values_to_dbus(a.values(), ACTION_KEYS)
                                            for a in actions])
        except Exception:                    # the start itself succeeded
            log.exception("could not emit DomainsDisplaced")

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
    def _dbus_entry(e: Entry, active: Optional[bool] = None,
                    listed: bool = True) -> dict[str, Variant]:
        """An entry for the lists (`Active` unless `listed` is false); a templated
        definition also carries `Template` and `TemplateVariables`."""
        out = config_to_dbus(e.config, active=(e.active if active is None else active)
                             if listed else None, host=e.host)
        if e.template is not None:
            out.update(values_to_dbus({"Template": e.template.template,
                                       "TemplateVariables": e.template.values()}))
        return out

    @method()
    @_contract_errors
    async def ListInactiveDomains(self) -> "aa{sv}":  # type: ignore[valid-type]  # reason: D-Bus signature annotation
        snap = await self._current()
        return [self._dbus_entry(e, listed=False) for e in snap.values()
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
        return await self._start_domain(uuid)

    async def _start_domain(self, uuid: str) -> str:
        """StartDomain, and autostart: the policy, the farm's placement, the timeout."""
        canonical = canonical_uuid(uuid)
        if self.farm is not None and canonical is not None:
            entry = self._snapshot.get(canonical)
            if entry is not None and _is_farm(entry.store):
                return await self._start_farm(entry)
        async with self._change_lock:
            entry = await self._entry(uuid)
            if _is_farm(entry.store):
                return await self._start_farm(entry)
            self._not_pending(entry.config)
            if entry.active:
                raise DBusError(ERROR_ALREADY_RUNNING,
                                f"{entry.config.name} ({entry.config.uuid}) is already running")
            def late(exc: Optional[BaseException], result: Any) -> None:
                if exc is None and result is not None:      # what it displaced, still
                    self._announce(canonical_uuid(result[0]) or result[0],
                                   entry.config.name, result[1])
            running, actions = await self._start_call(entry.config, self._start_blocking,
                                                      entry, on_late=late)
            await self._sync()
            self._announce(canonical_uuid(running) or running, entry.config.name, actions)
            return canonical_uuid(running) or running

    def _not_pending(self, cfg: DomainConfig) -> None:
        """Error.Failed while an earlier start of `cfg` is still going on in libvirt."""
        if cfg.uuid in self._pending_starts:
            raise DBusError(ERROR_FAILED, f"{cfg.name} ({cfg.uuid}) is still being started "
                            "(an earlier StartDomain outlasted --start-timeout); it will run "
                            "when libvirt finishes, or the Manager's log will say why not")

    async def _start_call(self, cfg: DomainConfig, fn: Callable[..., Any], *args: Any,
                          on_late: Optional[Callable[[Optional[BaseException], Any], None]]
                          = None) -> Any:
        """Run the blocking start `fn` for at most start_timeout. Past it the start is
        not abandoned (libvirt cannot be interrupted, and a start reported failed must
        not happen anyway): it goes on in the background, its outcome is logged (and
        given to `on_late`, on the loop), and the caller gets Error.Failed saying the
        start is still in progress."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, fn, *args)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.start_timeout)
        except asyncio.TimeoutError:
            pass
        self._pending_starts[cfg.uuid] = future
        started = time.monotonic() - self.start_timeout

        def finished(fut: "asyncio.Future[Any]") -> None:
            if self._pending_starts.get(cfg.uuid) is fut:
                del self._pending_starts[cfg.uuid]
            exc = None if fut.cancelled() else fut.exception()
            took = time.monotonic() - started
            if fut.cancelled():
                log.error("the late start of %s (%s) was cancelled", cfg.name, cfg.uuid)
            elif exc is not None:
                reason = exc.get_error_message() if isinstance(exc, libvirt.libvirtError) \
                    else str(exc)
                log.error("starting %s (%s) failed after %.1f s (StartDomain had answered "
                          "that it was still in progress): %s", cfg.name, cfg.uuid, took,
                          reason)
            else:
                log.info("started %s (%s) after %.1f s (StartDomain had answered that it "
                         "was still in progress)", cfg.name, cfg.uuid, took)
            if on_late is not None:
                try:
                    on_late(exc, None if exc is not None or fut.cancelled() else fut.result())
                except Exception:
                    log.exception("after the late start of %s", cfg.name)
            self._want_sync()
        future.add_done_callback(finished)
        log.warning("starting %s (%s) takes longer than --start-timeout %g s; still "
                    "waiting for libvirt in the background", cfg.name, cfg.uuid,
                    self.start_timeout)
        raise DBusError(ERROR_FAILED, f"starting {cfg.name} ({cfg.uuid}) is still in progress "
                        f"after {self.start_timeout:g} s (the Manager's --start-timeout); it "
                        "was not cancelled: the domain runs when libvirt finishes, or the "
                        "Manager's log says why it did not")

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
        self._not_pending(cfg)
        if entry.active:
            raise DBusError(ERROR_ALREADY_RUNNING, f"{cfg.name} ({cfg.uuid}) is already "
                            f"running on this host {farm.host_name}")
        farm.require_lease(f"starting {cfg.name}")
        xml, cfg = await self._blocking(self._farm_material, entry)
        needed = _needed(cfg)
        plan, done = Plan(needed), []
        async with self._place_lock:
            policy: Optional[Callable[[], None]] = None
            if self.policy.overcommit == MAKE_ROOM:
                # pause (never save: a saved farm guest would be offered on every host)
                plan, done = await self._blocking(self._farm_make_room, cfg, needed,
                                                  timeout=self.start_timeout)
            else:
                host, used, free = await self._blocking(self._farm_memory_kib)

                def policy() -> None:
                    if needed > free:
                        raise DBusError(ERROR_REFUSED,
                                        f"starting {cfg.name} needs {_size(needed)} of memory "
                                        f"but only {_size(free)} is free on {farm.host_name} "
                                        f"(host {_size(host)}, running domains use "
                                        f"{_size(used)})")
            self._placed_at[cfg.uuid] = time.monotonic()
            self._starting.add(cfg.uuid)
            try:
                token = await farm.place(cfg.uuid, policy)
            except BaseException:
                self._starting.discard(cfg.uuid)
                if done:
                    await self._blocking(self._undo, done)
                raise
        def late(exc: Optional[BaseException], _result: Any) -> None:
            # the start answered "in progress": release the placement only if it failed
            self._starting.discard(cfg.uuid)
            self._placed_at[cfg.uuid] = time.monotonic()
            if exc is None:
                self._started.add(cfg.uuid)
                self._announce(cfg.uuid, cfg.name, plan.actions)
                return

            async def release() -> None:
                with contextlib.suppress(StoreError):
                    await farm.release(cfg.uuid, token)
                if done:
                    with contextlib.suppress(Exception):
                        await self._blocking(self._undo, done)
            asyncio.ensure_future(release())
        try:
            running = await self._start_call(cfg, self._create_transient, entry, xml, cfg,
                                             plan.memory_kib, on_late=late)
        except BaseException as exc:
            if cfg.uuid in self._pending_starts:     # still starting: keep the placement
                raise
            log.warning("starting %s (%s) failed, releasing its placement: %s", cfg.name,
                        cfg.uuid, exc)
            with contextlib.suppress(StoreError):
                await farm.release(cfg.uuid, token)
            if done:
                with contextlib.suppress(Exception):
                    await self._blocking(self._undo, done)
            raise
        finally:
            # A sync whose libvirt read began before this moment may not show the new
            # domain: _reconcile leaves the placement alone for such a sync.
            self._placed_at[cfg.uuid] = time.monotonic()
            if cfg.uuid not in self._pending_starts:   # else `late` does it
                self._starting.discard(cfg.uuid)
        log.info("started %s (%s) on %s, placement token %d", cfg.name, cfg.uuid,
                 farm.host_name, token)
        self._started.add(cfg.uuid)
        self._want_sync()
        self._announce(canonical_uuid(running) or running, cfg.name, plan.actions)
        return canonical_uuid(running) or running

    def _farm_material(self, entry: Entry) -> tuple[str, DomainConfig]:
        return self._start_xml(entry, self.libvirt.get())

    def _farm_make_room(self, cfg: DomainConfig, needed: int) -> tuple[Plan, list[Done]]:
        """Plan a farm start and pause what the plan says (blocking); what other farm
        starts have placed but libvirt does not run yet counts as used."""
        conn = self.libvirt.get()
        running = {d.UUIDString() for d in
                   conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)}
        reserved = []
        for u in self._starting - running:
            e = self._snapshot.get(u)
            if e is not None:
                reserved.append(Running(u, e.config.name, _needed(e.config)))
        plan = self._plan(conn, cfg, needed, shrinkable=True, reserved=reserved)
        return plan, displace(conn, plan)

    def _undo(self, done: Sequence[Done]) -> None:
        undo(self.libvirt.get(), done)

    def _farm_memory_kib(self) -> tuple[int, int, int]:
        """(host, used, free) KiB for a farm start: the host's memory minus what runs
        (a farm domain counts its definition's memory, without asking libvirt) and
        what is being started (blocking)."""
        conn = self.libvirt.get()
        host = self._host_kib(conn)
        mine = self.farm.mine
        counted = set(mine) | self._starting
        used = 0
        for u in counted:
            fe = self.farm.entries.get(u)
            if fe is not None:
                known = self._snapshot.get(u)      # a templated one: as rendered
                used += _needed(known.config if known is not None else fe.config)
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            with contextlib.suppress(libvirt.libvirtError):   # stopped meanwhile
                if dom.UUIDString() not in counted:
                    used += int(dom.info()[2])
        return host, used, max(host - used, 0)

    def _create_transient(self, entry: Entry, xml: str, cfg: DomainConfig, memory: int) -> str:
        conn = self.libvirt.get()
        if memory < _needed(cfg):
            xml = self._shrunk_xml(xml, entry, cfg, memory, libvirt_type_for(conn, cfg))
        dom = conn.createXML(xml, 0)
        return str(dom.UUIDString())

    @method()
    @_contract_errors
    async def DefineDomain(self, properties: "a{sv}") -> "s":  # type: ignore[valid-type,name-defined]  # reason: D-Bus signature annotation
        props = dict(properties)
        if "Template" in props or "TemplateVariables" in props:
            raise DBusError(ERROR_INVALID_ARGUMENT, "DefineDomain makes plain definitions: "
                            "define a templated one with DefineFromTemplate")
        if "UUID" not in props:
            props["UUID"] = Variant("s", str(uuidlib.uuid4()))
        cfg = await self._blocking(self._probe_disks, config_from_dbus(props))
        async with self._change_lock:
            snap = await self._sync()
            if cfg.uuid in snap:
                raise DBusError(ERROR_INVALID_ARGUMENT, f"UUID {cfg.uuid} is already defined "
                                f"(as {snap[cfg.uuid].config.name})")
            await self._check_unique_name(cfg)
            await self._store_call(self.stores[0], "define", cfg)
            await self._sync()
        log.info("defined %s (%s) in %s", cfg.name, cfg.uuid, self.stores[0].spec)
        return cfg.uuid

    @method()
    @_contract_errors
    async def UndefineDomain(self, uuid: "s"):  # type: ignore[name-defined]  # reason: D-Bus signature annotation
        async with self._change_lock:
            entry = await self._entry(uuid)
            blocker = await self._blocking(self._undefine_blocker, entry)
            if blocker is not None:
                raise DBusError(ERROR_REFUSED, blocker)
            await self._store_call(entry.store, "undefine", entry.config.uuid)
            await self._sync()
        log.info("undefined %s (%s)", entry.config.name, entry.config.uuid)

    @method()
    @_contract_errors
    async def GetDomain(self, uuid: "s") -> "a{sv}":  # type: ignore[name-defined,valid-type]  # reason: D-Bus signature annotation
        entry = await self._entry(uuid)
        # A farm definition placed on another host runs (there): Active, and Host says where.
        return self._dbus_entry(entry, active=entry.active or entry.elsewhere)

    @method()
    @_contract_errors
    async def UpdateDomain(self, uuid: "s", changes: "a{sv}"):  # type: ignore[name-defined,valid-type]  # reason: D-Bus signature annotation
        async with self._change_lock:
            entry = await self._entry(uuid)
            old = entry.config
            given = changes.get("UUID")
            if given is not None and canonical_uuid(getattr(given, "value", None)) != old.uuid:
                raise DBusError(ERROR_INVALID_ARGUMENT, "UpdateDomain cannot change the UUID")
            if entry.template is not None:
                await self._update_templated(entry, changes)
                return
            if "Template" in changes or "TemplateVariables" in changes:
                raise DBusError(ERROR_NOT_SUPPORTED, f"{old.name} is not a templated "
                                "definition: it has no template or variables to change")
            merged = config_to_dbus(old)
            merged.update({k: v for k, v in changes.items() if k not in ("UUID", "Active")})
            new = config_from_dbus(merged)
            if new.disks != old.disks and not isinstance(entry.store, LibvirtStore):
                new = await self._blocking(self._probe_disks, new)
            if new == old:
                return
            await self._check_unique_name(new)
            renamed = new.name != old.name
            if renamed and entry.active and isinstance(entry.store, LibvirtStore):
                # libvirt renames only a stopped domain: the definition takes the new
                # name when the domain stops (before its next start), like a SQLite one
                rest = replace(new, name=old.name)
                if rest != old:
                    await self._store_call(entry.store, "update", old, rest)
                await self._store_call(entry.store, "rename_later", old.uuid, new.name)
            else:
                await self._store_call(entry.store, "update", old, new)
            if renamed and entry.active:
                log.info("renamed %s (%s) to %s: the running domain keeps the name %s; the "
                         "new name applies from its next start", old.name, old.uuid,
                         new.name, old.name)
            await self._sync()

    # ------------------------------------------------------------ templates

    async def _refresh_templates(self) -> None:
        """Read the templates directory now (a template written a moment ago counts)."""
        changed = await self._blocking(self.templates.refresh)
        if changed:
            self._templates_changed |= changed
            self._want_sync()

    @method()
    @_contract_errors
    async def ListTemplates(self) -> "aa{sv}":  # type: ignore[valid-type]  # reason: D-Bus signature annotation
        await self._refresh_templates()
        return [template_to_dbus(t.name, t.description, t.version,
                                 [(v.name, v.type, v.default, v.description)
                                  for v in t.variables])
                for t in sorted(self.templates.templates.values(), key=lambda t: t.name)]

    @method()
    @_contract_errors
    async def DefineFromTemplate(self, template: "s", variables: "a{sv}") -> "s":  # type: ignore[valid-type,name-defined]  # reason: D-Bus signature annotation
        await self._refresh_templates()
        t = self.templates.get(template)
        given = {str(k): plain(v) for k, v in dict(variables).items()}
        name = given.pop("name", None)
        if not isinstance(name, str) or not name.strip():
            raise DBusError(ERROR_INVALID_ARGUMENT, "variable name (the domain's name) is "
                            "required, a non-empty string")
        raw_uuid = given.pop("uuid", None)
        uuid = canonical_uuid(raw_uuid) if raw_uuid is not None else str(uuidlib.uuid4())
        if uuid is None:
            raise DBusError(ERROR_INVALID_ARGUMENT, f"variable uuid {str(raw_uuid)[:80]!r} is "
                            "not a UUID")
        policy: dict[str, Any] = {k: given.pop(k) for k in ("Priority", "MinMemoryKiB")
                                  if k in given}
        # the contract's rules for the name and the policy keys
        base = config_from_dbus(values_to_dbus({"UUID": uuid, "Name": name, **policy}))
        row = Templated(uuid, base.name, t.name, variables_json(t.check(given)),
                        base.priority, base.min_memory_kib)
        _, cfg = t.render(uuid, row.name, row.values(), self._hypervisor or "kvm")
        async with self._change_lock:
            snap = await self._sync()
            if uuid in snap:
                raise DBusError(ERROR_INVALID_ARGUMENT, f"UUID {uuid} is already defined "
                                f"(as {snap[uuid].config.name})")
            await self._check_unique_name(cfg)
            await self._store_call(self.stores[0], "define_templated", row)
            await self._sync()
        log.info("defined %s (%s) from template %s in %s", row.name, uuid, t.name,
                 self.stores[0].spec)
        return uuid

    async def _update_templated(self, entry: Entry, changes: dict[str, Any]) -> None:
        """UpdateDomain of a templated definition: its name, its policy, its variables
        (TemplateVariables, or VCPUs / MemoryKiB / MaxMemoryKiB through the variables
        vcpus, memory_kib, max_memory_kib when the template declares them). What else
        the domain has comes from the template: changing it is Error.NotSupported."""
        row = entry.template
        assert row is not None
        t = self.templates.get(row.template)
        old = entry.config
        given_template = changes.get("Template")
        if given_template is not None and getattr(given_template, "value", None) != row.template:
            raise DBusError(ERROR_NOT_SUPPORTED, f"{row.name} is rendered from template "
                            f"{row.template}; a definition cannot change its template")
        values = row.values()
        extra = changes.get("TemplateVariables")
        if extra is not None:
            merged_vars = plain(extra)
            if not isinstance(merged_vars, dict):
                raise DBusError(ERROR_INVALID_ARGUMENT, "TemplateVariables is not a dict")
            values.update(t.check(merged_vars))
        merged = config_to_dbus(old)
        merged.update({k: v for k, v in changes.items()
                       if k not in ("UUID", "Active", "Host", "Template", "TemplateVariables")})
        new = config_from_dbus(merged)
        fixed = []
        for field, var in (("vcpus", "vcpus"), ("memory_kib", "memory_kib"),
                           ("max_memory_kib", "max_memory_kib")):
            if getattr(new, field) == getattr(old, field):
                continue
            declared = t.variable(var)
            if declared is not None:
                values[var] = declared.coerce(getattr(new, field), f"variable {var}")
            elif field != "max_memory_kib":     # checked against the rendering below
                fixed.append(field)
        fixed += [f for f in ("title", "type", "os_type", "arch", "autostart", "disks", "nics")
                  if getattr(new, f) != getattr(old, f)]
        if fixed:
            raise DBusError(ERROR_NOT_SUPPORTED, f"{row.name} is rendered from template "
                            f"{row.template}: its {', '.join(fixed)} come from the template "
                            "(change the template, or its variables with TemplateVariables)")
        new_row = Templated(row.uuid, new.name, row.template, variables_json(values),
                            new.priority, new.min_memory_kib)
        if new_row == row:
            return
        _, cfg = t.render(row.uuid, new_row.name, values, self._hypervisor or "kvm")
        if new.max_memory_kib != old.max_memory_kib and cfg.max_memory_kib != new.max_memory_kib:
            raise DBusError(ERROR_NOT_SUPPORTED, f"{row.name} is rendered from template "
                            f"{row.template}: its maximum memory comes from the template")
        await self._check_unique_name(cfg)
        await self._store_call(entry.store, "update_templated", new_row)
        if new_row.name != row.name and entry.active:
            log.info("renamed %s (%s) to %s: the running domain keeps the name %s; the "
                     "new name applies from its next start", row.name, row.uuid,
                     new_row.name, row.name)
        await self._sync()

    @signal()
    def TemplatesChanged(self):
        return None

    @signal()
    def DomainsDisplaced(self, started, actions) -> "saa{sv}":  # type: ignore[valid-type]  # reason: D-Bus signature annotation
        return [started, actions]

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
    return Stored(entry.config, entry.active, entry.template)


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
        if self._own_bus:
            if self.bus.connected:
                self.bus.disconnect()
            # Also when the bus went away first (its daemon stopped by the same signal):
            # the error it ended with is taken here, not logged as never retrieved.
            with contextlib.suppress(Exception):
                await self.bus.wait_for_disconnect()

    async def wait_closed(self) -> None:
        """Until the bus connection ends (the daemon went away)."""
        # Shielded: cancelling this wait must not cancel the bus's own future.
        with contextlib.suppress(Exception):
            await asyncio.shield(self.bus.wait_for_disconnect())


async def serve_manager(bus: Union[str, MessageBus], stores: Sequence[Union[Store, str]],
                        libvirt_conn: Union[libvirt.virConnect, LibvirtConnection, None] = None,
                        *, poll_interval: float = 1.0,
                        templates: Optional[TemplateLibrary] = None,
                        policy: Optional[PolicyOptions] = None,
                        start_timeout: float = DEFAULT_START_TIMEOUT,
                        state_file: Union[str, "os.PathLike[str]", None] = None
                        ) -> ManagerHandle:
    """Export the reference Manager on `bus` (system, session, an address, or a
    connected MessageBus) and own org.example.virt. For in-process use (the demo).

    `stores` holds Store objects or specs (`sqlite:PATH`, `libvirt:URI`; `libvirt:`
    with no URI means `libvirt_conn` itself). `libvirt_conn` may be an open
    virConnect shared with the rest of the process; it is never closed here. What is
    opened here (the stores named by spec, their libvirt connections) is closed by
    the handle's stop(), or at once if serving fails.
    """
    # libvirt's own error printing goes to the log (for stores opened in-process too)
    libvirt.registerErrorHandler(libvirt_error_to_log, None)
    made: list[LibvirtConnection] = []       # ours to close; a handed-in one is not
    if not isinstance(libvirt_conn, LibvirtConnection):
        libvirt_conn = LibvirtConnection(None, libvirt_conn)
        made.append(libvirt_conn)
    connections: dict[str | None, LibvirtConnection] = {None: libvirt_conn}
    specs = list(stores)
    resolved = [open_store(s, connections) if isinstance(s, str) else s for s in specs]
    opened = [s for s, spec in zip(resolved, specs) if isinstance(spec, str)]
    made += [c for uri, c in connections.items() if uri is not None]
    service = ManagerService(resolved, libvirt_conn, poll_interval=poll_interval,
                             templates=templates, policy=policy, start_timeout=start_timeout,
                             state_file=state_file)
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
