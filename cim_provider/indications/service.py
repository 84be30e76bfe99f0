"""Inventory changes -> lifecycle indications -> matching subscriptions -> delivery.

The inventory's Change kinds are exactly what a client sees of VIRT_ComputerSystem
(a definition appearing is a creation, a transient domain stopping a deletion, a
passive domain starting a modification), so they map one to one:

    created  -> VIRT_ComputerSystemCreatedIndication  (CIM_InstCreation)
    modified -> VIRT_ComputerSystemModifiedIndication (CIM_InstModification)
    deleted  -> VIRT_ComputerSystemDeletedIndication  (CIM_InstDeletion)

SourceInstance is the VIRT_ComputerSystem a GetInstance returns at that moment;
PreviousInstance is the SourceInstance of the previous indication about that system,
so a console that follows the stream always sees consistent pairs. A modification
of the record that changes no VIRT_ComputerSystem property (a disk added to a
definition, say) is not an indication of this class and is not sent.

Everything runs on the server's loop, in the inventory's callback: building and
matching cost microseconds, and delivery only appends to per-destination queues.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

from pywbem import CIMDateTime, CIMInstance, CIMProperty

from ..inventory.inventory import Change, Inventory
from ..domain.records import DomainRecord
from ..wbem import wql
from ..wbem.repository import Repository
from .delivery import DestinationWorker, listener_url
from .subscriptions import Filter, Subscriptions, interop_key

log = logging.getLogger(__name__)

SOURCE_NS = "root/virt"
CREATED = "VIRT_ComputerSystemCreatedIndication"
MODIFIED = "VIRT_ComputerSystemModifiedIndication"
DELETED = "VIRT_ComputerSystemDeletedIndication"
_CLASS_OF = {"created": CREATED, "modified": MODIFIED, "deleted": DELETED}


class IndicationService:
    """Owns the destination workers; fed by `attach`ed inventories or by `publish`."""

    def __init__(self, repo: Repository, host: str, subscriptions: Subscriptions,
                 **worker_options: Any):
        self.repo = repo
        self.host = host
        self.subs = subscriptions
        self.worker_options = worker_options
        self.workers: dict[tuple, DestinationWorker] = {}
        self._ids = itertools.count(1)
        self._boot = f"{host}:{int(time.time())}"     # unique per server run
        self._last: dict[str, CIMInstance] = {}
        self._unsubscribe: list[Callable[[], None]] = []
        self._build: Callable[[DomainRecord], CIMInstance] | None = None
        self._failing: set[tuple] = set()     # destinations already logged as failing
        # Closes of dropped workers under way: held here (the loop keeps only a weak
        # reference to a task) until each ends, and awaited by close().
        self._closing: set[asyncio.Task[None]] = set()
        subscriptions.listeners.append(self._prune)

    # ---- sources of indications -------------------------------------------------------

    def attach(self, inventory: Inventory, build: Callable[[DomainRecord], CIMInstance]) -> None:
        """Follow `inventory`; `build(record)` is the VIRT_ComputerSystem of a record."""
        self._build = build
        for rec in inventory.records():
            self._last[rec.uuid] = build(rec)
        self._unsubscribe.append(inventory.subscribe(self._on_change))

    def _on_change(self, change: Change) -> None:
        build = self._build
        assert build is not None
        # Nobody subscribed: no indication to build (at a first sync of 100,000
        # definitions, building them was most of its time; docs/architecture.md,
        # "Sources"). The last instance is still kept for a later modification.
        listening = next(iter(self.subs.active()), None) is not None
        if change.kind == "deleted":
            assert change.old is not None       # a deletion carries the record deleted
            old = self._last.pop(change.uuid, None)
            if listening:
                self.publish(self.indication("deleted", old or build(change.old)))
            return
        assert change.new is not None           # a creation or change carries the new one
        new = build(change.new)
        old = self._last.get(change.uuid)
        self._last[change.uuid] = new
        if not listening:
            return
        if change.kind == "created" or old is None:
            self.publish(self.indication("created", new))
            return
        changed = [p.name for p in new.properties.values()
                   if old.properties.get(p.name) is None
                   or old.properties[p.name].value != p.value]
        changed += [n for n in old.properties if n not in new.properties]
        if not changed:
            return
        self.publish(self.indication("modified", new, old, changed))

    def indication(self, kind: str, source: CIMInstance, previous: CIMInstance | None = None,
                   changed: list[str] | None = None,
                   classname: str | None = None) -> CIMInstance:
        """A lifecycle indication about `source` (an instance with its path); of the
        VIRT_ComputerSystem class for `kind` unless `classname` (a CIM_InstIndication
        subclass, e.g. CIM_InstModification for the host's health) says otherwise."""
        cls = self.repo.namespace(SOURCE_NS).require(classname or _CLASS_OF[kind])
        path = source.path.copy()
        path.host = self.host
        values: dict[str, Any] = {
            "IndicationIdentifier": f"{self._boot}:{next(self._ids)}",
            "IndicationTime": CIMDateTime.now(),
            "SourceInstanceModelPath": str(path),
            "SourceInstanceHost": self.host,
            "PerceivedSeverity": 2,          # Information
        }
        if changed is not None:
            values["ChangedPropertyNames"] = changed
        inst = CIMInstance(cls.classname)
        for name, value in values.items():
            decl = cls.properties[name]
            inst[decl.name] = CIMProperty(decl.name, value, type=decl.type,
                                          is_array=decl.is_array)
        # DSP0201: an embedded instance travels as an escaped INSTANCE in a string
        # property marked EmbeddedObject="object" (the class uses EmbeddedObject).
        for name, value in (("SourceInstance", source), ("PreviousInstance", previous)):
            if value is not None:
                inst[name] = CIMProperty(name, value, type="string", embedded_object="object")
        return inst

    # ---- matching and queueing ----------------------------------------------------------

    def _matches(self, flt: Filter, indication: CIMInstance, source_ns: str) -> bool:
        if flt.source_namespaces is not None and not any(
                n.lower() == source_ns.lower() for n in flt.source_namespaces):
            return False
        ns = self.repo.namespace(source_ns)
        if not ns.is_subclass(indication.classname, flt.query.classname):
            return False
        return wql.matches(flt.query, indication, ns.is_subclass)

    def publish(self, indication: CIMInstance, source_ns: str = SOURCE_NS) -> int:
        """Queue `indication` for every enabled subscription whose filter selects it;
        returns how many were queued. Never blocks and never raises."""
        n = 0
        try:
            active = list(self.subs.active())
        except Exception:
            log.exception("could not queue indication %s", indication.get("IndicationIdentifier"))
            return 0
        # One subscription that fails (a destination that cannot be served, say) must not
        # cost the others this indication: each is tried on its own, and a failing
        # destination is logged once (not on every indication) until it works again.
        for _sub, flt, dest in active:
            key = interop_key(dest.path)
            try:
                if not self._matches(flt, indication, source_ns):
                    continue
                copy = indication.copy()
                copy["IndicationFilterName"] = CIMProperty("IndicationFilterName", flt.name,
                                                           type="string")
                self._worker(dest).put(copy)
            except Exception:
                if key not in self._failing:
                    self._failing.add(key)
                    log.exception("listener %s: cannot queue indications for it (logged "
                                  "once); other subscriptions are unaffected", dest.get("Name"))
                continue
            self._failing.discard(key)
            n += 1
        return n

    def _worker(self, dest: CIMInstance) -> DestinationWorker:
        key = interop_key(dest.path)
        worker = self.workers.get(key)
        if worker is None or worker.url != listener_url(dest["Destination"]):
            if worker is not None:
                self._close_later(worker)
            user, password = dest.get("username"), dest.get("password")
            worker = DestinationWorker(dest["Name"], dest["Destination"],
                                       context=f"{self._boot}:{dest['Name']}",
                                       auth=(user, password or "") if user else None,
                                       **self.worker_options)
            self.workers[key] = worker
        return worker

    def _prune(self) -> None:
        """Stop the workers of destinations that were deleted."""
        for key in [k for k in self.workers if k not in self.subs.destinations]:
            self._close_later(self.workers.pop(key))
        self._failing.intersection_update(self.subs.destinations)

    def _close_later(self, worker: DestinationWorker) -> None:
        """Close a worker no longer wanted, without waiting here (a listener callback)."""
        task = asyncio.get_running_loop().create_task(worker.close(),
                                                      name=f"close {worker.url}")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for unsub in self._unsubscribe:
            unsub()
        self._unsubscribe.clear()
        if self._prune in self.subs.listeners:
            self.subs.listeners.remove(self._prune)
        workers, self.workers = list(self.workers.values()), {}
        for worker in workers:
            await worker.close()
        # Workers dropped just before may not even have begun to close: wait for them.
        # (Cancelling such a close before it ran would leave the worker's task running.)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
