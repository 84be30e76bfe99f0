"""What changed among a Manager's definitions, and how the client applies it.

The Manager client keeps every definition a Manager lists (100,000 of them in a farm,
docs/architecture.md "Manager contract"); after the first listing it asks only what
changed (ListChangesSince). `Delta` is one such answer, parsed and validated;
`merge_delta` applies it to what the client holds, in place, in O(changed), and says
what really changed so that only that goes on to the inventory (`update_defined`).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from ..domain.records import DomainConfig


@dataclass(slots=True)
class Delta:
    """One ListChangesSince answer: the Manager's `generation` now, the usable entries
    that changed (`changed`; of those, the `active` ones and the farm `hosts` they are
    placed on) and the UUIDs gone (`removed`: removed, or changed into an entry that
    cannot be used)."""
    generation: int
    changed: dict[str, DomainConfig] = field(default_factory=dict)
    active: set[str] = field(default_factory=set)
    hosts: dict[str, str] = field(default_factory=dict)
    removed: set[str] = field(default_factory=set)


@dataclass(slots=True)
class Applied:
    """What `merge_delta` really changed: definitions new or different, UUIDs no
    longer defined, and whether the set of active UUIDs moved."""
    changed: dict[str, DomainConfig] = field(default_factory=dict)
    removed: set[str] = field(default_factory=set)
    active_moved: bool = False

    def __bool__(self) -> bool:
        return bool(self.changed or self.removed or self.active_moved)


def merge_delta(delta: Delta, defs: dict[str, DomainConfig], active: set[str],
                hosts: dict[str, str]) -> Applied:
    """Bring `defs`, `active` and `hosts` (changed in place) to what `delta` says; a
    UUID both removed and changed is changed. Reporting an unchanged entry is allowed
    by the contract (MANAGER.md, "Many definitions"): it is not passed on."""
    out = Applied()
    for uuid in delta.removed:
        if uuid in delta.changed:
            continue
        if defs.pop(uuid, None) is not None:
            out.removed.add(uuid)
        if uuid in active:
            active.discard(uuid)
            out.active_moved = True
        hosts.pop(uuid, None)
    for uuid, cfg in delta.changed.items():
        old = defs.get(uuid)
        if old is not cfg and old != cfg:
            defs[uuid] = cfg
            out.changed[uuid] = cfg
        if (uuid in delta.active) != (uuid in active):
            out.active_moved = True
            if uuid in delta.active:
                active.add(uuid)
            else:
                active.discard(uuid)
        host = delta.hosts.get(uuid)
        if host is None:
            hosts.pop(uuid, None)
        else:
            hosts[uuid] = sys.intern(host)
    return out
