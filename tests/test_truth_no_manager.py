"""Truthful state with no Manager on the bus (issue 12), on libvirt's test driver.

The server here is fed by libvirt alone (tests/support/lvserver.py, test:///default
shared with the test). The test driver crashes a domain on a core dump with
VIR_DUMP_CRASH: lifecycle STOPPED with detail CRASHED, state SHUT OFF with reason
CRASHED, as a killed QEMU gives (tests/test_qemu_truth_state.py has the real one).

- A running persistent domain says "definition held by libvirt; the Manager is not on
  the bus", a transient one "transient".
- A persistent domain libvirt stopped on a failure stays a system (Error, Major
  failure, libvirt's reason) although no Manager lists it, from the crash event and,
  after a restart of the provider, from the shut-off reason; its next start clears it.
- A persistent domain shut off on request is not offered: passive definitions are the
  Manager's (docs/architecture.md, "States").
"""
from __future__ import annotations

import asyncio
import os
import tempfile
import uuid as uuidlib

import libvirt
import pytest
import pywbem

try:
    from tests.support.lvserver import LibvirtServer
    from tests.support.model import (TEST_UUID, VSSD, cim_error, cs_path, iid_path,
                                     reset_test_default)
except ImportError:
    from support.lvserver import LibvirtServer  # type: ignore
    from support.model import (TEST_UUID, VSSD, cim_error, cs_path, iid_path,  # type: ignore
                               reset_test_default)

from cim_provider.domain.records import Kind
from cim_provider.inventory.inventory import Inventory
from cim_provider.sources.libvirt import LibvirtSource

HELD = "definition held by libvirt; the Manager is not on the bus"


def domain_xml(name: str, uuid: str) -> str:
    return (f"<domain type='test'><name>{name}</name><uuid>{uuid}</uuid>"
            "<memory unit='MiB'>64</memory><vcpu>1</vcpu>"
            "<os><type arch='x86_64'>hvm</type></os></domain>")


def crash(dom) -> None:
    """The test driver's crash: a core dump with VIR_DUMP_CRASH stops the domain."""
    fd, path = tempfile.mkstemp(prefix="cim-crash-")
    os.close(fd)
    try:
        dom.coreDump(path, libvirt.VIR_DUMP_CRASH)
    finally:
        os.unlink(path)


@pytest.fixture
def srv():
    server = LibvirtServer()
    try:
        yield server
    finally:
        server.close()


def state(cs) -> tuple:
    return cs["EnabledState"], list(cs["OperationalStatus"]), cs["HealthState"]


def test_running_persistent_says_held_by_libvirt_and_transient_says_transient(srv):
    wbem = srv.conn()
    cs = wbem.GetInstance(cs_path(TEST_UUID))
    assert state(cs) == (2, [2], 5)
    assert HELD in cs["Description"]
    assert "transient" not in cs["Description"]

    uuid = str(uuidlib.uuid4())
    dom = srv.libvirt.createXML(domain_xml("fleeting", uuid), 0)
    srv.wait(lambda: srv.inventory.get(uuid) is not None, what="the transient domain")
    cs = wbem.GetInstance(cs_path(uuid))
    assert "transient" in cs["Description"] and HELD not in cs["Description"]
    dom.destroy()


def test_a_crashed_persistent_domain_stays_visible_until_it_starts(srv):
    wbem = srv.conn()
    uuid = str(uuidlib.uuid4())
    dom = srv.libvirt.defineXML(domain_xml("crashy", uuid))
    dom.create()
    srv.wait(lambda: (r := srv.inventory.get(uuid)) is not None and r.running is not None,
             what="the domain running")
    kinds: list[str] = []
    srv.on_loop(lambda: srv.inventory.subscribe(
        lambda ch: kinds.append(ch.kind) if ch.uuid == uuid else None))

    crash(dom)
    assert dom.state()[:2] == [libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_CRASHED]
    rec = srv.wait(lambda: (r := srv.inventory.get(uuid)) is not None and r.running is None
                   and r, what="the crash seen")
    assert rec.stop_reason and "crashed" in rec.stop_reason
    assert rec.kind is Kind.PASSIVE_ONLY and rec.name == "crashy"
    assert "deleted" not in srv.on_loop(lambda: list(kinds))   # never vanished in between
    cs = wbem.GetInstance(cs_path(uuid))
    assert state(cs) == (3, [6], 20)
    assert cs["StatusDescriptions"] == [rec.stop_reason]
    assert cs["ElementName"] == "crashy"
    # The configuration shown is libvirt's persistent one.
    defined = wbem.GetInstance(iid_path(VSSD, f"VIRT:defined:{uuid}"))
    assert defined["ElementName"] == "crashy"

    dom.create()
    srv.wait(lambda: (r := srv.inventory.get(uuid)) is not None and r.running is not None,
             what="the domain running again")
    cs = wbem.GetInstance(cs_path(uuid))
    assert state(cs) == (2, [2], 5)
    assert not cs.get("StatusDescriptions")
    assert HELD in cs["Description"]

    # Stopped on request: no failure to show, and no Manager to offer the definition.
    dom.destroy()
    srv.wait(lambda: srv.inventory.get(uuid) is None, what="the domain gone")
    assert cim_error(lambda: wbem.GetInstance(cs_path(uuid))).status_code \
        == pywbem.CIM_ERR_NOT_FOUND
    dom.undefine()


def test_undefining_a_crashed_domain_removes_it(srv):
    uuid = str(uuidlib.uuid4())
    dom = srv.libvirt.defineXML(domain_xml("gone-after", uuid))
    dom.create()
    srv.wait(lambda: (r := srv.inventory.get(uuid)) is not None and r.running is not None,
             what="the domain running")
    crash(dom)
    srv.wait(lambda: (r := srv.inventory.get(uuid)) is not None and r.stop_reason,
             what="the crash seen")
    dom.undefine()
    srv.wait(lambda: srv.inventory.get(uuid) is None, what="the undefined domain gone")


def test_a_crash_before_the_provider_starts_is_read_at_connect():
    """The provider (re)starts after the crash: the shut-off reason and libvirt's
    definition keep the domain visible, with no event ever seen."""
    reset_test_default()

    async def body() -> None:
        from cim_provider.sources.libvirt import ensure_event_loop_impl
        ensure_event_loop_impl()
        conn = libvirt.open("test:///default")
        uuid = str(uuidlib.uuid4())
        dom = conn.defineXML(domain_xml("crashed-earlier", uuid))
        dom.create()
        crash(dom)
        plain = conn.defineXML(domain_xml("shut-off-plainly", str(uuidlib.uuid4())))
        inv = Inventory()
        src = LibvirtSource(conn=conn, on_snapshot=inv.set_running,
                            on_domain=inv.update_running, on_stop_reasons=inv.set_stop_reasons)
        await src.start()
        try:
            assert await src.wait_connected(10)
            rec = inv.get(uuid)
            assert rec is not None and rec.running is None
            assert rec.stop_reason and "shut off, crashed" in rec.stop_reason
            assert rec.defined is not None and rec.defined.name == "crashed-earlier"
            assert inv.get(plain.UUIDString()) is None       # not a failure: not offered
            # A Manager that lists it wins: its definition is the one shown.
            mine = rec.defined.__class__(uuid=uuid, name="from-the-manager")
            inv.set_defined({uuid: mine})
            assert inv.get(uuid).defined == mine and inv.get(uuid).stop_reason
            inv.set_defined(None)
            assert inv.get(uuid).defined.name == "crashed-earlier"
        finally:
            await src.stop()
            dom.undefine()
            plain.undefine()
            conn.close()

    asyncio.run(body())
