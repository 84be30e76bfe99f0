"""Threads for blocking libvirt calls, so that a hung call cannot starve the rest.

Each connection gets its own small pool (`CallPool`). A call that times out while
running keeps its thread until libvirt returns; when every thread of a pool is stuck
the source gives that connection (and pool) up and opens a new one. Threads are daemon
threads: one stuck in libvirt for good must not hold up the interpreter's exit.
Opens and closes run in threads of their own (`in_thread`).
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections import deque
from typing import Any, Callable, TypeVar

log = logging.getLogger(__name__)

_T = TypeVar("_T")

POOL_SIZE = 4           # threads for the blocking calls on one connection
# Threads still inside libvirt calls nobody waits for any more (they timed out: stuck
# calls of given-up pools, hung opens and closes). Past this many, no new connection is
# tried until some return: against a daemon that never answers, each attempt would
# leave one more thread behind.
MAX_STRAY = 16


class Count:
    """An int that threads add to."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.value += n


def run_into(fut: concurrent.futures.Future[_T], fn: Callable[[], _T]) -> None:
    if not fut.set_running_or_notify_cancel():
        return                              # cancelled before it started
    try:
        result = fn()
    except BaseException as exc:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


def in_thread(fn: Callable[[], _T], name: str) -> concurrent.futures.Future[_T]:
    """Run `fn` in a (daemon) thread of its own; its outcome comes in the future."""
    fut: concurrent.futures.Future[_T] = concurrent.futures.Future()
    threading.Thread(target=run_into, args=(fut, fn), name=name, daemon=True).start()
    return fut


class CallPool:
    """The threads for the blocking calls on one connection.

    A thread inside a libvirt call that never returns cannot be taken back. A call
    whose caller stopped waiting (`leave`) but which still runs is "stuck"; once every
    thread is stuck the pool is `wedged`: the source gives up the connection and this
    pool with it (`shutdown`, which never waits) and starts afresh with new ones. The
    stuck threads end on their own when libvirt returns. They are daemon threads, as a
    ThreadPoolExecutor's are not, so that one stuck for good does not hold up the exit
    of the interpreter either.
    """

    def __init__(self, name: str, size: int, strays: Count) -> None:
        self.name = name
        self.size = size
        self._strays = strays                  # the source's count, over all pools
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: deque[tuple[concurrent.futures.Future[Any], Callable[[], Any]]] = deque()
        self._threads = 0
        self._idle = 0
        self._running = 0
        self._quiet = threading.Condition(self._lock)     # notified when _running drops to 0
        self._stuck = 0
        self.closed = False

    def submit(self, fn: Callable[[], _T]) -> concurrent.futures.Future[_T]:
        """Queue `fn`; RuntimeError once the pool is shut down."""
        fut: concurrent.futures.Future[_T] = concurrent.futures.Future()
        with self._lock:
            if self.closed:
                raise RuntimeError(f"{self.name} is shut down")
            self._queue.append((fut, fn))
            spawn = len(self._queue) > self._idle and self._threads < self.size
            if spawn:
                self._threads += 1
                number = self._threads
            else:
                self._wake.notify()
        if spawn:
            threading.Thread(target=self._work, name=f"{self.name}-{number}",
                             daemon=True).start()
        return fut

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self.closed:
                    self._idle += 1
                    self._wake.wait()
                    self._idle -= 1
                if not self._queue:             # shut down and nothing left to do
                    self._threads -= 1
                    return
                fut, fn = self._queue.popleft()
                self._running += 1
            try:
                run_into(fut, fn)
            finally:
                del fut, fn
                with self._lock:
                    self._running -= 1
                    if not self._running:
                        self._quiet.notify_all()

    def leave(self, fut: concurrent.futures.Future[Any]) -> None:
        """Its caller stopped waiting for `fut`: one not started never runs; one that
        runs is stuck until it returns."""
        if fut.cancel():
            return
        with self._lock:
            self._stuck += 1
        self._strays.add(1)
        fut.add_done_callback(self._unstick)    # at once if it is done already

    def _unstick(self, _fut: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._stuck -= 1
        self._strays.add(-1)

    @property
    def wedged(self) -> bool:
        """Every thread is stuck in a call that timed out: later calls could only queue."""
        with self._lock:
            return self._stuck >= self.size

    def wait_idle(self) -> None:
        """Blocking, after `shutdown`: until no call of this pool runs any more. Never
        on the loop: the calls may be stuck for good."""
        with self._lock:
            while self._running:
                self._quiet.wait()

    def shutdown(self) -> None:
        """Take no more calls and cancel the queued ones; never waits for a thread."""
        with self._lock:
            self.closed = True
            queued = [fut for fut, _ in self._queue]
            self._queue.clear()
            self._wake.notify_all()
        for fut in queued:
            fut.cancel()
