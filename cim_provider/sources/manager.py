"""Client of an org.example.virt.Manager: the passive domain definitions, kept current.

A Manager is another program, possibly not running, possibly restarted at any time,
possibly written by someone else. So this client follows its presence on the bus
(NameOwnerChanged), learns what it offers by introspection (only ListInactiveDomains
and StartDomain are required), treats every entry it returns as untrusted input, and
puts a timeout on every call so that no caller can hang on it.

The module is longer than most (about 900 lines) because it is one state machine:
presence, introspection, listing and calls share one lock and one epoch counter, and
their invariants are easier to check in one place. Its errors live in manager_errors.py,
the changes of an incremental listing (and how they are applied) in manager_changes.py.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..contract import (BUS_NAME, CHANGE_SIGNALS, DOMAINS_DISPLACED, ERROR_INVALID_ARGUMENT,
                        ERROR_NOT_SUPPORTED, INTERFACE, TEMPLATES_CHANGED,
                        OBJECT_PATH, REQUIRED_METHODS, InvalidEntry, Member,
                        active_from_dbus, config_from_dbus, host_from_dbus, interface_members,
                        members, templates_from_dbus, values_to_dbus, variant_of)
from ..contract.bus import (DBUS_INTERFACE, DBUS_NAME, DBUS_PATH, DBusError, Message,
                            MessageBus, MessageType, bus_description, connect, intr)
from ..domain.records import DomainConfig
from ..domain.records import canonical_uuid
from ..domain.sources import SourceStatus
from .manager_changes import Delta, merge_delta
from .manager_errors import (ABSENT_MEMBER_ERRORS, ERR_BAD_REPLY, ERR_TIMEOUT, ERR_UNAVAILABLE,
                             ManagerError, ManagerFailed, ManagerNotSupported, ManagerRefused,
                             ManagerTimeout, ManagerUnavailable, error_from_dbus)

log = logging.getLogger(__name__)

# Signals often come in bursts (a tool defining ten domains): signals within this long
# of the last read wait for the rest of it, so a burst costs one or two ListDomains.
DEBOUNCE = 0.05
# Back-off between attempts to reach the bus itself (not the Manager) after it failed.
RECONNECT_MIN, RECONNECT_MAX = 0.5, 30.0
# Even with the change signals, re-read this often: a signal can be lost (a bus daemon
# under memory pressure drops messages), and then nothing else would make us look.
SAFETY_RELIST = 60.0
# StartDomain returns once the domain runs, and starting a real guest (qemu allocating
# memory, attaching disks, the Manager's own policy) can take much longer than a list.
START_TIMEOUT = 60.0
# A listing carries every definition: with thousands of them (or a Manager that reads
# them from libvirt or a database first) it takes far longer than a simple call.
LIST_TIMEOUT = 60.0

# Entries asked for per ListDomainsPage call (a Manager may return fewer).
PAGE_SIZE = 2000

OnChange = Callable[[dict[str, DomainConfig] | None], None]
# on_delta(changed, removed): only these definitions changed (by UUID) or went away.
OnDelta = Callable[[dict[str, DomainConfig], set[str]], None]
# A full listing: definitions, active UUIDs, farm hosts by UUID, the generation read.
Listing = tuple[dict[str, DomainConfig], set[str], dict[str, str], "int | None"]


def _count_types(signature: str) -> int:
    """How many complete D-Bus types a signature holds ("aa{sv}s" -> 2)."""
    count = depth = 0
    for ch in signature:
        if ch in "({":
            depth += 1
        elif ch in ")}":
            depth -= 1
        if depth == 0 and ch != "a":
            count += 1
    return count


def _entry_uuid(entry: Any) -> str | None:
    """The canonical UUID an entry names, if any (to drop it when it is unusable)."""
    if isinstance(entry, Mapping):
        value = getattr(entry.get("UUID"), "value", None)
        if isinstance(value, str):
            return canonical_uuid(value)
    return None

def _ident(entry: Any) -> str:
    """A short way to name an entry in a warning, from whatever it carries."""
    if isinstance(entry, Mapping):
        for key in ("UUID", "Name"):
            v = getattr(entry.get(key), "value", None)
            if isinstance(v, str):
                return f"{key} {v[:64]!r}"
    return "without a usable UUID or Name"


class ManagerClient:
    """Follows one Manager on one bus and keeps `definitions` current.

    `on_change(defs)` runs on the event loop with all current definitions whenever a
    (re)read differs from the previous one (definitions or the set of active UUIDs),
    and with None when the Manager goes away. With `on_delta`, a read that brings only
    changes (ListChangesSince) calls `on_delta(changed, removed)` instead, with just
    the definitions that changed and the UUIDs no longer listed: O(changed), not
    O(all) (docs/architecture.md, "Sources"). A full (re-)list still calls on_change.

    Without the change signals the list is re-read every `relist_interval` seconds;
    with them, on each signal, every `relist_interval` after a failed read until one
    succeeds, and every `safety_relist` seconds in case a signal was lost (None: never).

    Every call gives up after `call_timeout` seconds, except StartDomain, which gets
    `start_timeout`, and the listings, which get `list_timeout`. A listing that times
    out is tried again at once; until the first one succeeds, `status` says the
    passive domains are not listed yet.
    """

    def __init__(self, bus: str = "system", *, call_timeout: float = 5.0,
                 relist_interval: float = 5.0, on_change: OnChange | None = None,
                 safety_relist: float | None = SAFETY_RELIST,
                 start_timeout: float = START_TIMEOUT,
                 list_timeout: float = LIST_TIMEOUT,
                 on_delta: OnDelta | None = None) -> None:
        self.bus_spec = bus
        self.call_timeout = call_timeout
        self.start_timeout = start_timeout
        self.list_timeout = list_timeout
        self.relist_interval = relist_interval
        self.safety_relist = safety_relist
        self.on_change = on_change
        self.on_delta = on_delta
        self.definitions: dict[str, DomainConfig] | None = None
        self.active: set[str] = set()
        # Farm Managers: the host each listed entry is placed on (its `Host` key).
        self.hosts: dict[str, str] = {}
        self.generation: int | None = None
        # ListTemplates (when offered): plain dicts, see contract.templates_from_dbus;
        # None until read. Re-read on TemplatesChanged, else with the periodic re-lists.
        self.templates: list[dict[str, Any]] | None = None
        self._templates_stale = True
        self._bus: MessageBus | None = None
        self._owner: str | None = None
        self._epoch = 0                    # bumped whenever the owner changes
        self._offered: set[str] = set()
        self._need_introspect = True
        self._warned: set[tuple[str, str]] = set()
        self._wake = asyncio.Event()
        self._wakes = 0                    # counts reasons to re-list (see _poke)
        self._owner_events = 0             # NameOwnerChanged signals seen
        self._debounce = False
        self._refresh_failed = False       # the last read of this Manager failed
        self._refresh_lock = asyncio.Lock()
        self._last_read = 0.0              # time.monotonic() when the last read ended
        self._task: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False
        self._first_attempt = asyncio.Event()    # the first listing returned or failed
        # When the present condition began (time.time()), for `status`.
        self._absent_since: float | None = time.time()
        self._waiting_since: float | None = None
        self._failing_since: float | None = None
        self._last_failure = ""

    # ------------------------------------------------------------ public state

    @property
    def present(self) -> bool:
        return self._owner is not None

    @property
    def knows_twins(self) -> bool:
        return self.offers("ListDomains")

    def offers(self, member: str) -> bool:
        """Whether the Manager now on the bus offers `member` (method, signal, property)."""
        return self._owner is not None and member in self._offered

    @property
    def listed(self) -> bool:
        """Whether the passive domains shown come from a listing of the present Manager."""
        return self._owner is not None and self.definitions is not None

    @property
    def status(self) -> SourceStatus:
        """What clients miss because of this Manager, if anything."""
        where = bus_description(self.bus_spec)
        if self._owner is None:
            return SourceStatus("degraded", f"no org.example.virt.Manager on {where}: passive "
                                "domains are not listed", self._absent_since)
        if self.definitions is None:
            since = SourceStatus.stamp(self._waiting_since)
            why = f" (last attempt: {self._last_failure})" if self._last_failure else ""
            return SourceStatus("degraded", f"passive domains not listed yet: waiting for the "
                                f"Manager since {since}{why}", self._waiting_since)
        if self._failing_since is not None:
            since = SourceStatus.stamp(self._failing_since)
            return SourceStatus("degraded", f"the Manager's list could not be read again since "
                                f"{since} ({self._last_failure}); passive domains shown as "
                                "last listed", self._failing_since)
        return SourceStatus()

    # ------------------------------------------------------------ life cycle

    async def start(self) -> None:
        """Connect and start following the Manager; absence is not an error.

        The first listing runs in the background loop; start() waits for it at most
        `call_timeout` seconds, so a slow Manager delays nobody: until it answers,
        `status` says so and the passive domains appear the moment it does.
        """
        if self._task is not None:
            return
        self._stopping = False
        try:
            await self._connect()
        except Exception as exc:  # the bus may come later (system bus restart)
            log.warning("cannot connect to %s: %s; will retry",
                        bus_description(self.bus_spec), exc)
        self._task = asyncio.create_task(self._run(), name="manager-client")
        if self._owner is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._first_attempt.wait(), self.call_timeout)
            if self.definitions is None and self._owner is not None:
                log.warning("%s", self.status.reason)

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()      # the loop ends on the flag even if a cancel is swallowed
        for task in (self._task, self._watch):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._task = self._watch = None
        if self._bus is not None:
            self._bus.remove_message_handler(self._on_message)
            self._bus.disconnect()
            self._bus = None
        self._owner = None

    async def _connect(self) -> None:
        try:
            bus = await asyncio.wait_for(connect(self.bus_spec), self.call_timeout)
        except asyncio.TimeoutError:
            raise ManagerUnavailable(ERR_TIMEOUT, f"{bus_description(self.bus_spec)} did not "
                                     f"accept a connection within {self.call_timeout:g} s") \
                from None
        bus.add_message_handler(self._on_message)
        self._bus = bus
        try:
            await self._add_match(f"type='signal',sender='{DBUS_NAME}',interface='{DBUS_INTERFACE}',"
                                  f"member='NameOwnerChanged',arg0='{BUS_NAME}'")
            await self._add_match(f"type='signal',sender='{BUS_NAME}',interface='{INTERFACE}',"
                                  f"path='{OBJECT_PATH}'")
            seen = self._owner_events
            try:
                reply = await self._raw_call(DBUS_NAME, DBUS_PATH, DBUS_INTERFACE,
                                             "GetNameOwner", "s", [BUS_NAME])
                owner = reply[0]
            except ManagerUnavailable:
                owner = None
            if self._owner_events != seen:
                # A NameOwnerChanged overtook our answer: it is newer, keep what it said.
                owner = self._owner
        except BaseException:
            self._bus = None
            bus.remove_message_handler(self._on_message)
            bus.disconnect()
            raise
        self._watch = asyncio.create_task(self._watch_disconnect(bus), name="manager-bus-watch")
        log.info("following %s on %s (%s)", BUS_NAME, bus_description(self.bus_spec),
                 "present" if owner else "absent")
        if owner:
            self._appeared(owner)

    async def _add_match(self, rule: str) -> None:
        await self._raw_call(DBUS_NAME, DBUS_PATH, DBUS_INTERFACE, "AddMatch", "s", [rule])

    async def _watch_disconnect(self, bus: MessageBus) -> None:
        """When the bus connection drops, the Manager is as good as gone."""
        with contextlib.suppress(Exception):
            # Shielded: cancelling this watch must not cancel the bus's own future.
            await asyncio.shield(bus.wait_for_disconnect())
        if self._stopping or bus is not self._bus:
            return
        log.warning("lost the connection to %s", bus_description(self.bus_spec))
        self._bus = None
        self._vanished()
        self._wake.set()

    async def _run(self) -> None:
        """The background loop: re-list on signals, on an interval, or on (re)appearance."""
        backoff = RECONNECT_MIN
        while not self._stopping:
            if self._bus is None:
                await asyncio.sleep(backoff)
                try:
                    await self._connect()
                    backoff = RECONNECT_MIN
                except Exception as exc:
                    backoff = min(backoff * 2, RECONNECT_MAX)
                    log.debug("bus still unreachable: %s", exc)
                continue
            timed_out = False
            try:
                await asyncio.wait_for(self._wake.wait(), self._wait_timeout())
            except asyncio.TimeoutError:
                timed_out = True
            self._wake.clear()
            if self._stopping:
                break
            if self._owner is None:
                continue
            if self._debounce:
                # The first signal after a quiet spell is read at once (a define shows
                # without delay); more within DEBOUNCE of a read share the next one.
                wait = self._last_read + DEBOUNCE - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                self._debounce = False
                self._wake.clear()
                timed_out = False
            try:
                await self._refresh(periodic=timed_out)
            except Exception:  # never let the loop die on a surprise
                if self._owner is not None:
                    self._refresh_failed = True
                log.exception("unexpected error while reading the Manager's domains")
            self._last_read = time.monotonic()

    def _wait_timeout(self) -> float | None:
        if self._owner is None:
            return None
        if (self.definitions is None or self._need_introspect or self._refresh_failed
                or not CHANGE_SIGNALS <= self._offered):
            return self.relist_interval
        return self.safety_relist

    # ------------------------------------------------------------ presence and signals

    def _on_message(self, msg: Message) -> None:
        if msg.message_type != MessageType.SIGNAL:
            return
        if (msg.member == "NameOwnerChanged" and msg.interface == DBUS_INTERFACE
                and msg.sender == DBUS_NAME):
            body = list(msg.body)
            if len(body) == 3 and body[0] == BUS_NAME:
                self._owner_events += 1
                if body[2]:
                    self._appeared(body[2])
                else:
                    self._vanished()
        elif (msg.interface == INTERFACE and msg.path == OBJECT_PATH
              and msg.member in CHANGE_SIGNALS and msg.sender == self._owner):
            log.debug("%s%s from the Manager", msg.member, tuple(msg.body))
            self._debounce = True
            self._poke()
        elif (msg.interface == INTERFACE and msg.path == OBJECT_PATH
              and msg.sender == self._owner and msg.sender is not None):
            if msg.member == TEMPLATES_CHANGED:
                self._templates_stale = True
                self._debounce = True
                self._poke()
            elif msg.member == DOMAINS_DISPLACED:
                _log_displaced(list(msg.body), self.definitions or {})

    def _appeared(self, owner: str) -> None:
        if owner == self._owner:
            return
        log.info("Manager %s appeared as %s", BUS_NAME, owner)
        self._owner = owner
        self._waiting_since = time.time()
        self._failing_since = None
        self._last_failure = ""
        self._epoch += 1
        self._offered = set(REQUIRED_METHODS)
        self._need_introspect = True
        self._warned.clear()
        self.generation = None
        self.templates = None
        self._templates_stale = True
        self._debounce = False
        self._refresh_failed = False
        self._poke()

    def _poke(self) -> None:
        """Ask the loop for a re-list."""
        self._wakes += 1
        self._wake.set()

    def _vanished(self) -> None:
        if self._owner is not None:
            log.info("Manager %s left the bus", BUS_NAME)
            self._absent_since = time.time()
        self._owner = None
        self._epoch += 1
        self._offered = set()
        self.generation = None
        self.templates = None
        self._refresh_failed = False
        self._first_attempt.set()
        self.hosts = {}
        if self.definitions is not None or self.active:
            self.definitions = None
            self.active = set()
            self._notify(None)

    def _notify(self, defs: dict[str, DomainConfig] | None) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change(None if defs is None else dict(defs))
        except Exception:
            log.exception("on_change callback failed")

    def _notify_delta(self, changed: dict[str, DomainConfig], removed: set[str]) -> None:
        """Only these changed: `on_delta` when given, else the whole set to on_change."""
        if self.on_delta is None:
            self._notify(self.definitions)
            return
        try:
            self.on_delta(changed, removed)
        except Exception:
            log.exception("on_delta callback failed")

    # ------------------------------------------------------------ reading the list

    async def _introspect(self) -> None:
        """Learn which optional members this Manager offers (and with the right types)."""
        reply = await self._raw_call(BUS_NAME, OBJECT_PATH, "org.freedesktop.DBus.Introspectable",
                                     "Introspect", "", [], member_for_errors="Introspect")
        try:
            node = intr.Node.parse(reply[0])
        except Exception as exc:
            raise ManagerFailed(ERR_BAD_REPLY, f"unparsable introspection data: {exc}") from None
        remote: dict[str, Member] = {}
        for iface in node.interfaces:
            if iface.name == INTERFACE:
                remote = interface_members(iface)
        offered = set(REQUIRED_METHODS)
        for name, want in members().items():
            got = remote.get(name)
            if got is None:
                continue
            same_type = (got.kind, got.in_signature, got.out_signature) == \
                (want.kind, want.in_signature, want.out_signature)
            if same_type and (got.kind != "property" or "read" in got.access):
                offered.add(name)
            else:
                self._warn_once(("member", name),
                                "the Manager's %s does not match the contract (%s); not using it",
                                name, got)
        if not remote:
            # Not exported yet (name taken first) or no introspection: try again later.
            log.info("the Manager does not introspect %s yet; assuming only the required "
                     "methods", INTERFACE)
        else:
            self._need_introspect = False
        self._offered = offered
        log.info("Manager offers: %s", ", ".join(sorted(offered)))

    async def refresh(self, started: str | None = None) -> None:
        """Re-read the list now and wait for it (after a change made through this
        client, so the next read sees it). Failures are logged, not raised.

        `started`: the UUID StartDomain just started. A Manager without ListDomains
        lists only what is not running, so that definition is gone from its list: it is
        dropped at once, whether or not the re-list then succeeds.
        """
        if (started is not None and not self.knows_twins and self.definitions is not None
                and started in self.definitions):
            del self.definitions[started]
            self.hosts.pop(started, None)
            self._notify_delta({}, {started})
        await self._refresh(force=True)

    async def _refresh(self, force: bool = False, periodic: bool = False) -> None:
        """Re-read the list. `force`: whatever Generation says; `periodic`: no signal
        asked for this read (a safety re-list or a retry), so an unchanged Generation
        may spare it even when the Manager has signals."""
        async with self._refresh_lock:
            epoch = self._epoch
            wakes = self._wakes
            if self._owner is None:
                return
            try:
                if self._need_introspect:
                    try:
                        await self._introspect()
                    except (ManagerNotSupported, ManagerError) as exc:
                        if isinstance(exc, (ManagerUnavailable, ManagerTimeout)):
                            raise
                        log.info("cannot introspect the Manager (%s); assuming only the "
                                 "required methods", exc)
                    if epoch != self._epoch:
                        return
                if self.offers("ListTemplates") and (
                        self._templates_stale or self.templates is None
                        or (periodic and not self.offers(TEMPLATES_CHANGED))):
                    await self._read_templates()
                result: Listing | Delta
                if self.offers("ListDomainsPage"):
                    result = await self._read_paged()
                else:
                    polling = not CHANGE_SIGNALS <= self._offered
                    generation = None
                    if (polling or periodic) and self.offers("Generation") and not force:
                        # A cheap question first: has anything changed since the last list?
                        generation = await self._get_generation()
                        if (generation is not None and generation == self.generation
                                and self.definitions is not None):
                            self._refresh_failed = False
                            self._failing_since = None
                            return
                    entries, with_active = await self._list()
                    defs, active, hosts = self._parse(entries, with_active)
                    del entries
                    result = (defs, active, hosts, generation)
            except ManagerError as exc:
                if epoch == self._epoch:
                    # Retried every relist_interval (see _wait_timeout) until a read
                    # works: the change that made us read must not be lost. A listing
                    # that timed out is tried again at once: it is slow, not refused.
                    self._refresh_failed = True
                    self._last_failure = str(exc)
                    if self.definitions is not None and self._failing_since is None:
                        self._failing_since = time.time()
                    log.warning("cannot read the Manager's domains: %s", exc)
                    if isinstance(exc, ManagerTimeout):
                        self._poke()
                    self._first_attempt.set()
                return
            if epoch != self._epoch:
                return       # the Manager changed while we listened to the old one
            self._refresh_failed = False
            self._failing_since = None
            self._last_failure = ""
            self._first_attempt.set()
            if self.definitions is None and self._waiting_since is not None:
                log.info("the Manager listed its domains after %.1f s",
                         time.time() - self._waiting_since)
            if wakes == self._wakes:
                self._wake.clear()     # nothing new arrived while we listed
            if isinstance(result, Delta):
                # Only what changed, applied in place: O(changed) here and in the
                # inventory (docs/architecture.md, "Sources").
                self.generation = result.generation
                if self.definitions is None:      # never: a delta needs a listing first
                    self.definitions = {}
                applied = merge_delta(result, self.definitions, self.active, self.hosts)
                if applied.changed or applied.removed:
                    log.debug("Manager changes: %d new or changed, %d removed",
                              len(applied.changed), len(applied.removed))
                    self._notify_delta(applied.changed, applied.removed)
                return
            defs, active, hosts, generation = result
            self.generation = generation
            self.hosts = hosts
            if defs != self.definitions or active != self.active:
                self.definitions = defs
                self.active = active
                log.debug("Manager lists %d definitions (%d active)", len(defs), len(active))
                self._notify(defs)

    async def _read_templates(self) -> None:
        """ListTemplates into `templates`; a failure keeps what was read before."""
        self._templates_stale = False
        try:
            self.templates = templates_from_dbus(await self._call("ListTemplates"))
        except ManagerNotSupported as exc:
            if exc.name in ABSENT_MEMBER_ERRORS:
                self._offered.discard("ListTemplates")
            log.info("cannot list the Manager's templates: %s", exc)
        except (ManagerUnavailable, ManagerTimeout):
            self._templates_stale = True
            raise
        except (ManagerError, InvalidEntry) as exc:
            log.warning("cannot list the Manager's templates: %s", exc)

    async def _get_generation(self) -> int | None:
        try:
            reply = await self._raw_call(BUS_NAME, OBJECT_PATH, "org.freedesktop.DBus.Properties",
                                         "Get", "ss", [INTERFACE, "Generation"],
                                         member_for_errors="Generation")
        except ManagerNotSupported as exc:
            if exc.name in ABSENT_MEMBER_ERRORS:
                self._offered.discard("Generation")
            else:                    # not now (Error.NotSupported): list, ask again later
                log.debug("Generation not available now: %s", exc)
            return None
        value = getattr(reply[0], "value", None) if reply else None
        return value if isinstance(value, int) else None

    async def _read_paged(self) -> Listing | Delta:
        """A Manager with ListDomainsPage: only the changes since the generation we
        hold when it offers ListChangesSince and Generation (a Delta); else (or when it
        cannot say) everything in pages, then the changes made during the walk. Each
        page is parsed as it arrives, so the raw entries of only one page are held."""
        incremental = self.offers("ListChangesSince") and self.offers("Generation")
        if incremental and self.definitions is not None and self.generation is not None:
            try:
                delta = await self._changes_since(self.generation)
                if delta is not None:
                    return delta
            except (ManagerUnavailable, ManagerTimeout):
                raise
            except ManagerError as exc:
                log.info("listing the Manager's domains again: %s", exc)
        generation = await self._get_generation() if self.offers("Generation") else None
        defs: dict[str, DomainConfig] = {}
        active: set[str] = set()
        hosts: dict[str, str] = {}
        cursor = ""
        count = 0
        started = time.monotonic()

        def ask(after: str) -> asyncio.Task[list[Any]]:
            return asyncio.ensure_future(self._call_multi("ListDomainsPage", after, PAGE_SIZE,
                                                          timeout=self.list_timeout))
        # The next page is asked for before this one is parsed: the Manager builds it
        # while we parse (half the time of a first sync of 100,000 otherwise).
        pending: asyncio.Task[list[Any]] | None = ask(cursor)
        try:
            while pending is not None:
                page, cursor_next = await pending
                pending = None
                if not isinstance(page, (list, tuple)) or not isinstance(cursor_next, str):
                    raise ManagerFailed(ERR_BAD_REPLY,
                                        "ListDomainsPage returned the wrong types")
                if cursor_next:
                    if cursor_next == cursor or time.monotonic() - started > self.list_timeout:
                        raise ManagerFailed(ERR_BAD_REPLY,
                                            "ListDomainsPage does not come to an end")
                    cursor = cursor_next
                    pending = ask(cursor)
                self._parse_into(page, True, defs, active, hosts, first=count)
                count += len(page)
                del page
        finally:
            if pending is not None:        # failed or cancelled meanwhile
                pending.cancel()
                pending.add_done_callback(lambda t: t.cancelled() or t.exception())
        log.debug("listed %d entries in pages in %.2f s", count, time.monotonic() - started)
        if incremental and generation is not None:
            try:
                delta = await self._changes_since(generation)
            except (ManagerUnavailable, ManagerTimeout):
                raise
            except ManagerError as exc:
                log.info("cannot ask what changed while listing (%s); listing again next "
                         "time", exc)
                delta = None
            if delta is None:
                return defs, active, hosts, None
            merge_delta(delta, defs, active, hosts)
            return defs, active, hosts, delta.generation
        return defs, active, hosts, generation

    async def _changes_since(self, generation: int) -> Delta | None:
        """What changed since `generation` (ListChangesSince), parsed; None when the
        generations do not follow (the caller lists again)."""
        current, changed, removed = await self._call_multi("ListChangesSince", generation)
        if (not isinstance(current, int) or not isinstance(changed, (list, tuple))
                or not isinstance(removed, (list, tuple))):
            raise ManagerFailed(ERR_BAD_REPLY, "ListChangesSince returned the wrong types")
        if current < generation:
            log.info("the Manager's generation went back from %d to %d; listing again",
                     generation, current)
            return None
        delta = Delta(current)
        if not changed and not removed:
            return delta
        for u in removed:
            cu = canonical_uuid(u) if isinstance(u, str) else None
            if cu is not None:
                delta.removed.add(cu)
        self._parse_into(changed, True, delta.changed, delta.active, delta.hosts)
        for entry in changed:          # a changed entry that is now unusable is gone
            cu = _entry_uuid(entry)
            if cu is not None and cu not in delta.changed:
                delta.removed.add(cu)
        return delta

    async def _list(self) -> tuple[list[Any], bool]:
        if self.offers("ListDomains"):
            try:
                return await self._call("ListDomains", timeout=self.list_timeout), True
            except ManagerNotSupported as exc:
                if exc.name not in ABSENT_MEMBER_ERRORS:
                    raise    # a failure of this read (retried), not a missing method
                log.info("the Manager does not have ListDomains after all (%s); "
                         "using ListInactiveDomains", exc.name)
                self._offered.discard("ListDomains")
        return await self._call("ListInactiveDomains", timeout=self.list_timeout), False

    def _parse(self, entries: list[Any], with_active: bool
               ) -> tuple[dict[str, DomainConfig], set[str], dict[str, str]]:
        """Keep the good entries; skip each bad one with one warning."""
        defs: dict[str, DomainConfig] = {}
        active: set[str] = set()
        hosts: dict[str, str] = {}
        self._parse_into(entries, with_active, defs, active, hosts)
        return defs, active, hosts

    def _parse_into(self, entries: Any, with_active: bool, defs: dict[str, DomainConfig],
                    active: set[str], hosts: dict[str, str], first: int = 0) -> None:
        """`_parse` adding to `defs`, `active` and `hosts` (the `Host` of an entry that
        has one); `first`: the number of the first entry, for warnings (pages)."""
        for i, entry in enumerate(entries, first):
            try:
                cfg = config_from_dbus(entry)
                is_active = with_active and active_from_dbus(entry)
                host = host_from_dbus(entry)
            except InvalidEntry as exc:
                self._warn_once(("entry", f"{_ident(entry)}: {exc}"),
                                "skipping Manager entry #%d (%s): %s", i, _ident(entry), exc)
                continue
            if cfg.uuid in defs:
                self._warn_once(("duplicate", cfg.uuid),
                                "skipping Manager entry #%d: UUID %s is listed twice; "
                                "keeping the first", i, cfg.uuid)
                continue
            defs[cfg.uuid] = cfg
            if is_active:
                active.add(cfg.uuid)
            if host:
                hosts[cfg.uuid] = sys.intern(host)

    def _warn_once(self, key: tuple[str, str], fmt: str, *args: Any) -> None:
        """One warning per bad thing per Manager instance, not one per poll."""
        if key not in self._warned:
            self._warned.add(key)
            log.warning(fmt, *args)

    # ------------------------------------------------------------ calls

    async def _raw_call(self, destination: str, path: str, interface: str, member: str,
                        signature: str, body: list[Any], *,
                        member_for_errors: str | None = None,
                        timeout: float | None = None) -> list[Any]:
        """One method call with a timeout (`call_timeout` unless given); every failure
        becomes a ManagerError."""
        bus = self._bus
        what = member_for_errors or member
        limit = self.call_timeout if timeout is None else timeout
        if bus is None:
            raise ManagerUnavailable(ERR_UNAVAILABLE,
                                     f"not connected to {bus_description(self.bus_spec)}")
        msg = Message(destination=destination, path=path, interface=interface, member=member,
                      signature=signature, body=body)
        try:
            reply = await asyncio.wait_for(bus.call(msg), limit)
        except asyncio.TimeoutError:
            raise ManagerTimeout(ERR_TIMEOUT, f"{what} got no answer within "
                                 f"{limit:g} s") from None
        except DBusError as exc:
            raise error_from_dbus(str(exc.type), exc.text, what) from None
        except (OSError, EOFError) as exc:
            raise ManagerUnavailable(ERR_UNAVAILABLE, f"{what}: bus connection failed: {exc}") \
                from None
        if reply is None:
            raise ManagerUnavailable(ERR_UNAVAILABLE, f"{what}: no reply")
        if reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
            raise error_from_dbus(reply.error_name or "", text, what)
        return list(reply.body)

    async def _call_multi(self, member: str, *args: Any, timeout: float | None = None
                          ) -> list[Any]:
        """Call a contract method with several results; returns them as a list."""
        m = members()[member]
        if self._owner is None:
            raise ManagerUnavailable(ERR_UNAVAILABLE, f"no Manager on the bus for {member}")
        if member not in self._offered:
            raise ManagerNotSupported(ERROR_NOT_SUPPORTED,
                                      f"the Manager does not offer {member}")
        body = await self._raw_call(BUS_NAME, OBJECT_PATH, INTERFACE, member,
                                    m.in_signature, list(args), timeout=timeout)
        expected = _count_types(m.out_signature)
        if len(body) != expected:
            raise ManagerFailed(ERR_BAD_REPLY, f"{member} returned {len(body)} values, "
                                f"expected {expected}")
        return body

    async def _call(self, member: str, *args: Any, timeout: float | None = None) -> Any:
        """Call a contract method with the contract's signatures; return its one result."""
        m = members()[member]
        if self._owner is None:
            raise ManagerUnavailable(ERR_UNAVAILABLE, f"no Manager on the bus for {member}")
        if member not in self._offered and self._need_introspect:
            # Just appeared and not introspected yet: find out now rather than refuse.
            with contextlib.suppress(ManagerError):
                await self._introspect()
        if member not in self._offered:
            raise ManagerNotSupported(ERROR_NOT_SUPPORTED,
                                      f"the Manager does not offer {member}")
        body = await self._raw_call(BUS_NAME, OBJECT_PATH, INTERFACE, member,
                                    m.in_signature, list(args), timeout=timeout)
        expected = 1 if m.out_signature else 0
        if len(body) != expected:
            raise ManagerFailed(ERR_BAD_REPLY, f"{member} returned {len(body)} values, "
                               f"expected {expected}")
        result = body[0] if body else None
        if m.out_signature == "s" and not isinstance(result, str):
            raise ManagerFailed(ERR_BAD_REPLY, f"{member} did not return a string")
        if m.out_signature.startswith("a"):
            want = list if m.out_signature.startswith("aa") else dict
            if not isinstance(result, (list, tuple) if want is list else dict):
                raise ManagerFailed(ERR_BAD_REPLY, f"{member} returned the wrong type")
            if want is list:
                result = list(result)
        return result

    @staticmethod
    def _uuid(uuid: str) -> str:
        canonical = canonical_uuid(uuid)
        if canonical is None:
            raise ManagerRefused(ERROR_INVALID_ARGUMENT,
                               f"{uuid!r} is not a UUID")
        return canonical

    async def start_domain(self, uuid: str) -> str:
        """Ask the Manager to start a definition; returns the running domain's UUID.
        Waits up to `start_timeout`: the Manager answers once the domain runs."""
        result = await self._call("StartDomain", self._uuid(uuid), timeout=self.start_timeout)
        running = canonical_uuid(result)
        if running is None:
            raise ManagerFailed(ERR_BAD_REPLY, f"StartDomain returned {result[:80]!r}, not a UUID")
        return running

    async def define_domain(self, props: Mapping[str, Any]) -> str:
        """Define a domain from plain values (typed per the contract); returns its UUID."""
        try:
            values = values_to_dbus(props)
        except InvalidEntry as exc:
            raise ManagerRefused(ERROR_INVALID_ARGUMENT, str(exc)) from None
        result = await self._call("DefineDomain", values)
        uuid = canonical_uuid(result)
        if uuid is None:
            raise ManagerFailed(ERR_BAD_REPLY, f"DefineDomain returned {result[:80]!r}")
        return uuid

    async def define_from_template(self, template: str, variables: Mapping[str, Any]) -> str:
        """DefineFromTemplate: variables as plain values (str, int, bool); returns the UUID.
        Error.NotFound (no such template) is ManagerNotFound, Error.InvalidArgument (a
        bad variable, named in the message) ManagerRefused with that name."""
        try:
            values = {str(k): variant_of(v, f"variable {k}") for k, v in variables.items()}
        except InvalidEntry as exc:
            raise ManagerRefused(ERROR_INVALID_ARGUMENT, str(exc)) from None
        result = await self._call("DefineFromTemplate", template, values)
        uuid = canonical_uuid(result)
        if uuid is None:
            raise ManagerFailed(ERR_BAD_REPLY, f"DefineFromTemplate returned {result[:80]!r}")
        return uuid

    async def list_templates(self) -> list[dict[str, Any]]:
        """ListTemplates now (also kept in `templates`)."""
        await self._read_templates()
        return list(self.templates or [])

    async def undefine_domain(self, uuid: str) -> None:
        await self._call("UndefineDomain", self._uuid(uuid))

    async def get_domain(self, uuid: str) -> DomainConfig:
        result = await self._call("GetDomain", self._uuid(uuid))
        try:
            return config_from_dbus(result)
        except InvalidEntry as exc:
            raise ManagerFailed(ERR_BAD_REPLY, f"GetDomain returned a bad entry: {exc}") from None

    def placed_on(self, uuid: str) -> str | None:
        """The farm host this host's Manager lists `uuid` as placed on (its `Host`
        key: MANAGER.md, "Farm keys and errors"); None when not listed with one."""
        return self.hosts.get(uuid) if self.listed else None

    async def placement(self, uuid: str) -> str | None:
        """Where a definition this host's lists do not show runs, by GetDomain (a farm
        Manager answers it with `Active` and `Host` for one running on another host);
        None when it runs nowhere, is unknown, or the answer cannot be had."""
        if not self.offers("GetDomain"):
            return None
        try:
            entry = await self._call("GetDomain", self._uuid(uuid))
            if isinstance(entry, Mapping) and active_from_dbus(entry):
                host = host_from_dbus(entry)
                return host[:256] if host else None
        except (ManagerError, InvalidEntry) as exc:
            log.debug("GetDomain %s: %s", uuid, exc)
        return None

    async def update_domain(self, uuid: str, changes: Mapping[str, Any]) -> None:
        try:
            values = values_to_dbus(changes)
        except InvalidEntry as exc:
            raise ManagerRefused(ERROR_INVALID_ARGUMENT, str(exc)) from None
        await self._call("UpdateDomain", self._uuid(uuid), values)


def _log_displaced(body: list[Any], known: Mapping[str, DomainConfig]) -> None:
    """DomainsDisplaced(started, actions): what the Manager did to make room, at INFO
    (the guests it paused or saved change state in libvirt, which the lifecycle
    indications report; this says why)."""
    try:
        started, actions = body
        cfg = known.get(canonical_uuid(started) or "")
        if cfg is not None:
            started = f"{cfg.name} ({started})"
        parts = []
        for a in actions:
            v = {k: getattr(x, "value", x) for k, x in dict(a).items()}
            parts.append(f"{v.get('Action')} {v.get('Name')} ({v.get('UUID')}, "
                         f"{v.get('MemoryKiB')} KiB)")
        log.info("the Manager made room to start %s: %s", str(started)[:64],
                 "; ".join(parts)[:2000])
    except (TypeError, ValueError, AttributeError):
        log.info("the Manager made room for a start (unreadable DomainsDisplaced signal)")
