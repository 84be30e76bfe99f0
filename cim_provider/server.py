"""`cim-provider serve`: the WBEM server, wired from its parts.

One asyncio loop carries HTTP, D-Bus and libvirt events. `start_server` is also
what the demo and the tests use in-process.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import time
from dataclasses import dataclass, field

from aiohttp import web

from .providers.interop import interop_providers
from .wbem.dispatch import Dispatcher
from .wbem.http import DEFAULT_MAX_BODY, HTTPLimits, make_app
from .wbem.provider import Provider, Registry
from .wbem.pull import PullContexts
from .wbem.repository import Repository

log = logging.getLogger(__name__)


def parse_listen(value: str) -> tuple[str, int]:
    """HOST:PORT or [IPv6]:PORT."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def host_fqdn(timeout: float = 2.0) -> str:
    """The host's FQDN for CIM paths, without waiting long on a broken resolver."""
    name = socket.gethostname()
    result: list[str] = []

    def resolve() -> None:
        result.append(socket.getfqdn(name))

    import threading
    t = threading.Thread(target=resolve, daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result and result[0] else name


@dataclass
class ServerHandle:
    runner: web.AppRunner
    dispatcher: Dispatcher
    addresses: list[tuple[str, int]] = field(default_factory=list)

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_server(listen: list[tuple[str, int]], *, repo: Repository | None = None,
                       host: str | None = None, providers: list[Provider] | None = None,
                       limits: HTTPLimits | None = None) -> ServerHandle:
    """Build the repository, registry and dispatcher, and listen on every address."""
    repo = repo or Repository.load()
    host = host or host_fqdn()
    registry = Registry()
    for prov in interop_providers(repo, host) + list(providers or ()):
        registry.add(prov)
    dispatcher = Dispatcher(repo, registry, host, PullContexts())
    app = make_app(dispatcher, limits)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    handle = ServerHandle(runner, dispatcher)
    for h, p in listen:
        site = web.TCPSite(runner, h, p, reuse_address=True)
        await site.start()
        for sock in site._server.sockets:  # the real port when 0 was asked for
            handle.addresses.append(sock.getsockname()[:2])
    log.info("serving CIM-XML on %s", ", ".join(f"{h}:{p}" for h, p in handle.addresses))
    return handle


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", action="append", type=parse_listen, metavar="HOST:PORT",
                   help="address to serve plain HTTP on (repeatable; default 127.0.0.1:5988)")
    p.add_argument("--max-body", type=int, default=DEFAULT_MAX_BODY,
                   help="largest request body in bytes (default 16 MiB)")


async def _serve(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    handle = await start_server(args.listen or [("127.0.0.1", 5988)],
                                limits=HTTPLimits(max_body=args.max_body))
    log.info("ready in %.2f s", time.monotonic() - t0)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await handle.close()
    return 0


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_serve(args))
