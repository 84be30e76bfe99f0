"""`cim-provider demo`: everything on one machine, nothing outside a temporary folder.

A private dbus-daemon; libvirt's `test:///default`, whose state is one per process
and seen alike by every connection to it: the WBEM server has one connection, the
reference Manager its own, so each follows libvirt's domain events itself (libvirt-python
takes one callback per event and connection) and the Manager polls only as a safety net,
as `cim-provider manager` does; the Manager with two stores, SQLite seeded with passive
domains and libvirt's own persistent domains; one transient domain; the server on
127.0.0.1:5988. So all three kinds of system are there from the first request:
"test" (running, with its libvirt definition as passive twin), "transient-demo"
(running, no twin), "gnome-test" and "kde-dev" (passive only; kde-dev is too large
for the host, so the Manager's policy refuses to start it). `cim-provider demo` also
ships two templates (TEMPLATES, in the demo's folder) and three passive domains
rendered from them ("app-1", "app-2", "desk-alice"), so templates are there too.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shutil
import signal
import tempfile
import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .domain.records import Disk, DomainConfig, Nic

if TYPE_CHECKING:
    import libvirt

    from .busdaemon import PrivateBus
    from .manager.policy import PolicyOptions
    from .manager.service import ManagerHandle
    from .manager.store import LibvirtConnection, Store
    from .server.main import ServerHandle, Sources
    from .wbem.repository import Repository

log = logging.getLogger(__name__)

SEED = [
    DomainConfig(uuid="1f0c2a53-5d3e-4b8e-9a55-6a2f3d7c0001", name="gnome-test",
                 title="GNOME test machine", type="Test", os_type="hvm", arch="x86_64",
                 vcpus=2, memory_kib=524288, max_memory_kib=524288, autostart=False,
                 disks=(Disk("vda", "/var/lib/images/gnome-test.qcow2", "disk", "virtio",
                             10 * 1024 ** 3),),
                 nics=(Nic("52:54:00:6a:10:01", "network", "default", "virtio"),)),
    DomainConfig(uuid="1f0c2a53-5d3e-4b8e-9a55-6a2f3d7c0002", name="kde-dev",
                 title="KDE development machine (too large for this host)", type="Test",
                 os_type="hvm", arch="x86_64", vcpus=8, memory_kib=64 * 1024 ** 2,
                 max_memory_kib=64 * 1024 ** 2, autostart=False,
                 disks=(Disk("vda", "/var/lib/images/kde-dev.qcow2", "disk", "virtio",
                             40 * 1024 ** 3),),
                 nics=(Nic("52:54:00:6a:10:02", "network", "default", "virtio"),)),
]
# The demo's templates (`cim-provider manager --templates DIR` reads such files).
TEMPLATES = {
    "small-server": """{#
A small server: one virtio disk named after the domain, one NIC on a libvirt network.
@var vcpus: int[1..64] = 1 -- virtual CPUs
@var memory_kib: int[16384..] = 262144 -- memory in KiB
@var images: string = /var/lib/images -- directory of the disk image (NAME.qcow2)
@var network: string = default -- libvirt network of its NIC
#}
<domain type='{{ hypervisor }}'>
  <name>{{ name }}</name>
  <uuid>{{ uuid }}</uuid>
  <title>Small server {{ name }}</title>
  <memory unit='KiB'>{{ memory_kib }}</memory>
  <currentMemory unit='KiB'>{{ memory_kib }}</currentMemory>
  <vcpu>{{ vcpus }}</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <source file='{{ images }}/{{ name }}.qcow2'/><target dev='vda' bus='virtio'/>
    </disk>
    <interface type='network'>
      <mac address='{{ mac(0) }}'/><source network='{{ network }}'/><model type='virtio'/>
    </interface>
  </devices>
</domain>
""",
    "desktop": """{#
A desktop: two vCPUs, a disk and a CD-ROM, two NICs (virtio and e1000).
@var owner: string -- who it is for (shown in its title)
@var vcpus: int[1..16] = 2 -- virtual CPUs
@var memory_kib: int[65536..] = 393216 -- memory in KiB
@var install_iso: string = /var/lib/images/install.iso -- the CD-ROM's medium
#}
<domain type='{{ hypervisor }}'>
  <name>{{ name }}</name>
  <uuid>{{ uuid }}</uuid>
  <title>Desktop of {{ owner }}</title>
  <memory unit='KiB'>{{ memory_kib }}</memory>
  <vcpu>{{ vcpus }}</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <source file='/var/lib/images/{{ name }}.qcow2'/><target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='{{ install_iso }}'/><target dev='sda' bus='sata'/>
    </disk>
    <interface type='network'>
      <mac address='{{ mac(0) }}'/><source network='default'/><model type='virtio'/>
    </interface>
    <interface type='network'>
      <mac address='{{ mac(1) }}'/><source network='default'/><model type='e1000'/>
    </interface>
  </devices>
</domain>
""",
}
# (uuid, name, template, variables): the demo's templated passive domains
TEMPLATED: list[tuple[str, str, str, dict[str, Any]]] = [
    ("1f0c2a53-5d3e-4b8e-9a55-6a2f3d7c0101", "app-1", "small-server", {}),
    ("1f0c2a53-5d3e-4b8e-9a55-6a2f3d7c0102", "app-2", "small-server",
     {"vcpus": 2, "memory_kib": 393216}),
    ("1f0c2a53-5d3e-4b8e-9a55-6a2f3d7c0103", "desk-alice", "desktop", {"owner": "Alice"}),
]
TRANSIENT = DomainConfig(uuid=str(uuidlib.uuid4()), name="transient-demo",
                         title="A running domain no tool has a definition for", type="Test",
                         os_type="hvm", arch="x86_64", vcpus=1, memory_kib=131072,
                         max_memory_kib=131072)


@dataclass
class Demo:
    """Everything the demo started, so it can be stopped in reverse order."""
    workdir: Path
    bus: PrivateBus | None = None
    conn: libvirt.virConnect | None = None
    manager_conn: LibvirtConnection | None = None     # the Manager's own connection
    manager: ManagerHandle | None = None
    server: ServerHandle | None = None
    sources: Sources | None = None
    stores: list[Store] = field(default_factory=list)

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()         # also stops the sources
        elif self.sources is not None:
            await self.sources.close()        # the server never started (stopping twice is fine)
        if self.manager is not None:
            await self.manager.stop()
        for store in self.stores:
            with contextlib.suppress(Exception):
                store.close()
        if self.manager_conn is not None:
            with contextlib.suppress(Exception):
                self.manager_conn.close()
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
        if self.bus is not None:
            self.bus.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


async def start_demo(listen: list[tuple[str, int]], host: str | None = None,
                     state_dir: Path | None = None, https: Sequence[tuple[str, int]] = (),
                     options: argparse.Namespace | None = None,
                     repo: Repository | None = None, templates: bool = False,
                     policy: PolicyOptions | None = None, sync_wait: float = 2.0) -> Demo:
    """Start everything; subscriptions (and the self-signed HTTPS pair) live in
    `state_dir` (default: the demo's folder). `options`: the security options of
    security.add_arguments (users file, PAM, --cert/--key, --insecure-http); `repo`:
    the class repository (default: Repository.load()); `templates`: also ship
    TEMPLATES and the TEMPLATED passive domains (what `cim-provider demo` does);
    `policy`: the Manager's start policy (default: refuse what does not fit);
    `sync_wait`: the server's --sync-wait (docs/architecture.md, "Jobs")."""
    import libvirt

    from .busdaemon import PrivateBus
    from .manager.service import serve_manager
    from .manager.store import LibvirtConnection, LibvirtStore, SqliteStore, Templated
    from .manager.templates import SUFFIX, TemplateLibrary, variables_json
    from .server import security
    from .server.main import host_fqdn, start_server, start_sources
    from .domain.domxml import config_to_domain_xml
    from .sources.libvirt import ensure_event_loop_impl

    loop = asyncio.get_running_loop()
    demo = Demo(Path(tempfile.mkdtemp(prefix="cim-provider-demo-")))
    try:
        state_dir = state_dir or demo.workdir / "state"
        host = host or host_fqdn()            # once, for the TLS pair and the CIM paths
        sec = security.prepare(options or argparse.Namespace(), listen=listen, https=list(https),
                               state_dir=state_dir, host=host)
        demo.bus = PrivateBus()
        ensure_event_loop_impl()        # before the connection is opened
        demo.conn = conn = await loop.run_in_executor(None, libvirt.open, "test:///default")
        await loop.run_in_executor(None, conn.createXML,
                                   config_to_domain_xml(TRANSIENT), 0)
        sqlite = SqliteStore(demo.workdir / "definitions.db")
        for cfg in SEED:
            await loop.run_in_executor(None, sqlite.define, cfg)
        library = None
        if templates:
            folder = demo.workdir / "templates"
            folder.mkdir()
            for name, text in TEMPLATES.items():
                (folder / f"{name}{SUFFIX}").write_text(text)
            library = TemplateLibrary(folder)
            await loop.run_in_executor(None, sqlite.define_many_templated, [
                Templated(u, n, t, variables_json(v)) for u, n, t, v in TEMPLATED])
        # Its own connection (opened on first use, after the event implementation):
        # one handed in would be polled, its events being the server's.
        demo.manager_conn = own = LibvirtConnection("test:///default")
        demo.stores = [sqlite, LibvirtStore(own)]
        demo.manager = await serve_manager(demo.bus.address, demo.stores, own,
                                           templates=library, policy=policy)
        demo.sources = await start_sources(libvirt_conn=demo.conn,
                                           manager_bus=demo.bus.address)
        demo.server = await start_server(sec.listen, repo=repo, sources=demo.sources, host=host,
                                         state_dir=state_dir, https=sec.https,
                                         ssl_context=sec.ssl_context,
                                         authenticate=sec.authenticate, sync_wait=sync_wait)
        return demo
    except BaseException:
        await demo.close()
        raise


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .server.listen import parse_listen
    p.add_argument("--listen", action="append", type=parse_listen, metavar="HOST:PORT",
                   help="address to serve HTTP on (repeatable; default 127.0.0.1:5988)")
    from .schema_setup import add_cache_dir_argument
    add_cache_dir_argument(p)
    from .server import security
    security.add_arguments(p, demo=True)


def _banner(addr: tuple[str, int], bus: str, https: Sequence[tuple[str, int]] = ()) -> str:
    url = f"http://{addr[0]}:{addr[1]}"
    tls = "".join(f"\nHTTPS (self-signed unless --cert): https://{h}:{p}  "
                  f"(wbemcli -noverify, pywbemcli --no-verify)" for h, p in https)
    return f"""
cim-provider demo is serving on {url}   (Ctrl-C stops everything){tls}
Private D-Bus: {bus}

Try:
  wbemcli ein '{url}/root/virt:VIRT_ComputerSystem'
  wbemcli ei  '{url}/root/virt:VIRT_ComputerSystem'
  .venv/bin/pywbemcli -s {url} -d root/virt instance enumerate VIRT_ComputerSystem --pl ElementName,EnabledState
  .venv/bin/pywbemcli -s {url} -d root/virt instance associators VIRT_HostSystem.?
  .venv/bin/pywbemcli -s {url} -d interop profile list
See README.md for starting "gnome-test" through the Manager, pausing it and a refusal.
"""  # noqa: E501 - commands to copy, one per line


async def _run(args: argparse.Namespace, repo: Repository) -> int:
    from .server.security import StartupError
    # From the start: a stop asked for while starting stops it once started, quietly.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        demo = await start_demo(args.listen or [("127.0.0.1", 5988)],
                                https=args.https_listen or [("127.0.0.1", 5989)], options=args,
                                repo=repo, templates=True)
    except StartupError as exc:
        log.error("not starting: %s", exc)
        return 2
    assert demo.server is not None and demo.bus is not None      # start_demo started both
    print(_banner(demo.server.addresses[0], demo.bus.address, demo.server.https_addresses),
          flush=True)
    try:
        await stop.wait()
    finally:
        # A signal sent to the whole process group (a terminal's Ctrl-C, a service
        # manager's stop) has stopped the private dbus-daemon as well: every bus
        # connection ends on its own, and closing takes their errors quietly.
        await demo.close()
    return 0


def run(args: argparse.Namespace) -> int:
    from .schema_setup import load_repository
    from .server.main import run_loop
    repo = load_repository(args.cache_dir)     # before anything starts: no schema, exit 2
    if repo is None:
        return 2
    return run_loop(_run(args, repo))
