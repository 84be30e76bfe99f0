"""Shared set-ups for the CIM model acceptance tests (tests/test_model_*.py).

Nothing here is a mock: every set-up is the project's real server on loopback, fed by
the real libvirt test driver and a real Manager on a private dbus-daemon.

- `LoopThread`: an asyncio loop in a background thread (the server, the sources and
  an in-process Manager all live on it; the tests are ordinary synchronous clients).
- `DemoModel`: `cim_provider.demo.start_demo` (reference Manager with SQLite + libvirt
  stores sharing one test:///default with the server) on a free port.
- `MinimalModel`: one shared test:///default, a `RecordingManager` that offers only
  the contract's required methods (ListInactiveDomains, StartDomain), records every
  call and starts domains in the server's own libvirt, and the server.
- small client helpers: pywbem connections, paths, running `wbemcli` / `pywbemcli`.
"""
import asyncio
import os
import shutil
import subprocess
import threading
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pytest
import pywbem
from pywbem import CIMInstanceName

from cim_provider.contract import (BUS_NAME, ERROR_ALREADY_RUNNING, ERROR_NOT_FOUND,
                                   ERROR_REFUSED, INTERFACE, OBJECT_PATH, config_to_dbus)
from cim_provider.contract.bus import (DBusError, NameFlag, ServiceInterface, connect,
                                       method)
from cim_provider.domain.records import Disk, DomainConfig, Nic

try:
    from tests.support import reset_test_driver
    from tests.support.wbem_server import ROOT, env_without_proxy
except ImportError:  # tests/ itself on sys.path
    from support import reset_test_driver  # type: ignore
    from support.wbem_server import ROOT, env_without_proxy  # type: ignore

VIRT = "root/virt"
INTEROP = "interop"
HOST = "host.example.test"
CS = "VIRT_ComputerSystem"
VSSD = "VIRT_VirtualSystemSettingData"
RASD = "VIRT_ResourceAllocationSettingData"
SASD = "VIRT_StorageAllocationSettingData"
EPASD = "VIRT_EthernetPortAllocationSettingData"
VSMS = "VIRT_VirtualSystemManagementService"

# What the demo serves from the start (cim_provider/demo.py).
TEST_UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"       # "test": running + libvirt twin
GNOME_UUID = "1f0c2a53-5d3e-4b8e-9a55-6a2f3d7c0001"      # passive, fits the host
KDE_UUID = "1f0c2a53-5d3e-4b8e-9a55-6a2f3d7c0002"        # passive, refused by policy

WBEMCLI = shutil.which("wbemcli") or "/usr/bin/wbemcli"
PYWBEMCLI = str(ROOT / ".venv" / "bin" / "pywbemcli")


# ---------------------------------------------------------------- the loop thread

class LoopThread:
    """An asyncio loop running in a daemon thread; `run(coro)` waits for a result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="model-loop",
                                       daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


# ---------------------------------------------------------------- client helpers

def connect_wbem(url: str, namespace: str = VIRT, timeout: int = 30) -> pywbem.WBEMConnection:
    return pywbem.WBEMConnection(url, default_namespace=namespace, timeout=timeout,
                                 no_verification=True)


def cs_path(uuid: str, ccn: str = CS) -> CIMInstanceName:
    return CIMInstanceName(CS, {"CreationClassName": ccn, "Name": uuid}, namespace=VIRT)


def iid_path(classname: str, iid: str) -> CIMInstanceName:
    return CIMInstanceName(classname, {"InstanceID": iid}, namespace=VIRT)


def vssd_path(which: str, uuid: str) -> CIMInstanceName:
    return iid_path(VSSD, f"VIRT:{which}:{uuid}")


def host_path(host: str = HOST) -> CIMInstanceName:
    return CIMInstanceName("VIRT_HostSystem", {"CreationClassName": "VIRT_HostSystem",
                                               "Name": host}, namespace=VIRT)


def vsms_path(host: str = HOST) -> CIMInstanceName:
    return CIMInstanceName(VSMS, {"SystemCreationClassName": "VIRT_HostSystem",
                                  "SystemName": host, "CreationClassName": VSMS,
                                  "Name": "VirtualSystemManagementService"}, namespace=VIRT)


def profile_path(dsp: str) -> CIMInstanceName:
    return CIMInstanceName("VIRT_RegisteredProfile", {"InstanceID": f"VIRT:{dsp}"},
                           namespace=INTEROP)


def key(path: CIMInstanceName) -> tuple:
    """Identity of a path for comparisons: namespace, class, keys (host ignored)."""
    def norm(v):
        return key(v) if isinstance(v, CIMInstanceName) else str(v)
    return ((path.namespace or "").lower(), path.classname.lower(),
            tuple(sorted((k.lower(), norm(v)) for k, v in path.keybindings.items())))


def keys(paths) -> set:
    return {key(getattr(p, "path", None) or p) for p in paths}


def rsc(conn: pywbem.WBEMConnection, uuid: str, state: Optional[int]) -> int:
    """RequestStateChange; returns the return value as an int."""
    params = {} if state is None else {"RequestedState": pywbem.Uint16(state)}
    rv, _out = conn.InvokeMethod("RequestStateChange", cs_path(uuid), **params)
    return int(rv)


def cim_error(fn: Callable[[], Any]) -> pywbem.CIMError:
    """The CIMError `fn` raises; fails the test if it raises none."""
    try:
        fn()
    except pywbem.CIMError as exc:
        return exc
    raise AssertionError("expected a CIMError, the call succeeded")


def wbemcli(*args: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess:
    """sblim wbemcli; `check` asserts exit status 0 and nothing on stderr."""
    proc = subprocess.run([WBEMCLI, *args], capture_output=True, text=True, timeout=timeout,
                          env={k: v for k, v in os.environ.items() if "proxy" not in k.lower()})
    if check:
        assert proc.returncode == 0 and "*" not in proc.stderr, \
            f"wbemcli {' '.join(args)} failed: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def pywbemcli(url: str, home: Path, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([PYWBEMCLI, "-s", url, *args], capture_output=True, text=True,
                          timeout=timeout, env=env_without_proxy(home), cwd=str(home))


def wbem_url(url: str, namespace: str, classname: str, keys_text: str = "") -> str:
    """wbemcli object path: http://HOST:PORT/NAMESPACE:CLASS[.KEYS]."""
    return f"{url}/{namespace}:{classname}" + (f".{keys_text}" if keys_text else "")


def wbem_cs(url: str, uuid: str) -> str:
    return wbem_url(url, VIRT, CS, f'CreationClassName="{CS}",Name="{uuid}"')


def wbem_vsms(url: str, host: str = HOST) -> str:
    return wbem_url(url, VIRT, VSMS, f'SystemCreationClassName="VIRT_HostSystem",'
                    f'SystemName="{host}",CreationClassName="{VSMS}",'
                    f'Name="VirtualSystemManagementService"')


# ---------------------------------------------------------------- domains

def domain_config(name: str, *, uuid: Optional[str] = None, vcpus: int = 1,
                  memory_kib: int = 65536, disks=(), nics=(),
                  autostart: bool = False) -> DomainConfig:
    return DomainConfig(uuid=uuid or str(uuidlib.uuid4()), name=name, type="Test",
                        os_type="hvm", arch="x86_64", vcpus=vcpus, memory_kib=memory_kib,
                        max_memory_kib=memory_kib, autostart=autostart,
                        disks=tuple(disks), nics=tuple(nics))


def sample_config(name: str, **kw) -> DomainConfig:
    """A definition with one disk and one NIC (so SASD/EPASD exist)."""
    suffix = uuidlib.uuid4().hex[:6]
    mac = "52:54:00:" + ":".join(suffix[i:i + 2] for i in (0, 2, 4))
    return domain_config(name, disks=[Disk("vda", f"/var/lib/images/{name}.qcow2", "disk",
                                           "virtio", 2 * 1024 ** 3)],
                         nics=[Nic(mac, "network", "default", "virtio")], **kw)


# ---------------------------------------------------------------- test:///default

def reset_test_default() -> None:
    """test:///default back to its start (see tests.support.reset_test_driver)."""
    import libvirt
    conn = libvirt.open("test:///default")
    try:
        reset_test_driver(conn)
    finally:
        conn.close()


# ---------------------------------------------------------------- the demo

class DemoModel:
    """start_demo() on 127.0.0.1:<free port>, host name HOST, in a LoopThread."""

    def __init__(self) -> None:
        from cim_provider.demo import start_demo
        reset_test_default()
        self.lt = LoopThread()
        try:
            # The tests of this model read each state change's own answer (0, not
            # 4096 and a job): a generous --sync-wait, as tests/test_templates_cim.py
            # has, so that a busy CI machine does not turn a change into a job (a
            # shutdown answered 4096 after 2 s once in a full run). The jobs have
            # their own tests with a short one.
            self.demo = self.lt.run(start_demo([("127.0.0.1", 0)], host=HOST,
                                               sync_wait=60.0))
        except BaseException:
            self.lt.stop()
            raise
        self.port = self.demo.server.addresses[0][1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.bus = self.demo.bus.address
        self.libvirt = self.demo.conn                 # the shared test:///default

    @property
    def inventory(self):
        return self.demo.server.sources.inventory

    def conn(self, namespace: str = VIRT) -> pywbem.WBEMConnection:
        return connect_wbem(self.url, namespace)

    def close(self) -> None:
        try:
            reset_test_default()          # leave nothing behind for later modules
            self.lt.run(self.demo.close(), 30)
        finally:
            self.lt.stop()


# ---------------------------------------------------------------- a recording Manager

class RecordingManager(ServiceInterface):
    """org.example.virt.Manager with only the required methods. Definitions live in
    `entries` (uuid -> DomainConfig); StartDomain records its argument, applies
    `refuse` (uuid -> reason, answered with Error.Refused) and starts the definition
    as a transient domain on `conn` (the server's own libvirt), then lists it no more.
    """

    def __init__(self, conn, configs=()) -> None:
        super().__init__(INTERFACE)
        self.conn = conn
        self.entries: Dict[str, DomainConfig] = {c.uuid: c for c in configs}
        self.calls: List[tuple] = []
        self.refuse: Dict[str, str] = {}
        self.hang = 0.0               # StartDomain sleeps this long first (a stuck Manager)
        self.vanish = None            # a callable: StartDomain leaves the bus mid-call
        # A threading.Event: StartDomain waits until the test sets it (a Manager still at
        # work, for as long as the test needs), then goes on as usual.
        self.gate: Optional[threading.Event] = None

    @method()
    async def ListInactiveDomains(self) -> "aa{sv}":
        self.calls.append(("ListInactiveDomains",))
        return [config_to_dbus(c) for c in self.entries.values()]

    @method()
    async def StartDomain(self, uuid: "s") -> "s":
        self.calls.append(("StartDomain", uuid))
        if self.vanish is not None:
            self.vanish()
            raise DBusError(ERROR_NOT_FOUND, "gone")     # never reaches the caller
        if self.hang:
            await asyncio.sleep(self.hang)
        while self.gate is not None and not self.gate.is_set():
            await asyncio.sleep(0.01)
        if uuid in self.refuse:
            raise DBusError(ERROR_REFUSED, self.refuse[uuid])
        cfg = self.entries.get(uuid)
        if cfg is None:
            raise DBusError(ERROR_NOT_FOUND, f"no definition with UUID {uuid}")
        from cim_provider.domain.domxml import config_to_domain_xml
        loop = asyncio.get_running_loop()
        try:
            dom = await loop.run_in_executor(None, self.conn.createXML,
                                             config_to_domain_xml(cfg), 0)
        except Exception as exc:  # libvirt said no
            raise DBusError(ERROR_ALREADY_RUNNING, str(exc)) from None
        del self.entries[uuid]
        return dom.UUIDString()

    def starts(self) -> List[str]:
        return [c[1] for c in self.calls if c[0] == "StartDomain"]


class UndefiningManager(RecordingManager):
    """A RecordingManager that also offers UndefineDomain, recorded like the others:
    `refuse_undefine` (uuid -> reason) is answered with Error.Refused and changes
    nothing; any other known definition is forgotten."""

    def __init__(self, conn, configs=()) -> None:
        super().__init__(conn, configs)
        self.refuse_undefine: Dict[str, str] = {}

    @method()
    async def UndefineDomain(self, uuid: "s"):
        self.calls.append(("UndefineDomain", uuid))
        if uuid in self.refuse_undefine:
            raise DBusError(ERROR_REFUSED, self.refuse_undefine[uuid])
        if self.entries.pop(uuid, None) is None:
            raise DBusError(ERROR_NOT_FOUND, f"no definition with UUID {uuid}")


class MinimalModel:
    """A private bus, one shared test:///default, a RecordingManager (or the
    `manager_class` given, a subclass) and the server."""

    def __init__(self, configs=(), relist: float = 0.5, manager_timeout: float = 5.0,
                 manager_start_timeout: float = 60.0,
                 manager_class: type = RecordingManager,
                 manager_list_timeout: float = 60.0) -> None:
        from cim_provider.busdaemon import PrivateBus
        reset_test_default()
        self.lt = LoopThread()
        self.bus = PrivateBus()
        self.configs = list(configs)
        self.manager_class = manager_class
        self.relist = relist
        self.manager_timeout = manager_timeout
        self.manager_start_timeout = manager_start_timeout
        self.manager_list_timeout = manager_list_timeout
        self.manager: Optional[RecordingManager] = None
        self._mbus = None
        self.server = None
        try:
            self.lt.run(self._start())
        except BaseException:
            self.close()
            raise
        self.url = f"http://127.0.0.1:{self.server.addresses[0][1]}"

    async def _start(self) -> None:
        import libvirt

        from cim_provider.server.main import start_server, start_sources
        from cim_provider.sources.libvirt import ensure_event_loop_impl
        loop = asyncio.get_running_loop()
        ensure_event_loop_impl()
        self.libvirt = await loop.run_in_executor(None, libvirt.open, "test:///default")
        await self.start_manager(self.configs)
        sources = await start_sources(libvirt_conn=self.libvirt, manager_bus=self.bus.address,
                                      manager_timeout=self.manager_timeout,
                                      manager_start_timeout=self.manager_start_timeout,
                                      manager_list_timeout=self.manager_list_timeout,
                                      relist_interval=self.relist)
        self.server = await start_server([("127.0.0.1", 0)], sources=sources, host=HOST)

    async def start_manager(self, configs=()) -> RecordingManager:
        self._mbus = await connect(self.bus.address)
        self.manager = self.manager_class(self.libvirt, configs)
        self.manager.vanish_now = self._mbus.disconnect
        self._mbus.export(OBJECT_PATH, self.manager)
        await self._mbus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
        return self.manager

    async def stop_manager(self) -> None:
        if self._mbus is not None:
            self._mbus.disconnect()
            try:
                await self._mbus.wait_for_disconnect()
            except Exception:
                pass
            self._mbus = None

    @property
    def inventory(self):
        return self.server.sources.inventory

    @property
    def client(self):
        return self.server.sources.manager

    def conn(self, namespace: str = VIRT) -> pywbem.WBEMConnection:
        return connect_wbem(self.url, namespace)

    def wait(self, predicate: Callable[[], Any], within: float = 10.0, what: str = "condition") -> None:
        """Poll (on the loop, where the inventory lives) until `predicate()` holds."""
        async def poll():
            deadline = time.monotonic() + within
            while not predicate():
                if time.monotonic() > deadline:
                    raise AssertionError(f"{what} not reached within {within} s")
                await asyncio.sleep(0.02)
        self.lt.run(poll(), within + 5)

    def close(self) -> None:
        async def shutdown():
            if self.server is not None:
                await self.server.close()
            await self.stop_manager()
            if getattr(self, "libvirt", None) is not None:
                self.libvirt.close()
        try:
            reset_test_default()
            self.lt.run(shutdown(), 30)
        finally:
            self.lt.stop()
            self.bus.stop()


def poll_until(predicate: Callable[[], Any], within: float = 10.0, what: str = "condition",
               interval: float = 0.05) -> Any:
    """Poll from the test thread (e.g. a client read) until it returns something true."""
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {within} s")
        time.sleep(interval)


async def manager_get_domain(address: str, uuid: str) -> Optional[dict]:
    """The Manager's own GetDomain(uuid) over a separate bus connection, as plain
    values; None when it answers NotFound."""
    from cim_provider.contract.bus import Message, MessageType, plain
    bus = await connect(address)
    try:
        reply = await bus.call(Message(destination=BUS_NAME, path=OBJECT_PATH,
                                       interface=INTERFACE, member="GetDomain",
                                       signature="s", body=[uuid]))
        if reply.message_type == MessageType.ERROR:
            if reply.error_name == ERROR_NOT_FOUND:
                return None
            raise AssertionError(f"GetDomain failed: {reply.error_name} {reply.body}")
        return plain(reply.body[0])
    finally:
        bus.disconnect()


@pytest.fixture(scope="module")
def demo():
    """One in-process demo per test module (import this fixture into the module)."""
    d = DemoModel()
    yield d
    d.close()
