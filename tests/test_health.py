"""Honest health (issue 11): VIRT_HostSystem and the management service say when a
source is away, and subscribers hear of each change.

All real and separate processes: a private libvirtd (test driver over its socket), a
private dbus-daemon, the reference Manager, `cim-provider serve`; pywbem as the client
and pywbem's WBEMListener as the console. libvirtd is killed and restarted, then the
Manager; each transition must show through pywbem within 5 s and arrive at the
listener as a CIM_InstModification of the host and of the service.
"""
from __future__ import annotations

import subprocess
import time

import pytest

try:
    from tests.support import manager_command, run, stop_process, wait_for_owner
    from tests.support.indications import Console, Listener, quiet_pywbem_logs
    from tests.support.libvirtd import Libvirtd
    from tests.support.model import connect_wbem, poll_until
    from tests.support.wbem_server import free_port, wait_accepting
except ImportError:
    from support import manager_command, run, stop_process, wait_for_owner  # type: ignore
    from support.indications import Console, Listener, quiet_pywbem_logs  # type: ignore
    from support.libvirtd import Libvirtd  # type: ignore
    from support.model import connect_wbem, poll_until  # type: ignore
    from support.wbem_server import free_port, wait_accepting  # type: ignore

pytestmark = pytest.mark.dbus

SEEN = 5.0      # seconds within which pywbem must see a transition
HEALTH_QUERY = ("SELECT * FROM CIM_InstModification WHERE SourceInstance ISA "
                "VIRT_HostSystem OR SourceInstance ISA VIRT_VirtualSystemManagementService")


def health(conn):
    out = []
    for cls in ("VIRT_HostSystem", "VIRT_VirtualSystemManagementService"):
        inst = conn.EnumerateInstances(cls)[0]
        out.append((list(inst["OperationalStatus"]), int(inst["HealthState"]),
                    list(inst.get("StatusDescriptions") or [])))
    return out


def all_ok(conn):
    return all(s == [2] and h == 5 and not d for s, h, d in health(conn))


def states(conn):
    return {(tuple(s), h) for s, h, _d in health(conn)}


@pytest.fixture
def farm(tmp_path):
    """libvirtd + bus + Manager + serve, each its own process."""
    from cim_provider.busdaemon import PrivateBus
    quiet_pywbem_logs()
    lvd = Libvirtd()
    lvd.start()
    bus = PrivateBus()
    procs = {}

    def start_manager():
        procs["manager"] = subprocess.Popen(
            manager_command("--manager-bus", bus.address, "--store",
                            f"sqlite:{tmp_path / 'm.db'}", "--libvirt-uri", lvd.uri),
            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "manager.log", "ab"))
        run(wait_for_owner(bus.address))

    start_manager()
    port = free_port()
    procs["serve"] = subprocess.Popen(
        [str(manager_command()[0]), "serve", "--listen", f"127.0.0.1:{port}",
         "--state-dir", str(tmp_path / "state"), "--libvirt-uri", lvd.uri,
         "--manager-bus", bus.address],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "serve.log", "wb"))
    wait_accepting(port, time.monotonic() + 60, procs["serve"])

    class Farm:
        url = f"http://127.0.0.1:{port}"
        libvirtd = lvd
        log = tmp_path / "serve.log"

        @staticmethod
        def kill_manager():
            procs["manager"].kill()
            procs["manager"].wait()

        restart_manager = staticmethod(start_manager)

    try:
        yield Farm
    finally:
        for p in (procs.get("serve"), procs.get("manager")):
            stop_process(p)
        bus.stop()
        lvd.stop()
        lvd.cleanup()


def test_each_source_away_and_back_is_seen_and_announced(farm):
    conn = connect_wbem(farm.url)
    poll_until(lambda: all_ok(conn), within=SEEN, what="healthy at start")
    listener = Listener()
    console = Console(farm.url)
    try:
        console.subscribe(listener.url, query=HEALTH_QUERY, namespaces=("root/virt",))

        def announced(pred, what):
            """Both the host and the service announced a change matching `pred`."""
            def got():
                seen = {r.indication["SourceInstance"].classname
                        for r in listener.received if pred(r.indication["SourceInstance"])}
                return seen >= {"VIRT_HostSystem", "VIRT_VirtualSystemManagementService"}
            poll_until(got, within=SEEN, what=what)
            listener.take()

        # libvirt away: Error, with the URI and the time it went away
        t = time.monotonic()
        farm.libvirtd.proc.kill()
        farm.libvirtd.proc.wait()
        poll_until(lambda: states(conn) == {((6,), 20)}, within=SEEN, what="Error seen")
        print(f"\n[health] libvirtd killed -> Error seen by pywbem in "
              f"{time.monotonic() - t:.2f} s")
        desc = health(conn)[0][2]
        assert len(desc) == 1 and desc[0].startswith(
            f"libvirt {farm.libvirtd.uri} unreachable since "), desc
        announced(lambda si: list(si["OperationalStatus"]) == [6], "Error announced")

        # libvirt back: OK again
        t = time.monotonic()
        farm.libvirtd.start()
        poll_until(lambda: all_ok(conn), within=SEEN + 10, what="OK after libvirtd restart")
        print(f"[health] libvirtd restarted -> OK seen in {time.monotonic() - t:.2f} s")
        announced(lambda si: list(si["OperationalStatus"]) == [2], "recovery announced")

        # the Manager away: Degraded, passive domains not listed
        t = time.monotonic()
        farm.kill_manager()
        poll_until(lambda: states(conn) == {((3,), 10)}, within=SEEN, what="Degraded seen")
        print(f"[health] Manager killed -> Degraded seen in {time.monotonic() - t:.2f} s")
        desc = health(conn)[1][2]
        assert len(desc) == 1 and "no org.example.virt.Manager on" in desc[0] \
            and "passive domains are not listed" in desc[0], desc
        announced(lambda si: list(si["OperationalStatus"]) == [3], "Degraded announced")

        # the Manager back
        t = time.monotonic()
        farm.restart_manager()
        poll_until(lambda: all_ok(conn), within=SEEN, what="OK after the Manager restart")
        print(f"[health] Manager restarted -> OK seen in {time.monotonic() - t:.2f} s")
        announced(lambda si: list(si["OperationalStatus"]) == [2], "recovery announced")
    finally:
        console.close()
        listener.stop()
        conn.close()
    log = farm.log.read_text()
    assert "WARNING" in log and "unreachable since" in log
    assert "libvirt is back" in log and "Manager is back" in log


def test_a_lasting_failure_is_logged_once_then_reminded(tmp_path, caplog):
    """WARNING at the first failure, one reminder per `reminder` seconds, INFO when back:
    a real libvirt source pointed at a socket nobody serves, then at a real daemon."""
    import asyncio
    import logging
    from types import SimpleNamespace

    from cim_provider.server.health_watch import HealthWatcher
    from cim_provider.sources.libvirt import LibvirtSource

    async def scenario():
        with Libvirtd() as lvd:
            src = LibvirtSource(lvd.uri.replace(str(lvd.socket), str(tmp_path / "none")),
                                call_timeout=2.0)
            await src.start()
            watcher = HealthWatcher(SimpleNamespace(libvirt=src, manager=None),  # type: ignore
                                    None, None, None, reminder=0.2)  # type: ignore
            try:
                with caplog.at_level(logging.INFO, logger="cim_provider.server.health_watch"):
                    for _ in range(5):              # five checks within 0.2 s: one line
                        watcher.check_logs()
                    mine = lambda: [r for r in caplog.records  # noqa: E731
                                    if r.name == "cim_provider.server.health_watch"]
                    first = [r for r in mine() if r.levelno == logging.WARNING]
                    assert len(first) == 1 and "unreachable since" in first[0].getMessage()
                    await asyncio.sleep(0.25)
                    watcher.check_logs()
                    warnings = [r for r in mine() if r.levelno == logging.WARNING]
                    assert len(warnings) == 2 and warnings[1].getMessage().startswith("still: ")
                    src.uri = lvd.uri               # the daemon is there after all
                    assert await src.wait_connected(20)
                    watcher.check_logs()
                    assert any(r.levelno == logging.INFO and "libvirt is back" in r.getMessage()
                               for r in mine())
            finally:
                await src.stop()
    run(scenario())
