"""`cim-provider manager`: run the reference org.example.virt.Manager until stopped.

SIGHUP reads the configuration file again and applies the log level; every other
option needs a restart (the log says which changed). A reload never stops the service:
a broken file is logged (ERROR) and the running settings stay.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from pathlib import Path

import libvirt

from .. import logsetup
from .policy import PolicyOptions
from .store import (LibvirtConnection, Store, default_db_path, libvirt_error_to_log,
                    open_store)

log = logging.getLogger(__name__)
# attributes of the parsed options that are not options (cli.py, server/config.py)
_NOT_OPTIONS = {"command", "config", "reread_config"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # --manager-bus as on `serve` (the bus both meet on); --bus is the older name
    bus = parser.add_argument_group("bus")
    bus.add_argument("--manager-bus", "--bus", dest="bus", default="system",
                     metavar="system|session|ADDRESS",
                     help="bus to serve org.example.virt.Manager on: system, session, or a "
                          "D-Bus address (unix:path=...); honours $DBUS_SYSTEM_BUS_ADDRESS / "
                          "$DBUS_SESSION_BUS_ADDRESS (default: %(default)s)")
    stores = parser.add_argument_group("stores")
    stores.add_argument("--store", action="append", default=None,
                        metavar="sqlite:FILE|libvirt:URI|postgresql:CONNINFO",
                        help="where definitions live; repeatable, DefineDomain writes to the "
                             "first (default: sqlite:/var/lib/cim-provider/manager.db as "
                             "root, else sqlite:$XDG_STATE_HOME/cim-provider/manager.db). "
                             "postgresql: a farm database shared by every host (a libpq URI "
                             "or key=value string; the password from PGPASSFILE, "
                             "PGPASSWORD or passfile=, never needed here)")
    stores.add_argument("--libvirt-uri", default=None, metavar="URI",
                        help="hypervisor that StartDomain uses for SQLite definitions "
                             "(default: $LIBVIRT_DEFAULT_URI, else libvirt's default)")
    stores.add_argument("--poll-interval", type=float, default=1.0, metavar="SECONDS",
                        help="time between checks for changes made outside the Manager; "
                             "while libvirt's domain events are followed, libvirt is re-read "
                             "only every 60 s and this paces the templates directory "
                             "(default: %(default)s)")
    stores.add_argument("--start-timeout", type=float, default=300.0, metavar="SECONDS",
                        help="how long StartDomain waits for libvirt to start a domain "
                             "(after making room); a start that takes longer is not "
                             "cancelled: it goes on, its outcome is logged, and the caller "
                             "is told it is still in progress (serve's "
                             "--manager-start-timeout bounds how long a WBEM client waits "
                             "for that answer) (default: %(default)s)")
    tpl = parser.add_argument_group("templates")
    tpl.add_argument("--templates", default=None, metavar="DIR",
                     help="directory of domain XML templates, one NAME.xml.j2 each "
                          "(ListTemplates, DefineFromTemplate); re-read when a file changes "
                          "(default: none)")
    policy = parser.add_argument_group("start policy")
    policy.add_argument("--overcommit", choices=("refuse", "make-room"), default="refuse",
                        help="a start that does not fit in memory: refuse it, or make room "
                             "by starting it smaller (down to its MinMemoryKiB), then "
                             "pausing, then managed-saving running domains of lower Priority "
                             "(default: %(default)s)")
    policy.add_argument("--overcommit-others", action="store_true", default=False,
                        help="make-room may also pause and save domains the Manager did not "
                             "start (default: only its own)")
    policy.add_argument("--host-memory-kib", type=int, default=None, metavar="KIB",
                        help="host memory the policy assumes, instead of libvirt's "
                             "(virNodeGetInfo; for tests, or a host that keeps memory back; "
                             "default: libvirt's figure)")
    policy.add_argument("--pause-budget-kib", type=int, default=None, metavar="KIB",
                        help="memory of paused domains that make-room counts as free (the "
                             "host may page it out) (default: this machine's swap size)")
    farm = parser.add_argument_group("farm (with a postgresql: store)")
    farm.add_argument("--host-id", default=None, metavar="ID",
                      help="this host's identity in the farm (default: /etc/machine-id)")
    farm.add_argument("--host-name", default=None, metavar="NAME",
                      help="this host's name as other hosts and clients see it (default: "
                           "the host name)")
    farm.add_argument("--lease", type=float, default=30.0, metavar="SECONDS",
                      help="this host's lease, renewed every third of it; when it expires "
                           "other hosts may start its domains (default: %(default)s)")


def reload(args: argparse.Namespace) -> argparse.Namespace:
    """SIGHUP: the options read again, the log level applied; `args` (the running
    options) with the new level, or unchanged when the file is unusable."""
    try:
        reread = getattr(args, "reread_config", None)
        new = reread() if reread is not None else args
        before = logsetup.set_level(new.log_level)
        keys = (set(vars(args)) | set(vars(new))) - _NOT_OPTIONS - {"log_level"}
        restart = sorted("--" + k.replace("_", "-") for k in keys
                         if getattr(args, k, None) != getattr(new, k, None))
        log.info("reloaded%s: log level %s%s", f" {new.config}" if getattr(new, "config", None)
                 else "", new.log_level, "" if before == new.log_level else f" (was {before})")
        if restart:
            log.warning("changed but applied only on restart: %s", ", ".join(restart))
        args.log_level = new.log_level
    except Exception as exc:       # a reload must never stop the service
        log.error("reload failed, keeping the current settings: %s", exc)
    return args


def run(args: argparse.Namespace) -> int:
    libvirt.registerErrorHandler(libvirt_error_to_log, None)
    try:
        return asyncio.run(_serve(args))
    except KeyboardInterrupt:
        return 0


def _libvirt_events() -> None:
    """libvirt's domain events on this loop (the Manager follows libvirt's lifecycle
    instead of polling it; a farm Manager releases a placement the moment its domain
    stops); before any connection is opened, as libvirt requires."""
    try:
        import libvirtaio
        libvirtaio.virEventRegisterAsyncIOImpl()
    except Exception as exc:      # polling still notices stopped domains
        log.warning("no libvirt events (%s); noticing stopped domains by polling", exc)


async def _serve(args: argparse.Namespace) -> int:
    from .service import serve_manager      # the D-Bus stack only when actually serving
    from .templates import TemplateLibrary

    connections: dict[str | None, LibvirtConnection] = {}
    service_conn = connections.setdefault(args.libvirt_uri, LibvirtConnection(args.libvirt_uri))
    specs = args.store or [f"sqlite:{default_db_path()}"]
    stores: list[Store] = []
    farm = {"host_id": getattr(args, "host_id", None), "host_name": getattr(args, "host_name", None),
            "lease": getattr(args, "lease", 30.0), "poll_interval": args.poll_interval}
    _libvirt_events()
    try:
        policy = PolicyOptions(getattr(args, "overcommit", "refuse"),
                               bool(getattr(args, "overcommit_others", False)),
                               getattr(args, "host_memory_kib", None),
                               getattr(args, "pause_budget_kib", None))
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    if getattr(args, "start_timeout", 300.0) <= 0:
        log.error("--start-timeout must be positive")
        return 2
    templates = None
    if getattr(args, "templates", None):
        templates = TemplateLibrary(args.templates)
        if not templates.directory or not templates.directory.is_dir():
            log.error("--templates %s is not a directory", args.templates)
            return 2
        templates.refresh()
    try:
        for spec in specs:
            if spec.startswith("libvirt:") and not spec[len("libvirt:"):]:
                spec = f"libvirt:{args.libvirt_uri or ''}"
            stores.append(open_store(spec, connections, farm=farm))
    except (ValueError, OSError) as exc:
        log.error("%s", exc)
        return 2
    sqlite_dbs = [Path(s[len("sqlite:"):]) for s in specs if s.startswith("sqlite:")]
    db = sqlite_dbs[0] if sqlite_dbs else default_db_path()
    state_file = db.with_name(db.name + ".autostart")
    try:
        handle = await serve_manager(args.bus, stores, service_conn,
                                     poll_interval=args.poll_interval, templates=templates,
                                     policy=policy,
                                     start_timeout=getattr(args, "start_timeout", 300.0),
                                     state_file=state_file)
    except Exception as exc:
        log.error("cannot serve the Manager on %s: %s", args.bus, exc or type(exc).__name__)
        for store in stores:
            store.close()
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload, args)
    closed = asyncio.create_task(handle.wait_closed())
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait({closed, waiter}, return_when=asyncio.FIRST_COMPLETED)
    lost = closed.done() and not stop.is_set()
    for task in (closed, waiter):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await handle.stop()
    for store in stores:
        store.close()
    for conn in connections.values():
        conn.close()
    if lost:
        log.error("lost the bus connection")
        return 1
    return 0
