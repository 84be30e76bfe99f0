"""The host's resources beside its domains: capacity, storage pools, networks, usage.

The libvirt source feeds it (domain.sources.ResourceFeed): everything in full at each
connect, then one pool or network at a time on libvirt's storage-pool and network
events, and one usage sample of every running domain per metrics interval. Readers
(the pool and metric providers) only read what is here; nothing asks libvirt on their
behalf. Not thread-safe: everything runs on the asyncio loop.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..domain.records import DomainStats, HostCapacity, Network, StatsSample, StoragePool

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Usage:
    """One running domain's usage over the last sampling interval.

    `time` is when the newer sample was taken (wall clock); `duration` the seconds
    since the one before (None for a domain seen in one sample only, whose interval
    figures are None too). Byte counts are what moved during the interval."""
    time: float
    duration: float | None
    cpu_percent: float | None = None
    memory_kib: int | None = None
    disk_read_bytes: int | None = None
    disk_write_bytes: int | None = None
    net_rx_bytes: int | None = None
    net_tx_bytes: int | None = None


def _delta(new: int | None, old: int | None) -> int | None:
    """What a counter moved; None when unknown or reset (the domain restarted)."""
    if new is None or old is None or new < old:
        return None
    return new - old


def usage_between(old: DomainStats | None, new: DomainStats, old_mono: float | None,
                  new_mono: float, time: float) -> Usage:
    """Usage from two samples of one domain (pure; `old` None: the first sample)."""
    duration = new_mono - old_mono if old is not None and old_mono is not None else None
    if old is None or not duration or duration <= 0:
        return Usage(time, None, memory_kib=new.memory_used_kib)
    cpu = _delta(new.cpu_time_ns, old.cpu_time_ns)
    percent = None
    if cpu is not None:
        percent = min(100.0, round(cpu / (duration * 1e9 * max(new.vcpus or 1, 1)) * 100, 2))
    return Usage(time, duration, cpu_percent=percent, memory_kib=new.memory_used_kib,
                 disk_read_bytes=_delta(new.block_rd_bytes, old.block_rd_bytes),
                 disk_write_bytes=_delta(new.block_wr_bytes, old.block_wr_bytes),
                 net_rx_bytes=_delta(new.net_rx_bytes, old.net_rx_bytes),
                 net_tx_bytes=_delta(new.net_tx_bytes, old.net_tx_bytes))


class HostResources:
    """Capacity, storage pools and networks by name, and the last two usage samples.

    `subscribe(cb)` calls `cb(kind, name)` after a change: kind "host" (a full
    re-read, name ""), "pool", "network" or "sample". `version` moves with every change
    of capacity, pools or networks (not samples), so consumers can cache by it.
    """

    def __init__(self) -> None:
        self.capacity: HostCapacity | None = None
        self.pools: dict[str, StoragePool] = {}
        self.networks: dict[str, Network] = {}
        self.sample: StatsSample | None = None
        self.previous: StatsSample | None = None
        self.samples = 0                      # how many samples were taken (tests wait on it)
        self.sampling = 0.0                   # seconds between samples; 0: no sampling
        self.version = 0
        self._subscribers: list[Callable[[str, str], None]] = []

    # ---- the feed (domain.sources.ResourceFeed) -------------------------------------

    def set_host(self, capacity: HostCapacity | None, pools: Mapping[str, StoragePool],
                 networks: Mapping[str, Network]) -> None:
        if capacity == self.capacity and pools == self.pools and networks == self.networks:
            return
        if capacity is not None:
            self.capacity = capacity
        self.pools = dict(pools)
        self.networks = dict(networks)
        self._changed("host", "")

    def update_pool(self, name: str, pool: StoragePool | None) -> None:
        if self.pools.get(name) == pool:
            return
        if pool is None:
            del self.pools[name]
        else:
            self.pools[name] = pool
        self._changed("pool", name)

    def update_network(self, name: str, network: Network | None) -> None:
        if self.networks.get(name) == network:
            return
        if network is None:
            del self.networks[name]
        else:
            self.networks[name] = network
        self._changed("network", name)

    def set_sampling(self, interval: float) -> None:
        self.sampling = interval

    def set_sample(self, sample: StatsSample) -> None:
        """A new sample: it becomes current, the current one previous (O(1) here; usage
        is derived per domain when read)."""
        self.previous, self.sample = self.sample, sample
        self.samples += 1
        self._notify("sample", "")

    # ---- reads ------------------------------------------------------------------------

    def usage(self, uuid: str) -> Usage | None:
        """The usage of one running domain over the last interval; None when the last
        sample does not have it (not running then, or no sample yet)."""
        cur = self.sample
        stats = cur.stats.get(uuid) if cur is not None else None
        if cur is None or stats is None:
            return None
        prev = self.previous
        return usage_between(prev.stats.get(uuid) if prev is not None else None, stats,
                             prev.monotonic if prev is not None else None, cur.monotonic,
                             cur.time)

    def pool_of_path(self, path: str | None) -> StoragePool | None:
        """The storage pool whose target directory holds `path` (the longest match)."""
        if not path:
            return None
        best: StoragePool | None = None
        for pool in self.pools.values():
            root = (pool.path or "").rstrip("/")
            if root and path.startswith(root + "/") and (
                    best is None or len(root) > len((best.path or "").rstrip("/"))):
                best = pool
        return best

    def subscribe(self, callback: Callable[[str, str], None]) -> Callable[[], None]:
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)
        return unsubscribe

    def _changed(self, kind: str, name: str) -> None:
        self.version += 1
        self._notify(kind, name)

    def _notify(self, kind: str, name: str) -> None:
        for cb in tuple(self._subscribers):
            try:
                cb(kind, name)
            except Exception:            # a broken consumer must not break the source
                log.exception("host resources subscriber %r failed on %s %s", cb, kind, name)
