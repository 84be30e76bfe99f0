"""Helpers shared by tests: a private dbus-daemon, a minimal Manager, small async tools."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


def run(coro: Awaitable[T], timeout: float = 60.0) -> T:
    """Run one test scenario on a fresh event loop, never longer than `timeout`."""
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


async def eventually(predicate: Callable[[], Any], within: float = 1.0,
                     what: str = "condition") -> None:
    """Poll `predicate` until true; fail if it is still false after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not reached within {within} s")
        await asyncio.sleep(0.01)


def manager_command(*args: str) -> list[str]:
    """`cim-provider manager ARGS` from this venv, as a separate process."""
    import shutil
    import sys
    from pathlib import Path
    exe = Path(sys.executable).parent / "cim-provider"
    if exe.exists():
        return [str(exe), "manager", *args]
    found = shutil.which("cim-provider")
    if found:
        return [found, "manager", *args]
    return [sys.executable, "-m", "cim_provider.cli", "manager", *args]


async def wait_for_owner(address: str, name: str = "org.example.virt",
                         within: float = 20.0, present: bool = True) -> None:
    """Ask the bus daemon itself (not the code under test) until `name` is (un)owned."""
    from cim_provider.contract.bus import DBUS_INTERFACE, DBUS_NAME, DBUS_PATH, Message
    from cim_provider.contract.bus import MessageType, connect
    bus = await connect(address)
    try:
        deadline = time.monotonic() + within
        while True:
            reply = await bus.call(Message(destination=DBUS_NAME, path=DBUS_PATH,
                                           interface=DBUS_INTERFACE, member="NameHasOwner",
                                           signature="s", body=[name]))
            if reply.message_type == MessageType.METHOD_RETURN and reply.body[0] == present:
                return
            if time.monotonic() >= deadline:
                raise AssertionError(f"{name} {'never appeared' if present else 'stayed'}")
            await asyncio.sleep(0.02)
    finally:
        bus.disconnect()


TEST_DOMAIN_UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"   # "test" in test:///default


def reset_test_driver(conn) -> None:
    """Put test:///default back as libvirt creates it: only "test", running.

    Its state is shared by every connection of this process while one is open, so a
    test's leftovers (and the demo's transient domain) would show up in later tests.
    Domains that vanish while we walk the list are simply gone already.
    """
    import libvirt
    for dom in conn.listAllDomains():
        try:
            if dom.UUIDString() == TEST_DOMAIN_UUID:
                if not dom.isActive():
                    dom.create()
                elif dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                    dom.resume()
                continue
            persistent = dom.isPersistent()
            if dom.isActive():
                dom.destroy()
            if persistent:
                dom.undefine()
        except libvirt.libvirtError:
            pass


def stop_process(proc) -> None:
    """Terminate a child we started; kill it if it does not go within 10 s."""
    import subprocess
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
