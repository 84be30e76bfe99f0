"""The host side of the libvirt source: storage pools, networks, capacity, usage samples.

Read in full at each connect (with the domains); then libvirt's storage-pool events
(lifecycle and refresh) and network lifecycle events say which pool or network to read
again, and a sampler takes one usage sample of every running domain per interval (the
first one interval after the connect): one listing names the active domains,
their counters are read in slices (sources/libvirt_stats.py) and kept packed. Every
blocking call runs in the connection's call pool (`LibvirtSource._call`); what is
learnt goes to a `domain.sources.ResourceFeed`.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import libvirt

from ..domain.records import DomainConfig, DomainStats, RunningDomain, StatsSample
from ..domain.sources import ResourceFeed
from .libvirt_calls import (LibvirtError, read_autostart, read_capacity, read_network,
                            read_networks, read_pool, read_pools)
from .libvirt_stats import CHUNK, Packer, PackedStats, differing_vcpus, list_active, read_chunk

if TYPE_CHECKING:
    from .libvirt import LibvirtSource

log = logging.getLogger(__name__)

# (register method, event id, deregister method) of the host events we follow.
_EVENTS = [(reg, getattr(libvirt, ev), dereg) for reg, ev, dereg in (
    ("storagePoolEventRegisterAny", "VIR_STORAGE_POOL_EVENT_ID_LIFECYCLE",
     "storagePoolEventDeregisterAny"),
    ("storagePoolEventRegisterAny", "VIR_STORAGE_POOL_EVENT_ID_REFRESH",
     "storagePoolEventDeregisterAny"),
    ("networkEventRegisterAny", "VIR_NETWORK_EVENT_ID_LIFECYCLE", "networkEventDeregisterAny"),
) if hasattr(libvirt, ev)]


SAMPLE_SHARE_INVERSE = 5        # a sample takes at most 1/5 of the time between starts
PACE = 3.0                      # per-domain slices: this much idle time per unit of work


async def _pause(seconds: float) -> None:
    """The pause between two per-domain slices of a sample."""
    await asyncio.sleep(seconds)


def next_sample_in(interval: float, took: float) -> float:
    """Seconds from the end of a sample that took `took` to the start of the next: one
    `interval` after its start, or later so that sampling takes at most a fifth of the
    time. A driver without bulk statistics answers two calls per domain (over a remote
    connection 10,000 round trips for 5,000 domains: seconds of libvirtd's time and
    ours, requests waiting meanwhile); a sample of bulk statistics takes milliseconds
    and is never delayed. The metrics' Duration is the real interval
    (docs/architecture.md, "CIM model")."""
    return max(0.0, interval - took, (SAMPLE_SHARE_INVERSE - 1) * took)


class HostWatch:
    """Pools, networks and usage of one LibvirtSource's connection, fed to `feed`."""

    def __init__(self, source: LibvirtSource, feed: ResourceFeed | None,
                 metrics_interval: float) -> None:
        self.src = source
        self.feed = feed
        self.interval = metrics_interval
        self._dirty: set[tuple[str, str]] = set()       # ("pool"|"network", name)
        self._readers: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._sampler: asyncio.Task[None] | None = None
        self._last: PackedStats | None = None     # the last sample's (its index is reused)
        self._bulk = True           # ask bulk statistics (False: this driver lacks them)
        if feed is not None:
            feed.set_sampling(metrics_interval)

    # ---- connect / disconnect ---------------------------------------------------------

    def register(self, conn: libvirt.virConnect, gen: int,
                 keep: Callable[[int, str], None]) -> None:
        """Blocking (on the registration thread): the pool and network callbacks."""
        if self.feed is None:
            return
        for reg, event_id, dereg in _EVENTS:
            callback: Callable[..., None] = \
                self._on_pool if reg.startswith("storagePool") else self._on_network
            if reg.startswith("storagePool") and \
                    event_id == getattr(libvirt, "VIR_STORAGE_POOL_EVENT_ID_REFRESH", None):
                callback = self._on_pool_refresh
            try:
                cb_id = getattr(conn, reg)(None, event_id, callback, gen)
            except libvirt.libvirtError as exc:       # a driver without storage/networks
                log.debug("libvirt: %s %d not available: %s", reg, event_id, exc)
                continue
            keep(cb_id, dereg)

    async def load(self, conn: libvirt.virConnect) -> None:
        """The full read at connect: capacity, every pool and network."""
        if self.feed is None:
            return

        def work() -> tuple[Any, Any, Any]:
            return read_capacity(conn), read_pools(conn), read_networks(conn)

        capacity, pools, networks = await self.src._call(work, what="read pools and networks")
        self.feed.set_host(capacity, pools, networks)

    def start(self) -> None:
        """After a connect: follow the events and sample usage every interval."""
        if self.feed is not None and self.interval > 0 and self._sampler is None:
            self._sampler = asyncio.ensure_future(self._sample_loop())
        for key in list(self._dirty):         # events that came during the full read
            self._kick(key)

    def stop(self) -> None:
        """The connection is gone: no reads and no samples until the next one."""
        self._dirty.clear()
        for task in list(self._readers.values()):
            task.cancel()
        self._readers.clear()
        sampler, self._sampler = self._sampler, None
        self._last = None
        self._bulk = True
        if sampler is not None:
            sampler.cancel()

    # ---- events -----------------------------------------------------------------------

    def _on_pool(self, _conn: Any, pool: libvirt.virStoragePool, _event: int, _detail: int,
                 gen: int) -> None:
        self._post(gen, "pool", pool.name())

    def _on_pool_refresh(self, _conn: Any, pool: libvirt.virStoragePool, gen: int) -> None:
        self._post(gen, "pool", pool.name())

    def _on_network(self, _conn: Any, net: libvirt.virNetwork, _event: int, _detail: int,
                    gen: int) -> None:
        self._post(gen, "network", net.name())

    def _post(self, gen: int, kind: str, name: str) -> None:
        loop = self.src._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._event, gen, kind, name)
        except RuntimeError:
            pass

    def _event(self, gen: int, kind: str, name: str) -> None:
        if gen != self.src._gen or self.src._stopping:
            return
        log.debug("libvirt: %s event on %s", kind, name)
        self._dirty.add((kind, name))
        if self.src.connected:
            self._kick((kind, name))

    def _kick(self, key: tuple[str, str]) -> None:
        task = self._readers.get(key)
        if task is None or task.done():
            self._readers[key] = asyncio.ensure_future(self._reader(key))

    async def _reader(self, key: tuple[str, str]) -> None:
        """Read one pool or network until no event is pending for it."""
        kind, name = key
        try:
            while key in self._dirty and self.feed is not None:
                self._dirty.discard(key)
                conn, gen = self.src._conn, self.src._gen
                if conn is None:
                    return
                try:
                    if kind == "pool":
                        pool = await self.src._call(functools.partial(read_pool, conn, name),
                                                    what=f"read pool {name}")
                        if gen == self.src._gen:
                            self.feed.update_pool(name, pool)
                    else:
                        net = await self.src._call(functools.partial(read_network, conn, name),
                                                   what=f"read network {name}")
                        if gen == self.src._gen:
                            self.feed.update_network(name, net)
                except LibvirtError as exc:
                    log.warning("libvirt: cannot read %s %s: %s", kind, name, exc.message)
                    return
        finally:
            if self._readers.get(key) is asyncio.current_task():
                del self._readers[key]

    # ---- usage --------------------------------------------------------------------------

    async def sample(self) -> StatsSample | None:
        """One sample of every running domain now (and the pools' allocation, which
        changes without events); None when there is no connection.

        The domains are read CHUNK at a time, one call in the connection's threads per
        slice, the loop free between them (sources/libvirt_stats.py), and the sample is
        kept packed. What changes without an event is compared with the last read of
        each domain: a domain whose vCPU count (current or maximum) or autostart flag
        differs is read again at once, so the change shows within one interval."""
        conn, gen = self.src._conn, self.src._gen
        if conn is None or self.feed is None or not self.src.connected:
            return None
        running = dict(self.src.running)
        timeout = self.src.load_timeout
        doms = await self.src._call(functools.partial(list_active, conn), timeout=timeout,
                                    what="list domains for usage statistics")
        packer = Packer()
        asked, bulk, from_bulk = self._bulk, self._bulk, 0
        for i in range(0, len(doms), CHUNK):
            if gen != self.src._gen:
                return None
            began = time.monotonic()
            part = doms[i:i + CHUNK]
            bulk, got = await self.src._call(
                functools.partial(read_chunk, conn, part, running, packer, bulk),
                timeout=timeout, what="read usage statistics")
            from_bulk += got
            if 2 * got < len(part) and i + CHUNK < len(doms):
                # Mostly per-domain calls (each a round trip over a remote connection,
                # whose answer takes the interpreter back from the loop): paced, so
                # that a sample keeps to a quarter of the time while it runs and
                # requests meanwhile wait less (issue 16: GetInstance p50 and p99).
                await _pause(PACE * (time.monotonic() - began))
        # A driver whose bulk statistics had no domain's CPU time in a whole sample
        # (libvirt's test driver) is not asked for them again on this connection: the
        # per-domain calls give every figure anyway, and 10,000 answers without one
        # cost the call threads (and the loop beside them) ~80 ms per sample.
        self._bulk = bulk and not (asked and bool(packer.uuids) and not from_bulk)
        previous = self._last

        def work() -> tuple[StatsSample, Any, set[str] | None, set[str]]:
            # The domain handles go here, not on the loop: one virDomainFree each.
            doms.clear()
            try:
                autostart: set[str] | None = read_autostart(conn)
            except libvirt.libvirtError as exc:
                log.debug("libvirt: no autostart listing: %s", exc)
                autostart = None
            stats = packer.finish(previous)
            return (StatsSample(time.time(), time.monotonic(), stats), read_pools(conn),
                    autostart, differing_vcpus(stats, running))

        sample, pools, autostart, differ = await self.src._call(
            work, timeout=timeout, what="read usage statistics")
        if gen != self.src._gen:
            return None
        if isinstance(sample.stats, PackedStats):
            self._last = sample.stats
        for uuid in self._stale(sample, autostart, running, differ):
            self.src.reread(uuid)
        self.feed.set_sample(sample)
        for name, pool in pools.items():
            self.feed.update_pool(name, pool)
        return sample

    def _stale(self, sample: StatsSample, autostart: set[str] | None,
               seen: dict[str, RunningDomain] | None = None,
               differ: set[str] | None = None) -> list[str]:
        """The running domains whose last read disagrees with the sample. `differ`:
        those whose vCPU counts differed from the records in `seen` (compared in the
        call thread); a record read again since is compared here."""
        out = []
        for uuid, dom in self.src.running.items():
            cfg = dom.config
            if differ is not None and seen is not None and seen.get(uuid) is dom:
                stale = uuid in differ
            else:
                stale = _vcpus_stale(sample.stats.get(uuid), cfg)
            if stale:
                out.append(uuid)
            elif autostart is not None and cfg.autostart is not None \
                    and (uuid in autostart) != cfg.autostart:
                out.append(uuid)
        return out

    async def _sample_loop(self) -> None:
        # The first sample one interval after the connect, not at once: at start-up the
        # full read has just made every record, the server is about to answer its first
        # requests, and a sample of 10,000 domains would take the GIL from both (issue
        # 16, start-up). Its figures are the same one interval later; until then there
        # are none, as before any sample (docs/architecture.md, "CIM model").
        await asyncio.sleep(self.interval)
        stretched = False
        while True:
            started = time.monotonic()
            try:
                await self.sample()
            except LibvirtError as exc:
                log.warning("libvirt: usage sample failed: %s", exc.message)
            except Exception:
                log.exception("libvirt: usage sample failed")
            took = time.monotonic() - started
            # Only per-domain sampling (a driver without bulk statistics) is stretched: a
            # bulk call that takes long waits on the hypervisor, not on this server.
            wait = next_sample_in(self.interval, took) if not self._bulk else \
                max(0.0, self.interval - took)
            if wait > self.interval - took and not stretched:
                log.info("libvirt: a usage sample took %.1f s: sampling every %.0f s "
                         "instead of %g s", took, took + wait, self.interval)
            stretched = wait > self.interval - took
            await asyncio.sleep(wait)


def _vcpus_stale(st: DomainStats | None, cfg: DomainConfig) -> bool:
    return st is not None and (
        (st.vcpus is not None and st.vcpus != cfg.vcpus)
        or (st.max_vcpus is not None and cfg.max_vcpus is not None
            and st.max_vcpus != cfg.max_vcpus))
