"""The merge rules, the Inventory's change feed, and its behaviour at scale."""
from __future__ import annotations

import random
import time
from dataclasses import replace

import pytest

from cim_provider.domain.records import (Disk, DomainConfig, DomainRecord, Kind, Nic,
                                         RunningDomain, RunState)
from cim_provider.inventory import Change, Inventory, merge


def U(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}"


def cfg(n: int, name: str | None = None, **kw: object) -> DomainConfig:
    return DomainConfig(uuid=U(n), name=name or f"dom{n}", **kw)  # type: ignore[arg-type]


def run(n: int, state: RunState = RunState.RUNNING, name: str | None = None,
        **kw: object) -> RunningDomain:
    return RunningDomain(config=cfg(n, name, **kw), state=state, id=n)


def by_uuid(*items: DomainConfig | RunningDomain) -> dict:
    return {i.uuid: i for i in items}


# expected: uuid -> (kind, name, running state or None, defined name or None)
TESTCASES = [
    ("nothing anywhere", {}, {}, {}),
    ("one running domain without a twin is running-only",
     by_uuid(run(1)), {},
     {U(1): (Kind.RUNNING_ONLY, "dom1", RunState.RUNNING, None)}),
    ("one definition that is not running is passive-only",
     {}, by_uuid(cfg(2)),
     {U(2): (Kind.PASSIVE_ONLY, "dom2", None, "dom2")}),
    ("same UUID in both sources is one record of kind both",
     by_uuid(run(3)), by_uuid(cfg(3)),
     {U(3): (Kind.BOTH, "dom3", RunState.RUNNING, "dom3")}),
    ("running wins for the name, the definition is kept as the defined config",
     by_uuid(run(4, name="live-name")), by_uuid(cfg(4, name="defined-name")),
     {U(4): (Kind.BOTH, "live-name", RunState.RUNNING, "defined-name")}),
    ("a paused twin keeps its libvirt state",
     by_uuid(run(5, RunState.PAUSED)), by_uuid(cfg(5)),
     {U(5): (Kind.BOTH, "dom5", RunState.PAUSED, "dom5")}),
    ("equal names but different UUIDs are two systems",
     by_uuid(run(6, name="same")), by_uuid(cfg(7, name="same")),
     {U(6): (Kind.RUNNING_ONLY, "same", RunState.RUNNING, None),
      U(7): (Kind.PASSIVE_ONLY, "same", None, "same")}),
    ("a crashed domain without a twin is still running-only",
     by_uuid(run(8, RunState.CRASHED)), {},
     {U(8): (Kind.RUNNING_ONLY, "dom8", RunState.CRASHED, None)}),
    ("all three kinds at once",
     by_uuid(run(1), run(3)), by_uuid(cfg(2), cfg(3)),
     {U(1): (Kind.RUNNING_ONLY, "dom1", RunState.RUNNING, None),
      U(2): (Kind.PASSIVE_ONLY, "dom2", None, "dom2"),
      U(3): (Kind.BOTH, "dom3", RunState.RUNNING, "dom3")}),
]


@pytest.mark.parametrize("desc,running,defined,expected", TESTCASES,
                         ids=[t[0] for t in TESTCASES])
def test_merge(desc, running, defined, expected):
    merged = merge(running, defined)
    got = {u: (r.kind, r.name, r.running.state if r.running else None,
               r.defined.name if r.defined else None) for u, r in merged.items()}
    assert got == expected
    for u, rec in merged.items():
        assert rec.uuid == u
        assert rec.running is running.get(u)
        assert rec.defined is defined.get(u)
        # the configuration in force: live when running, else the definition
        assert rec.current is (running[u].config if u in running else defined[u])


@pytest.mark.parametrize("desc,running,defined,expected", TESTCASES,
                         ids=[t[0] for t in TESTCASES])
def test_inventory_agrees_with_merge(desc, running, defined, expected):
    inv = Inventory()
    inv.set_defined(defined)
    inv.set_running(running)
    assert {r.uuid: r for r in inv.records()} == merge(running, defined)
    counts = {k: 0 for k in Kind}
    for kind, *_ in expected.values():
        counts[kind] += 1
    assert inv.counts() == counts


def feed(inv: Inventory) -> list[Change]:
    changes: list[Change] = []
    inv.subscribe(changes.append)
    return changes


def test_snapshot_creates_then_diffs_only_real_changes():
    inv = Inventory()
    changes = feed(inv)
    inv.set_running(by_uuid(run(1), run(2)))
    assert sorted((c.kind, c.uuid) for c in changes) == [("created", U(1)), ("created", U(2))]
    assert all(c.old is None and c.new is inv.get(c.uuid) for c in changes)
    gen = inv.generation
    changes.clear()

    inv.set_running(by_uuid(run(1), run(2)))      # equal values, new objects
    assert changes == [] and inv.generation == gen

    inv.set_running(by_uuid(run(1), run(2, RunState.PAUSED), run(3)))
    assert sorted((c.kind, c.uuid) for c in changes) == [("created", U(3)), ("modified", U(2))]
    mod = next(c for c in changes if c.kind == "modified")
    assert mod.old.running.state is RunState.RUNNING and mod.new.running.state is RunState.PAUSED
    assert inv.generation > gen
    changes.clear()

    inv.set_running(by_uuid(run(3)))
    assert sorted((c.kind, c.uuid) for c in changes) == [("deleted", U(1)), ("deleted", U(2))]
    assert all(c.new is None and c.old is not None for c in changes)
    assert inv.get(U(1)) is None and len(inv) == 1


def test_events_and_definitions_move_records_between_kinds():
    inv = Inventory()
    changes = feed(inv)
    inv.set_defined(by_uuid(cfg(1), cfg(2)))
    assert inv.counts()[Kind.PASSIVE_ONLY] == 2 and len(changes) == 2
    changes.clear()

    inv.update_running(U(1), run(1))                       # a passive domain starts
    assert [(c.kind, c.old.kind, c.new.kind) for c in changes] == \
        [("modified", Kind.PASSIVE_ONLY, Kind.BOTH)]
    changes.clear()

    inv.update_running(U(1), run(1))                       # the same again: nothing
    inv.update_running(U(9), None)                         # stop of an unknown domain
    assert changes == []

    inv.update_running(U(5), run(5))                       # a transient one appears
    assert [(c.kind, c.new.kind) for c in changes] == [("created", Kind.RUNNING_ONLY)]
    changes.clear()

    inv.set_defined(None)                                  # the Manager goes away
    kinds = sorted((c.kind, c.uuid) for c in changes)
    assert kinds == [("deleted", U(2)), ("modified", U(1))]
    assert inv.get(U(1)).kind is Kind.RUNNING_ONLY
    changes.clear()

    inv.update_running(U(1), None)                         # its only source is gone now
    assert [(c.kind, c.uuid) for c in changes] == [("deleted", U(1))]
    assert inv.counts() == {Kind.RUNNING_ONLY: 1, Kind.PASSIVE_ONLY: 0, Kind.BOTH: 0}


def test_stopping_a_twin_leaves_the_passive_record():
    inv = Inventory()
    inv.set_defined(by_uuid(cfg(1)))
    inv.set_running(by_uuid(run(1)))
    changes = feed(inv)
    inv.update_running(U(1), None)
    assert [(c.kind, c.new.kind) for c in changes] == [("modified", Kind.PASSIVE_ONLY)]
    assert inv.get(U(1)).running is None and inv.get(U(1)).defined == cfg(1)


def test_versions_change_exactly_when_the_record_changes():
    inv = Inventory()
    inv.set_running(by_uuid(run(1), run(2)))
    v1, v2 = inv.get(U(1)).version, inv.get(U(2)).version
    assert v1 != v2 and v1 > 0
    inv.set_running(by_uuid(run(1), run(2)))
    assert (inv.get(U(1)).version, inv.get(U(2)).version) == (v1, v2)
    inv.update_running(U(1), run(1, RunState.PAUSED))
    assert inv.get(U(1)).version not in (v1, v2) and inv.get(U(2)).version == v2
    # (uuid, version) never repeats, even in another Inventory
    other = Inventory()
    other.set_running(by_uuid(run(1)))
    assert other.get(U(1)).version not in (v1, inv.get(U(1)).version)


def test_records_are_ordered_and_cached_until_a_change():
    inv = Inventory()
    inv.set_running(by_uuid(run(3, name="b"), run(1, name="c"), run(2, name="b")))
    inv.set_defined(by_uuid(cfg(4, name="a")))
    recs = inv.records()
    assert [(r.name, r.uuid) for r in recs] == [("a", U(4)), ("b", U(2)), ("b", U(3)),
                                                ("c", U(1))]
    assert inv.records() is recs                           # cached
    inv.set_defined(by_uuid(cfg(4, name="a")))             # no real change
    assert inv.records() is recs
    inv.update_running(U(1), run(1, name="0-renamed"))     # a rename moves it
    recs2 = inv.records()
    assert recs2 is not recs
    assert [r.name for r in recs2] == ["0-renamed", "a", "b", "b"]
    inv.update_running(U(2), None)
    assert [r.uuid for r in inv.records()] == [U(1), U(4), U(3)]


def test_one_event_touches_one_record():
    inv = Inventory()
    inv.set_running({U(n): run(n) for n in range(50)})
    inv.set_defined({U(n): cfg(n) for n in range(25, 75)})
    before = {r.uuid: r for r in inv.records()}
    inv.update_running(U(30), run(30, RunState.PAUSED))
    after = {r.uuid: r for r in inv.records()}
    changed = [u for u in after if after[u] is not before[u]]
    assert changed == [U(30)]


def test_subscribers_see_the_applied_state_and_can_leave():
    inv = Inventory()
    seen: list[tuple[str, DomainRecord | None]] = []
    unsubscribe = inv.subscribe(lambda c: seen.append((c.uuid, inv.get(c.uuid))))

    def broken(_c: Change) -> None:
        raise RuntimeError("consumer bug")

    inv.subscribe(broken)
    late: list[Change] = []
    inv.subscribe(late.append)
    inv.set_running(by_uuid(run(1), run(2)))
    assert sorted(u for u, _ in seen) == [U(1), U(2)]
    assert all(rec is not None and rec is inv.get(u) for u, rec in seen)
    assert len(late) == 2                                  # the broken one stopped no one
    unsubscribe()
    unsubscribe()                                          # twice is harmless
    inv.update_running(U(1), None)
    assert len(seen) == 2 and len(late) == 3


def random_running(rng: random.Random, n: int) -> RunningDomain:
    return run(n, rng.choice(list(RunState)), name=rng.choice(["x", "y", f"d{n}"]),
               vcpus=rng.choice([1, 2]),
               disks=(Disk(target="vda", source=f"/img/{n}"),) if rng.random() < 0.5 else (),
               nics=(Nic(mac="52:54:00:00:00:01"),) if rng.random() < 0.3 else ())


def random_defined(rng: random.Random, n: int) -> DomainConfig:
    return cfg(n, name=rng.choice(["x", "z", f"d{n}"]), memory_kib=rng.choice([1024, 2048]))


@pytest.mark.parametrize("seed", range(5))
def test_incremental_updates_equal_a_full_merge(seed):
    """Any sequence of snapshots, events and Manager lists ends where merge() says,
    and replaying the change feed reproduces the records (what consumers rely on)."""
    rng = random.Random(seed)
    inv = Inventory()
    mirror: dict[str, DomainRecord] = {}

    def replay(c: Change) -> None:
        assert (c.uuid in mirror) == (c.kind != "created")
        assert c.old == mirror.get(c.uuid)
        if c.new is None:
            del mirror[c.uuid]
        else:
            mirror[c.uuid] = c.new

    inv.subscribe(replay)
    running: dict[str, RunningDomain] = {}
    defined: dict[str, DomainConfig] | None = None
    for _ in range(300):
        op = rng.random()
        n = rng.randrange(30)
        if op < 0.6:
            dom = random_running(rng, n) if rng.random() < 0.6 else None
            if dom is None:
                running.pop(U(n), None)
            else:
                running[U(n)] = dom
            inv.update_running(U(n), dom)
        elif op < 0.75:
            running = {U(k): random_running(rng, k) for k in rng.sample(range(30), 10)}
            inv.set_running(running)
        else:
            defined = None if rng.random() < 0.2 else \
                {U(k): random_defined(rng, k) for k in rng.sample(range(30), 12)}
            inv.set_defined(defined)
        expected = merge(running, defined or {})
        assert {r.uuid: r for r in inv.records()} == expected
        assert mirror == expected
        assert all(inv.get(u) == r for u, r in expected.items())
        counts = {k: 0 for k in Kind}
        for r in expected.values():
            counts[r.kind] += 1
        assert inv.counts() == counts
        assert [r.uuid for r in inv.records()] == \
            [r.uuid for r in sorted(expected.values(), key=lambda r: (r.name, r.uuid))]


def test_merge_at_scale(capsys):
    """1,000 running + 1,000 passive, 500 of them twins: 500/500/500 of each kind."""
    running = {U(n): run(n, disks=(Disk(target="vda", source=f"/img/{n}.qcow2"),),
                         nics=(Nic(mac=f"52:54:00:00:{n // 256:02x}:{n % 256:02x}"),))
               for n in range(1000)}
    defined = {U(n): cfg(n, memory_kib=1048576, vcpus=2) for n in range(500, 1500)}

    t0 = time.perf_counter()
    inv = Inventory()
    inv.set_defined(defined)
    inv.set_running(running)
    recs = inv.records()
    cold = time.perf_counter() - t0

    assert len(recs) == 1500
    assert inv.counts() == {Kind.RUNNING_ONLY: 500, Kind.BOTH: 500, Kind.PASSIVE_ONLY: 500}
    assert sum(1 for r in recs if r.kind is Kind.BOTH) == 500
    assert merge(running, defined) == {r.uuid: r for r in recs}

    changes = feed(inv)
    paused = replace(running[U(700)], state=RunState.PAUSED)
    t0 = time.perf_counter()
    inv.update_running(U(700), paused)
    one_event = time.perf_counter() - t0
    t0 = time.perf_counter()
    recs2 = inv.records()
    first_read = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(10_000):
        inv.records()
    cached_read = (time.perf_counter() - t0) / 10_000

    assert [c.kind for c in changes] == ["modified"]
    assert inv.get(U(700)).running.state is RunState.PAUSED and inv.get(U(700)).kind is Kind.BOTH
    assert recs2 is not recs and inv.records() is recs2

    t0 = time.perf_counter()
    inv.set_running(running | {U(700): paused})       # a full re-snapshot, nothing new
    resnapshot = time.perf_counter() - t0
    assert len(changes) == 1

    with capsys.disabled():
        print(f"\n[inventory scale] 1000 running + 1000 passive (500 twins): "
              f"cold build {cold * 1e3:.1f} ms; one event {one_event * 1e6:.0f} us; "
              f"first records() after it {first_read * 1e6:.0f} us; cached records() "
              f"{cached_read * 1e9:.0f} ns; unchanged re-snapshot {resnapshot * 1e3:.1f} ms")
