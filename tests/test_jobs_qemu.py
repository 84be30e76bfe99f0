"""Issue 12: stopping jobs on a real hypervisor (QEMU with TCG and no guest OS, under
the private libvirtd of tests/support/qemu.py; the server's libvirt calls may take
20 s, so a call held up in libvirt stays a call).

- A shutdown the guest ignores (nothing answers ACPI) is a job waiting for the guest:
  Terminate stops following it (0, JobState 8) and RequestedState goes back to the
  last successful request; the guest is left running, as it is.
- A suspend held up in libvirt (QEMU stopped with SIGSTOP, so its monitor does not
  answer) is inside a libvirt call under which libvirt runs no job of its own to
  abort (virDomainGetJobInfo: NONE): Kill answers 1 Not Supported and the job goes on
  to its real outcome once QEMU runs again.
- A suspend waiting behind libvirt's own job on the domain (a live core dump into a
  FIFO nobody reads yet; the guest's 4 MiB BIOS is random, so the dump cannot finish
  into the pipe's buffers): Kill aborts libvirt's job (virDomainAbortJob) and answers
  0; the job ends Killed, and the dump fails "canceled by client".
- The same abort while every thread of the server's libvirt connection waits behind
  that job: it has a connection of its own, so it gets through.
"""
import asyncio
import contextlib
import os
import signal
import threading
import uuid as uuidlib

import libvirt
import pytest
from pywbem import Uint16

from cim_provider.sources.libvirt_threads import POOL_SIZE

try:
    from tests.support.model import cs_path, poll_until
    from tests.support.qemu import (QEMU, needs_qemu, qemu_pid, qemu_server, start_guest, wait_running)
except ImportError:
    from support.model import cs_path, poll_until  # type: ignore
    from support.qemu import (QEMU, needs_qemu, qemu_pid, qemu_server, start_guest, wait_running)  # type: ignore

pytestmark = [pytest.mark.qemu, needs_qemu]


@pytest.fixture(scope="module")
def qemu():
    with qemu_server(metrics_interval=0, call_timeout=20.0) as (daemon, srv):
        systems = srv.server.dispatcher.registry.provider("root/virt", "VIRT_ComputerSystem")
        systems.jobs.sync_wait = 0.0          # every change answers 4096
        yield daemon, srv


def request(wbem, path, state):
    rv, out = wbem.InvokeMethod("RequestStateChange", path, RequestedState=Uint16(state))
    return int(rv), out


def ended(wbem, path):
    return poll_until(lambda: (j := wbem.GetInstance(path))["JobState"] != 4 and j, 30,
                      "the job ended")


def test_terminate_a_shutdown_the_guest_ignores(qemu):
    _daemon, srv = qemu
    uuid, dom = start_guest(srv, "stop-shutdown")
    wbem = srv.conn()
    rv, out = request(wbem, cs_path(uuid), 9)          # a successful request first
    assert rv == 4096 and ended(wbem, out["Job"])["JobState"] == 7
    rv, out = request(wbem, cs_path(uuid), 2)
    assert rv == 4096 and ended(wbem, out["Job"])["JobState"] == 7
    assert wbem.GetInstance(cs_path(uuid))["RequestedState"] == 2

    rv, out = request(wbem, cs_path(uuid), 4)
    assert rv == 4096
    job = out["Job"]
    poll_until(lambda: wbem.GetInstance(job)["JobStatus"] ==
               "waiting for the system to show the change", 20, "waiting for the guest")
    assert wbem.GetInstance(cs_path(uuid))["RequestedState"] == 4
    assert request(wbem, job, 4)[0] == 0
    inst = wbem.GetInstance(job)
    assert (inst["JobState"], inst["JobStatus"]) == (8, "terminated")
    cs = wbem.GetInstance(cs_path(uuid))
    assert (cs["EnabledState"], cs["RequestedState"]) == (2, 2)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert request(wbem, job, 5)[0] == 4097


def test_kill_a_call_held_up_in_libvirt_is_not_supported(qemu):
    _daemon, srv = qemu
    uuid, dom = start_guest(srv, "stop-held")
    wbem = srv.conn()
    pid = qemu_pid(uuid)
    os.kill(pid, signal.SIGSTOP)
    try:
        rv, out = request(wbem, cs_path(uuid), 9)
        assert rv == 4096
        job = out["Job"]
        assert wbem.GetInstance(job)["JobStatus"] == "waiting for libvirt"
        assert request(wbem, job, 5)[0] == 1
        assert request(wbem, job, 4)[0] == 1
        assert wbem.GetInstance(job)["JobState"] == 4
    finally:
        os.kill(pid, signal.SIGCONT)
    done = ended(wbem, job)
    assert done["JobState"] == 7, done.get("ErrorDescription")
    assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED


def halting_guest(daemon, srv, name):
    """A guest whose BIOS is 4 MiB of random bytes, ending in `cli; hlt` at the reset
    vector: it runs, halted, and a dump of it is megabytes that do not compress."""
    os.chmod(daemon.images, 0o777)
    bios = daemon.images / f"{name}.bin"
    data = bytearray(os.urandom(4 << 20))
    data[-16:] = bytes([0xFA, 0xF4, 0xEB, 0xFD]) + bytes(12)
    bios.write_bytes(bytes(data))
    os.chmod(bios, 0o644)
    uuid = str(uuidlib.uuid4())
    dom = srv.libvirt.defineXML(
        f"<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid>"
        "<memory unit='MiB'>64</memory><vcpu>1</vcpu>"
        f"<os><type arch='x86_64' machine='pc'>hvm</type><loader type='rom'>{bios}</loader>"
        f"</os><devices><emulator>{QEMU}</emulator><memballoon model='none'/></devices>"
        "</domain>")
    dom.create()
    wait_running(srv, uuid)
    return uuid, dom


@contextlib.contextmanager
def dump_under_way(daemon, srv, name):
    """libvirt's own job on a halting guest: a live core dump, made on a connection of
    its own, into a FIFO nobody reads yet. Yields (uuid, dom, outcome) once libvirt
    shows the job; afterwards the FIFO is drained (outcome["drained"]: bytes) and the
    dump's end is in outcome["dump"]."""
    uuid, dom = halting_guest(daemon, srv, name)
    fifo = daemon.images / f"{name}.fifo"
    os.mkfifo(fifo)
    os.chmod(fifo, 0o666)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)    # there, but not reading yet
    other = libvirt.open(daemon.uri)                        # someone else's dump
    outcome = {"drained": 0}

    def dump():
        try:
            other.lookupByUUIDString(uuid).coreDumpWithFormat(str(fifo), 0,
                                                               libvirt.VIR_DUMP_LIVE)
            outcome["dump"] = "done"
        except libvirt.libvirtError as exc:
            outcome["dump"] = str(exc)
    dumper = threading.Thread(target=dump, daemon=True)
    dumper.start()
    try:
        poll_until(lambda: dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE, 20,
                   "libvirt's dump job running")
        yield uuid, dom, outcome
    finally:
        os.set_blocking(reader, True)
        while chunk := os.read(reader, 1 << 20):
            outcome["drained"] += len(chunk)
        os.close(reader)
        dumper.join(60)
        other.close()


def test_kill_aborts_the_libvirt_job_a_call_waits_behind(qemu):
    daemon, srv = qemu
    wbem = srv.conn()
    with dump_under_way(daemon, srv, "stop-dump") as (uuid, _dom, outcome):
        rv, out = request(wbem, cs_path(uuid), 9)
        assert rv == 4096
        job = out["Job"]
        assert wbem.GetInstance(job)["JobStatus"] == "waiting for libvirt"
        assert request(wbem, job, 5)[0] == 0
        inst = wbem.GetInstance(job)
        assert (inst["JobState"], inst["JobStatus"]) == (9, "killed")
        assert wbem.GetInstance(cs_path(uuid))["RequestedState"] == 12
        assert request(wbem, job, 5)[0] == 4097
    assert "canceled by client" in outcome["dump"], outcome
    assert outcome["drained"] < 4 << 20          # cut short: the BIOS alone is 4 MiB


def test_an_abort_gets_through_while_every_call_thread_waits(qemu):
    """As many suspends as the shared connection has threads, all waiting behind
    libvirt's dump job: the abort does not queue behind them (it has a connection of
    its own) and stops the dump; then the suspends go through."""
    daemon, srv = qemu
    src = srv.source

    async def hold(uuid):
        return [asyncio.ensure_future(src.suspend(uuid)) for _ in range(POOL_SIZE)]

    async def settle(tasks):
        return await asyncio.gather(*tasks, return_exceptions=True)

    with dump_under_way(daemon, srv, "stop-pool") as (uuid, dom, outcome):
        held = srv.lt.run(hold(uuid))
        assert srv.lt.run(src.abort_job(uuid), timeout=30) is True
    assert "canceled by client" in outcome["dump"], outcome
    assert srv.lt.run(settle(held), timeout=60) == [None] * POOL_SIZE
    assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
