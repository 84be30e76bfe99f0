"""libvirt's event loop on asyncio: libvirtaio's adapter, made safe for our threads.

libvirt delivers domain events through whatever event implementation is registered in
the process; libvirtaio offers one for asyncio. We subclass it (below) because libvirt
calls its hooks from executor threads and because tests run one loop after another.
Also here, as they need nothing heavier: `open_soon`, the open that `serve` starts
before it imports the rest of the server (server/main.py), and `close_opened`.

Private libvirtaio members used here, each checked in libvirt-python 9.0 to 12.8 (the
range pyproject.toml allows, `<13`): `Descriptor.callbacks`/`fd`/`_handle`, `DescriptorDict`,
`TimeoutCallback._task`, `virEventAsyncIOImpl.descriptors/callbacks/_pending_inc/
_pending_dec/_add_handle..._remove_timeout` and the module global `_current_impl`. If
libvirtaio renames them, `ensure_event_loop_impl` fails at start-up (AttributeError in
the first registration) and tests/test_libvirt_source.py fails at once, never silently.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
from typing import Any, Callable

import libvirt
import libvirtaio

from .libvirt_threads import in_thread

log = logging.getLogger(__name__)


class _Descriptor(libvirtaio.Descriptor):
    def _handle(self, event: int) -> None:
        # Another thread may remove a watch while the loop dispatches this fd: skip
        # callbacks that are gone rather than call libvirt back for a removed watch.
        for callback in list(self.callbacks.values()):
            if callback.event is not None and callback.event & event \
                    and callback.iden in self.callbacks:
                callback.cb(callback.iden, self.fd, event, callback.opaque)


class _Descriptors(libvirtaio.DescriptorDict):
    def __missing__(self, fd: int) -> _Descriptor:
        descriptor = _Descriptor(self.impl, fd)
        self[fd] = descriptor
        return descriptor


class _AsyncIOImpl(libvirtaio.virEventAsyncIOImpl):
    """libvirtaio's adapter, made safe for two things our use of libvirt needs.

    libvirt calls the add/update/remove hooks from whichever thread made the API
    call, and we make most calls from executor threads; asyncio objects may only be
    touched on the loop's thread. So the bookkeeping happens at once under a lock and
    the loop-side work (readers, timer tasks, free callbacks) is handed to the loop.
    Second, libvirt accepts one event implementation per process, while tests run
    one asyncio loop after another: `rebind` moves the live handles to a new loop.
    """

    loop: asyncio.AbstractEventLoop     # set by libvirtaio's __init__, moved by rebind

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self.descriptors: dict[int, _Descriptor] = _Descriptors(self)
        self._lock = threading.RLock()
        self._thread = threading.get_ident()

    # -- dispatch to the loop's thread

    def _on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            if threading.get_ident() == self._thread:
                fn(*args)
            else:
                self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:        # the loop is closed: nothing is left to drive
            log.debug("libvirt event hook after its loop closed")

    def _free_later(self, opaque: Any) -> None:
        """libvirt forbids running a free callback from inside the remove hook."""
        try:
            self.loop.call_soon_threadsafe(self._free, opaque)
        except RuntimeError:
            log.debug("libvirt free callback dropped: loop closed")

    def _free(self, opaque: Any) -> None:
        libvirt.virEventInvokeFreeCallback(opaque)
        self._pending_dec()

    # libvirtaio counts handles and timers whose free callback has not run yet. The
    # count goes up on whichever thread called libvirt and down on the loop's thread:
    # both under the lock, or a read-modify-write on one thread loses the other's.

    def _pending_inc(self) -> None:
        with self._lock:
            super()._pending_inc()

    def _pending_dec(self) -> None:
        with self._lock:
            super()._pending_dec()

    # -- file handles

    def _add_handle(self, fd: int, event: int, cb: Any, opaque: Any) -> int:
        with self._lock:
            desc = self.descriptors[fd]
            callback = libvirtaio.FDCallback(self, cb, opaque, descriptor=desc, event=event)
            self.callbacks[callback.iden] = callback
            desc.callbacks[callback.iden] = callback
            self._pending_inc()
        self._on_loop(self._sync_fd, fd)
        return callback.iden

    def _update_handle(self, watch: int, event: int) -> None:
        with self._lock:
            callback = self.callbacks.get(watch)
            if not isinstance(callback, libvirtaio.FDCallback):
                return
            callback.event = event
            fd = callback.descriptor.fd
        self._on_loop(self._sync_fd, fd)

    def _remove_handle(self, watch: int) -> int:
        with self._lock:
            callback = self.callbacks.pop(watch, None)
            if not isinstance(callback, libvirtaio.FDCallback):
                return -1
            desc, fd = callback.descriptor, callback.descriptor.fd
            desc.callbacks.pop(watch, None)
            if not desc.callbacks and dict.get(self.descriptors, fd) is desc:
                del self.descriptors[fd]
        self._on_loop(self._sync_fd, fd)
        self._free_later(callback.opaque)
        return 0

    def _sync_fd(self, fd: int) -> None:
        """Make the loop watch `fd` exactly as the current callbacks ask."""
        with self._lock:
            desc = dict.get(self.descriptors, fd)
            if desc is None:
                self.loop.remove_reader(fd)
                self.loop.remove_writer(fd)
                return
            try:
                desc.update()
            except OSError:
                # The fd was closed and its number reused before we saw the removal:
                # forget the stale registration and register the new socket afresh.
                self.loop.remove_reader(fd)
                self.loop.remove_writer(fd)
                desc.update()

    # -- timers

    def _add_timeout(self, timeout: int, cb: Any, opaque: Any) -> int:
        with self._lock:
            timer = libvirtaio.TimeoutCallback(self, cb, opaque)
            timer.timeout = timeout
            timer._armed = None
            self.callbacks[timer.iden] = timer
            self._pending_inc()
        self._on_loop(self._sync_timer, timer)
        return timer.iden

    def _update_timeout(self, timer_id: int, timeout: int) -> None:
        with self._lock:
            timer = self.callbacks.get(timer_id)
            if not isinstance(timer, libvirtaio.TimeoutCallback):
                return
            timer.timeout = timeout
        self._on_loop(self._sync_timer, timer)

    def _remove_timeout(self, timer_id: int) -> int:
        with self._lock:
            timer = self.callbacks.pop(timer_id, None)
            if not isinstance(timer, libvirtaio.TimeoutCallback):
                return -1
            timer.timeout = -1
        self._on_loop(self._sync_timer, timer)
        self._free_later(timer.opaque)
        return 0

    def _sync_timer(self, timer: libvirtaio.TimeoutCallback) -> None:
        """Run a timer task iff the timer is enabled; restart it when its period changed."""
        with self._lock:
            live = self.callbacks.get(timer.iden) is timer and timer.timeout >= 0
            task = timer._task
            if task is not None and not task.done() and live and timer._armed == timer.timeout:
                return
            if task is not None:
                task.cancel()
                timer._task = None
            if live:
                timer._armed = timer.timeout
                timer._task = self.loop.create_task(self._run_timer(timer))

    async def _run_timer(self, timer: libvirtaio.TimeoutCallback) -> None:
        period = timer._armed
        while True:
            await asyncio.sleep(period / 1000 if period > 0 else 0)
            # Re-check after the sleep: a disable from another thread may be in flight.
            if self.callbacks.get(timer.iden) is not timer or timer.timeout < 0:
                return
            timer.cb(timer.iden, timer.opaque)

    # -- moving between loops

    def rebind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve libvirt from `loop` from now on, carrying over the live handles."""
        with self._lock:
            old = self.loop
            if old is loop:
                return
            if not old.is_closed() and old.is_running():
                raise RuntimeError("libvirt events are bound to another running asyncio loop")
            if not old.is_closed():
                for fd in list(self.descriptors):
                    old.remove_reader(fd)
                    old.remove_writer(fd)
            self.loop = loop
            self._thread = threading.get_ident()
            for fd in list(self.descriptors):
                self._sync_fd(fd)
            for cb in list(self.callbacks.values()):
                if isinstance(cb, libvirtaio.TimeoutCallback):
                    cb._task = None
                    self._sync_timer(cb)


_impl_lock = threading.Lock()


def _quiet_error_handler(_ctx: object, err: object) -> None:
    """libvirt prints every error on stderr by default; we raise and log them instead."""
    log.debug("libvirt: %s", err)


def ensure_event_loop_impl(loop: asyncio.AbstractEventLoop | None = None
                           ) -> libvirtaio.virEventAsyncIOImpl:
    """Route libvirt's events through the running asyncio loop; call before any open.

    Idempotent; safe to call from every component that opens a connection. Called
    again from a later loop (one asyncio.run after another), it moves over to it.
    """
    if loop is None:
        loop = asyncio.get_running_loop()
    with _impl_lock:
        impl = libvirtaio.getCurrentImpl()
        if impl is None:
            libvirt.registerErrorHandler(_quiet_error_handler, None)
            impl = _AsyncIOImpl(loop).register()
            libvirtaio._current_impl = impl      # so libvirtaio.getCurrentImpl() sees it
            log.debug("libvirt event loop implementation registered")
        elif impl.loop is not loop:
            if not isinstance(impl, _AsyncIOImpl):
                raise RuntimeError("a libvirtaio implementation for another loop is registered")
            impl.rebind(loop)
        return impl


def open_soon(uri: str | None, loop: asyncio.AbstractEventLoop
              ) -> concurrent.futures.Future[libvirt.virConnect]:
    """libvirt's open of `uri`, started now in a thread of its own, its events on `loop`.

    For `serve`: the open of a node with thousands of domains takes seconds without
    holding the GIL, and the server's imports and class repository fit in them. The
    future goes to LibvirtSource (`opening`), whose first connection takes it; one
    nobody takes should get `close_opened` as its done callback.
    """
    ensure_event_loop_impl(loop)        # first: the remote driver adds its socket at open
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
