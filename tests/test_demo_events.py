"""The demo's Manager follows libvirt's domain events, as `cim-provider manager` does.

The demo gives the reference Manager a libvirt connection of its own (test:///default's
state is shared by every connection of the process), so it registers for lifecycle
events itself and re-reads libvirt only as a safety net (manager/service.py,
SAFETY_POLL), instead of every second. Proof by a positive signal: a domain defined
behind the Manager's back (on the server's connection) reaches the Manager through a
libvirt event, and its definition is then in the Manager's snapshot.
"""
from __future__ import annotations

import uuid as uuidlib

try:
    from tests.support.model import demo, poll_until  # noqa: F401 (demo: a fixture)
except ImportError:
    from support.model import demo, poll_until  # type: ignore  # noqa: F401


def domain_xml(name: str, uuid: str) -> str:
    return (f"<domain type='test'><name>{name}</name><uuid>{uuid}</uuid>"
            "<memory unit='MiB'>64</memory><vcpu>1</vcpu>"
            "<os><type arch='x86_64'>hvm</type></os></domain>")


def on_loop(demo, fn):
    async def call():
        return fn()
    return demo.lt.run(call())


def test_the_demo_manager_follows_events_and_polls_only_as_a_safety_net(demo):
    svc = demo.demo.manager.service
    assert on_loop(demo, lambda: svc._events_all) is True
    assert on_loop(demo, svc._poll_every) == svc.safety_poll > svc.poll_interval
    # Its own connection: the server's cannot take a second lifecycle callback.
    assert svc.libvirt.owned and svc.libvirt.get() is not demo.libvirt

    events: list[int] = []
    real = svc._want_sync

    def counted() -> None:          # what a libvirt event on its connection calls
        events.append(1)
        real()
    on_loop(demo, lambda: setattr(svc, "_want_sync", counted))
    uuid = str(uuidlib.uuid4())
    dom = None
    try:
        dom = demo.libvirt.defineXML(domain_xml("behind-its-back", uuid))
        poll_until(lambda: on_loop(demo, lambda: uuid in svc._snapshot and len(events)),
                   what="the definition seen through a libvirt event")
    finally:
        on_loop(demo, lambda: svc.__dict__.pop("_want_sync", None))
        if dom is not None:
            dom.undefine()
            # its event handled: no sync of this test's is left for the next one
            poll_until(lambda: on_loop(demo, lambda: uuid not in svc._snapshot),
                       what="the undefinition seen")


def test_rows_written_behind_its_back_are_seen_between_safety_polls(demo):
    """SQLite has no events: the store's version (its own commits, SQLite's data_version
    for other connections) is checked every poll_interval, so a row the demo seeds, or
    another process writes, is listed without waiting for the safety poll."""
    from cim_provider.domain.records import DomainConfig
    from cim_provider.manager.store import SqliteStore

    svc = demo.demo.manager.service
    sqlite = demo.demo.stores[0]
    safety = svc.safety_poll
    on_loop(demo, lambda: setattr(svc, "safety_poll", 10.0 ** 9))    # never, here
    other = SqliteStore(sqlite.path)               # another connection to the same file
    mine, theirs = str(uuidlib.uuid4()), str(uuidlib.uuid4())
    try:
        assert on_loop(demo, svc._poll_every) == 10.0 ** 9
        sqlite.define(DomainConfig(uuid=mine, name="seeded-later", type="Test"))
        poll_until(lambda: on_loop(demo, lambda: mine in svc._snapshot),
                   what="a row written through the store object")
        other.define(DomainConfig(uuid=theirs, name="written-elsewhere", type="Test"))
        poll_until(lambda: on_loop(demo, lambda: theirs in svc._snapshot),
                   what="a row written by another connection")
    finally:
        on_loop(demo, lambda: setattr(svc, "safety_poll", safety))
        for uuid in (mine, theirs):
            try:
                other.undefine(uuid)
            except Exception:
                pass
        other.close()
