"""Where the reference Manager keeps definitions: SQLite, or libvirt's persistent domains.

Stores are deliberately dumb: they persist and list. Policy, uniqueness across stores,
starting, rendering templates and the D-Bus signals live in the service. Every method
here is blocking and is called off the event loop (SQLite on its own single thread,
libvirt on the default executor).

A templated definition is a row too (`Templated`: UUID, name, template name, the
variables as JSON, its start policy); nothing rendered is stored. SQLite and the farm
keep them; libvirt cannot.

The module is a little over 500 lines because it holds both local stores, the SQLite
one and the libvirt one (with renames deferred in a running domain's metadata), and
the connection they share.
"""
from __future__ import annotations

import abc
import contextlib
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from xml.sax.saxutils import quoteattr
from pathlib import Path
from typing import Any

import libvirt

from ..contract import (ERROR_FAILED, ERROR_INVALID_ARGUMENT, ERROR_NOT_FOUND,
                        ERROR_NOT_SUPPORTED, InvalidEntry, config_from_dbus,
                        config_from_values, config_to_values, values_to_dbus)
from ..domain.records import DomainConfig
from ..domain.domxml import DomainXMLError, config_to_domain_xml, parse_domain_xml
from .disks import resolve_disks

log = logging.getLogger(__name__)


def libvirt_error_to_log(_ctx: object, err: object) -> None:
    """libvirt prints every error on stderr ("libvirt: XML-RPC error : ...") unless a
    handler is registered; the stores turn errors into exceptions and log what matters.
    Registered by `cim-provider manager` and by serve_manager (in-process use)."""
    message = err[2] if isinstance(err, (tuple, list)) and len(err) > 2 else err
    log.debug("libvirt: %s", message)


class StoreError(Exception):
    """A failure with the contract error name a client should see."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name
        self.message = message


def default_db_path() -> Path:
    """/var/lib/cim-provider/manager.db as root, else under $XDG_STATE_HOME."""
    if os.geteuid() == 0:
        return Path("/var/lib/cim-provider/manager.db")
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(state) / "cim-provider" / "manager.db"


class LibvirtConnection:
    """One libvirt connection, opened on first use and reopened after it died.

    A connection handed in by the caller (a process that shares one connection
    between the Manager and its own use) is used as is and never closed.
    """

    def __init__(self, uri: str | None = None, conn: libvirt.virConnect | None = None) -> None:
        self.uri = uri
        self._conn = conn
        self._owned = conn is None
        self._lock = threading.Lock()

    @property
    def owned(self) -> bool:
        """Opened (and closed) here, not handed in by the caller."""
        return self._owned

    def get(self) -> libvirt.virConnect:
        with self._lock:
            if self._conn is not None and not self._owned:
                return self._conn
            if self._conn is not None:
                try:
                    if self._conn.isAlive():
                        return self._conn
                except libvirt.libvirtError:
                    pass
                log.warning("libvirt connection to %s died; reopening", self.uri or "default")
                self._close_quietly()
            try:
                self._conn = libvirt.open(self.uri)
            except libvirt.libvirtError as exc:
                raise StoreError(ERROR_FAILED, f"cannot connect to libvirt "
                                 f"({self.uri or 'default URI'}): {exc}") from None
            return self._conn

    def _close_quietly(self) -> None:
        try:
            if self._conn is not None:
                self._conn.close()
        except libvirt.libvirtError:
            pass
        self._conn = None

    def close(self) -> None:
        with self._lock:
            if self._owned:
                self._close_quietly()


@dataclass(frozen=True, slots=True)
class Templated:
    """A templated definition as stored: rendered by the service, never by a store."""
    uuid: str
    name: str
    template: str
    variables: str                   # JSON object, canonical (templates.variables_json)
    priority: int | None = None
    min_memory_kib: int | None = None

    def values(self) -> dict[str, Any]:
        loaded = json.loads(self.variables)
        return loaded if isinstance(loaded, dict) else {}

    def policy_values(self) -> dict[str, Any]:
        """The start policy as contract keys (what the config column holds)."""
        return {k: v for k, v in (("Priority", self.priority),
                                  ("MinMemoryKiB", self.min_memory_kib)) if v is not None}

    def placeholder(self) -> DomainConfig:
        """Its DomainConfig before rendering: UUID, name and policy only."""
        return DomainConfig(uuid=self.uuid, name=self.name, priority=self.priority,
                            min_memory_kib=self.min_memory_kib)


def templated_row(uuid: str, name: str, policy: Any, template: Any,
                  variables: Any) -> Templated:
    """A stored templated row checked like any entry (InvalidEntry when malformed)."""
    if not isinstance(template, str) or not template:
        raise InvalidEntry("the template name is missing")
    if isinstance(variables, str):
        variables = json.loads(variables)
    if not isinstance(variables, dict):
        raise InvalidEntry("the variables are not a JSON object")
    if isinstance(policy, str):
        policy = json.loads(policy)
    if not isinstance(policy, dict):
        raise InvalidEntry("the policy is not a JSON object")
    cfg = config_from_values({**policy, "UUID": uuid, "Name": name})
    return Templated(cfg.uuid, cfg.name, template,
                     json.dumps(variables, sort_keys=True, ensure_ascii=False,
                                separators=(",", ":")),
                     cfg.priority, cfg.min_memory_kib)


@dataclass(frozen=True, slots=True)
class Stored:
    """A definition as a store lists it; `active` is None when the store cannot tell.
    A templated one carries its row in `template` and a placeholder `config`."""
    config: DomainConfig
    active: bool | None = None
    template: Templated | None = None


class Store(abc.ABC):
    """What the service needs from a store (all blocking)."""
    spec: str = ""

    @abc.abstractmethod
    def list(self) -> list[Stored]: ...

    @abc.abstractmethod
    def define(self, cfg: DomainConfig) -> None: ...

    @abc.abstractmethod
    def undefine(self, uuid: str) -> None: ...

    @abc.abstractmethod
    def update(self, old: DomainConfig, new: DomainConfig) -> None: ...

    # Templated definitions: stores that cannot keep them say so.
    def define_templated(self, row: Templated) -> None:
        raise StoreError(ERROR_NOT_SUPPORTED, f"{self.spec} cannot hold templated definitions "
                         "(use an sqlite: or postgresql: store first)")

    def update_templated(self, row: Templated) -> None:
        raise StoreError(ERROR_NOT_SUPPORTED, f"{self.spec} cannot hold templated definitions")

    def version(self) -> object:
        """Something cheap that changes whenever the store's content may have (the
        service re-reads it then, between its safety polls); None: no such thing
        (libvirt's store follows libvirt's events instead)."""
        return None

    def close(self) -> None:
        pass


class SqliteStore(Store):
    """Definitions as JSON rows (contract keys) in one table.

    WAL with synchronous=FULL and one transaction per change, committed before the
    service replies: an acknowledged definition survives kill -9 and power loss.
    Every SQLite failure (a full disk, a corrupt or locked file, a dropped table)
    comes out as StoreError: Error.Failed, or Error.InvalidArgument for a duplicate.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.spec = f"sqlite:{self.path}"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection, used by one thread at a time (the service's store executor);
        # the lock makes direct use from other threads safe too.
        self._db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None,
                                   check_same_thread=False)
        self._lock = threading.Lock()
        self._writes = 0          # transactions committed through this object
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("CREATE TABLE IF NOT EXISTS domains ("
                             " uuid TEXT PRIMARY KEY, name TEXT NOT NULL, config TEXT NOT NULL)")
            # Templated rows (added later: a database from before gets the columns)
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(domains)")}
            for column in ("template", "variables"):
                if column not in columns:
                    self._db.execute(f"ALTER TABLE domains ADD COLUMN {column} TEXT")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction under the lock: committed when the block ends,
        rolled back if it raises."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                self._db.execute("COMMIT")
                self._writes += 1
            except BaseException:
                with contextlib.suppress(sqlite3.Error):   # keep the first error
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                raise

    def _failed(self, action: str, exc: sqlite3.Error) -> StoreError:
        if isinstance(exc, sqlite3.IntegrityError):       # a UUID defined twice
            return StoreError(ERROR_INVALID_ARGUMENT, f"{action}: {exc}")
        return StoreError(ERROR_FAILED, f"{self.spec}: {action} failed: {exc}")

    def _write(self, sql: str, params: tuple[Any, ...], action: str) -> int:
        try:
            with self._transaction() as db:
                return db.execute(sql, params).rowcount
        except sqlite3.Error as exc:
            raise self._failed(action, exc) from None

    def list(self) -> list[Stored]:
        try:
            with self._lock:
                rows = self._db.execute(
                    "SELECT uuid, name, config, template, variables FROM domains "
                    "ORDER BY rowid").fetchall()
        except sqlite3.Error as exc:
            raise self._failed("listing the definitions", exc) from None
        out = []
        for uuid, name, text, template, variables in rows:
            try:
                if template is not None:
                    row = templated_row(uuid, name, text, template, variables)
                    out.append(Stored(row.placeholder(), template=row))
                    continue
                cfg = config_from_dbus(values_to_dbus(json.loads(text)))
            except (ValueError, TypeError) as exc:   # InvalidEntry and JSON errors
                log.warning("%s: skipping unreadable row %s: %s", self.spec, uuid, exc)
                continue
            out.append(Stored(cfg))
        return out

    def define(self, cfg: DomainConfig) -> None:
        try:
            self._write("INSERT INTO domains (uuid, name, config) VALUES (?, ?, ?)",
                        (cfg.uuid, cfg.name, json.dumps(config_to_values(cfg))),
                        f"defining {cfg.name}")
        except StoreError as exc:
            if exc.name == ERROR_INVALID_ARGUMENT:
                raise StoreError(ERROR_INVALID_ARGUMENT,
                                 f"UUID {cfg.uuid} is already defined") from None
            raise

    def define_many(self, cfgs: Sequence[DomainConfig]) -> None:
        """Seed many definitions in one transaction (the demo and the benchmark)."""
        rows = [(c.uuid, c.name, json.dumps(config_to_values(c))) for c in cfgs]
        try:
            with self._transaction() as db:
                db.executemany("INSERT INTO domains (uuid, name, config) VALUES (?, ?, ?)",
                               rows)
        except sqlite3.Error as exc:
            raise self._failed(f"defining {len(rows)} domains", exc) from None

    def define_templated(self, row: Templated) -> None:
        try:
            self._write("INSERT INTO domains (uuid, name, config, template, variables) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (row.uuid, row.name, json.dumps(row.policy_values()), row.template,
                         row.variables), f"defining {row.name}")
        except StoreError as exc:
            if exc.name == ERROR_INVALID_ARGUMENT:
                raise StoreError(ERROR_INVALID_ARGUMENT,
                                 f"UUID {row.uuid} is already defined") from None
            raise

    def define_many_templated(self, rows: Sequence[Templated]) -> None:
        """Seed many templated definitions in one transaction (the demo, tests)."""
        values = [(r.uuid, r.name, json.dumps(r.policy_values()), r.template, r.variables)
                  for r in rows]
        try:
            with self._transaction() as db:
                db.executemany("INSERT INTO domains (uuid, name, config, template, variables) "
                               "VALUES (?, ?, ?, ?, ?)", values)
        except sqlite3.Error as exc:
            raise self._failed(f"defining {len(values)} domains", exc) from None

    def update_templated(self, row: Templated) -> None:
        n = self._write("UPDATE domains SET name = ?, config = ?, template = ?, variables = ? "
                        "WHERE uuid = ?", (row.name, json.dumps(row.policy_values()),
                                           row.template, row.variables, row.uuid),
                        f"updating {row.uuid}")
        if n == 0:
            raise StoreError(ERROR_NOT_FOUND, f"no definition with UUID {row.uuid}")

    def undefine(self, uuid: str) -> None:
        if self._write("DELETE FROM domains WHERE uuid = ?", (uuid,),
                       f"undefining {uuid}") == 0:
            raise StoreError(ERROR_NOT_FOUND, f"no definition with UUID {uuid}")

    def update(self, old: DomainConfig, new: DomainConfig) -> None:
        n = self._write("UPDATE domains SET name = ?, config = ? WHERE uuid = ?",
                        (new.name, json.dumps(config_to_values(new)), old.uuid),
                        f"updating {old.uuid}")
        if n == 0:
            raise StoreError(ERROR_NOT_FOUND, f"no definition with UUID {old.uuid}")

    def version(self) -> object:
        """(commits through this object, SQLite's data_version: it moves when another
        connection, of this process or another, commits to the file)."""
        try:
            with self._lock:
                row = self._db.execute("PRAGMA data_version").fetchone()
        except sqlite3.Error:
            return None
        return self._writes, row[0] if row else None

    def close(self) -> None:
        with self._lock:
            self._db.close()


# A rename asked while a libvirt-store domain runs, kept in its definition's metadata.
RENAME_NS = "http://example.org/cim-provider/manager/rename/1"
RENAME_PREFIX = "cimp"


def _pending_name(xml: str) -> str | None:
    """The name a rename made while the domain ran is waiting to apply, if any."""
    if RENAME_NS not in xml:
        return None
    try:
        element = ET.fromstring(xml).find(f"metadata/{{{RENAME_NS}}}rename")
    except ET.ParseError:
        return None
    name = element.get("name") if element is not None else None
    return name.strip() or None if name else None


def libvirt_type_for(conn: libvirt.virConnect, cfg: DomainConfig) -> str:
    """The <domain type=...> to use for `cfg` on this hypervisor."""
    driver = conn.getType().lower()
    if driver == "qemu":
        return "qemu" if (cfg.type or "").lower() == "qemu" else "kvm"
    return driver


def _libvirt_error(action: str, exc: libvirt.libvirtError) -> StoreError:
    if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
        return StoreError(ERROR_NOT_FOUND, f"{action}: {exc.get_error_message()}")
    return StoreError(ERROR_FAILED, f"{action}: {exc.get_error_message() or exc}")


class LibvirtStore(Store):
    """libvirt's own persistent domains, as definitions; libvirt says which are active."""

    def __init__(self, conn: LibvirtConnection) -> None:
        self.connection = conn
        self.spec = f"libvirt:{conn.uri or ''}"

    def list(self) -> list[Stored]:
        conn = self.connection.get()
        out = []
        try:
            domains = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_PERSISTENT)
        except libvirt.libvirtError as exc:
            raise _libvirt_error("listing libvirt domains", exc) from None
        for dom in domains:
            try:
                xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
                cfg = parse_domain_xml(xml, autostart=bool(dom.autostart()))
                active = bool(dom.isActive())
                pending = _pending_name(xml)
                if pending and pending != cfg.name:
                    cfg = self._renamed(dom, cfg, pending, active)
                out.append(Stored(cfg, active))
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:   # gone meanwhile
                    log.warning("%s: cannot read a domain: %s", self.spec, exc)
            except DomainXMLError as exc:
                log.warning("%s: skipping a domain with unusable XML: %s", self.spec, exc)
        return out

    def rename_later(self, uuid: str, name: str) -> None:
        """Rename a running domain: libvirt renames only stopped ones, so the new name
        is kept in its persistent definition's metadata and applied by `list` once the
        domain has stopped (a Manager restart meanwhile keeps it)."""
        dom = self.lookup(uuid)
        try:
            dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                            f"<rename name={quoteattr(name)}/>", RENAME_PREFIX, RENAME_NS,
                            libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        except libvirt.libvirtError as exc:
            raise _libvirt_error(f"renaming {uuid}", exc) from None

    def _renamed(self, dom: libvirt.virDomain, cfg: DomainConfig, name: str,
                 active: bool) -> DomainConfig:
        """A definition with a rename waiting: its new name; applied in libvirt now
        when the domain is stopped."""
        if active:
            return replace(cfg, name=name)
        try:
            dom.rename(name, 0)
            with contextlib.suppress(libvirt.libvirtError):
                dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, None, None, RENAME_NS,
                                libvirt.VIR_DOMAIN_AFFECT_CONFIG)
            log.info("%s (%s) has stopped: renamed it to %s, as asked while it ran",
                     cfg.name, cfg.uuid, name)
            return replace(cfg, name=name)
        except libvirt.libvirtError as exc:
            log.error("cannot rename %s (%s) to %s: %s", cfg.name, cfg.uuid, name,
                      exc.get_error_message() or exc)
            return cfg

    def lookup(self, uuid: str) -> libvirt.virDomain:
        try:
            return self.connection.get().lookupByUUIDString(uuid)
        except libvirt.libvirtError as exc:
            raise _libvirt_error(f"looking up {uuid}", exc) from None

    @staticmethod
    def _no_policy(cfg: DomainConfig) -> None:
        if cfg.priority is not None or cfg.min_memory_kib is not None:
            raise StoreError(ERROR_NOT_SUPPORTED, "a libvirt-store definition cannot keep "
                             "Priority or MinMemoryKiB (use an sqlite: store)")

    def define(self, cfg: DomainConfig) -> None:
        self._no_policy(cfg)
        conn = self.connection.get()
        try:
            cfg = resolve_disks(conn, cfg)
            dom = conn.defineXML(config_to_domain_xml(cfg, libvirt_type_for(conn, cfg)))
            if cfg.autostart:
                dom.setAutostart(1)
        except libvirt.libvirtError as exc:
            raise _libvirt_error(f"defining {cfg.name}", exc) from None

    def undefine(self, uuid: str) -> None:
        dom = self.lookup(uuid)
        try:
            if not dom.isPersistent():
                raise StoreError(ERROR_NOT_FOUND, f"no definition with UUID {uuid}")
            dom.undefine()
        except libvirt.libvirtError as exc:
            raise _libvirt_error(f"undefining {uuid}", exc) from None

    def update(self, old: DomainConfig, new: DomainConfig) -> None:
        """Only what libvirt can change in place; rewriting the XML from our reduced
        model would silently drop every device and setting the model does not carry."""
        unsupported = [f for f in ("type", "os_type", "arch", "disks", "nics", "priority",
                                   "min_memory_kib")
                       if getattr(old, f) != getattr(new, f)]
        if unsupported:
            raise StoreError(ERROR_NOT_SUPPORTED, "a libvirt-store definition cannot change "
                             + ", ".join(unsupported) + " through the Manager; use virsh edit")
        dom = self.lookup(old.uuid)
        config = libvirt.VIR_DOMAIN_AFFECT_CONFIG
        try:
            # A maximum must never drop below the current value, even for a moment:
            # raise the maximum first when growing, lower the current first when shrinking.
            mem_steps = []
            if new.max_memory_kib is not None and new.max_memory_kib != old.max_memory_kib:
                mem_steps.append((new.max_memory_kib, config | libvirt.VIR_DOMAIN_MEM_MAXIMUM))
            if new.memory_kib is not None and new.memory_kib != old.memory_kib:
                mem_steps.append((new.memory_kib, config))
            if (new.max_memory_kib or 0) < (old.max_memory_kib or 0):
                mem_steps.reverse()
            for kib, flags in mem_steps:
                dom.setMemoryFlags(kib, flags)
            if new.vcpus is not None and new.vcpus != old.vcpus:
                # VCPUs is the current count; the maximum (hot-plug headroom someone
                # set with virsh) is raised when the new count needs it, never lowered.
                maximum = config | libvirt.VIR_DOMAIN_VCPU_MAXIMUM
                if new.vcpus > dom.vcpusFlags(maximum):
                    dom.setVcpusFlags(new.vcpus, maximum)
                dom.setVcpusFlags(new.vcpus, config)
            if new.title != old.title:
                dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_TITLE, new.title or "", None, None,
                                config)
            if new.autostart is not None and new.autostart != old.autostart:
                dom.setAutostart(int(new.autostart))
            if new.name != old.name:
                dom.rename(new.name, 0)
        except libvirt.libvirtError as exc:
            raise _libvirt_error(f"updating {old.name}", exc) from None


def open_store(spec: str, connections: dict[str | None, LibvirtConnection],
               farm: dict[str, Any] | None = None) -> Store:
    """`sqlite:PATH`, `libvirt:URI` (an empty URI means libvirt's default) or
    `postgresql:CONNINFO` (the farm store, pgstore.py; `farm` holds its options:
    host_id, host_name, lease, poll_interval). A bare `postgresql://...` URI works too.

    `connections` maps URIs to shared connections, so a libvirt store and the service
    talk to the same hypervisor connection when their URIs match.
    """
    kind, _, rest = spec.partition(":")
    if kind in ("postgresql", "postgres"):
        from .pgstore import FarmStore        # psycopg only when a farm is used
        conninfo = spec if rest.startswith("//") else rest
        if not conninfo:
            raise ValueError("postgresql store needs a connection string: postgresql:CONNINFO")
        return FarmStore(conninfo, **(farm or {}))
    if kind == "sqlite":
        if not rest:
            raise ValueError("sqlite store needs a path: sqlite:PATH")
        return SqliteStore(rest)
    if kind == "libvirt":
        uri = rest or None
        if uri not in connections:
            connections[uri] = LibvirtConnection(uri)
        return LibvirtStore(connections[uri])
    raise ValueError(f"unknown store {spec!r}: use sqlite:PATH, libvirt:URI or "
                     "postgresql:CONNINFO")


__all__ = ["Store", "SqliteStore", "LibvirtStore", "LibvirtConnection", "Stored",
           "StoreError", "Templated", "templated_row", "open_store", "default_db_path",
           "libvirt_type_for", "libvirt_error_to_log"]
