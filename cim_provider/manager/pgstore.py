"""The farm store: definitions shared by every host, in one PostgreSQL database.

Every host runs a Manager with `--store postgresql:CONNINFO`; the database says which
definitions exist, which host runs which (a *placement*, with a fencing token) and
which hosts are alive (a *lease* each Manager renews). The rules, in one place:

- The schema is created and upgraded by versioned migrations, applied at start inside
  one transaction holding an advisory lock: ten Managers starting at once migrate once.
- Every change of `definitions` or `placements`, by a Manager or by hand (psql),
  passes through a trigger that gives its transaction the next `farm.generation`
  (one row, so writers are serialised and generations commit in order), logs the
  UUID in `changes` and NOTIFYs `cim_provider_farm`. Managers LISTEN, and catch up by reading the changes
  after the generation they know, in one REPEATABLE READ snapshot; a missed
  notification costs at most the safety poll (1 s).
- A definition is *placed* on a host while that host runs it. Placing is one
  transaction: lock the farm row and the definition, check that no live placement
  exists, check this host's lease, apply the caller's policy, insert. The loser of a
  race gets Error.AlreadyRunning naming the winner's host.
- A placement is removed by its host when the domain stops, with its fencing token:
  a host that lost its placement (its lease expired meanwhile) cannot remove the
  placement another host holds now.
- A host whose lease expired loses its placements: any live Manager deletes them
  (only after it has itself been connected for a whole lease period, so that after a
  database outage every host has had the chance to renew first).

This module owns the database side only (blocking nothing: psycopg's asyncio API);
policy, libvirt and the D-Bus signals stay in the service. A few hundred lines more
than most modules: the connection life cycle, the cache and the transactions share
one lock and one notion of "connected", which is easier to check in one place.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import Jsonb

from ..contract import (ERROR_ALREADY_RUNNING, ERROR_FAILED, ERROR_INVALID_ARGUMENT,
                        ERROR_NOT_FOUND, InvalidEntry, config_from_values, config_to_values)
from ..domain.records import DomainConfig
from .store import Store, Stored, StoreError, Templated, templated_row

log = logging.getLogger(__name__)

CHANNEL = "cim_provider_farm"
# pg_advisory_xact_lock key held while migrating (any fixed number; "cimf" in ASCII).
SCHEMA_LOCK = 0x63696D66
# More changes than this since the generation we know: read everything again instead.
FULL_RELOAD_OVER = 20_000
# How long the change log is kept (a Manager away for longer reads everything again).
CHANGES_KEPT = 86_400.0
PRUNE_EVERY = 600.0
RECONNECT_MIN, RECONNECT_MAX = 0.2, 5.0

_V1 = """
CREATE TABLE farm (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    generation bigint NOT NULL DEFAULT 0,
    horizon bigint NOT NULL DEFAULT 0
);
INSERT INTO farm DEFAULT VALUES;
CREATE SEQUENCE fencing_token;
CREATE TABLE hosts (
    host_id text PRIMARY KEY CHECK (host_id <> ''),
    name text NOT NULL,
    lease_expires timestamptz NOT NULL,
    registered timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE definitions (
    uuid uuid PRIMARY KEY,
    name text NOT NULL UNIQUE,
    config jsonb NOT NULL,
    generation bigint NOT NULL DEFAULT 0
);
CREATE TABLE placements (
    uuid uuid PRIMARY KEY REFERENCES definitions ON DELETE CASCADE,
    host_id text NOT NULL REFERENCES hosts ON DELETE CASCADE,
    since timestamptz NOT NULL DEFAULT now(),
    token bigint NOT NULL DEFAULT nextval('fencing_token'),
    generation bigint NOT NULL DEFAULT 0
);
CREATE INDEX placements_host ON placements (host_id);
CREATE TABLE changes (
    generation bigint NOT NULL,
    uuid uuid NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX changes_generation ON changes (generation);

-- One generation per writing transaction (remembered in a transaction-local
-- setting), taken with the farm row's lock, which is then held until the commit:
-- writers are serialised from their first change on, so generations commit in order.
CREATE FUNCTION farm_touch(changed uuid) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE g bigint;
BEGIN
    g := nullif(current_setting('cim_provider.generation', true), '')::bigint;
    IF g IS NULL THEN
        UPDATE farm SET generation = generation + 1 RETURNING generation INTO g;
        PERFORM set_config('cim_provider.generation', g::text, true);
        PERFORM pg_notify('cim_provider_farm', '');
    END IF;
    INSERT INTO changes (generation, uuid) VALUES (g, changed);
    RETURN g;
END $$;

CREATE FUNCTION farm_row_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM farm_touch(OLD.uuid);
        RETURN OLD;
    END IF;
    IF TG_OP = 'UPDATE' AND OLD.uuid <> NEW.uuid THEN
        PERFORM farm_touch(OLD.uuid);
    END IF;
    NEW.generation := farm_touch(NEW.uuid);
    RETURN NEW;
END $$;

CREATE TRIGGER definitions_changed BEFORE INSERT OR UPDATE OR DELETE ON definitions
    FOR EACH ROW EXECUTE FUNCTION farm_row_changed();
CREATE TRIGGER placements_changed BEFORE INSERT OR UPDATE OR DELETE ON placements
    FOR EACH ROW EXECUTE FUNCTION farm_row_changed();
"""

# Templated definitions: the template's name and the variables (nothing rendered is
# stored); `config` then holds only the start policy (Priority, MinMemoryKiB).
_V2 = """
ALTER TABLE definitions ADD COLUMN template text, ADD COLUMN variables jsonb;
ALTER TABLE definitions ADD CONSTRAINT definitions_templated
    CHECK ((template IS NULL) = (variables IS NULL));
"""

# (version, what it does, SQL). Append only: a released migration never changes.
MIGRATIONS: list[tuple[int, str, str]] = [
    (1, "farm, hosts, definitions, placements, changes; the change trigger", _V1),
    (2, "templated definitions: definitions.template, definitions.variables", _V2),
]


def default_host_id() -> str:
    """/etc/machine-id (what systemd and D-Bus use to name this machine)."""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        with contextlib.suppress(OSError):
            text = Path(path).read_text().strip()
            if text:
                return text
    raise ValueError("no /etc/machine-id: give the host an identity with --host-id")


def redacted(conninfo: str) -> str:
    """The connection string without a password, for logs and `spec`."""
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        return "(unparsable connection string)"
    if "password" in params:
        params["password"] = "***"
    return make_conninfo("", **params)


@dataclass(frozen=True, slots=True)
class Placement:
    host_id: str
    token: int
    since: float            # seconds since the epoch


@dataclass(frozen=True, slots=True)
class FarmEntry:
    """One valid definition: its config, the generation of its row, its placement;
    a templated one its row (`config` is then a placeholder the service renders)."""
    config: DomainConfig
    generation: int
    placement: Placement | None
    template: Templated | None = None


@dataclass(frozen=True, slots=True)
class HostInfo:
    name: str
    expires_in: float       # seconds the lease still runs (database clock); < 0: expired


class FarmStore(Store):
    """The farm's definitions as seen by one host, kept current in memory.

    `entries` holds every valid definition (placed anywhere); `hosts` every host
    with its lease; `generation` the farm generation they reflect (None before the
    first read). `on_change()` is called (on the loop) after something in them
    changed; `take_dirty()` says which UUIDs (None: maybe all).
    """

    farm = True

    def __init__(self, conninfo: str, *, host_id: str | None = None,
                 host_name: str | None = None, lease: float = 30.0,
                 poll_interval: float = 1.0, timeout: float = 10.0) -> None:
        if conninfo.startswith("postgresql:") and not conninfo.startswith("postgresql://"):
            conninfo = conninfo[len("postgresql:"):]
        try:
            params = conninfo_to_dict(conninfo)
        except psycopg.ProgrammingError as exc:
            raise ValueError(f"postgresql store: bad connection string: {exc}") from None
        if "password" in params:
            log.warning("the farm connection string carries a password, which every local "
                        "user can read in the process list; use PGPASSFILE or a passfile= "
                        "parameter instead")
        self.conninfo = conninfo
        self.spec = f"postgresql:{redacted(conninfo)}"
        self.host_id = host_id or default_host_id()
        self.host_name = host_name or socket.gethostname()
        if lease <= 0:
            raise ValueError("--lease must be positive")
        self.lease = lease
        self.poll_interval = poll_interval
        self.timeout = timeout
        self.entries: dict[str, FarmEntry] = {}
        self.mine: dict[str, int] = {}       # UUIDs placed on this host -> fencing token
        self.hosts: dict[str, HostInfo] = {}
        self.generation: int | None = None
        self.horizon = 0
        self.on_change: Callable[[], None] | None = None
        self._dirty: set[str] | None = set()
        self._work: psycopg.AsyncConnection[Any] | None = None
        self._listen: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()          # the work connection: one thing at a time
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._connected_since: float | None = None     # monotonic
        self._down_since: float | None = time.time()
        self.down_reason = "not connected yet"
        self._lease_until = 0.0                         # monotonic
        self._lease_failing_since: float | None = None
        self._next_renew = 0.0
        self._next_prune = 0.0
        self._warned: set[tuple[str, Any]] = set()
        self._reaped: set[str] = set()       # expired hosts whose placements we removed
        self._loaded = asyncio.Event()

    # ------------------------------------------------------------ state for the service

    @property
    def connected(self) -> bool:
        return self._work is not None

    @property
    def lease_ok(self) -> bool:
        return time.monotonic() < self._lease_until

    def take_dirty(self) -> set[str] | None:
        dirty, self._dirty = self._dirty, set()
        return dirty

    def host_name_of(self, host_id: str) -> str:
        info = self.hosts.get(host_id)
        return info.name if info is not None else host_id

    def unreachable(self, action: str) -> StoreError:
        since = time.strftime("%H:%M:%S", time.localtime(self._down_since or time.time()))
        return StoreError(ERROR_FAILED, f"{action}: the farm database is unreachable since "
                          f"{since} ({self.down_reason}); try again when it is back")

    def require_lease(self, action: str) -> None:
        if not self.connected:
            raise self.unreachable(action)
        if not self.lease_ok:
            raise StoreError(ERROR_FAILED, f"{action}: this host ({self.host_name}) could not "
                             "renew its lease in the farm database; it starts nothing until "
                             "it can")

    # ------------------------------------------------------------ life cycle

    async def open(self, wait: float | None = None) -> None:
        """Start connecting (in the background, with back-off) and following the farm.
        Waits up to `wait` seconds (default: the timeout) for the first full read;
        a database that is not there yet is not an error."""
        self._stopping = False
        self._tasks.append(asyncio.create_task(self._supervise(), name="farm-supervisor"))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._loaded.wait(), self.timeout if wait is None else wait)
        if self.generation is None:
            log.warning("%s: not read yet (%s); serving nothing from it until it is",
                        self.spec, self.down_reason)

    async def aclose(self) -> None:
        self._stopping = True
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        await self._disconnect(None)

    def close(self) -> None:
        """Blocking close (Store API): only drops the connections."""
        for conn in (self._work, self._listen):
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.pgconn.finish()
        self._work = self._listen = None

    async def _connect_one(self) -> psycopg.AsyncConnection[Any]:
        return await asyncio.wait_for(
            psycopg.AsyncConnection.connect(self.conninfo, autocommit=True,
                                            application_name="cim-provider manager"),
            self.timeout)

    async def _disconnect(self, reason: str | None) -> None:
        work, listen = self._work, self._listen
        self._work = self._listen = None
        self._connected_since = None
        for conn in (work, listen):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 2.0)
        if reason is not None and work is not None:
            self._down_since = time.time()
            self.down_reason = reason
            log.warning("%s: lost the farm database (%s); lists are served as last read "
                        "(generation %s), starts and changes are refused until it is back",
                        self.spec, reason, self.generation)

    async def _supervise(self) -> None:
        """Connect (with back-off), then follow: catch up on notifications and every
        poll interval, renew the lease, reap expired hosts, prune the change log."""
        backoff = RECONNECT_MIN
        while not self._stopping:
            if self._work is None:
                try:
                    await self._connect()
                    backoff = RECONNECT_MIN
                except (psycopg.Error, OSError, asyncio.TimeoutError, StoreError) as exc:
                    reason = _reason(exc)
                    if reason != self.down_reason:
                        log.warning("%s: cannot connect: %s (retrying)", self.spec, reason)
                    self.down_reason = reason
                    await self._disconnect(None)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, RECONNECT_MAX)
                    continue
            try:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._next_wait())
                self._wake.clear()
                if self._stopping:
                    break
                await self._tick()
            except (psycopg.Error, OSError, asyncio.TimeoutError) as exc:
                await self._disconnect(_reason(exc))
            except StoreError as exc:
                log.warning("%s", exc.message)
            except Exception:
                log.exception("%s: unexpected error while following the farm", self.spec)
                await asyncio.sleep(self.poll_interval)

    def _next_wait(self) -> float:
        now = time.monotonic()
        wait = min(self.poll_interval, max(self._next_renew - now, 0.0))
        for info in self.hosts.values():
            if 0 < info.expires_in < wait:
                wait = info.expires_in + 0.02
        return max(wait, 0.0)

    async def _connect(self) -> None:
        work = await self._connect_one()
        try:
            await self._migrate(work)
            listen = await self._connect_one()
        except BaseException:
            with contextlib.suppress(Exception):
                await work.close()
            raise
        try:
            await listen.execute(f"LISTEN {CHANNEL}")
        except BaseException:
            with contextlib.suppress(Exception):
                await work.close()
                await listen.close()
            raise
        self._work, self._listen = work, listen
        self._connected_since = time.monotonic()
        if self._down_since is not None and self.generation is not None:
            log.info("%s: the farm database is back after %.1f s; catching up from "
                     "generation %d", self.spec, time.time() - self._down_since, self.generation)
        self._down_since = None
        self.down_reason = ""
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(asyncio.create_task(self._follow(listen), name="farm-listen"))
        await self._renew()
        await self._tick()

    async def _follow(self, listen: psycopg.AsyncConnection[Any]) -> None:
        """Wake the supervisor on every notification; a lost connection wakes it too."""
        try:
            async for _ in listen.notifies():
                self._wake.set()
        except (psycopg.Error, OSError) as exc:
            if listen is self._listen and not self._stopping:
                async with self._lock:
                    if listen is self._listen:
                        await self._disconnect(_reason(exc))
                self._wake.set()

    async def _tick(self) -> None:
        now = time.monotonic()
        if now >= self._next_renew:
            await self._renew()
        await self.catch_up()
        expired = {hid for hid, info in self.hosts.items()
                   if info.expires_in <= 0 and hid != self.host_id}
        self._reaped &= expired              # a host that renewed may expire again
        if expired - self._reaped and self._may_reap():
            await self.reap_expired()
            self._reaped |= expired
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_EVERY
            await self._prune()

    def _may_reap(self) -> bool:
        """Reap others' expired leases only after being connected for a whole lease
        period: after an outage of the database, every live host renews first."""
        return (self._connected_since is not None
                and time.monotonic() - self._connected_since >= self.lease)

    # ------------------------------------------------------------ transactions

    @contextlib.asynccontextmanager
    async def _tx(self, action: str, *, write: bool = True,
                  readonly_snapshot: bool = False) -> AsyncIterator[psycopg.AsyncCursor[Any]]:
        """One transaction on the work connection, under the lock, with a deadline.
        Writers lock the farm row first, so every writer takes the locks in the same
        order (no deadlock) and generations commit in order. A lost connection is
        StoreError(Failed) saying so; the supervisor reconnects."""
        async with self._lock:
            conn = self._work
            if conn is None:
                raise self.unreachable(action)
            try:
                async with asyncio.timeout(self.timeout):
                    async with conn.transaction():
                        cur = conn.cursor()
                        if readonly_snapshot:
                            await cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ "
                                              "READ ONLY")
                        elif write:
                            await cur.execute("SELECT generation FROM farm FOR UPDATE")
                        yield cur
            except StoreError:
                raise
            except psycopg.errors.UniqueViolation as exc:
                raise StoreError(ERROR_INVALID_ARGUMENT, f"{action}: {_diag(exc)}") from None
            except (psycopg.errors.IntegrityError, psycopg.errors.DataError) as exc:
                raise StoreError(ERROR_INVALID_ARGUMENT, f"{action}: {_diag(exc)}") from None
            except (psycopg.OperationalError, psycopg.InterfaceError, OSError,
                    TimeoutError) as exc:
                reason = _reason(exc)
                if conn is self._work:
                    await self._disconnect(reason)
                self._wake.set()
                raise self.unreachable(action) from None
            except psycopg.Error as exc:
                raise StoreError(ERROR_FAILED, f"{action}: the farm database said: "
                                 f"{_diag(exc)}") from None

    async def _migrate(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Apply the migrations this database lacks, once, whoever else starts now."""
        async with asyncio.timeout(max(self.timeout, 60.0)):
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                await conn.execute("CREATE TABLE IF NOT EXISTS farm_schema ("
                                   " version integer PRIMARY KEY, description text NOT NULL,"
                                   " applied timestamptz NOT NULL DEFAULT now())")
                cur = await conn.execute("SELECT coalesce(max(version), 0) FROM farm_schema")
                row = await cur.fetchone()
                have = int(row[0]) if row else 0
                known = MIGRATIONS[-1][0]
                if have > known:
                    raise StoreError(ERROR_FAILED, f"{self.spec}: the farm schema is at version "
                                     f"{have}, newer than this Manager knows ({known}); "
                                     "upgrade cim-provider on this host")
                for version, description, ddl in MIGRATIONS:
                    if version <= have:
                        continue
                    await conn.execute(ddl)
                    await conn.execute("INSERT INTO farm_schema (version, description) "
                                       "VALUES (%s, %s)", (version, description))
                    log.info("%s: farm schema migrated to version %d (%s)", self.spec,
                             version, description)

    async def schema_version(self) -> int:
        async with self._tx("reading the schema version", write=False) as cur:
            await cur.execute("SELECT max(version) FROM farm_schema")
            row = await cur.fetchone()
            return int(row[0]) if row and row[0] is not None else 0

    # ------------------------------------------------------------ the lease

    async def _renew(self) -> None:
        sent = time.monotonic()
        self._next_renew = sent + self.lease / 3
        try:
            async with self._tx("renewing this host's lease", write=False) as cur:
                await cur.execute("SELECT lease_expires > now() FROM hosts WHERE host_id = %s "
                                  "FOR UPDATE", (self.host_id,))
                row = await cur.fetchone()
                await cur.execute(
                    "INSERT INTO hosts (host_id, name, lease_expires) "
                    "VALUES (%s, %s, now() + %s * interval '1 second') "
                    "ON CONFLICT (host_id) DO UPDATE SET name = EXCLUDED.name, "
                    "lease_expires = EXCLUDED.lease_expires",
                    (self.host_id, self.host_name, self.lease))
        except StoreError as exc:
            if self._lease_failing_since is None:
                self._lease_failing_since = time.time()
            log.error("%s: cannot renew the lease of host %s (%s): %s; it starts nothing until "
                      "it can, and after %g s other hosts may take over its domains",
                      self.spec, self.host_name, self.host_id, exc.message, self.lease)
            raise
        self._lease_until = sent + self.lease
        if row is not None and not row[0]:
            log.warning("%s: this host's lease had expired; its placements may have been "
                        "taken over, reconciling with what libvirt runs", self.spec)
            self._mark_all_dirty()
        if self._lease_failing_since is not None:
            log.info("%s: lease renewed again after %.1f s", self.spec,
                     time.time() - self._lease_failing_since)
            self._lease_failing_since = None

    def _mark_all_dirty(self) -> None:
        self._dirty = None
        self._changed()

    # ------------------------------------------------------------ reading

    async def catch_up(self) -> bool:
        """Bring `entries` and `hosts` to the farm's current generation; True if
        anything changed. One snapshot: every read sees the same state."""
        async with self._tx("reading the farm", readonly_snapshot=True) as cur:
            await cur.execute("SELECT generation, horizon FROM farm")
            row = await cur.fetchone()
            if row is None:
                raise StoreError(ERROR_FAILED, f"{self.spec}: the farm row is missing")
            generation, horizon = int(row[0]), int(row[1])
            rows: list[Any] | None = None
            full = False
            if self.generation != generation:
                known = self.generation
                full = known is None or known < horizon or known > generation
                select = ("SELECT d.uuid, d.name, d.config, d.generation, p.host_id, p.token, "
                          "extract(epoch from p.since), d.template, d.variables "
                          "FROM definitions d LEFT JOIN placements p ON p.uuid = d.uuid")
                if full:
                    await cur.execute(select)
                    rows = await cur.fetchall()
                else:
                    await cur.execute("SELECT DISTINCT uuid FROM changes WHERE generation > %s "
                                      "AND generation <= %s LIMIT %s",
                                      (known, generation, FULL_RELOAD_OVER + 1))
                    touched = [r[0] for r in await cur.fetchall()]
                    if len(touched) > FULL_RELOAD_OVER:
                        full = True
                        await cur.execute(select)
                    else:
                        await cur.execute(select + " WHERE d.uuid = ANY(%s)", (touched,))
                    rows = await cur.fetchall()
                    found = {str(r[0]) for r in rows}
                    gone = [str(u) for u in touched if str(u) not in found]
            await cur.execute("SELECT host_id, name, "
                              "extract(epoch from lease_expires - now()) FROM hosts")
            hosts = {r[0]: HostInfo(r[1], float(r[2])) for r in await cur.fetchall()}
        self.hosts = hosts
        self.horizon = horizon
        if rows is None:
            return False
        changed = self._apply(rows, full, [] if full else gone)
        first = self.generation is None
        self.generation = generation
        if first:
            log.info("%s: %d definitions at generation %d", self.spec, len(self.entries),
                     generation)
            self._loaded.set()
        if changed or first:
            self._changed()
        return changed

    def _apply(self, rows: list[Any], full: bool, gone: list[str]) -> bool:
        new_entries = {} if full else self.entries
        dirty: set[str] = set()
        seen: set[str] = set()
        for uuid_obj, name, config, gen, host_id, token, since, template, variables in rows:
            uuid = str(uuid_obj)
            seen.add(uuid)
            old = self.entries.get(uuid)
            row: Templated | None = None
            if old is not None and old.generation == gen:
                cfg: DomainConfig | None = old.config
                row = old.template
            else:
                cfg, row = self._config(uuid, name, config, gen, template, variables)
            if cfg is None:
                if not full and uuid in new_entries:
                    del new_entries[uuid]
                    dirty.add(uuid)
                continue
            placement = None if host_id is None else Placement(host_id, int(token), float(since))
            entry = FarmEntry(cfg, int(gen), placement, row)
            if old is None or old != entry:
                dirty.add(uuid)
                new_entries[uuid] = entry
            elif full:
                new_entries[uuid] = old
        if full:
            dirty.update(u for u in self.entries if u not in new_entries)
            self.entries = new_entries
        else:
            for uuid in gone:
                if self.entries.pop(uuid, None) is not None:
                    dirty.add(uuid)
        for uuid in dirty if not full else list(self.entries) + list(self.mine):
            now = self.entries.get(uuid)
            if now is not None and now.placement is not None \
                    and now.placement.host_id == self.host_id:
                self.mine[uuid] = now.placement.token
            else:
                self.mine.pop(uuid, None)
        if dirty and self._dirty is not None:
            self._dirty |= dirty
        return bool(dirty)

    def _config(self, uuid: str, name: Any, config: Any, gen: Any, template: Any = None,
                variables: Any = None) -> tuple[DomainConfig | None, Templated | None]:
        """A row as a DomainConfig (and its template row, if templated); a malformed
        one is skipped with one warning."""
        try:
            if not isinstance(config, dict):
                raise InvalidEntry("config is not a JSON object")
            if template is not None:
                row = templated_row(uuid, name, config, template, variables)
                return row.placeholder(), row
            values = dict(config)
            values["UUID"] = uuid
            values["Name"] = name
            return config_from_values(values), None
        except (InvalidEntry, TypeError, ValueError) as exc:
            key = ("row", (uuid, gen))
            if key not in self._warned:
                self._warned.add(key)
                log.warning("%s: skipping definition %s (generation %s) in the farm database: "
                            "%s", self.spec, uuid, gen, exc)
            return None, None

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:
                log.exception("farm change callback failed")

    async def changed_since(self, generation: int, limit: int) -> set[str] | None:
        """UUIDs changed after `generation` up to ours, from the change log; None when
        the log no longer reaches back that far or holds more than `limit`."""
        if self.generation is None or generation > self.generation:
            return None
        async with self._tx("reading the change log", readonly_snapshot=True) as cur:
            await cur.execute("SELECT horizon FROM farm")
            row = await cur.fetchone()
            if row is None or generation < int(row[0]):
                return None
            await cur.execute("SELECT DISTINCT uuid FROM changes WHERE generation > %s AND "
                              "generation <= %s LIMIT %s", (generation, self.generation,
                                                            limit + 1))
            found = {str(r[0]) for r in await cur.fetchall()}
        return None if len(found) > limit else found

    # ------------------------------------------------------------ writing definitions

    def _writable(self, action: str) -> None:
        if not self.connected:
            raise self.unreachable(action)

    async def define(self, cfg: DomainConfig) -> None:  # type: ignore[override]  # reason: async in this store
        action = f"defining {cfg.name}"
        self._writable(action)
        values = config_to_values(cfg)
        try:
            async with self._tx(action) as cur:
                await cur.execute("INSERT INTO definitions (uuid, name, config) "
                                  "VALUES (%s, %s, %s)", (cfg.uuid, cfg.name, Jsonb(values)))
        except StoreError as exc:
            if exc.name == ERROR_INVALID_ARGUMENT:
                raise StoreError(ERROR_INVALID_ARGUMENT, f"the farm already has a definition "
                                 f"with UUID {cfg.uuid} or name {cfg.name!r}") from None
            raise
        await self._refresh_quietly()

    async def define_many(self, cfgs: list[DomainConfig]) -> None:
        """Seed many definitions in one transaction (tests and the benchmark)."""
        async with self._tx(f"defining {len(cfgs)} domains") as cur:
            await cur.executemany("INSERT INTO definitions (uuid, name, config) "
                                  "VALUES (%s, %s, %s)",
                                  [(c.uuid, c.name, Jsonb(config_to_values(c))) for c in cfgs])
        await self._refresh_quietly()

    async def define_templated(self, row: Templated) -> None:  # type: ignore[override]  # reason: async in this store
        action = f"defining {row.name}"
        self._writable(action)
        try:
            async with self._tx(action) as cur:
                await cur.execute("INSERT INTO definitions (uuid, name, config, template, "
                                  "variables) VALUES (%s, %s, %s, %s, %s)",
                                  (row.uuid, row.name, Jsonb(row.policy_values()), row.template,
                                   Jsonb(row.values())))
        except StoreError as exc:
            if exc.name == ERROR_INVALID_ARGUMENT:
                raise StoreError(ERROR_INVALID_ARGUMENT, f"the farm already has a definition "
                                 f"with UUID {row.uuid} or name {row.name!r}") from None
            raise
        await self._refresh_quietly()

    async def define_many_templated(self, rows: list[Templated]) -> None:
        """Seed many templated definitions in one transaction (tests)."""
        async with self._tx(f"defining {len(rows)} domains") as cur:
            await cur.executemany("INSERT INTO definitions (uuid, name, config, template, "
                                  "variables) VALUES (%s, %s, %s, %s, %s)",
                                  [(r.uuid, r.name, Jsonb(r.policy_values()), r.template,
                                    Jsonb(r.values())) for r in rows])
        await self._refresh_quietly()

    async def update_templated(self, row: Templated) -> None:  # type: ignore[override]  # reason: async in this store
        action = f"updating {row.uuid}"
        self._writable(action)
        try:
            async with self._tx(action) as cur:
                await cur.execute("UPDATE definitions SET name = %s, config = %s, template = %s, "
                                  "variables = %s WHERE uuid = %s",
                                  (row.name, Jsonb(row.policy_values()), row.template,
                                   Jsonb(row.values()), row.uuid))
                if cur.rowcount == 0:
                    raise StoreError(ERROR_NOT_FOUND, f"no definition with UUID {row.uuid}")
        except StoreError as exc:
            if exc.name == ERROR_INVALID_ARGUMENT:
                raise StoreError(ERROR_INVALID_ARGUMENT, f"the name {row.name!r} is already "
                                 "used by another definition in the farm") from None
            raise
        await self._refresh_quietly()

    async def undefine(self, uuid: str) -> None:  # type: ignore[override]  # reason: async in this store
        action = f"undefining {uuid}"
        self._writable(action)
        async with self._tx(action) as cur:
            await cur.execute("DELETE FROM definitions WHERE uuid = %s", (uuid,))
            if cur.rowcount == 0:
                raise StoreError(ERROR_NOT_FOUND, f"no definition with UUID {uuid}")
        await self._refresh_quietly()

    async def update(self, old: DomainConfig, new: DomainConfig) -> None:  # type: ignore[override]  # reason: async in this store
        action = f"updating {old.uuid}"
        self._writable(action)
        try:
            async with self._tx(action) as cur:
                await cur.execute("UPDATE definitions SET name = %s, config = %s "
                                  "WHERE uuid = %s", (new.name, Jsonb(config_to_values(new)),
                                                      old.uuid))
                if cur.rowcount == 0:
                    raise StoreError(ERROR_NOT_FOUND, f"no definition with UUID {old.uuid}")
        except StoreError as exc:
            if exc.name == ERROR_INVALID_ARGUMENT:
                raise StoreError(ERROR_INVALID_ARGUMENT, f"the name {new.name!r} is already "
                                 "used by another definition in the farm") from None
            raise
        await self._refresh_quietly()

    async def touch(self, uuids: list[str]) -> None:
        """Log `uuids` as changed under a new farm generation without changing them
        (a Manager whose template changed renders them differently now)."""
        async with self._tx("recording re-rendered definitions") as cur:
            await cur.execute("SELECT farm_touch(u) FROM unnest(%s::uuid[]) AS u "
                              "WHERE u IN (SELECT uuid FROM definitions)", (uuids,))
        await self._refresh_quietly()

    async def _refresh_quietly(self) -> None:
        """After our own write: read it back now (the caller's next list shows it);
        a failure here is the supervisor's business, the write itself succeeded."""
        with contextlib.suppress(StoreError):
            await self.catch_up()

    # ------------------------------------------------------------ placements

    async def _live_placement(self, cur: psycopg.AsyncCursor[Any], uuid: str,
                              action: str) -> tuple[str, str] | None:
        """Within a writing transaction: (host_id, host name) of the live placement of
        `uuid`, or None. An expired one is removed (when we may reap)."""
        await cur.execute("SELECT p.host_id, h.name, h.lease_expires <= now(), p.token "
                          "FROM placements p JOIN hosts h ON h.host_id = p.host_id "
                          "WHERE p.uuid = %s", (uuid,))
        row = await cur.fetchone()
        if row is None:
            return None
        host_id, name, expired, token = row
        if expired and host_id != self.host_id and self._may_reap():
            await cur.execute("DELETE FROM placements WHERE uuid = %s AND token = %s",
                              (uuid, token))
            log.warning("%s: host %s (%s) let its lease expire; %s: taking over its "
                        "placement of %s", self.spec, name, host_id, action, uuid)
            return None
        return host_id, name

    async def place(self, uuid: str, check: Callable[[], None] | None = None) -> int:
        """Claim `uuid` for this host; returns the placement's fencing token.

        AlreadyRunning (naming the host) if a live placement exists, NotFound if there
        is no such definition; `check()` (the caller's policy) runs inside the
        transaction once the definition is known to be free, and may raise.
        """
        action = f"starting {uuid}"
        self.require_lease(action)
        async with self._tx(action) as cur:
            await cur.execute("SELECT name FROM definitions WHERE uuid = %s FOR UPDATE", (uuid,))
            row = await cur.fetchone()
            if row is None:
                raise StoreError(ERROR_NOT_FOUND, f"no definition with UUID {uuid}")
            name = row[0]
            holder = await self._live_placement(cur, uuid, action)
            if holder is not None:
                where = "this host" if holder[0] == self.host_id else "host"
                raise StoreError(ERROR_ALREADY_RUNNING,
                                 f"{name} ({uuid}) is already running on {where} {holder[1]}")
            await cur.execute("SELECT lease_expires > now() FROM hosts WHERE host_id = %s",
                              (self.host_id,))
            mine = await cur.fetchone()
            if mine is None or not mine[0]:
                self._lease_until = 0.0
                self._next_renew = 0.0
                self._wake.set()
                raise StoreError(ERROR_FAILED, f"{action}: this host's lease in the farm "
                                 "database has expired; it starts nothing until it is renewed")
            if check is not None:
                check()
            await cur.execute("INSERT INTO placements (uuid, host_id) VALUES (%s, %s) "
                              "RETURNING token", (uuid, self.host_id))
            token_row = await cur.fetchone()
        assert token_row is not None
        await self._refresh_quietly()
        return int(token_row[0])

    async def release(self, uuid: str, token: int) -> bool:
        """Remove this host's placement of `uuid` if it still carries `token` (a
        placement taken over by another host meanwhile is left alone)."""
        async with self._tx(f"releasing {uuid}") as cur:
            await cur.execute("DELETE FROM placements WHERE uuid = %s AND host_id = %s "
                              "AND token = %s", (uuid, self.host_id, token))
            released = cur.rowcount > 0
        await self._refresh_quietly()
        return released

    async def adopt(self, uuid: str) -> tuple[int | None, str | None]:
        """Claim a definition libvirt already runs here: (token, None), or (None, host
        name) when another host holds a live placement, or (None, None) when there is
        no such definition."""
        action = f"adopting {uuid}"
        self.require_lease(action)
        async with self._tx(action) as cur:
            await cur.execute("SELECT 1 FROM definitions WHERE uuid = %s FOR UPDATE", (uuid,))
            if await cur.fetchone() is None:
                return None, None
            holder = await self._live_placement(cur, uuid, action)
            if holder is not None:
                if holder[0] == self.host_id:
                    return None, None
                return None, holder[1]
            await cur.execute("INSERT INTO placements (uuid, host_id) VALUES (%s, %s) "
                              "RETURNING token", (uuid, self.host_id))
            row = await cur.fetchone()
        await self._refresh_quietly()
        return (int(row[0]) if row else None), None

    async def reap_expired(self) -> list[str]:
        """Remove the placements of every other host whose lease expired."""
        async with self._tx("releasing the placements of hosts whose lease expired") as cur:
            await cur.execute("DELETE FROM placements p USING hosts h "
                              "WHERE p.host_id = h.host_id AND h.lease_expires <= now() "
                              "AND h.host_id <> %s RETURNING p.uuid, h.name", (self.host_id,))
            rows = await cur.fetchall()
        if rows:
            names = sorted({r[1] for r in rows})
            log.warning("%s: the lease of %s expired: %d of its domains are offered again "
                        "(if that host still runs them, they now run twice when started "
                        "elsewhere)", self.spec, ", ".join(names), len(rows))
            await self._refresh_quietly()
        return [str(r[0]) for r in rows]

    async def _prune(self) -> None:
        async with self._tx("pruning the change log") as cur:
            await cur.execute(
                "WITH gone AS (DELETE FROM changes WHERE at < now() - %s * interval '1 second' "
                "RETURNING generation) UPDATE farm SET horizon = greatest(horizon, "
                "coalesce((SELECT max(generation) FROM gone), 0))", (CHANGES_KEPT,))

    # Last in the class: the name `list` would shadow the builtin in annotations.
    def list(self) -> list[Stored]:
        """Store's blocking list (define, undefine and update are coroutines here)."""
        return [Stored(e.config, e.placement is not None and e.placement.host_id == self.host_id,
                       e.template)
                for e in self.entries.values()]


def _diag(exc: psycopg.Error) -> str:
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    return primary or str(exc).strip() or type(exc).__name__


def _reason(exc: BaseException) -> str:
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "no answer in time"
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


__all__ = ["FarmStore", "FarmEntry", "Placement", "HostInfo", "MIGRATIONS", "CHANNEL",
           "default_host_id", "redacted"]
