"""Usage samples read in slices and kept packed (issue 16; sources/libvirt_stats.py):
the counters are the ones the per-domain calls give, whatever the slice size; a packed
sample reads back exactly the DomainStats it was made of (unknowns, huge values); two
samples of the same domains share one index; the usage derived from packed samples is
the one derived from plain ones; and the first sample comes one interval after the
connect, not at it.
"""
from __future__ import annotations

import uuid as uuidlib

import libvirt
import pytest

try:
    from tests.support.lvserver import LibvirtServer
except ImportError:
    from support.lvserver import LibvirtServer  # type: ignore

from cim_provider.domain.records import DomainStats, StatsSample
from cim_provider.inventory.resources import HostResources, usage_between
from cim_provider.sources import libvirt_stats as ls

A, B, C = (str(uuidlib.UUID(int=i)) for i in (1, 2, 3))


def _row(stats: DomainStats) -> tuple:
    return tuple(getattr(stats, f) for f in ls.FIELDS)


def test_fields_are_domain_stats_in_order():
    assert ls.FIELDS == DomainStats.__slots__


def test_packed_reads_back_what_it_was_made_of():
    full = DomainStats(cpu_time_ns=2 * 10**18, vcpus=2, max_vcpus=4, memory_used_kib=1 << 40,
                       block_rd_bytes=0, block_wr_bytes=7, net_rx_bytes=8, net_tx_bytes=9)
    unknown = DomainStats(cpu_time_ns=5, vcpus=1)
    huge = DomainStats(cpu_time_ns=2**64 + 3, vcpus=1, net_rx_bytes=2**63)
    packed = ls.pack([(A, _row(full)), (B, _row(unknown)), (C, _row(huge))])
    assert dict(packed) == {A: full, B: unknown, C: huge}
    assert len(packed) == 3 and list(packed) == [A, B, C]
    assert A in packed and "nope" not in packed and packed.get("nope") is None
    assert packed.row(B) == _row(unknown) and packed.row("nope") is None
    with pytest.raises(KeyError):
        packed["nope"]


def test_the_same_domains_share_one_index():
    first = ls.pack([(A, (1,) * ls.WIDTH), (B, (2,) * ls.WIDTH)])
    again = ls.pack([(A, (3,) * ls.WIDTH), (B, (4,) * ls.WIDTH)], first)
    assert again.index is first.index
    assert again[A].cpu_time_ns == 3 and first[A].cpu_time_ns == 1
    other = ls.pack([(B, (5,) * ls.WIDTH), (A, (6,) * ls.WIDTH)], again)
    assert other.index is not again.index and other[A].cpu_time_ns == 6
    fewer = ls.pack([(A, (7,) * ls.WIDTH)], again)
    assert fewer.index is not again.index and B not in fewer


def test_slices_read_into_one_packer_are_the_whole_sample():
    """read_chunk adds slice after slice to one Packer: the rows of a later slice keep
    their own positions, odd values included (the `big` side table), and the UUID kept
    is the running record's own string object."""
    huge = (2**64, -1, None, 1, 2, 3, 4, 5)
    rows = [(str(uuidlib.UUID(int=100 + i)), (i,) * ls.WIDTH) for i in range(7)]
    rows[5] = (rows[5][0], huge)
    whole = ls.pack(rows)
    packer = ls.Packer()
    for i in range(0, len(rows), 3):
        for uuid, row in rows[i:i + 3]:
            packer.add(uuid, row)
    sliced = packer.finish()
    assert dict(sliced) == dict(whole) and list(sliced) == [u for u, _ in rows]
    assert sliced.row(rows[5][0]) == huge and set(sliced.big) == {(5, 0), (5, 1)}
    assert all(a is b for a, (b, _row) in zip(sliced, rows))
    assert len(sliced.packed) == ls.WIDTH * len(rows)


def test_usage_from_packed_samples_is_the_usage_from_plain_ones():
    old = DomainStats(cpu_time_ns=10 * 10**9, vcpus=2, memory_used_kib=100,
                      block_rd_bytes=1000, block_wr_bytes=0, net_rx_bytes=5, net_tx_bytes=7)
    new = DomainStats(cpu_time_ns=12 * 10**9, vcpus=2, memory_used_kib=150,
                      block_rd_bytes=3000, block_wr_bytes=10, net_rx_bytes=5, net_tx_bytes=9)
    plain, packed = HostResources(), HostResources()
    plain.set_sample(StatsSample(1000.0, 100.0, {A: old}))
    plain.set_sample(StatsSample(1002.0, 102.0, {A: new}))
    first = ls.pack([(A, _row(old))])
    packed.set_sample(StatsSample(1000.0, 100.0, first))
    packed.set_sample(StatsSample(1002.0, 102.0, ls.pack([(A, _row(new))], first)))
    assert packed.usage(A) == plain.usage(A) == usage_between(old, new, 100.0, 102.0, 1002.0)
    assert packed.usage(B) is None


def _expected(conn) -> dict[str, DomainStats]:
    """The counters asked one domain at a time (what the sampler gave before slices)."""
    out = {}
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        info = dom.info()
        mem = dom.memoryStats()
        out[dom.UUIDString()] = DomainStats(
            cpu_time_ns=info[4], vcpus=info[3],
            memory_used_kib=ls.memory_used(mem.get("actual", info[2]), mem.get("available"),
                                           mem.get("unused"), mem.get("rss")))
    return out


@pytest.fixture
def conn():
    c = libvirt.open("test:///default")
    doms = [c.createXML(f"<domain type='test'><name>slice-{i}</name><memory>{65536 * (i + 1)}"
                        f"</memory><vcpu>{i % 3 + 1}</vcpu><os><type>hvm</type></os></domain>",
                        0) for i in range(7)]
    yield c
    for dom in doms:
        dom.destroy()
    c.close()


@pytest.mark.parametrize("chunk", [1, 3, 250])
def test_slices_give_the_per_domain_counters(conn, monkeypatch, chunk):
    monkeypatch.setattr(ls, "CHUNK", chunk)
    got = ls.read_stats(conn, {})
    want = _expected(conn)
    assert set(got) == set(want) and len(got) == 8
    for uuid, stats in want.items():
        # cpu time moves between the two reads (the test driver's clock): all else equal
        assert got[uuid].cpu_time_ns >= stats.cpu_time_ns - 10**12
        assert _row(got[uuid])[1:] == _row(stats)[1:]


def test_first_sample_waits_one_interval():
    srv = LibvirtServer(metrics_interval=3600)
    try:
        assert srv.on_loop(lambda: srv.source.connected)
        assert srv.on_loop(lambda: srv.resources.samples) == 0
        srv.sample()                     # what the sampler does once the interval is over
        assert srv.on_loop(lambda: srv.resources.samples) == 1
        assert isinstance(srv.on_loop(lambda: srv.resources.sample.stats), ls.PackedStats)
    finally:
        srv.close()


def test_a_driver_without_bulk_counters_is_asked_per_domain_after_one_sample():
    """The test driver's bulk statistics have no CPU time: after one sample that shows
    it, slices are read with per-domain calls only; the figures stay the same."""
    srv = LibvirtServer(metrics_interval=3600)
    calls = []
    real = srv.libvirt.domainListGetStats

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    srv.libvirt.domainListGetStats = counting
    try:
        srv.sample()
        assert len(calls) == 1
        first = srv.on_loop(lambda: dict(srv.resources.sample.stats))
        srv.sample()
        srv.sample()
        assert len(calls) == 1
        again = srv.on_loop(lambda: dict(srv.resources.sample.stats))
        assert set(again) == set(first)
        for uuid, stats in again.items():
            assert (stats.vcpus, stats.memory_used_kib) == \
                (first[uuid].vcpus, first[uuid].memory_used_kib)
            assert stats.cpu_time_ns >= first[uuid].cpu_time_ns
    finally:
        del srv.libvirt.domainListGetStats
        srv.close()


def test_negative_counters_stay_what_they_were():
    odd = DomainStats(cpu_time_ns=5, vcpus=1, block_rd_bytes=-1, block_wr_bytes=-2)
    packed = ls.pack([(A, _row(odd)), (B, (None,) * ls.WIDTH)])
    assert packed[A] == odd and packed[B] == DomainStats()


NEXT_SAMPLE = [
    # (desc, interval, took, expected wait)
    ("a quick sample keeps the interval", 10.0, 0.05, 9.95),
    ("a fifth of the interval still keeps it", 10.0, 2.0, 8.0),
    ("a slower one stretches it to five times its length", 10.0, 3.5, 14.0),
    ("a sample longer than the interval", 10.0, 12.0, 48.0),
    ("nothing to wait for with no time taken", 1.0, 0.0, 1.0),
]


@pytest.mark.parametrize("desc, interval, took, expected", NEXT_SAMPLE)
def test_sampling_takes_at_most_a_fifth_of_the_time(desc, interval, took, expected):
    from cim_provider.sources.libvirt_host import next_sample_in
    wait = next_sample_in(interval, took)
    assert wait == pytest.approx(expected), desc
    assert took / (took + wait) <= 0.2 + 1e-9 or took + wait == pytest.approx(interval)


def test_per_domain_slices_are_paced(monkeypatch):
    """Slices answered by per-domain calls (the test driver's) are followed by a pause
    of PACE times their own duration, none after the last; the sample is complete."""
    from cim_provider.sources import libvirt_host
    monkeypatch.setattr(libvirt_host, "CHUNK", 2)
    pauses: list[float] = []

    async def pause(seconds: float) -> None:
        pauses.append(seconds)
    monkeypatch.setattr(libvirt_host, "_pause", pause)
    srv = LibvirtServer(metrics_interval=3600)
    doms = [srv.libvirt.createXML(f"<domain type='test'><name>paced-{i}</name><memory>65536"
                                  "</memory><os><type>hvm</type></os></domain>", 0)
            for i in range(4)]
    try:
        srv.wait(lambda: len(srv.source.running) == 5, what="the new domains' events")
        srv.sample()
        assert srv.on_loop(lambda: len(srv.resources.sample.stats)) == 5
        assert len(pauses) == 2 and all(p > 0 for p in pauses)       # 3 slices of <= 2
    finally:
        for dom in doms:
            dom.destroy()
        srv.close()
