"""The merged view of every domain, kept up to date incrementally, with a change feed.

Two sources feed it: libvirt (what runs now: a full snapshot after each connect, then
one event at a time) and the Manager (what is defined: a full list at the first sync
and after a gap, otherwise only what changed, or None while the Manager is away).
Readers (the CIM providers) call `get` and `records` far more often than the sources
change anything, so reads are O(1) or served from a cache, and every write touches
only the records it concerns.

Not thread-safe: everything runs on the asyncio loop.
"""
from __future__ import annotations

import bisect
import itertools
import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Mapping, Sequence

from ..domain.records import DomainConfig, DomainRecord, Kind, RunningDomain
from .resources import HostResources

log = logging.getLogger(__name__)

# One counter for the whole process: a (uuid, version) pair then names one record
# value even across Inventory instances, so a consumer's cache can never confuse two.
_versions = itertools.count(1)
BULK = 64       # records changed at once above which the name order is sorted afresh


def merge(running: Mapping[str, RunningDomain],
          defined: Mapping[str, DomainConfig]) -> dict[str, DomainRecord]:
    """Pure merge: one record per UUID found in either source (version left at 0)."""
    out: dict[str, DomainRecord] = {}
    for uuid, dom in running.items():
        out[uuid] = DomainRecord(uuid=uuid, running=dom, defined=defined.get(uuid))
    for uuid, cfg in defined.items():
        if uuid not in out:
            out[uuid] = DomainRecord(uuid=uuid, defined=cfg)
    return out


@dataclass(frozen=True, slots=True)
class Change:
    """One record created, modified or deleted; `old`/`new` are None where absent."""
    kind: Literal["created", "modified", "deleted"]
    uuid: str
    old: DomainRecord | None
    new: DomainRecord | None


def _sort_key(rec: DomainRecord) -> tuple[str, str]:
    return (rec.name, rec.uuid)


class Inventory:
    """The current records by UUID, fed by the sources, read by the providers."""

    def __init__(self) -> None:
        self._running: dict[str, RunningDomain] = {}
        self._defined: dict[str, DomainConfig] = {}
        self._stop_reasons: dict[str, str] = {}          # libvirt's, shown while not running
        self._held: dict[str, DomainConfig] = {}         # libvirt's definitions of those
        self._records: dict[str, DomainRecord] = {}
        self._keys: list[tuple[str, str]] = []          # sorted (name, uuid)
        self._ordered: tuple[DomainRecord, ...] | None = ()
        self._counts: dict[Kind, int] = {k: 0 for k in Kind}
        self._subscribers: list[Callable[[Change], None]] = []
        self.generation = 0
        # The host's capacity, storage pools, networks and usage samples (fed by the
        # libvirt source like the running domains; read by the pool and metric providers).
        self.resources = HostResources()

    # ---- writes -------------------------------------------------------------------

    def set_running(self, running: Mapping[str, RunningDomain]) -> None:
        """Replace the running set with a full snapshot; only real differences count."""
        old = self._running
        new = dict(running)
        touched = [u for u, dom in new.items() if old.get(u) != dom]
        touched += [u for u in old if u not in new]
        self._running = new
        self._apply(touched)

    def update_running(self, uuid: str, dom: RunningDomain | None) -> None:
        """Apply one libvirt event: `dom` is the domain now, None when it stopped."""
        if dom is None:
            if self._running.pop(uuid, None) is None:
                return
        else:
            if self._running.get(uuid) == dom:
                return
            self._running[uuid] = dom
        self._apply((uuid,))

    def set_defined(self, defined: Mapping[str, DomainConfig] | None) -> None:
        """Replace the Manager's definitions; None means the Manager is absent. Compares
        every definition: for a full (re-)list; changes alone go to `update_defined`."""
        old = self._defined
        new = dict(defined) if defined is not None else {}
        get = old.get
        # `is` first: an unchanged definition is usually the very object held already.
        touched = [u for u, cfg in new.items() if (o := get(u)) is not cfg and o != cfg]
        touched += [u for u in old if u not in new]
        self._defined = new
        self._apply(touched)

    def update_defined(self, changed: Mapping[str, DomainConfig],
                       removed: Iterable[str] = ()) -> None:
        """Apply a part of the Manager's definitions: `changed`, new or changed ones by
        UUID, and `removed`, UUIDs it no longer lists (a UUID in both stays, as
        `changed` says). Costs O(changed + removed), whatever the number held: the
        Manager client's path for ListChangesSince (docs/architecture.md, "Sources")."""
        defined = self._defined
        touched = [u for u in removed if u not in changed and defined.pop(u, None) is not None]
        for uuid, cfg in changed.items():
            old = defined.get(uuid)
            if old is cfg or old == cfg:
                continue
            defined[uuid] = cfg
            touched.append(uuid)
        self._apply(touched)

    def set_stop_reasons(self, reasons: Mapping[str, str],
                         held: Mapping[str, DomainConfig] | None = None) -> None:
        """Replace why libvirt last stopped domains on a failure (by UUID) and, of those
        it still holds persistently, their definitions (`held`): such a domain stays a
        record while neither libvirt runs it nor the Manager lists it
        (docs/architecture.md, "States")."""
        old, old_held = self._stop_reasons, self._held
        new, new_held = dict(reasons), dict(held or {})
        touched = [u for u, r in new.items() if old.get(u) != r]
        touched += [u for u in old if u not in new]
        touched += [u for u, c in new_held.items() if old_held.get(u) != c]
        touched += [u for u in old_held if u not in new_held]
        self._stop_reasons, self._held = new, new_held
        self._apply(dict.fromkeys(touched))

    # ---- reads --------------------------------------------------------------------

    def get(self, uuid: str) -> DomainRecord | None:
        return self._records.get(uuid)

    def records(self) -> Sequence[DomainRecord]:
        """Every record ordered by name then UUID; the same tuple until the next change."""
        if self._ordered is None:
            recs = self._records
            self._ordered = tuple(recs[u] for _, u in self._keys)
        return self._ordered

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, uuid: object) -> bool:
        return uuid in self._records

    def counts(self) -> dict[Kind, int]:
        return dict(self._counts)

    @property
    def running(self) -> Mapping[str, RunningDomain]:
        return self._running

    @property
    def defined(self) -> Mapping[str, DomainConfig]:
        return self._defined

    def subscribe(self, callback: Callable[[Change], None]) -> Callable[[], None]:
        """Call `callback` with each Change after it is applied; returns unsubscribe."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            try:
                self._subscribers.remove(callback)
            except ValueError:
                pass
        return unsubscribe

    # ---- internals ----------------------------------------------------------------

    def _apply(self, uuids: Iterable[str]) -> None:
        """Recompute the given records; notify only after all of them are in place.
        Many at once (a full snapshot at start-up or reconnect): the name order is
        sorted once at the end instead of kept by one insertion per record."""
        uuids = list(uuids)
        # Sorting afresh costs O(all); inserting one by one O(all) each: sort only when
        # the batch is a good share of everything (a first sync), not for a few hundred
        # changes among 100,000.
        bulk = len(uuids) > BULK and len(uuids) * 16 > len(self._records)
        changes: list[Change] = []
        for uuid in uuids:
            change = self._recompute(uuid, bulk)
            if change is not None:
                changes.append(change)
        if not changes:
            return
        if bulk:
            self._keys = sorted(_sort_key(r) for r in self._records.values())
        self._ordered = None
        for change in changes:
            for cb in tuple(self._subscribers):
                try:
                    cb(change)
                except Exception:  # a broken consumer must not break the sources
                    log.exception("inventory subscriber %r failed on %s %s",
                                  cb, change.kind, change.uuid)

    def _recompute(self, uuid: str, bulk: bool = False) -> Change | None:
        """One record from the sources; `bulk`: the caller sorts the name order."""
        old = self._records.get(uuid)
        run = self._running.get(uuid)
        cfg = self._defined.get(uuid)
        if cfg is None and run is None and uuid in self._stop_reasons:
            cfg = self._held.get(uuid)      # libvirt's own, of a domain it stopped on a failure
        if run is None and cfg is None:
            if old is None:
                return None
            del self._records[uuid]
            if not bulk:
                self._remove_key(_sort_key(old))
            self._counts[old.kind] -= 1
            self.generation += 1
            return Change("deleted", uuid, old, None)
        stop = self._stop_reasons.get(uuid) if run is None else None
        if old is not None and old.running == run and old.defined == cfg \
                and old.stop_reason == stop:
            return None
        new = DomainRecord(uuid=uuid, running=run, defined=cfg, version=next(_versions),
                           stop_reason=stop)
        self._records[uuid] = new
        self._counts[new.kind] += 1
        self.generation += 1
        if old is None:
            if not bulk:
                bisect.insort(self._keys, _sort_key(new))
            return Change("created", uuid, None, new)
        self._counts[old.kind] -= 1
        if old.name != new.name and not bulk:
            self._remove_key(_sort_key(old))
            bisect.insort(self._keys, _sort_key(new))
        return Change("modified", uuid, old, new)

    def _remove_key(self, key: tuple[str, str]) -> None:
        i = bisect.bisect_left(self._keys, key)
        if i < len(self._keys) and self._keys[i] == key:
            del self._keys[i]
        else:  # never expected; keep the order list honest rather than crash
            log.error("inventory order list lost key %r", key)
            self._keys = sorted(_sort_key(r) for r in self._records.values())
