"""Acceptance (issue 4), end to end with separate processes and a real C++ client:

- a private dbus-daemon (tests/support/dbus_daemon.py),
- a real libvirtd serving the test driver (tests/support/libvirtd.py),
- `cim-provider manager --bus ADDRESS --store sqlite:DB --store libvirt:URI
  --libvirt-uri URI`, its SQLite store seeded with two passive definitions,
- `cim-provider serve --listen 127.0.0.1:PORT --libvirt-uri URI --manager-bus ADDRESS`,
- sblim `wbemcli` as the client: ein / ei / gi / ai / ain, and cm RequestStateChange to
  start a passive domain through the Manager and see it running, pause and resume it,
  and read a refusal.
"""
import asyncio
import re
import subprocess
import time

import libvirt
import pytest

try:
    from tests.support import manager_command, stop_process, wait_for_owner
    from tests.support.dbus_daemon import DBusDaemon, subprocess_env
    from tests.support.libvirtd import Libvirtd
    from tests.support.model import (CS, TEST_UUID, VIRT, domain_config, poll_until,
                                      sample_config, wbem_cs, wbem_url, wbemcli)
    from tests.support.wbem_server import CIM_PROVIDER, ROOT, free_port, wait_accepting
except ImportError:
    from support import manager_command, stop_process, wait_for_owner  # type: ignore
    from support.dbus_daemon import DBusDaemon, subprocess_env  # type: ignore
    from support.libvirtd import Libvirtd  # type: ignore
    from support.model import (CS, TEST_UUID, VIRT, domain_config, poll_until,  # type: ignore
                               sample_config, wbem_cs, wbem_url, wbemcli)
    from support.wbem_server import CIM_PROVIDER, ROOT, free_port, wait_accepting  # type: ignore

from cim_provider.manager.store import SqliteStore

pytestmark = pytest.mark.dbus

PASSIVE = sample_config("e2e-passive", memory_kib=65536, vcpus=2)
HUGE = domain_config("e2e-huge", memory_kib=64 * 1024 ** 2)


class Stack:
    """Every process of the end-to-end set-up; `stop()` ends them in reverse order."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.procs = []
        self.logs = {}
        self.bus = DBusDaemon()
        self.libvirtd = Libvirtd()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _spawn(self, name, argv):
        log = open(self.workdir / f"{name}.log", "wb")
        self.logs[name] = self.workdir / f"{name}.log"
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT),
                                env=subprocess_env(self.bus.address))
        log.close()
        self.procs.append(proc)
        return proc

    def _start(self):
        self.libvirtd.start()
        self.uri = self.libvirtd.uri
        db = self.workdir / "definitions.db"
        store = SqliteStore(db)
        store.define(PASSIVE)
        store.define(HUGE)
        store.close()
        self.manager = self._spawn("manager", manager_command(
            "--bus", self.bus.address, "--store", f"sqlite:{db}",
            "--store", f"libvirt:{self.uri}", "--libvirt-uri", self.uri,
            "--poll-interval", "0.5"))
        asyncio.run(wait_for_owner(self.bus.address, within=30))
        self.port = free_port()
        self.server = self._spawn("serve", [
            str(CIM_PROVIDER), "serve", "--listen", f"127.0.0.1:{self.port}",
            "--libvirt-uri", self.uri, "--manager-bus", self.bus.address])
        wait_accepting(self.port, time.monotonic() + 30, self.server)
        self.url = f"http://127.0.0.1:{self.port}"

    def log(self, name):
        return self.logs[name].read_text(errors="replace")

    def stop(self):
        for proc in reversed(self.procs):
            stop_process(proc)
        self.libvirtd.cleanup()
        self.bus.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("e2e"))
    yield s
    s.stop()


def ein(stack):
    out = wbemcli("ein", wbem_url(stack.url, VIRT, CS)).stdout
    return set(re.findall(r',Name="([0-9a-f-]{36})"', out))


def gi(stack, uuid):
    """wbemcli -nl gi: {property: raw value text}."""
    out = wbemcli("-nl", "gi", wbem_cs(stack.url, uuid)).stdout
    return dict(line[1:].split("=", 1) for line in out.splitlines() if line.startswith("-"))


def test_systems_through_wbemcli(stack):
    # the Manager's passive definitions and libvirtd's running "test"
    poll_until(lambda: {PASSIVE.uuid, HUGE.uuid, TEST_UUID} <= ein(stack), within=30,
               what="all three systems listed by wbemcli ein")
    lines = wbemcli("ei", wbem_url(stack.url, VIRT, CS)).stdout.strip().splitlines()
    passive = next(line for line in lines if f'Name="{PASSIVE.uuid}"' in line)
    assert 'ElementName="e2e-passive"' in passive and "EnabledState=3" in passive
    props = gi(stack, TEST_UUID)
    assert (props["ElementName"], props["EnabledState"], props["RequestedState"]) == \
        ('"test"', "2", "12")
    # the passive definition has a defined VSSD, and no state VSSD
    out = wbemcli("ain", "-ac", "VIRT_SettingsDefineState", wbem_cs(stack.url, PASSIVE.uuid)).stdout
    assert f'InstanceID="VIRT:defined:{PASSIVE.uuid}"' in out
    out = wbemcli("ai", "-ac", "VIRT_VirtualSystemSettingDataComponent",
                  wbem_url(stack.url, VIRT, "VIRT_VirtualSystemSettingData",
                           f'InstanceID="VIRT:defined:{PASSIVE.uuid}"')).stdout
    assert 'AllocationUnits="byte*2^10"' in out and "VirtualQuantity=65536" in out
    assert 'HostResource="/var/lib/images/e2e-passive.qcow2"' in out


def test_associators_from_host(stack):
    hosts = wbemcli("ein", wbem_url(stack.url, VIRT, "VIRT_HostSystem")).stdout.strip().splitlines()
    assert len(hosts) == 1
    host = "http://" + hosts[0]
    out = wbemcli("ain", "-ac", "VIRT_HostedDependency", host).stdout
    assert set(re.findall(r',Name="([0-9a-f-]{36})"', out)) == ein(stack)
    out = wbemcli("ai", "-ac", "VIRT_HostedDependency", host).stdout
    assert 'ElementName="e2e-passive"' in out and 'ElementName="test"' in out


def test_start_passive_through_the_manager(stack):
    path = wbem_cs(stack.url, PASSIVE.uuid)
    out = wbemcli("cm", path, "RequestStateChange.RequestedState=2").stdout
    assert "RequestStateChange: 0" in out, out
    props = gi(stack, PASSIVE.uuid)
    assert (props["EnabledState"], props["RequestedState"]) == ("2", "2")
    # the Manager (another process) is what started it, in libvirtd
    assert f"started e2e-passive ({PASSIVE.uuid})" in stack.log("manager")
    conn = libvirt.open(stack.uri)
    try:
        dom = conn.lookupByUUIDString(PASSIVE.uuid)
        assert dom.isActive()
    finally:
        conn.close()
    # it runs now, with its definition as passive twin: a state and a defined VSSD
    out = wbemcli("ain", "-arc", "VIRT_VirtualSystemSettingData", path).stdout
    assert f"VIRT:state:{PASSIVE.uuid}" in out and f"VIRT:defined:{PASSIVE.uuid}" in out
    # pause and resume through libvirt
    for requested, enabled in (("9", "9"), ("2", "2")):
        out = wbemcli("cm", path, f"RequestStateChange.RequestedState={requested}").stdout
        assert "RequestStateChange: 0" in out, out
        props = gi(stack, PASSIVE.uuid)
        assert (props["EnabledState"], props["RequestedState"]) == (enabled, requested)
    # starting it again makes no sense now
    out = wbemcli("cm", path, "RequestStateChange.RequestedState=2").stdout
    assert "RequestStateChange: 4097" in out, out


def test_refusal_through_wbemcli(stack):
    proc = wbemcli("cm", wbem_cs(stack.url, HUGE.uuid), "RequestStateChange.RequestedState=2",
                   check=False)
    assert "CIM_ERR_FAILED" in proc.stderr, proc.stderr
    assert "starting e2e-huge needs 64.0 GiB" in proc.stderr
    assert gi(stack, HUGE.uuid)["EnabledState"] == "3"


def test_invalid_parameter_through_wbemcli(stack):
    proc = wbemcli("cm", wbem_cs(stack.url, TEST_UUID), "RequestStateChange.RequestedState=12",
                   check=False)
    assert "CIM_ERR_INVALID_PARAMETER" in proc.stderr, proc.stderr
    proc = wbemcli("gi", wbem_cs(stack.url, "not-a-uuid"), check=False)
    assert "CIM_ERR_NOT_FOUND" in proc.stderr, proc.stderr
