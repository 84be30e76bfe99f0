"""`cim-provider manager`: run the reference org.example.virt.Manager until stopped."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal

from .store import LibvirtConnection, Store, default_db_path, open_store

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bus", default="system",
                        help="system (default), session, or a D-Bus address (unix:path=...)")
    parser.add_argument("--store", action="append", default=None,
                        metavar="sqlite:PATH|libvirt:URI",
                        help="where definitions live; repeatable, DefineDomain writes to the "
                             f"first (default: sqlite:{default_db_path()})")
    parser.add_argument("--libvirt-uri", default=None,
                        help="hypervisor that StartDomain uses for SQLite definitions "
                             "(default: LIBVIRT_DEFAULT_URI, else libvirt's default)")
    parser.add_argument("--poll-interval", type=float, default=1.0,
                        help="seconds between checks for changes made outside the Manager")


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_serve(args))
    except KeyboardInterrupt:
        return 0


async def _serve(args: argparse.Namespace) -> int:
    from .service import serve_manager      # the D-Bus stack only when actually serving

    connections: dict[str | None, LibvirtConnection] = {}
    service_conn = connections.setdefault(args.libvirt_uri, LibvirtConnection(args.libvirt_uri))
    specs = args.store or [f"sqlite:{default_db_path()}"]
    stores: list[Store] = []
    try:
        for spec in specs:
            if spec.startswith("libvirt:") and not spec[len("libvirt:"):]:
                spec = f"libvirt:{args.libvirt_uri or ''}"
            stores.append(open_store(spec, connections))
    except (ValueError, OSError) as exc:
        log.error("%s", exc)
        return 2
    try:
        handle = await serve_manager(args.bus, stores, service_conn,
                                     poll_interval=args.poll_interval)
    except Exception as exc:
        log.error("cannot serve the Manager on %s: %s", args.bus, exc or type(exc).__name__)
        for store in stores:
            store.close()
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
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
