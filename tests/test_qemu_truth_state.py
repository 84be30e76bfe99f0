"""Truthful state on a real hypervisor (issue 12): QEMU (TCG, no guest OS, 64 MiB, no
disk) under the private, unprivileged libvirtd of tests/test_hotplug_qemu.py, served by
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
import uuid as uuidlib

import libvirt
import pytest

try:
    from tests.support.lvserver import LibvirtServer
    from tests.support.model import CS, RASD, cs_path, iid_path, vssd_path
    from tests.test_hotplug_qemu import QEMU, QemuDaemon, pytestmark as _needs_qemu
except ImportError:
    from support.lvserver import LibvirtServer  # type: ignore
    from support.model import CS, RASD, cs_path, iid_path, vssd_path  # type: ignore
    from test_hotplug_qemu import QEMU, QemuDaemon, pytestmark as _needs_qemu  # type: ignore

from cim_provider.domain.domxml import parse_domain_xml

pytestmark = [pytest.mark.qemu, _needs_qemu]
INACTIVE = 2          # VIR_DOMAIN_XML_INACTIVE


def tiny_xml(uuid: str, name: str, vcpus: str = "<vcpu>1</vcpu>") -> str:
    """A guest with nothing to boot: it sits in the firmware, ignoring ACPI."""
    return (f"<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid>"
            f"<memory unit='MiB'>64</memory>{vcpus}"
            "<os><type arch='x86_64' machine='pc'>hvm</type></os>"
            f"<devices><emulator>{QEMU}</emulator><memballoon model='none'/></devices>"
            "</domain>")


@pytest.fixture(scope="module")
def qemu():
    daemon = QemuDaemon()
    try:
        daemon.start()
    except Exception as exc:       # a host where unprivileged qemu cannot run
        daemon.stop()
        pytest.skip(f"no private qemu libvirtd here: {exc}")
    srv = None
    try:
        srv = LibvirtServer(daemon.uri, metrics_interval=0)
        yield daemon, srv
    finally:
        if srv is not None:
            try:
                for d in srv.libvirt.listAllDomains():
                    if d.isActive():
                        d.destroy()
                    if d.isPersistent():
                        d.undefine()
            except Exception:
                pass
            srv.close()
        daemon.stop()


def qemu_pid(uuid: str) -> int:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if args and b"qemu-system" in args[0] and uuid.encode() in args:
            return int(entry)
    raise AssertionError(f"no qemu process for {uuid}")


def start(srv, xml: str, uuid: str):
    dom = srv.libvirt.defineXML(xml)
    dom.create()
    wait_running(srv, uuid)
    return dom


def wait_running(srv, uuid: str) -> None:
    srv.wait(lambda: (r := srv.inventory.get(uuid)) is not None and r.running is not None
             and r.running.state.name == "RUNNING", what="the qemu guest running")


def test_killed_qemu_shows_crashed_and_a_start_clears_it(qemu):
    _daemon, srv = qemu
    uuid = str(uuidlib.uuid4())
    dom = start(srv, tiny_xml(uuid, "crash"), uuid)
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
    src = LibvirtSource(uri, on_stop_reasons=got.update)
    await src.start()
    try:
        assert await src.wait_connected(20)
        return dict(got)
    finally:
        await src.stop()


def test_vcpu_hotplug_and_autostart_show_within_one_sample(qemu):
    _daemon, srv = qemu
    uuid = str(uuidlib.uuid4())
    dom = start(srv, tiny_xml(uuid, "vcpus", "<vcpu current='1'>2</vcpu>"), uuid)
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
