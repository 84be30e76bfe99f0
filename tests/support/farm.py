"""A farm of "hosts" on one machine, every part real and its own process.

Each `FarmHost` has its own private libvirtd (test driver over its socket, so the
Manager and `cim-provider serve` of that host see the same libvirt and no other), its
own private dbus-daemon, its own `cim-provider manager --store postgresql:...` and its
own `cim-provider serve`. All hosts share one PostgreSQL (tests/support/postgres.py).
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any

import pywbem

from cim_provider.busdaemon import PrivateBus

from . import manager_command, stop_process
from .libvirtd import Libvirtd
from .postgres import Postgres
from .wbem_server import free_port, wait_accepting

CS = "VIRT_ComputerSystem"
VSMS = "VIRT_VirtualSystemManagementService"
VIRT = "root/virt"


class FarmHost:
    """One host: libvirtd, bus, Manager, server. `start()` / `stop()` each part."""

    def __init__(self, name: str, pg: Postgres, workdir: Path, *, lease: float = 30.0,
                 serve: bool = True, manager_args: tuple[str, ...] = ()) -> None:
        self.name = name
        self.pg = pg
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lease = lease
        self.manager_args = manager_args
        self.libvirtd = Libvirtd()
        self.libvirtd.start()
        # The test driver forgets its domains when its last connection closes (a real
        # hypervisor does not): this one stays open while the host lives.
        self.keeper = self.libvirt()
        self.bus = PrivateBus()
        self.manager: subprocess.Popen[bytes] | None = None
        self.server: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.start_manager()
        if serve:
            self.start_server()

    # ------------------------------------------------------------ processes

    @property
    def libvirt_uri(self) -> str:
        return self.libvirtd.uri

    def env(self) -> dict[str, str]:
        env = self.pg.env(self.bus.env())
        env.pop("LIBVIRT_DEFAULT_URI", None)
        return env

    def start_manager(self, store: str | None = None) -> None:
        store = store or f"postgresql:{self.pg.conninfo}"
        log = open(self.dir / "manager.log", "ab")
        self.manager = subprocess.Popen(
            manager_command("--manager-bus", self.bus.address, "--store", store,
                            "--libvirt-uri", self.libvirt_uri, "--host-id", f"id-{self.name}",
                            "--host-name", self.name, "--lease", str(self.lease),
                            "--poll-interval", "0.5", "--log-level", "INFO",
                            *self.manager_args),
            env=self.env(), stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def kill_manager(self) -> None:
        """kill -9: no lease given back, no placement released."""
        if self.manager is not None and self.manager.poll() is None:
            self.manager.send_signal(signal.SIGKILL)
            self.manager.wait(10)
        self.manager = None

    def start_server(self) -> None:
        self.port = free_port()
        log = open(self.dir / "serve.log", "ab")
        self.server = subprocess.Popen(
            [manager_command()[0], "serve", "--listen", f"127.0.0.1:{self.port}",
             "--state-dir", str(self.dir / "state"), "--libvirt-uri", self.libvirt_uri,
             "--manager-bus", self.bus.address, "--manager-relist", "0.5",
             "--log-level", "INFO"],
            env=self.env(), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_accepting(self.port, time.monotonic() + 60, self.server)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def conn(self, timeout: int = 60) -> pywbem.WBEMConnection:
        return pywbem.WBEMConnection(self.url, default_namespace=VIRT, timeout=timeout,
                                     no_verification=True)

    def log_text(self, which: str = "manager") -> str:
        try:
            return (self.dir / f"{which}.log").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        for proc in (self.server, self.manager):
            stop_process(proc)
        self.server = self.manager = None
        self.bus.stop()
        try:
            self.keeper.close()
        except Exception:
            pass
        self.libvirtd.cleanup()

    # ------------------------------------------------------------ libvirt and CIM

    def libvirt(self) -> Any:
        import libvirt
        return libvirt.open(self.libvirt_uri)

    def running(self) -> set[str]:
        import libvirt
        conn = self.libvirt()
        try:
            return {d.UUIDString() for d in
                    conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)}
        finally:
            conn.close()

    def destroy(self, uuid: str) -> None:
        conn = self.libvirt()
        try:
            conn.lookupByUUIDString(uuid).destroy()
        finally:
            conn.close()

    def systems(self, conn: pywbem.WBEMConnection | None = None) -> dict[str, int]:
        """UUID -> EnabledState of every VIRT_ComputerSystem this host's server shows."""
        c = conn or self.conn()
        try:
            return {i["Name"]: int(i["EnabledState"]) for i in
                    c.EnumerateInstances(CS, PropertyList=["Name", "EnabledState"])}
        finally:
            if conn is None:
                c.close()

    def vsms_path(self, conn: pywbem.WBEMConnection) -> pywbem.CIMInstanceName:
        return conn.EnumerateInstanceNames(VSMS)[0]


def cs_path(uuid: str) -> pywbem.CIMInstanceName:
    return pywbem.CIMInstanceName(CS, {"CreationClassName": CS, "Name": uuid}, namespace=VIRT)


def define_through_cim(conn: pywbem.WBEMConnection, host: FarmHost, name: str,
                       memory_kib: int = 16384) -> str:
    """DefineSystem on `host`'s server; returns the new system's UUID."""
    from pywbem import CIMInstance, Uint16, Uint64
    vssd = CIMInstance("VIRT_VirtualSystemSettingData",
                       properties={"ElementName": name, "VirtualSystemType": "Test"})
    mem = CIMInstance("VIRT_ResourceAllocationSettingData",
                      properties={"ResourceType": Uint16(4), "VirtualQuantity": Uint64(memory_kib),
                                  "AllocationUnits": "byte*2^10"})
    rv, out = conn.InvokeMethod("DefineSystem", host.vsms_path(conn), SystemSettings=vssd,
                                ResourceSettings=[mem])
    assert int(rv) == 0, rv
    return str(out["ResultingSystem"]["Name"])


def wait_until(predicate: Any, within: float, what: str, step: float = 0.02) -> Any:
    deadline = time.monotonic() + within
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not reached within {within} s")
        time.sleep(step)


def new_uuid() -> str:
    return str(uuidlib.uuid4())


def seed_sql(n: int, prefix: str, memory_kib: int = 16384) -> str:
    """SQL that defines `n` definitions straight in the database (one statement)."""
    return ("INSERT INTO definitions (uuid, name, config) SELECT u, "
            f"'{prefix}-' || i, jsonb_build_object('Type', 'Test', 'OSType', 'hvm', "
            f"'VCPUs', 1, 'MemoryKiB', {memory_kib}, 'MaxMemoryKiB', {memory_kib}) "
            f"FROM (SELECT gen_random_uuid() AS u, i FROM generate_series(1, {n}) i) s")


def pg_env_note() -> str:
    return os.environ.get("PGPASSFILE", "")


def dbus_call(address: str, member: str, signature: str = "", body: list | None = None,
              timeout: float = 30.0) -> list:
    """One call of the Manager on `address`; a D-Bus error is raised as DBusCallError."""
    import asyncio

    from cim_provider.contract import BUS_NAME, INTERFACE, OBJECT_PATH
    from cim_provider.contract.bus import Message, MessageType, connect

    async def go() -> list:
        bus = await connect(address)
        try:
            reply = await asyncio.wait_for(bus.call(Message(
                destination=BUS_NAME, path=OBJECT_PATH, interface=INTERFACE, member=member,
                signature=signature, body=body or [])), timeout)
        finally:
            bus.disconnect()
        if reply.message_type == MessageType.ERROR:
            raise DBusCallError(reply.error_name or "", reply.body[0] if reply.body else "")
        return list(reply.body)
    return asyncio.run(go())


class DBusCallError(Exception):
    def __init__(self, name: str, text: str) -> None:
        super().__init__(f"{name}: {text}")
        self.name = name
        self.text = text


def listed(address: str) -> dict[str, dict]:
    """The Manager's ListDomains as {uuid: plain dict}."""
    from cim_provider.contract.bus import plain
    return {e["UUID"]: e for e in (plain(x) for x in dbus_call(address, "ListDomains")[0])}
