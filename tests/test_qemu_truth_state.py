"""Truthful state on a real hypervisor (issue 12): QEMU (TCG, no guest OS, 64 MiB, no
disk) under the private, unprivileged libvirtd of tests/support/qemu.py, served by
the server fed by libvirt alone (tests/support/lvserver.py).

- QEMU killed with SIGKILL: libvirt reports the domain stopped (failed) and shut off
  (crashed); the system, which stays known (its definition is offered like the
  Manager's libvirt store offers it), shows EnabledState 3, OperationalStatus [6],
  HealthState 20 and the reason; a later start clears it.
- A running persistent domain without a Manager twin is "definition held by libvirt",
  not "transient".
- vCPU hot-plug (setVcpusFlags live, maximum 2) and `virsh autostart` raise no event
  the server relies on: they show after one usage sample.
"""
import os
import signal
import time

import libvirt
import pytest

try:
    from tests.support.model import CS, RASD, cs_path, iid_path, vssd_path
    from tests.support.qemu import (needs_qemu, qemu_pid, qemu_server, start_guest, tiny_xml, wait_running)
except ImportError:
    from support.model import CS, RASD, cs_path, iid_path, vssd_path  # type: ignore
    from support.qemu import (needs_qemu, qemu_pid, qemu_server, start_guest, tiny_xml, wait_running)  # type: ignore

from cim_provider.domain.domxml import parse_domain_xml

pytestmark = [pytest.mark.qemu, needs_qemu]
INACTIVE = 2          # VIR_DOMAIN_XML_INACTIVE


@pytest.fixture(scope="module")
def qemu():
    with qemu_server(metrics_interval=0) as pair:
        yield pair


def test_killed_qemu_shows_crashed_and_a_start_clears_it(qemu):
    _daemon, srv = qemu
    uuid, dom = start_guest(srv, "crash", tiny_xml("{uuid}", "{name}"))
    wbem = srv.conn()
    cs = wbem.GetInstance(cs_path(uuid))
    assert cs["EnabledState"] == 2
    assert "definition held by libvirt; the Manager is not on the bus" in cs["Description"]
    assert "transient" not in cs["Description"]
    # What the Manager's libvirt store would offer: the persistent definition.
    cfg = parse_domain_xml(dom.XMLDesc(INACTIVE), None)
    srv.on_loop(lambda: srv.inventory.set_defined({uuid: cfg}))

    os.kill(qemu_pid(uuid), signal.SIGKILL)
    rec = srv.wait(lambda: (r := srv.inventory.get(uuid)) is not None and r.running is None
                   and r.stop_reason and r, what="the crash seen", within=20)
    assert "libvirt: stopped, failed" in rec.stop_reason
    assert dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
    cs = wbem.GetInstance(cs_path(uuid))
    assert cs["EnabledState"] == 3
    assert list(cs["OperationalStatus"]) == [6]
    assert cs["HealthState"] == 20
    assert cs["StatusDescriptions"] == [rec.stop_reason]

    # A fresh server (a restart of the provider) learns it from the shut-off reason.
    again = srv.lt.run(_reasons_at_connect(srv.uri))
    assert "shut off, crashed" in again[uuid]

    dom.create()
    wait_running(srv, uuid)
    cs = wbem.GetInstance(cs_path(uuid))
    assert (cs["EnabledState"], list(cs["OperationalStatus"]), cs["HealthState"]) == (2, [2], 5)
    assert not cs.get("StatusDescriptions")
    dom.destroy()      # destroyed on request: no failure, nothing to show
    rec = srv.wait(lambda: (r := srv.inventory.get(uuid)) is not None and r.running is None
                   and r, what="the guest stopped")
    assert rec.stop_reason is None
    assert wbem.GetInstance(cs_path(uuid))["HealthState"] == 5
    dom.undefine()
    srv.on_loop(lambda: srv.inventory.set_defined({}))


async def _reasons_at_connect(uri):
    from cim_provider.sources.libvirt import LibvirtSource
    got = {}
    src = LibvirtSource(uri, on_stop_reasons=lambda reasons, _held: got.update(reasons))
    await src.start()
    try:
        assert await src.wait_connected(20)
        return dict(got)
    finally:
        await src.stop()


def test_vcpu_hotplug_and_autostart_show_within_one_sample(qemu):
    _daemon, srv = qemu
    uuid, dom = start_guest(srv, "vcpus", tiny_xml("{uuid}", "{name}",
                                                   "<vcpu current='1'>2</vcpu>"))
    wbem = srv.conn()
    proc = iid_path(RASD, f"VIRT:state:{uuid}/proc")
    rasd = wbem.GetInstance(proc)
    assert (rasd["VirtualQuantity"], rasd["Limit"]) == (1, 2)
    assert wbem.GetInstance(vssd_path("state", uuid))["AutomaticStartupAction"] == 2

    reads = srv.on_loop(lambda: srv.source.domain_reads)
    dom.setVcpusFlags(2, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    dom.setAutostart(1)
    deadline = time.monotonic() + 5
    while dom.vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_LIVE) != 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    srv.sample()
    srv.wait(lambda: srv.source.domain_reads > reads
             and srv.inventory.get(uuid).running.config.vcpus == 2
             and srv.inventory.get(uuid).running.config.autostart is True,
             what="the re-read after the sample", within=10)
    rasd = wbem.GetInstance(proc)
    assert (rasd["VirtualQuantity"], rasd["Limit"]) == (2, 2)
    assert wbem.GetInstance(vssd_path("state", uuid))["AutomaticStartupAction"] == 4
    names = {p["DeviceID"] for p in wbem.EnumerateInstanceNames("VIRT_Processor")
             if p["SystemName"] == uuid}
    assert len(names) == 2
    assert wbem.GetInstance(cs_path(uuid))["CreationClassName"] == CS
    dom.setAutostart(0)
    dom.destroy()
    dom.undefine()
