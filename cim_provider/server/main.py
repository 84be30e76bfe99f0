"""`cim-provider serve`: the WBEM server, wired from its parts.

One asyncio loop carries HTTP and D-Bus; libvirt's events come from a thread of their
own (sources/libvirt_events.py). `start_server` is also what the demo and the tests use
in-process.

Importing this module imports nothing heavy, not even asyncio: `serve` starts libvirt's
open (seconds for thousands of domains, without the GIL) before its event loop exists
and before aiohttp and the server's own modules are imported, and imports them in a
worker thread while it runs (issue 16, start-up; docs/architecture.md, "Sources"). So
those are imported inside the functions that use them; tests/test_startup_order.py
checks the order. It runs past 500 lines because that order (before the loop, while
libvirt opens, after) is kept readable in one module rather than spread over several.
"""
from __future__ import annotations

import argparse
import functools
import gc
import logging
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from . import heap, security
from .listen import show_address
from .notify import Notifier
from .options import add_arguments, default_state_dir  # noqa: F401  (cli.py: serve's options)
from ..schema_setup import load_repository, schema_missing

if TYPE_CHECKING:
    import asyncio
    import concurrent.futures

    import libvirt
    from aiohttp import web

    from ..indications.service import IndicationService
    from ..inventory.inventory import Inventory
    from ..providers.jobs import Job, JobsProvider
    from ..sources.libvirt import LibvirtSource
    from ..sources.manager import ManagerClient
    from ..wbem.dispatch import Dispatcher
    from ..wbem.provider import Provider
    from ..wbem.repository import Repository
    from .audit import AuditLog
    from .connections import ConnectionGuard
    from .health_watch import HealthWatcher
    from .http import HTTPLimits


log = logging.getLogger(__name__)


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
    fqdn = result[0] if result else ""
    # Without DNS the resolver may only offer "localhost": the host name says more.
    return fqdn if fqdn and not fqdn.startswith("localhost") else name


@dataclass
class Sources:
    """The inventory and the two sources that keep it current."""
    inventory: Inventory
    libvirt: LibvirtSource | None = None
    manager: ManagerClient | None = None

    async def close(self) -> None:
        for src in (self.manager, self.libvirt):
            if src is not None:
                await src.stop()


async def start_sources(*, libvirt_uri: str | None = None, libvirt_conn=None,
                        manager_bus: str | None = "system", call_timeout: float = 10.0,
                        manager_timeout: float = 5.0, relist_interval: float = 5.0,
                        manager_start_timeout: float = 60.0,
                        manager_list_timeout: float = 60.0,
                        metrics_interval: float = 10.0,
                        libvirt_opening: concurrent.futures.Future[libvirt.virConnect] | None
                        = None) -> Sources:
    """Connect libvirt (events on this loop) and follow the Manager; neither has to be up.
    `metrics_interval`: seconds between usage samples of the running domains (0: none);
    `libvirt_opening`: an open of `libvirt_uri` already under way (libvirt_events.open_soon)
    that the first connection takes instead of opening another."""
    import asyncio

    from ..inventory.inventory import Inventory
    from ..sources.libvirt import LibvirtSource
    inv = Inventory()
    lv = LibvirtSource(libvirt_uri, conn=libvirt_conn, call_timeout=call_timeout,
                       on_snapshot=inv.set_running, on_domain=inv.update_running,
                       on_stop_reasons=inv.set_stop_reasons,
                       feed=inv.resources, metrics_interval=metrics_interval,
                       opening=libvirt_opening)
    mgr = None
    if manager_bus:
        from ..sources.manager import ManagerClient
        mgr = ManagerClient(manager_bus, call_timeout=manager_timeout,
                            start_timeout=manager_start_timeout,
                            list_timeout=manager_list_timeout,
                            relist_interval=relist_interval, on_change=inv.set_defined,
                            on_delta=inv.update_defined)
    # Side by side: the bus connection and the Manager's first listing are made while
    # libvirt's first read runs in its thread (~0.1 s of the start-up without a Manager
    # on the bus, issue 16). The inventory takes either half first.
    sources = Sources(inv, lv, mgr)
    started = await asyncio.gather(lv.start(), *([mgr.start()] if mgr else []),
                                   return_exceptions=True)
    failed = [r for r in started if isinstance(r, BaseException)]
    if failed:
        await sources.close()
        raise failed[0]
    return sources


@dataclass
class ServerHandle:
    runner: web.AppRunner
    dispatcher: Dispatcher
    addresses: list[tuple[str, int]] = field(default_factory=list)
    sources: Sources | None = None
    indications: IndicationService | None = None
    https_addresses: list[tuple[str, int]] = field(default_factory=list)
    guard: ConnectionGuard | None = None
    authenticate: object | None = None
    # Run on a reload request (SIGHUP in `serve`): reopen the audit log, ...
    on_reload: list[Callable[[], None]] = field(default_factory=list)
    audit: AuditLog | None = None
    health: HealthWatcher | None = None

    def stats(self) -> dict[str, int]:
        """Counts for introspection (tests, SIGUSR1): connections, pull contexts, logins."""
        out = {"pull_contexts": len(self.dispatcher.pulls)}
        if self.guard is not None:
            st = self.guard.stats
            out.update(connections_open=st.open, connections_accepted=st.accepted,
                       connections_refused=st.refused, header_timeouts=st.header_timeouts)
        out["failed_logins"] = getattr(self.authenticate, "failures", 0)
        return out

    async def close(self) -> None:
        await self.runner.cleanup()
        if self.health is not None:
            await self.health.close()
        # No request is served any more: stop what providers run in the background
        # (before the sources those tasks call are stopped).
        await self.dispatcher.registry.close()
        from ..wbem.instance import forget_classes
        forget_classes()
        if self.indications is not None:
            await self.indications.close()
        if self.sources is not None:
            await self.sources.close()
        if self.audit is not None:
            self.audit.close()


async def start_server(listen: list[tuple[str, int]], *, repo: Repository | None = None,
                       host: str | None = None, providers: list[Provider] | None = None,
                       sources: Sources | None = None,
                       limits: HTTPLimits | None = None,
                       state_dir: str | Path | None = None,
                       indication_options: dict | None = None,
                       https: Sequence[tuple[str, int]] = (), ssl_context=None,
                       authenticate=None, max_pull_per_client: int | None = None,
                       audit_log: str | Path | None = None, sync_wait: float = 2.0,
                       shutdown_timeout: float = 300.0) -> ServerHandle:
    """Build the repository, registry and dispatcher, and listen on every address.

    With `sources`, the virtual-system model is served from their inventory, and its
    changes become lifecycle indications. Subscriptions are kept in `state_dir` (only
    in memory when None); `indication_options` tune delivery (see indications.delivery).
    `https` listeners use `ssl_context`; `authenticate` is the hook of wbem/auth.py
    (None: no authentication, every client an operator; see security.py for the rules).
    `sync_wait`: how long a state change may take before it answers 4096 with a job;
    `shutdown_timeout`: how long a job waits for a shutdown, reboot or start to show
    (providers/jobs.py). Every modifying operation is logged on `cim_provider.audit`,
    and appended to
    `audit_log` as a JSON line when given (reopened by the handle's `on_reload`).
    When the audit log cannot be opened or a listener cannot start (a port in use, a
    name that does not resolve, ...), everything built is closed again, `sources`
    included, and a security.StartupError saying which and why is raised (for a
    listener also an OSError with its errno).
    """
    # _import_server (below) imports these ahead, in `serve`'s worker thread.
    from aiohttp import web

    from ..indications.service import IndicationService
    from ..indications.subscriptions import Subscriptions, subscription_providers
    from ..providers import Backend, virt_providers
    from ..providers.computer_system import ComputerSystemProvider
    from ..providers.host_system import HostSystemProvider
    from ..providers.interop import interop_providers
    from ..providers.jobs import Jobs, JobsProvider
    from ..providers.management_service import ManagementServiceProvider
    from ..wbem.dispatch import Dispatcher
    from ..wbem.provider import Registry
    from ..wbem.pull import PullContexts
    from ..wbem.repository import Repository
    from .audit import AuditLog, AuditLogError
    from .connections import ConnectionGuard, GuardedSite
    from .health_watch import HealthWatcher
    from .http import HTTPLimits, make_app
    if https and ssl_context is None:
        raise ValueError("HTTPS listeners need an ssl_context")
    try:
        audit = AuditLog(audit_log)
    except AuditLogError:
        if sources is not None:
            await sources.close()
        raise
    repo = repo or Repository.load()
    host = host or host_fqdn()
    registry = Registry()
    model: list[Provider] = []
    backend = None
    jobs = Jobs(sync_wait=sync_wait)
    if sources is not None:
        backend = Backend(repo, sources.inventory, host, sources.libvirt, sources.manager)
        model = virt_providers(backend, jobs)
    subs = Subscriptions(repo, host, state_dir)
    subs.load()
    indications = IndicationService(repo, host, subs, **(indication_options or {}))
    if sources is not None:
        systems = next(p for p in model if isinstance(p, ComputerSystemProvider))
        systems.shutdown_timeout = shutdown_timeout
        indications.attach(sources.inventory, systems.instance)
        job_instances = next(p for p in model if isinstance(p, JobsProvider))
        jobs.listeners.append(functools.partial(_publish_job, indications, job_instances))
    for prov in interop_providers(repo, host) + subscription_providers(subs) + model \
            + list(providers or ()):
        registry.add(prov)
    pulls = PullContexts() if max_pull_per_client is None \
        else PullContexts(max_per_client=max_pull_per_client)
    dispatcher = Dispatcher(repo, registry, host, pulls, audit=audit)
    limits = limits or HTTPLimits()
    app = make_app(dispatcher, limits, authenticate)
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           keepalive_timeout=limits.keepalive_timeout,
                           max_line_size=limits.max_line_size,
                           max_field_size=limits.max_field_size, max_headers=limits.max_headers)
    await runner.setup()
    guard = ConnectionGuard(limits.max_connections, limits.read_timeout)
    handle = ServerHandle(runner, dispatcher, sources=sources, indications=indications,
                          guard=guard, authenticate=authenticate, audit=audit)
    handle.on_reload.append(audit.reopen)
    if backend is not None:
        handle.health = HealthWatcher(
            backend, next(p for p in model if isinstance(p, HostSystemProvider)),
            next(p for p in model if isinstance(p, ManagementServiceProvider)), indications)
    try:
        for addrs, ctx, out in ((listen, None, handle.addresses),
                                (https, ssl_context, handle.https_addresses)):
            for h, p in addrs:
                site = GuardedSite(runner, h, p, guard, ssl_context=ctx,
                                   handshake_timeout=limits.read_timeout)
                try:
                    await site.start()
                except OSError as exc:   # in use, not an address of this host, no name
                    raise security.ListenError.of(exc, h, p) from None
                for sock in site.sockets:  # the real port when 0 was asked for
                    out.append(sock.getsockname()[:2])
    except BaseException:
        # Not serving: stop what was built (runner, indication workers, the sources'
        # tasks) instead of leaving it running behind the error.
        await handle.close()
        raise
    if handle.health is not None:
        await handle.health.start()
    log.info("serving CIM-XML on %s", ", ".join(
        [f"http://{show_address(h, p)}" for h, p in handle.addresses]
        + [f"https://{show_address(h, p)}" for h, p in handle.https_addresses]))
    if audit_log is not None:
        log.info("audit log: %s", audit_log)
    return handle


def _publish_job(indications: IndicationService, provider: JobsProvider, job: Job,
                 previous: int | None) -> None:
    """A job's change as a CIM_InstModification (InstCreation when it appears)."""
    from pywbem import CIMProperty
    now = provider.instance(job)
    if previous is None:
        indications.publish(indications.indication("created", now,
                                                   classname="CIM_InstCreation"))
        return
    old = now.copy()
    old["JobState"] = CIMProperty("JobState", previous, type="uint16")
    indications.publish(indications.indication(
        "modified", now, old, ["JobState", "TimeOfLastStateChange", "ErrorCode",
                               "ErrorDescription", "PercentComplete", "OperationalStatus",
                               "JobStatus"], classname="CIM_InstModification"))


@dataclass
class _Begun:
    """What `serve` did before its event loop runs (_begin)."""
    notifier: Notifier
    sec: security.Security
    state_dir: Path
    host: str                    # "" until `naming` has it
    naming: concurrent.futures.Future[str]
    opening: concurrent.futures.Future[libvirt.virConnect]


# SIGTERM/SIGINT seen before the loop's own handlers are in place (_begin).
_EARLY_STOP: list[int] = []


def _note_stop(signum: int, _frame: object) -> None:
    _EARLY_STOP.append(signum)


def _begin(args: argparse.Namespace) -> _Begun | int:
    """Before the event loop: the refusals (exit 2, libvirt untouched), then libvirt's
    open started (seconds for a test:/// node of 10,000 domains, in a thread and without
    the GIL). Without --users or --pam-service nothing heavier than libvirt itself is
    imported first: asyncio, uvloop, aiohttp and the server's own modules come while the
    open runs (issue 16, start-up: spawn to the first complete enumeration;
    tests/test_startup_order.py)."""
    # First, before any thread or child process runs: $NOTIFY_SOCKET out of the
    # environment (notify.py), which no other thread may read while it is removed.
    notifier = Notifier.from_env()        # systemd Type=notify; a no-op without it
    # A stop asked for from here on stops the server cleanly (exit 0) once its loop runs,
    # also one that arrives while it starts (a listener may accept before start-up ends).
    _EARLY_STOP.clear()
    previous = {sig: signal.signal(sig, _note_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    begun: _Begun | int = 2
    try:
        if schema_missing(args.cache_dir):    # exit 2, having said what to run, and nothing else
            return begun
        # The host name is resolved beside libvirt's open: a broken resolver (host_fqdn
        # waits up to 2 s for it) must not delay the open. Only a self-signed TLS pair
        # to make needs it before.
        from ..sources.libvirt_threads import in_thread
        naming = in_thread(host_fqdn, "host-name")
        host = naming.result() if args.https_listen and getattr(args, "cert", None) is None \
            else ""
        state_dir = args.state_dir or default_state_dir()
        listen = args.listen or ([] if args.https_listen else [("127.0.0.1", 5988)])
        try:
            sec = security.prepare(args, listen=listen, https=args.https_listen or [],
                                   state_dir=state_dir, host=host)
        except security.StartupError as exc:
            log.error("not starting: %s", exc)
            return begun
        from ..sources.libvirt_events import open_soon
        begun = _Begun(notifier, sec, state_dir, host, naming, open_soon(args.libvirt_uri))
        return begun
    finally:
        if not isinstance(begun, _Begun):   # refused or failed: the handlers as they were
            for sig, handler in previous.items():
                signal.signal(sig, handler)


async def _serve(args: argparse.Namespace, t0: float, begun: _Begun) -> int:
    import asyncio

    from ..sources.libvirt_events import close_opened
    notifier = begun.notifier
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    if _EARLY_STOP:
        stop.set()
    sec, state_dir, opening = begun.sec, begun.state_dir, begun.opening
    # The rest of the server is imported and the class repository loaded in a worker
    # thread while libvirt opens.
    repo = await asyncio.to_thread(_load_while_libvirt_opens, args)
    if repo is None:                   # unreadable schema: exit 2 (load_repository said why)
        opening.add_done_callback(close_opened)
        return 2
    host = begun.host or await asyncio.wrap_future(begun.naming)
    sources = await start_sources(
        libvirt_uri=args.libvirt_uri, manager_bus=args.manager_bus,
        call_timeout=args.libvirt_timeout, manager_timeout=args.manager_timeout,
        manager_start_timeout=args.manager_start_timeout,
        manager_list_timeout=args.manager_list_timeout, relist_interval=args.manager_relist,
        metrics_interval=args.metrics_interval, libvirt_opening=opening)
    try:
        handle = await _start_server(sec, args, repo, sources, host, state_dir)
    except security.StartupError as exc:   # a listener (in use, ...): worth a restart
        log.error("not starting: %s", exc)
        return 1
    # SIGHUP: configuration file, users file, TLS pair, log level (server/reload.py)
    from .reload import Reloader
    reloader = Reloader(args, ssl_context=sec.ssl_context, authenticate=sec.authenticate,
                        state_dir=state_dir, hooks=handle.on_reload, notifier=notifier)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, reloader.reload)
    # SIGUSR1 logs the server's counts: introspection without a network endpoint.
    loop.add_signal_handler(signal.SIGUSR1, lambda: log.info("stats: %s", " ".join(
        f"{k}={v}" for k, v in handle.stats().items())))
    # What start-up built (the class repository, the first inventory) lives as long as
    # the server: out of the collector's sight, a full collection no longer walks it
    # and stalls the loop for a quarter of a second at 10,000 domains.
    end_startup_collection()
    # The C heap's free pages back to the system, now and after each usage sample
    # (server/heap.py: what libvirt freed, 3 KiB per domain with the test driver). In a
    # worker thread: ctypes lets go of the GIL, and the first requests need not wait
    # the ~30 ms it takes at 10,000 domains.
    _trim_soon(loop)
    unsubscribe_trim = sources.inventory.resources.subscribe(
        lambda kind, _name: _trim_soon(loop) if kind == "sample" else None)
    log.info("ready in %.2f s", time.monotonic() - t0)
    # Every listener is bound and listening: a connection made now is accepted.
    reloader.status = "serving " + " ".join(
        [f"http://{h}:{p}" for h, p in handle.addresses]
        + [f"https://{h}:{p}" for h, p in handle.https_addresses])
    notifier.ready(reloader.status)
    await stop.wait()
    notifier.stopping()
    unsubscribe_trim()
    await handle.close()
    notifier.close()
    return 0


def _load_while_libvirt_opens(args: argparse.Namespace) -> Repository | None:
    """In a worker thread while libvirt's open runs in its own: the class repository,
    then the modules the server is made of."""
    repo = load_repository(args.cache_dir)
    if repo is not None:
        _import_server(manager=bool(args.manager_bus))
    return repo


def _import_server(*, manager: bool) -> None:
    """What start_sources, start_server and _serve import, imported ahead (aiohttp,
    pywbem's client side, the providers, ...): a module left out here is imported
    when first used, on the loop, after libvirt's open."""
    from . import audit, connections, health_watch, http, reload  # noqa: F401
    from .. import providers  # noqa: F401
    from ..indications import service, subscriptions  # noqa: F401
    from ..inventory import inventory  # noqa: F401
    from ..providers import computer_system, interop, jobs  # noqa: F401
    from ..sources import libvirt  # noqa: F401
    from ..wbem import dispatch, pull  # noqa: F401
    if manager:
        from ..sources import manager as client  # noqa: F401


def _trim_soon(loop: asyncio.AbstractEventLoop) -> None:
    """heap.trim in a worker thread: it holds the C heap's locks while it works."""
    loop.run_in_executor(None, heap.trim)


async def _start_server(sec: security.Security, args: argparse.Namespace, repo: Repository,
                        sources: Sources, host: str, state_dir: Path) -> ServerHandle:
    return await start_server(sec.listen, repo=repo, sources=sources, host=host,
                              state_dir=state_dir,
                              limits=security.limits_from_args(args), https=sec.https,
                              ssl_context=sec.ssl_context, authenticate=sec.authenticate,
                              max_pull_per_client=args.max_pull_contexts,
                              audit_log=getattr(args, "audit_log", None),
                              sync_wait=args.sync_wait,
                              shutdown_timeout=args.shutdown_timeout,
                              indication_options={"insecure_listeners":
                                                  args.insecure_listeners})


def run_loop(main) -> int:
    """Run `main` on uvloop when installed (about 80 µs less per request here)."""
    try:
        import uvloop
    except ImportError:
        import asyncio
        return asyncio.run(main)
    return uvloop.run(main)


def begin_startup_collection() -> bool:
    """The collector off for the start-up: the initial read of every running domain
    (docs/architecture.md, "Sources": a full read at connect) makes a few hundred
    thousand objects that live as long as the server, and each full collection the
    allocations trigger walks all of them: three at 10,000 domains, ~0.4 s of a
    start-up that is to take libvirt's own time plus 1 s. What the imports made is
    frozen first. True when this call turned the collector off."""
    if not gc.isenabled():
        return False                # someone else manages it (an embedding process)
    gc.freeze()
    gc.disable()
    return True


_STARTUP_GC = False


def end_startup_collection() -> None:
    """Ready: all that start-up made frozen, and the collector on again (when
    begin_startup_collection turned it off). No collection first: at 10,000 domains
    it walks everything start-up made (~70 ms on the loop) to find a few dozen
    objects of cyclic garbage, which stay frozen instead."""
    global _STARTUP_GC
    gc.freeze()
    if _STARTUP_GC:
        _STARTUP_GC = False
        gc.enable()


def run(args: argparse.Namespace) -> int:
    global _STARTUP_GC
    t0 = time.monotonic()
    _STARTUP_GC = begin_startup_collection()
    try:
        begun = _begin(args)
        if not isinstance(begun, _Begun):       # refused: exit 2
            return begun
        return run_loop(_serve(args, t0, begun))
    finally:
        if _STARTUP_GC:                  # stopped before it was ready
            _STARTUP_GC = False
            gc.enable()
