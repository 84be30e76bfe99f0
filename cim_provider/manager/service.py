"""The reference org.example.virt.Manager: stores, a memory policy, StartDomain.

The exported interface is checked against the contract XML at start-up, so this
service cannot drift from what clients load. Every change, whether made through the
bus or behind our back (virsh define, a domain that stopped), is found by comparing
snapshots and announced with DomainDefined / DomainUndefined / DomainChanged and a new
Generation.

(No `from __future__ import annotations` here: the D-Bus decorators read the
annotations, which are D-Bus type strings, not Python types.)
"""
import asyncio
import contextlib
import functools
import logging
import time
import uuid as uuidlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import libvirt

from ..contract import (BUS_NAME, ERROR_ALREADY_RUNNING, ERROR_FAILED, ERROR_INVALID_ARGUMENT,
                        ERROR_NOT_FOUND, ERROR_REFUSED, INTERFACE, OBJECT_PATH, InvalidEntry,
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



@dataclass(frozen=True, slots=True)
class Entry:
    """One definition as the service sees it: which store holds it, is it running."""
    config: DomainConfig
    active: bool
    store: Store


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
        # Starts from the clock so that a restarted Manager never repeats an old value.
        self._generation = time.time_ns() // 1000
        self._snapshot: dict[str, Entry] = {}
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
        await self._sync(emit=False)
        self._poller = asyncio.create_task(self._poll(), name="manager-service-poll")

    async def stop(self) -> None:
        """Stop polling. The flag as well as the cancel: asyncio.wait_for (in
        _blocking) may swallow a cancel that arrives as its call completes, and the
        poller must end anyway."""
        self._stopping = True
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.cancel()
            await asyncio.wait({poller})     # never swallows a cancel of our own

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
        """Notice changes made behind our back (virsh, a guest shutting down)."""
        while not self._stopping:
            await asyncio.sleep(self.poll_interval)
            if self._stopping:
                return
            try:
                await self._sync()
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

    def _collect(self) -> dict[str, Entry]:
        """Every definition in every store (blocking). A UUID held twice: first store wins."""
        try:
            running: Optional[set[str]] = self._running_uuids()
            self._trouble("libvirt", None)
        except (StoreError, libvirt.libvirtError) as exc:
            self._trouble("libvirt", f"cannot ask libvirt which domains run: {exc}")
            running = None
        out: dict[str, Entry] = {}
        for store in self.stores:
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
        return out

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

    async def _sync(self, emit: bool = True) -> dict[str, Entry]:
        """Re-read everything; announce what changed since the last read."""
        async with self._sync_lock:
            new = await self._blocking(self._collect)
            old = self._snapshot
            self._snapshot = new
            if not emit:
                return new
            defined = [u for u in new if u not in old]
            undefined = [u for u in old if u not in new]
            changed = [u for u in new if u in old and
                       (new[u].config != old[u].config or new[u].active != old[u].active)]
            if defined or undefined or changed:
                self._generation += 1
                for u in defined:
                    self.DomainDefined(u)
                for u in undefined:
                    self.DomainUndefined(u)
                for u in changed:
                    self.DomainChanged(u)
                self.emit_properties_changed({"Generation": self._generation})
                log.info("generation %d: %d defined, %d undefined, %d changed",
                         self._generation, len(defined), len(undefined), len(changed))
            return new

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

    @method()
    @_contract_errors
    async def ListInactiveDomains(self) -> "aa{sv}":  # type: ignore[valid-type]  # reason: D-Bus signature annotation
        snap = await self._sync()
        return [config_to_dbus(e.config) for e in snap.values() if not e.active]

    @method()
    @_contract_errors
    async def ListDomains(self) -> "aa{sv}":  # type: ignore[valid-type]  # reason: D-Bus signature annotation
        snap = await self._sync()
        return [config_to_dbus(e.config, active=e.active) for e in snap.values()]

    @method()
    @_contract_errors
    async def StartDomain(self, uuid: "s") -> "s":  # type: ignore[name-defined]  # reason: D-Bus signature annotation
        async with self._change_lock:
            entry = await self._entry(uuid)
            if entry.active:
                raise DBusError(ERROR_ALREADY_RUNNING,
                                f"{entry.config.name} ({entry.config.uuid}) is already running")
            running = await self._blocking(self._start_blocking, entry)
            await self._sync()
            return canonical_uuid(running) or running

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
            await self._blocking(self.stores[0].define, cfg)
            await self._sync()
        log.info("defined %s (%s) in %s", cfg.name, cfg.uuid, self.stores[0].spec)
        return cfg.uuid

    @method()
    @_contract_errors
    async def UndefineDomain(self, uuid: "s"):  # type: ignore[name-defined]  # reason: D-Bus signature annotation
        async with self._change_lock:
            entry = await self._entry(uuid)
            await self._blocking(entry.store.undefine, entry.config.uuid)
            await self._sync()
        log.info("undefined %s (%s)", entry.config.name, entry.config.uuid)

    @method()
    @_contract_errors
    async def GetDomain(self, uuid: "s") -> "a{sv}":  # type: ignore[name-defined,valid-type]  # reason: D-Bus signature annotation
        entry = await self._entry(uuid)
        return config_to_dbus(entry.config, active=entry.active)

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
            await self._blocking(entry.store.update, old, new)
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
