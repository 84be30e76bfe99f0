"""Subscriptions in the interop namespace (DSP1054 Indications profile), persisted.

Clients (pywbem's WBEMSubscriptionManager, pywbemcli, consoles) create three kinds of
instance: a CIM_IndicationFilter (which indications, in WQL), a
CIM_ListenerDestinationCIMXML (where to send them) and a CIM_IndicationSubscription
(the association of one filter with one destination). They are kept in memory and in
`subscriptions.json` under the server's state directory, rewritten atomically after
every change, so they survive a restart.

Error codes at creation (our choice):
- a QueryLanguage other than WQL: CIM_ERR_QUERY_LANGUAGE_NOT_SUPPORTED;
- a query that does not parse, uses a WQL feature we do not offer, selects from a
  class that is not an indication class of the source namespaces, or names an unknown
  property or class: CIM_ERR_INVALID_PARAMETER. DSP0200 lists INVALID_PARAMETER (not
  INVALID_QUERY) among CreateInstance's errors, and the bad value is a property of the
  NewInstance parameter.

Subscriptions may expire (SubscriptionDuration) and ModifyInstance changes their
SubscriptionState and SubscriptionDuration (lifetime.py); filters and destinations
cannot be modified.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid as uuidlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pywbem
from pywbem import (CIMDateTime, CIMError, CIMInstance, CIMInstanceName, CIMProperty)

from ..statefile import write_private
from . import lifetime
from .jsonform import to_json as _to_json
from .jsonform import typed
from ..wbem import wql
from ..wbem.provider import Provider, path_key
from ..wbem.repository import Repository
from .delivery import listener_url

log = logging.getLogger(__name__)

INTEROP = "interop"
FILTER_CLASS = "CIM_IndicationFilter"
DEST_CLASS = "CIM_ListenerDestinationCIMXML"
SUB_CLASS = "CIM_IndicationSubscription"
SYSTEM_CCN = "CIM_ComputerSystem"
STATE_FILE = "subscriptions.json"
FORMAT = "cim-provider-subscriptions/1"

# CIM_AbstractIndicationSubscription.SubscriptionState
STATE_ENABLED, STATE_DISABLED = 2, 4
# CIM_ListenerDestination.Protocol: 2 = CIM-XML; PersistenceType: 2 = Permanent
PROTOCOL_CIMXML, PERSISTENCE_PERMANENT = 2, 2


# --- the subscription set ----------------------------------------------------------------

def interop_key(path: CIMInstanceName) -> tuple:
    """path_key of an interop instance path. Hand-built clients (wbemcli) send paths
    and the Filter / Handler references of a subscription without a namespace
    (INSTANCENAME); they mean interop, so a missing namespace is interop, at the top
    and in reference keys, and both spellings name the same instance."""
    if any(isinstance(v, CIMInstanceName) and not v.namespace
           for v in path.keybindings.values()):
        path = path.copy()
        for k, v in list(path.keybindings.items()):
            if isinstance(v, CIMInstanceName) and not v.namespace:
                v = v.copy()
                v.namespace = INTEROP
                path.keybindings[k] = v
    return path_key(path, INTEROP)


@dataclass
class Filter:
    instance: CIMInstance
    query: wql.Query
    source_namespaces: tuple[str, ...] | None    # None: every namespace

    @property
    def name(self) -> str:
        return self.instance["Name"]


class Subscriptions:
    """Filters, destinations and subscriptions by path; persisted on every change.

    `listeners` are called (no arguments) after each change, so the delivery side can
    drop workers of deleted destinations.
    """

    def __init__(self, repo: Repository, host: str, state_dir: Path | str | None):
        self.repo = repo
        self.ns = repo.namespace(INTEROP)
        self.host = host
        self.path = Path(state_dir) / STATE_FILE if state_dir is not None else None
        self.filters: dict[tuple, Filter] = {}
        self.destinations: dict[tuple, CIMInstance] = {}
        self.subscriptions: dict[tuple, CIMInstance] = {}
        self.listeners: list[Callable[[], None]] = []
        self._write_lock = asyncio.Lock()
        self.expiry = lifetime.Expiry(self.subscriptions, self.delete)
        self._keys: dict[str, list[str]] = {}

    # ---- keys and paths ----------------------------------------------------------

    def keys_of(self, classname: str) -> list[str]:
        keys = self._keys.get(classname)
        if keys is None:
            cls = self.ns.require(classname)
            keys = [p.name for p in cls.properties.values()
                    if p.qualifiers.get("Key") is not None and p.qualifiers["Key"].value]
            self._keys[classname] = keys
        return keys

    def path_of(self, inst: CIMInstance) -> CIMInstanceName:
        return CIMInstanceName(inst.classname, {k: inst[k] for k in self.keys_of(inst.classname)},
                               namespace=INTEROP)

    # ---- validation -----------------------------------------------------------------

    def compile_filter(self, inst: CIMInstance) -> Filter:
        """Check a filter's query and source namespaces; CIMError as documented above."""
        language, text = inst.get("QueryLanguage"), inst.get("Query")
        if not language or not text:
            raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                           "a filter needs both Query and QueryLanguage")
        if language.strip().upper() != wql.LANGUAGE:
            raise CIMError(pywbem.CIM_ERR_QUERY_LANGUAGE_NOT_SUPPORTED,
                           f"QueryLanguage {language[:64]!r} is not supported; use WQL")
        try:
            query = wql.parse(text)
        except wql.WQLError as exc:
            raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER, f"Query: {exc.message}") from None
        if query.select is not None:
            raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                           "Query: filters must select * (property lists are not supported)")
        names = list(inst.get("SourceNamespaces") or ())
        if inst.get("SourceNamespace"):
            names.append(inst["SourceNamespace"])
        sources: tuple[str, ...] | None = None
        if names:
            try:
                sources = tuple(self.repo.namespace(n).name for n in names)
            except CIMError:
                raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                               f"SourceNamespaces: one of {names!r} does not exist") from None
        checked = sources or tuple(self.repo.namespace_names)
        found = False
        for ns_name in checked:
            ns = self.repo.namespace(ns_name)
            cls = ns.get(query.classname)
            if cls is None:
                continue
            if not (cls.qualifiers.get("Indication") and cls.qualifiers["Indication"].value):
                raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                               f"Query: {cls.classname} is not an indication class")
            for prop in query.props():
                if prop.path[0] not in cls.properties:
                    raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                                   f"Query: {cls.classname} has no property {prop.path[0]!r}")
            for name in query.isa_classes():
                if ns.get(name) is None:
                    raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                                   f"Query: class {name!r} does not exist in {ns.name}")
            found = True
        if not found:
            raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                           f"Query: no indication class {query.classname!r} in "
                           f"{', '.join(checked)}")
        return Filter(inst, query, sources)

    def _fill_keys(self, inst: CIMInstance, kind: str) -> None:
        """Defaults for the key properties a client may leave out (DSP1054 lets the
        server choose them); a CreationClassName naming another class is refused."""
        ccn = inst.get("CreationClassName")
        if ccn is not None and ccn.lower() != inst.classname.lower():
            raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                           f"CreationClassName must be {inst.classname}, not {ccn!r}")
        defaults = {"CreationClassName": inst.classname, "SystemCreationClassName": SYSTEM_CCN,
                    "SystemName": self.host,
                    "Name": f"cim-provider:{kind}:{uuidlib.uuid4()}"}
        cls = self.ns.require(inst.classname)
        for name, value in defaults.items():
            if inst.get(name) is None:
                decl = cls.properties[name]
                inst[decl.name] = CIMProperty(decl.name, value, type=decl.type)

    @staticmethod
    def _set(inst: CIMInstance, cls, name: str, value: Any) -> None:
        decl = cls.properties[name]
        inst[decl.name] = CIMProperty(decl.name, value, type=decl.type, is_array=decl.is_array)

    # ---- changes --------------------------------------------------------------------

    async def create(self, inst: CIMInstance) -> CIMInstanceName:
        inst = inst.copy()
        cls = self.ns.get(inst.classname)
        if inst.classname == FILTER_CLASS:
            self._fill_keys(inst, "filter")
            flt = self.compile_filter(inst)
            if inst.get("IndividualSubscriptionSupported") is None:
                self._set(inst, cls, "IndividualSubscriptionSupported", True)
            table: dict = self.filters
            entry: Any = flt
        elif inst.classname == DEST_CLASS:
            self._fill_keys(inst, "destination")
            self.check_destination(inst)
            if inst.get("Protocol") is None:
                self._set(inst, cls, "Protocol", PROTOCOL_CIMXML)
            if inst.get("PersistenceType") is None:
                self._set(inst, cls, "PersistenceType", PERSISTENCE_PERMANENT)
            table, entry = self.destinations, inst
        elif inst.classname == SUB_CLASS:
            self.check_subscription(inst)
            now = CIMDateTime.now()
            if inst.get("SubscriptionState") is None:
                self._set(inst, cls, "SubscriptionState", STATE_ENABLED)
            self._set(inst, cls, "SubscriptionStartTime", now)
            self._set(inst, cls, "TimeOfLastStateChange", now)
            table, entry = self.subscriptions, inst
        else:
            raise CIMError(pywbem.CIM_ERR_NOT_SUPPORTED, f"{inst.classname} cannot be created")
        path = self.path_of(inst)
        key = interop_key(path)
        if key in table:
            raise CIMError(pywbem.CIM_ERR_ALREADY_EXISTS, f"{path} already exists")
        inst.path = path
        table[key] = entry
        try:
            await self.save()
        except OSError as exc:
            del table[key]
            raise CIMError(pywbem.CIM_ERR_FAILED, f"cannot persist the subscription: {exc}") \
                from None
        log.info("created %s", path)
        self._notify()
        self.expiry.schedule()
        return path

    async def modify(self, inst: CIMInstance, property_list: list[str] | None) -> None:
        """ModifyInstance of a subscription: SubscriptionState, SubscriptionDuration."""
        path = inst.path
        if path is None or path.classname != SUB_CLASS:
            raise CIMError(pywbem.CIM_ERR_NOT_SUPPORTED,
                           f"{inst.classname} cannot be modified")
        key = interop_key(path)
        old = self.subscriptions.get(key)
        if old is None:
            raise CIMError(pywbem.CIM_ERR_NOT_FOUND, f"no instance {path}")
        self.subscriptions[key] = lifetime.modified(old, inst, property_list)
        try:
            await self.save()
        except OSError as exc:
            self.subscriptions[key] = old
            raise CIMError(pywbem.CIM_ERR_FAILED, f"cannot persist the change: {exc}") from None
        log.info("modified %s", path)
        self._notify()
        self.expiry.schedule()

    async def delete(self, path: CIMInstanceName) -> None:
        key = interop_key(path)
        if path.classname == SUB_CLASS:
            table: dict = self.subscriptions
        elif path.classname == FILTER_CLASS:
            table = self.filters
        elif path.classname == DEST_CLASS:
            table = self.destinations
        else:
            raise CIMError(pywbem.CIM_ERR_NOT_SUPPORTED, f"{path.classname} cannot be deleted")
        if key not in table:
            raise CIMError(pywbem.CIM_ERR_NOT_FOUND, f"no instance {path}")
        if table is not self.subscriptions:
            # DSP1054: a filter or destination still referenced by a subscription stays;
            # pywbem's WBEMSubscriptionManager expects CIM_ERR_FAILED here.
            role = "Filter" if table is self.filters else "Handler"
            users = [s for s in self.subscriptions.values()
                     if interop_key(s[role]) == key]
            if users:
                raise CIMError(pywbem.CIM_ERR_FAILED,
                               f"{path.classname} {path['Name']!r} is referenced by "
                               f"{len(users)} subscription(s); delete them first")
        entry = table.pop(key)
        try:
            await self.save()
        except OSError as exc:
            table[key] = entry
            raise CIMError(pywbem.CIM_ERR_FAILED, f"cannot persist the deletion: {exc}") from None
        log.info("deleted %s", path)
        self._notify()

    def check_destination(self, inst: CIMInstance) -> None:
        dest = inst.get("Destination")
        if not dest:
            raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER, "Destination is required")
        parts = urlsplit(listener_url(dest))
        try:
            parts.port
        except ValueError:
            raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                           f"Destination {dest[:200]!r} has an invalid port") from None
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                           f"Destination {dest[:200]!r} is not an http or https URL")
        # HTTP Basic authentication (RFC 7617) cannot carry a user-id containing ':'
        # (it separates user-id and password), so such a listener could never be sent to.
        user = inst.get("username")
        if user is not None and ":" in user:
            raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                           "username must not contain ':' (RFC 7617 HTTP Basic "
                           "authentication forbids it in the user-id)")
        protocol = inst.get("Protocol")
        if protocol is not None and protocol != PROTOCOL_CIMXML:
            raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                           "Protocol must be 2 (CIM-XML) for CIM_ListenerDestinationCIMXML")

    def check_subscription(self, inst: CIMInstance) -> None:
        flt, handler = inst.get("Filter"), inst.get("Handler")
        if flt is None or handler is None:
            raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                           "a subscription needs both Filter and Handler")
        if interop_key(flt) not in self.filters:
            raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER, f"Filter {flt} does not exist")
        if interop_key(handler) not in self.destinations:
            raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER, f"Handler {handler} does not exist")
        state = inst.get("SubscriptionState")
        if state is not None and state not in (STATE_ENABLED, STATE_DISABLED):
            raise CIMError(pywbem.CIM_ERR_INVALID_PARAMETER,
                           "SubscriptionState must be 2 (Enabled) or 4 (Disabled)")
        lifetime.check_duration(inst.get("SubscriptionDuration"))

    def _notify(self) -> None:
        for cb in tuple(self.listeners):
            try:
                cb()
            except Exception:
                log.exception("subscription listener %r failed", cb)

    # ---- what the delivery side reads --------------------------------------------------

    def active(self) -> Iterable[tuple[CIMInstance, Filter, CIMInstance]]:
        """(subscription, filter, destination) for every enabled subscription."""
        now = time.time()
        for sub in self.subscriptions.values():
            if sub.get("SubscriptionState", STATE_ENABLED) != STATE_ENABLED \
                    or lifetime.expired(sub, now):
                continue
            flt = self.filters.get(interop_key(sub["Filter"]))
            dest = self.destinations.get(interop_key(sub["Handler"]))
            if flt is not None and dest is not None:
                yield sub, flt, dest

    # ---- persistence ---------------------------------------------------------------------

    def _snapshot(self) -> dict:
        def rows(insts: Iterable[CIMInstance]) -> list[dict]:
            return [{"classname": i.classname,
                     "properties": {p.name: _to_json(p.value) for p in i.properties.values()
                                    if p.value is not None}} for i in insts]
        return {"format": FORMAT,
                "filters": rows(f.instance for f in self.filters.values()),
                "destinations": rows(self.destinations.values()),
                "subscriptions": rows(self.subscriptions.values())}

    async def save(self) -> None:
        """Write the whole set atomically (temporary file, fsync, rename), off the loop."""
        if self.path is None:
            return
        data = json.dumps(self._snapshot(), indent=1, sort_keys=True).encode()
        async with self._write_lock:
            await asyncio.get_running_loop().run_in_executor(None, write_private, self.path,
                                                             data)

    def load(self) -> None:
        """Read the saved set; entries that no longer validate are skipped with a warning.
        A file that is not JSON at all is kept aside (never silently overwritten)."""
        if self.path is None or not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"unknown format {data.get('format')!r}")
        except (OSError, ValueError) as exc:
            aside = self.path.with_name(f"{STATE_FILE}.unreadable-{int(time.time())}")
            log.error("cannot read %s (%s); moved it to %s and starting without "
                      "subscriptions", self.path, exc, aside)
            with contextlib.suppress(OSError):
                os.replace(self.path, aside)
            return
        for section in ("filters", "destinations", "subscriptions"):
            for row in data.get(section, ()):
                try:
                    inst = typed(self.ns, row["classname"], row["properties"], STATE_FILE)
                    inst.path = self.path_of(inst)
                    key = interop_key(inst.path)
                    if section == "filters":
                        self.filters[key] = self.compile_filter(inst)
                    elif section == "destinations":
                        self.check_destination(inst)
                        self.destinations[key] = inst
                    else:
                        self.check_subscription(inst)
                        self.subscriptions[key] = inst
                except (CIMError, KeyError, TypeError, ValueError, AttributeError) as exc:
                    log.warning("skipping a saved %s entry: %s", section[:-1], exc)
        log.info("loaded %d filter(s), %d destination(s), %d subscription(s) from %s",
                 len(self.filters), len(self.destinations), len(self.subscriptions), self.path)
        self.expiry.schedule()                 # those that expired while we were down, too


# --- providers ---------------------------------------------------------------------------

class _SubscriptionClassProvider(Provider):
    namespace = INTEROP

    TABLE = ""            # the Subscriptions attribute holding this class's instances

    def __init__(self, subs: Subscriptions):
        self.subs = subs

    def _table(self) -> dict:
        return getattr(self.subs, self.TABLE)

    async def enumerate_instances(self, classname: str) -> Iterable[CIMInstance]:
        return [v.instance if isinstance(v, Filter) else v for v in self._table().values()]

    async def get_instance(self, path: CIMInstanceName) -> CIMInstance:
        v = self._table().get(interop_key(path))
        if v is None:
            raise CIMError(pywbem.CIM_ERR_NOT_FOUND, f"no instance {path}")
        return v.instance if isinstance(v, Filter) else v

    async def create_instance(self, instance: CIMInstance, ctx: Any) -> CIMInstanceName:
        return await self.subs.create(instance)

    async def delete_instance(self, path: CIMInstanceName, ctx: Any) -> None:
        await self.subs.delete(path)


class FilterProvider(_SubscriptionClassProvider):
    classnames = (FILTER_CLASS,)

    TABLE = "filters"


class DestinationProvider(_SubscriptionClassProvider):
    """CIM_ListenerDestinationCIMXML; enumerating the abstract CIM_ListenerDestination
    reaches these through the dispatcher's subclass fan-out. The listener's password
    is used for delivery but never shown to clients."""
    classnames = (DEST_CLASS,)

    TABLE = "destinations"

    @staticmethod
    def _hide(inst: CIMInstance) -> CIMInstance:
        if inst.get("password") is None:
            return inst
        out = inst.copy()
        del out["password"]
        return out

    async def enumerate_instances(self, classname: str) -> Iterable[CIMInstance]:
        return [self._hide(i) for i in await super().enumerate_instances(classname)]

    async def get_instance(self, path: CIMInstanceName) -> CIMInstance:
        return self._hide(await super().get_instance(path))


class SubscriptionProvider(_SubscriptionClassProvider):
    """CIM_IndicationSubscription: SubscriptionTimeRemaining computed when read;
    ModifyInstance changes SubscriptionState and SubscriptionDuration (lifetime.py)."""
    classnames = (SUB_CLASS,)

    TABLE = "subscriptions"

    async def enumerate_instances(self, classname: str) -> Iterable[CIMInstance]:
        return [lifetime.shown(i) for i in await super().enumerate_instances(classname)]

    async def get_instance(self, path: CIMInstanceName) -> CIMInstance:
        return lifetime.shown(await super().get_instance(path))

    async def modify_instance(self, instance: CIMInstance, property_list: list[str] | None,
                              ctx: Any) -> None:
        await self.subs.modify(instance, property_list)


def subscription_providers(subs: Subscriptions) -> list[Provider]:
    return [FilterProvider(subs), DestinationProvider(subs), SubscriptionProvider(subs)]
