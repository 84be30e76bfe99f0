"""Inventory.update_defined: the Manager's changes applied one by one (ListChangesSince,
docs/architecture.md "Sources"), with exactly the changes a full replace would make,
and nothing else touched."""
from __future__ import annotations

import random
from dataclasses import replace

import pytest

from cim_provider.domain.records import DomainConfig, Kind, RunningDomain, RunState
from cim_provider.inventory import Change, Inventory


def U(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}"


def cfg(n: int, name: str | None = None, **kw: object) -> DomainConfig:
    return DomainConfig(uuid=U(n), name=name or f"dom{n}", **kw)  # type: ignore[arg-type]


def run(n: int) -> RunningDomain:
    return RunningDomain(config=cfg(n, f"live{n}"), state=RunState.RUNNING, id=n)


def feed(inv: Inventory) -> list[Change]:
    changes: list[Change] = []
    inv.subscribe(changes.append)
    return changes


# Before: definitions 1..4 (passive), domain 3 also running (a twin), 9 running only.
# (description, changed, removed, expected changes as (kind, uuid), kinds after)
TESTCASES = [
    ("a new definition is created", {U(5): cfg(5)}, set(),
     [("created", U(5))], {U(5): Kind.PASSIVE_ONLY}),
    ("a changed definition is modified, the others are not touched",
     {U(2): cfg(2, vcpus=4)}, set(), [("modified", U(2))], {U(2): Kind.PASSIVE_ONLY}),
    ("a rename is modified and moves in the name order",
     {U(1): cfg(1, "zzz")}, set(), [("modified", U(1))], {U(1): Kind.PASSIVE_ONLY}),
    ("an equal definition (a new object) changes nothing",
     {U(2): cfg(2)}, set(), [], {U(2): Kind.PASSIVE_ONLY}),
    ("a removed passive definition is deleted", {}, {U(4)},
     [("deleted", U(4))], {U(4): None}),
    ("a removed twin leaves the running domain, without a definition",
     {}, {U(3)}, [("modified", U(3))], {U(3): Kind.RUNNING_ONLY}),
    ("a definition for a running-only domain makes a twin",
     {U(9): cfg(9)}, set(), [("modified", U(9))], {U(9): Kind.BOTH}),
    ("removing an unknown UUID changes nothing", {}, {U(77)}, [], {U(77): None}),
    ("a UUID both removed and changed is changed",
     {U(2): cfg(2, vcpus=8)}, {U(2)}, [("modified", U(2))], {U(2): Kind.PASSIVE_ONLY}),
    ("several at once, each once",
     {U(5): cfg(5), U(1): cfg(1, title="t")}, {U(2), U(4)},
     [("created", U(5)), ("deleted", U(2)), ("deleted", U(4)), ("modified", U(1))],
     {U(5): Kind.PASSIVE_ONLY, U(2): None, U(4): None}),
]


def _before() -> Inventory:
    inv = Inventory()
    inv.set_running({U(3): run(3), U(9): run(9)})
    inv.set_defined({U(n): cfg(n) for n in (1, 2, 3, 4)})
    return inv


@pytest.mark.parametrize("desc,changed,removed,expected,kinds", TESTCASES,
                         ids=[t[0] for t in TESTCASES])
def test_update_defined(desc, changed, removed, expected, kinds):
    inv = _before()
    before = {r.uuid: r for r in inv.records()}
    changes = feed(inv)
    inv.update_defined(changed, removed)
    assert sorted((c.kind, c.uuid) for c in changes) == sorted(expected), desc
    touched = {c.uuid for c in changes}
    for uuid, rec in before.items():     # everything else: the very same record
        if uuid not in touched:
            assert inv.get(uuid) is rec, (desc, uuid)
    for uuid, kind in kinds.items():
        rec = inv.get(uuid)
        assert (rec.kind if rec is not None else None) == kind, (desc, uuid)
    # the same result as a full replace with the definitions it now holds
    full = _before()
    full.set_defined(dict(inv.defined))
    assert [(r.uuid, r.name, r.running, r.defined) for r in inv.records()] == \
        [(r.uuid, r.name, r.running, r.defined) for r in full.records()]
    assert inv.counts() == full.counts()


@pytest.mark.parametrize("seed", range(5))
def test_random_updates_equal_full_replaces(seed):
    """Many small updates in a row among 500 definitions: the records, their order
    and the change feed are what set_defined of the whole set gives each time."""
    rng = random.Random(seed)
    inc, full = Inventory(), Inventory()
    for inv in (inc, full):
        inv.set_running({U(n): run(n) for n in range(0, 600, 7)})
    held = {U(n): cfg(n) for n in range(500)}
    inc.set_defined(held)
    full.set_defined(held)
    inc_changes, full_changes = feed(inc), feed(full)
    for _ in range(60):
        changed: dict[str, DomainConfig] = {}
        removed: set[str] = set()
        for _ in range(rng.randint(1, 12)):
            n = rng.randrange(600)
            if rng.random() < 0.3:
                removed.add(U(n))
            else:
                base = held.get(U(n), cfg(n))
                changed[U(n)] = replace(base, name=f"d{rng.randrange(50)}",
                                        vcpus=rng.choice([None, 1, 2]))
        held = {u: c for u, c in held.items() if u not in removed or u in changed}
        held.update(changed)
        inc.update_defined(changed, removed)
        full.set_defined(held)
        assert [(r.uuid, r.running, r.defined) for r in inc.records()] == \
            [(r.uuid, r.running, r.defined) for r in full.records()]
        assert sorted((c.kind, c.uuid) for c in inc_changes) == \
            sorted((c.kind, c.uuid) for c in full_changes)
        inc_changes.clear()
        full_changes.clear()
    assert inc.counts() == full.counts()


def test_a_full_replace_after_updates_sees_only_real_differences():
    """The re-list path (after a generation gap): set_defined with what the Manager
    lists now changes only the records that differ from what the updates left."""
    inv = _before()
    inv.update_defined({U(5): cfg(5)}, {U(1)})
    changes = feed(inv)
    inv.set_defined({U(n): cfg(n) for n in (2, 3, 5, 6)} | {U(4): cfg(4, vcpus=2)})
    assert sorted((c.kind, c.uuid) for c in changes) == [("created", U(6)),
                                                         ("modified", U(4))]
