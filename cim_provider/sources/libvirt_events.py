"""libvirt's event loop: libvirt's own, in a thread of its own.

libvirt delivers domain events, keepalives and the remote driver's socket I/O through
the event implementation registered in the process. We register libvirt's default one
(poll(2) in C) and drive it from a daemon thread, not the asyncio loop (libvirtaio):

- every call over a remote connection turns the socket's watch off and on again
  (libvirt's client reads the reply itself on the calling thread). Through libvirtaio
  each of those two updates woke the asyncio loop for a Python callback: measured at
  10,000 domains (5,000 running under libvirtd, usage sampled per domain every 10 s),
  0.96 s of the loop thread's CPU in 40 s, beside the requests it serves (issue 16,
  GetInstance p99). In C the same updates cost the loop nothing (0.03 s);
- nothing is bound to one asyncio loop, so tests that run one loop after another need
  no re-binding, and keepalives are answered while the loop is busy.

The callbacks registered with libvirt therefore run on that thread: each hands its
event to the loop with `call_soon_threadsafe` and does nothing else there
(sources/libvirt.py `_post`, sources/libvirt_host.py, manager/service.py).
Also here, as they need nothing heavier: `open_soon`, the open that `serve` starts
before it imports the rest of the server (server/main.py), and `close_opened`.
"""
from __future__ import annotations

import concurrent.futures
import functools
import logging
import threading
import time
from typing import Any

import libvirt

from .libvirt_threads import in_thread

log = logging.getLogger(__name__)

_impl_lock = threading.Lock()
_thread: threading.Thread | None = None


def _quiet_error_handler(_ctx: object, err: object) -> None:
    """libvirt prints every error on stderr by default; we raise and log them instead."""
    log.debug("libvirt: %s", err)


def _run_events() -> None:
    """The event thread: one poll and its dispatch per iteration, forever (a daemon)."""
    while True:
        if libvirt.virEventRunDefaultImpl() < 0:      # never seen; do not spin on it
            log.warning("libvirt: an iteration of the event loop failed")
            time.sleep(0.1)


def ensure_event_loop_impl() -> None:
    """libvirt's events for this process: call before any open (libvirt requires an
    implementation to be registered before the connections that use it are opened).

    Idempotent, from any thread; the first call registers libvirt's default
    implementation and starts the thread that drives it."""
    global _thread
    with _impl_lock:
        if _thread is not None:
            return
        libvirt.registerErrorHandler(_quiet_error_handler, None)
        libvirt.virEventRegisterDefaultImpl()
        _thread = threading.Thread(target=_run_events, name="libvirt-events", daemon=True)
        _thread.start()
        log.debug("libvirt event loop running in its own thread")


def open_soon(uri: str | None) -> concurrent.futures.Future[libvirt.virConnect]:
    """libvirt's open of `uri`, started now in a thread of its own.

    For `serve`: the open of a node with thousands of domains takes seconds without
    holding the GIL, and the server's imports and class repository fit in them. The
    future goes to LibvirtSource (`opening`), whose first connection takes it; one
    nobody takes should get `close_opened` as its done callback.
    """
    ensure_event_loop_impl()            # first: the remote driver adds its socket at open
    return in_thread(functools.partial(libvirt.open, uri), "libvirt-open")


def close_opened(fut: concurrent.futures.Future[Any]) -> None:
    """The connection a finished open brought, closed in a thread (an open whose caller
    gave up waiting, or that nobody took); nothing when the open failed."""
    if fut.cancelled() or fut.exception() is not None:
        return
    conn = fut.result()

    def close() -> None:
        try:
            conn.close()
        except libvirt.libvirtError as exc:
            log.debug("libvirt: close of an unused connection: %s", exc)

    threading.Thread(target=close, name="libvirt-close", daemon=True).start()
